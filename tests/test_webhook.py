"""The signed approval webhook: signatures, timestamps, bodies, and decisions made twice."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from django.test import Client, override_settings
from django.urls import reverse

from agent_ledger import services
from agent_ledger.api.authentication import sign
from agent_ledger.models import Effect, EffectStatus, EffectTransition
from agent_ledger.types import Actor
from tests.ledger_rows import make_effect, make_user

pytestmark = pytest.mark.django_db

WEBHOOK = reverse("agent_ledger_api:webhook")
SECRETS = {"primary": "test-secret-0123456789", "old": "old-secret-0123456789"}
SIGNATURE = "HTTP_X_AGENT_LEDGER_SIGNATURE"
TIMESTAMP = "HTTP_X_AGENT_LEDGER_TIMESTAMP"


@pytest.fixture(autouse=True)
def secrets() -> Any:
    with override_settings(AGENT_LEDGER={"WEBHOOK_SECRETS": SECRETS}):
        yield


def post(
    body: Any,
    *,
    secret: str = SECRETS["primary"],
    timestamp: int | str | None = None,
    client: Client | None = None,
    content_type: str = "application/json",
    **headers: str,
) -> Any:
    """POST ``body`` (a dict to encode, or raw bytes) signed like an external approver would."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    signed = {TIMESTAMP: stamp, SIGNATURE: sign(secret, stamp, raw)}
    signed.update(headers)
    return (client or Client()).post(WEBHOOK, raw, content_type=content_type, **signed)


def decision(effect: Effect, kind: str = "approve", **fields: Any) -> dict[str, Any]:
    return {"decision": kind, "approver": "carol", "idem_key": effect.idem_key, **fields}


def last_transition(effect: Effect) -> EffectTransition:
    return effect.transitions.order_by("at", "id").last()


# -- decisions -------------------------------------------------------------------------------


def test_approve_by_idem_key() -> None:
    effect = make_effect()
    response = post(decision(effect, reason="ship it"))
    assert response.status_code == 200
    assert response.json() == {
        "result": "approved",
        "status": "ready",
        "effect_id": str(effect.pk),
        "idem_key": effect.idem_key,
    }
    row = last_transition(effect)
    assert (row.to_status, row.actor_label, row.actor_name) == ("ready", "webhook:primary", "carol")
    assert row.actor_user_id is None
    assert row.reason == "ship it"


def test_deny_by_effect_id() -> None:
    effect = make_effect()
    body = {"decision": "deny", "approver": "carol", "effect_id": str(effect.pk), "reason": "no"}
    response = post(body)
    assert response.status_code == 200
    assert response.json()["result"] == "denied"
    effect.refresh_from_db()
    assert effect.status == EffectStatus.DENIED
    assert effect.error == {"message": "no", "code": "denied"}


def test_a_rotated_secret_still_works_and_is_named() -> None:
    effect = make_effect()
    assert post(decision(effect), secret=SECRETS["old"]).status_code == 200
    assert last_transition(effect).actor_label == "webhook:old"


@pytest.mark.parametrize("kind", ["approve", "deny"])
def test_the_same_decision_twice_is_a_no_op_success(kind: str) -> None:
    effect = make_effect()
    assert post(decision(effect, kind)).status_code == 200
    rows = effect.transitions.count()
    response = post(decision(effect, kind))
    assert response.status_code == 200
    assert response.json()["result"] == f"already {'approved' if kind == 'approve' else 'denied'}"
    assert effect.transitions.count() == rows


def test_already_approved_even_after_the_tool_ran() -> None:
    effect = make_effect()
    services.approve(effect.idem_key, actor=Actor("admin", name="alice"))
    Effect.objects.filter(pk=effect.pk).update(status=EffectStatus.SUCCEEDED)
    response = post(decision(effect))
    assert response.status_code == 200
    assert response.json() == {
        "result": "already approved",
        "status": "succeeded",
        "effect_id": str(effect.pk),
        "idem_key": effect.idem_key,
    }


@pytest.mark.parametrize(("first", "then"), [("approve", "deny"), ("deny", "approve")])
def test_a_conflicting_decision_is_409(first: str, then: str) -> None:
    effect = make_effect()
    assert post(decision(effect, first)).status_code == 200
    response = post(decision(effect, then))
    assert response.status_code == 409
    assert response.json()["status"] == ("ready" if first == "approve" else "denied")


@pytest.mark.parametrize("kind", ["approve", "deny"])
def test_an_effect_that_never_waited_is_409(kind: str) -> None:
    effect = make_effect(status=EffectStatus.SUCCEEDED)
    response = post(decision(effect, kind))
    assert response.status_code == 409
    assert response.json()["status"] == "succeeded"


@pytest.mark.parametrize(
    "body",
    [
        {"idem_key": "0" * 64},
        {"effect_id": "00000000-0000-0000-0000-000000000000"},
    ],
)
def test_unknown_effect_is_404(body: dict[str, str]) -> None:
    make_effect()
    response = post({"decision": "approve", "approver": "carol", **body})
    assert response.status_code == 404


def test_no_csrf_and_no_session_needed() -> None:
    effect = make_effect()
    assert post(decision(effect), client=Client(enforce_csrf_checks=True)).status_code == 200


def test_a_session_is_not_a_signature() -> None:
    effect = make_effect()
    client = Client(enforce_csrf_checks=True)
    client.force_login(make_user("root", is_superuser=True))
    response = client.post(WEBHOOK, decision(effect), content_type="application/json")
    assert response.status_code == 401
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL


# -- refused: signature and timestamp --------------------------------------------------------


def assert_refused(response: Any, words: str, effect: Effect) -> None:
    assert response.status_code == 401, response.content
    assert words in response.json()["detail"]
    assert response["WWW-Authenticate"].startswith("HMAC-SHA256")
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL


def test_missing_signature() -> None:
    effect = make_effect()
    response = Client().post(
        WEBHOOK,
        decision(effect),
        content_type="application/json",
        **{TIMESTAMP: str(int(time.time()))},
    )
    assert_refused(response, "Missing X-Agent-Ledger-Signature", effect)


def test_missing_timestamp() -> None:
    effect = make_effect()
    raw = json.dumps(decision(effect)).encode()
    response = Client().post(
        WEBHOOK,
        raw,
        content_type="application/json",
        **{SIGNATURE: sign(SECRETS["primary"], "", raw)},
    )
    assert_refused(response, "Missing X-Agent-Ledger-Timestamp", effect)


def test_timestamp_not_a_number() -> None:
    effect = make_effect()
    assert_refused(post(decision(effect), timestamp="yesterday"), "Unix time", effect)


@pytest.mark.parametrize(("offset", "words"), [(-301, "old"), (301, "in the future")])
def test_stale_timestamp(offset: int, words: str) -> None:
    effect = make_effect()
    response = post(decision(effect), timestamp=int(time.time()) + offset)
    assert_refused(response, "Stale timestamp", effect)
    assert words in response.json()["detail"]


def test_tolerance_is_a_setting() -> None:
    effect = make_effect()
    settings = {"WEBHOOK_SECRETS": SECRETS, "WEBHOOK_TOLERANCE_SECONDS": 600}
    with override_settings(AGENT_LEDGER=settings):
        assert post(decision(effect), timestamp=int(time.time()) - 500).status_code == 200


def test_signature_with_an_unknown_secret() -> None:
    effect = make_effect()
    response = post(decision(effect), secret="someone-elses-secret-123")
    assert_refused(response, "Bad signature", effect)


def test_signature_of_another_body() -> None:
    effect = make_effect()
    stamp = str(int(time.time()))
    signed = sign(SECRETS["primary"], stamp, json.dumps(decision(effect, "deny")).encode())
    response = Client().post(
        WEBHOOK,
        json.dumps(decision(effect, "approve")),
        content_type="application/json",
        **{TIMESTAMP: stamp, SIGNATURE: signed},
    )
    assert_refused(response, "Bad signature", effect)


def test_signature_of_another_timestamp() -> None:
    effect = make_effect()
    raw = json.dumps(decision(effect)).encode()
    now = int(time.time())
    response = Client().post(
        WEBHOOK,
        raw,
        content_type="application/json",
        **{TIMESTAMP: str(now), SIGNATURE: sign(SECRETS["primary"], str(now - 1), raw)},
    )
    assert_refused(response, "Bad signature", effect)


@pytest.mark.parametrize("value", ["md5=abc", "sha256=", "deadbeef", "sha256=ünïcode"])
def test_malformed_signature(value: str) -> None:
    effect = make_effect()
    response = post(decision(effect), **{SIGNATURE: value})
    assert_refused(response, "ignature", effect)


@pytest.mark.parametrize(
    "configured",
    [{}, {"chat": ""}, {"chat": "short"}, {"chat": "x" * 15}, {"chat": None}, "not a dict"],
    ids=["none", "empty", "short", "15-chars", "not-a-string", "not-a-dict"],
)
def test_no_usable_secret_is_503_and_logged(
    configured: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """System checks do not run under gunicorn: an empty secret from a missing environment
    variable must not let a request signed with the empty key decide anything."""
    effect = make_effect()
    key = configured.get("chat") if isinstance(configured, dict) else None
    with override_settings(AGENT_LEDGER={"WEBHOOK_SECRETS": configured}):
        response = post(decision(effect), secret=key if isinstance(key, str) else "")
    assert response.status_code == 503
    assert response.json()["detail"] == "The approval webhook is not configured."
    assert any(
        r.levelname == "ERROR" and "WEBHOOK_SECRETS" in r.getMessage() for r in caplog.records
    )
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL
    assert effect.transitions.count() == 1


def test_a_short_secret_beside_a_good_one_is_never_used() -> None:
    effect = make_effect()
    with override_settings(AGENT_LEDGER={"WEBHOOK_SECRETS": {"chat": "", **SECRETS}}):
        assert_refused(post(decision(effect), secret=""), "matches none", effect)
        assert post(decision(effect)).status_code == 200


def test_get_is_not_a_decision() -> None:
    stamp = str(int(time.time()))
    response = Client().get(
        WEBHOOK, **{TIMESTAMP: stamp, SIGNATURE: sign(SECRETS["primary"], stamp, b"")}
    )
    assert response.status_code == 405


# -- refused: the body -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"decision": "maybe"}, "decision"),
        ({"decision": None}, "decision"),
        ({"approver": None}, "approver"),
        ({"approver": 7}, "approver"),
        ({"approver": "x" * 151}, "approver"),
        ({"reason": 42}, "reason"),
        ({"reason": "x" * 2001}, "reason"),
        ({"effect_id": "00000000-0000-0000-0000-000000000000"}, "idem_key"),
        ({"idem_key": None, "effect_id": "not-a-uuid"}, "effect_id"),
        ({"color": "blue"}, "color"),
    ],
)
def test_bad_body_is_400(change: dict[str, Any], field: str) -> None:
    effect = make_effect()
    body = {**decision(effect), **change}
    body = {k: v for k, v in body.items() if v is not None}
    response = post(body)
    assert response.status_code == 400, response.content
    assert field in response.json()
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL


def test_unknown_decision_says_which_ones_exist() -> None:
    effect = make_effect()
    response = post(decision(effect, "escalate"))
    assert response.status_code == 400
    assert response.json()["decision"] == ['Unknown decision "escalate"; use "approve" or "deny".']


def test_neither_key_nor_id_is_400() -> None:
    response = post({"decision": "approve", "approver": "carol"})
    assert response.status_code == 400
    assert "idem_key" in response.json()


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
def test_not_a_json_object_is_400(raw: bytes) -> None:
    assert post(raw).status_code == 400


@pytest.mark.parametrize("depth", [100_000, 1_000_000])
def test_deeply_nested_json_is_400(depth: int) -> None:
    """Nesting past Python's recursion limit raised RecursionError in the parser (a 500)."""
    effect = make_effect()
    for raw in (b"[" * depth + b"]" * depth, b'{"reason": ' + b"[" * depth + b"]" * depth + b"}"):
        response = post(raw)
        assert response.status_code == 400
        assert "nested too deeply" in response.json()["detail"]
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL


def test_a_nul_byte_in_the_reason_is_400() -> None:
    effect = make_effect()
    response = post(decision(effect, "deny", reason="no\x00way"))
    assert response.status_code == 400
    assert "reason" in response.json()
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL


def test_not_json_at_all_is_415() -> None:
    response = post(b"decision=approve", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415
