"""The REST API: listing, filters, cursor pages, history, approve/deny and every refusal."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone
from rest_framework.authentication import BasicAuthentication, SessionAuthentication
from rest_framework.test import APIClient

from agent_ledger.api.views import EffectViewSet
from agent_ledger.keys import resource_canonical
from agent_ledger.models import Effect, EffectStatus
from agent_ledger.types import ResourceDescriptor
from tests.ledger_rows import PASSWORD, make_effect, make_user

pytestmark = pytest.mark.django_db

VIEW = "agent_ledger.view_effect"
APPROVE = "agent_ledger.approve_effect"
LIST = reverse("agent_ledger_api:effect-list")


def detail(effect: Effect | str, action: str = "") -> str:
    pk = effect.pk if isinstance(effect, Effect) else effect
    if action:
        return reverse(f"agent_ledger_api:effect-{action}", args=[pk])
    return reverse("agent_ledger_api:effect-detail", args=[pk])


def client_for(user: Any, **kwargs: Any) -> APIClient:
    client = APIClient(**kwargs)
    client.force_authenticate(user)
    return client


@pytest.fixture
def viewer() -> APIClient:
    return client_for(make_user("viewer", VIEW, staff=False))


@pytest.fixture
def approver_user() -> Any:
    return make_user("alice", VIEW, APPROVE, staff=False)


@pytest.fixture
def approver(approver_user: Any) -> APIClient:
    return client_for(approver_user)


# -- authentication and permissions ----------------------------------------------------------


@pytest.fixture
def basic_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A project whose DEFAULT_AUTHENTICATION_CLASSES start with Basic (read at import)."""
    monkeypatch.setattr(
        EffectViewSet, "authentication_classes", [BasicAuthentication, SessionAuthentication]
    )


@pytest.mark.parametrize("method", ["get", "post"])
def test_anonymous_gets_no_basic_challenge_unless_the_project_asks(method: str) -> None:
    """DRF's default classes put the session first: no challenge, so no browser login prompt
    whose credentials the browser would then send with cross-site requests too."""
    effect = make_effect()
    path = LIST if method == "get" else detail(effect, "approve")
    response = getattr(APIClient(), method)(path)
    assert response.status_code == 403
    assert "WWW-Authenticate" not in response


@pytest.mark.parametrize("method", ["get", "post"])
def test_a_basic_first_project_gets_a_basic_challenge(basic_first: None, method: str) -> None:
    effect = make_effect()
    path = LIST if method == "get" else detail(effect, "approve")
    response = getattr(APIClient(), method)(path)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Basic")


@pytest.mark.parametrize(("classes", "code"), [("default", 403), ("basic_first", 401)])
def test_bad_basic_credentials_are_refused(request: Any, classes: str, code: int) -> None:
    if classes == "basic_first":
        request.getfixturevalue("basic_first")
    make_user("viewer", VIEW)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Basic " + base64.b64encode(b"viewer:nope").decode())
    assert client.get(LIST).status_code == code


# -- ambient credentials: cross-site requests ------------------------------------------------


def basic_client(username: str = "alice") -> APIClient:
    client = APIClient()
    token = base64.b64encode(f"{username}:{PASSWORD}".encode()).decode()
    client.credentials(HTTP_AUTHORIZATION=f"Basic {token}")
    return client


def session_client(username: str = "alice") -> APIClient:
    client = APIClient()
    client.login(username=username, password=PASSWORD)
    return client


@pytest.mark.parametrize("action", ["approve", "deny"])
@pytest.mark.parametrize("login", [basic_client, session_client], ids=["basic", "session"])
@pytest.mark.parametrize(
    "headers",
    [
        {"HTTP_ORIGIN": "https://evil.example"},
        {"HTTP_ORIGIN": "null"},
        {"HTTP_ORIGIN": "http://testserver.evil.example"},
        {"HTTP_SEC_FETCH_SITE": "cross-site"},
        {"HTTP_SEC_FETCH_SITE": "same-site"},
    ],
    ids=["other-origin", "null-origin", "lookalike-origin", "fetch-cross-site", "fetch-same-site"],
)
def test_cross_site_decisions_with_ambient_credentials_are_refused(
    approver_user: Any, login: Any, headers: dict[str, str], action: str
) -> None:
    """A cross-site form POST (``text/plain``, empty body: no CORS preflight) carrying the
    browser's remembered Basic login or session changes nothing."""
    effect = make_effect()
    client = login()
    response = client.post(detail(effect, action), b"", content_type="text/plain", **headers)
    assert response.status_code == 403
    assert response.data["detail"].code == "cross_site_request"
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL
    assert effect.transitions.count() == 1


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl, a server: no browser headers at all
        {"HTTP_ORIGIN": "http://testserver"},
        {"HTTP_SEC_FETCH_SITE": "same-origin"},
        {"HTTP_ORIGIN": "https://ops.example.com"},
        {"HTTP_ORIGIN": "https://approvals.corp.example"},
    ],
    ids=["no-browser", "same-origin", "fetch-same-origin", "trusted", "trusted-wildcard"],
)
@override_settings(CSRF_TRUSTED_ORIGINS=["https://ops.example.com", "https://*.corp.example"])
def test_same_site_and_trusted_origins_may_decide(
    approver_user: Any, headers: dict[str, str]
) -> None:
    effect = make_effect()
    response = basic_client().post(detail(effect, "approve"), format="json", **headers)
    assert response.status_code == 200, response.data
    effect.refresh_from_db()
    assert effect.status == EffectStatus.READY


def test_non_ambient_credentials_are_not_limited_to_the_site(approver: APIClient) -> None:
    """A token (here: forced authentication) is sent by code that chose to, not by a browser."""
    effect = make_effect()
    response = approver.post(
        detail(effect, "approve"), format="json", HTTP_ORIGIN="https://other.example"
    )
    assert response.status_code == 200


def test_basic_authentication_works() -> None:
    make_user("viewer", VIEW)
    make_effect()
    client = APIClient()
    token = base64.b64encode(f"viewer:{PASSWORD}".encode()).decode()
    client.credentials(HTTP_AUTHORIZATION=f"Basic {token}")
    response = client.get(LIST)
    assert response.status_code == 200
    assert len(response.data["results"]) == 1


def test_session_authentication_needs_csrf_for_post(approver_user: Any) -> None:
    effect = make_effect()
    client = APIClient(enforce_csrf_checks=True)
    client.login(username="alice", password=PASSWORD)
    assert client.get(LIST).status_code == 200
    response = client.post(detail(effect, "approve"), {}, format="json")
    assert response.status_code == 403
    assert "CSRF" in response.data["detail"]


@pytest.mark.parametrize("path", ["list", "detail"])
def test_reading_needs_view_permission(path: str) -> None:
    effect = make_effect()
    client = client_for(make_user("nobody", staff=True))
    response = client.get(LIST if path == "list" else detail(effect))
    assert response.status_code == 403
    assert "view_effect" in response.data["detail"]


@pytest.mark.parametrize("action", ["approve", "deny"])
def test_deciding_needs_approve_permission(viewer: APIClient, action: str) -> None:
    effect = make_effect()
    response = viewer.post(detail(effect, action), {"reason": "x"}, format="json")
    assert response.status_code == 403
    assert "approve_effect" in response.data["detail"]
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL


def test_staff_and_superuser_flags_are_not_the_permission() -> None:
    effect = make_effect()
    staff = client_for(make_user("staff", staff=True))
    assert staff.post(detail(effect, "approve"), format="json").status_code == 403
    root = client_for(make_user("root", is_superuser=True))
    assert root.post(detail(effect, "approve"), format="json").status_code == 200


# -- list, filters, ordering, pages ----------------------------------------------------------


def test_list_shape(viewer: APIClient) -> None:
    now = timezone.now()
    make_effect(
        status=EffectStatus.SUCCEEDED,
        created_at=now,
        completed_at=now + timedelta(milliseconds=1500),
        result={"big": "x" * 100},
    )
    response = viewer.get(LIST)
    assert response.status_code == 200
    assert set(response.data) == {"next", "previous", "results"}  # cursor pages, no count
    (row,) = response.data["results"]
    assert row["status"] == "succeeded"
    assert row["duration_ms"] == 1500
    assert "args" not in row and "result" not in row  # the list stays light


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"status": "requires_approval"}, {"pending"}),
        ({"tool": "stripe.charge"}, {"charge"}),
        ({"workflow_id": "order-1"}, {"charge", "old"}),
        ({"created_after": "2024-01-01T00:00:00Z"}, {"pending", "charge"}),
        ({"created_before": "2024-01-01T00:00:00Z"}, {"old"}),
        (
            {"created_after": "2019-01-01T00:00:00Z", "created_before": "2021-01-01T00:00:00Z"},
            {"old"},
        ),
        ({"workflow_id": "order-1", "status": "succeeded"}, {"charge"}),
    ],
)
def test_filters(viewer: APIClient, params: dict[str, str], expected: set[str]) -> None:
    names = {
        make_effect(status=EffectStatus.REQUIRES_APPROVAL, workflow_id="deploy").pk: "pending",
        make_effect(
            status=EffectStatus.SUCCEEDED, workflow_id="order-1", tool="stripe.charge"
        ).pk: "charge",
        make_effect(
            status=EffectStatus.FAILED,
            workflow_id="order-1",
            created_at=timezone.now().replace(year=2020),
        ).pk: "old",
    }
    response = viewer.get(LIST, params)
    assert response.status_code == 200
    assert {names[Effect.objects.get(pk=r["id"]).pk] for r in response.data["results"]} == (
        expected
    )


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "bogus"}, "status"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"created_before": "2024-13-45"}, "created_before"),
        (
            {"created_after": "2024-02-01T00:00:00Z", "created_before": "2024-01-01T00:00:00Z"},
            "created_before",
        ),
        ({"tool": "x" * 256}, "tool"),
    ],
)
def test_bad_filters_are_400(viewer: APIClient, params: dict[str, str], field: str) -> None:
    response = viewer.get(LIST, params)
    assert response.status_code == 400
    assert field in response.data


def test_ordering_and_cursor_pages(viewer: APIClient) -> None:
    start = timezone.now() - timedelta(hours=1)
    made = [make_effect(created_at=start + timedelta(minutes=i)).pk for i in range(5)]
    seen: list[Any] = []
    page: str | None = LIST + "?page_size=2"
    while page:
        response = viewer.get(page)
        assert len(response.data["results"]) <= 2
        seen += [r["id"] for r in response.data["results"]]
        page = response.data["next"]
    assert seen == [str(pk) for pk in reversed(made)]  # newest first, each exactly once
    oldest_first = viewer.get(LIST, {"ordering": "created_at"}).data["results"]
    assert [r["id"] for r in oldest_first] == [str(pk) for pk in made]


def test_page_size_is_capped(viewer: APIClient) -> None:
    make_effect()
    assert viewer.get(LIST, {"page_size": 100_000}).status_code == 200


# -- retrieve --------------------------------------------------------------------------------


def test_retrieve_with_history(viewer: APIClient) -> None:
    effect = make_effect(args={"image": "app:v2"}, result=None)
    effect.transitions.create(
        from_status="requires_approval",
        to_status="denied",
        # Explicitly later: SQLite's Now() has millisecond text, the first row's microseconds.
        at=effect.created_at + timedelta(seconds=1),
        actor_label="admin",
        actor_name="bob",
        reason="no",
    )
    response = viewer.get(detail(effect))
    assert response.status_code == 200
    assert response.data["args"] == {"image": "app:v2"}
    assert [h["to_status"] for h in response.data["history"]] == ["requires_approval", "denied"]
    assert response.data["history"][1]["actor"] == {
        "label": "admin",
        "user_id": None,
        "name": "bob",
    }
    assert response.data["history"][1]["reason"] == "no"


@pytest.mark.parametrize("pk", ["00000000-0000-0000-0000-000000000000", "not-a-uuid"])
def test_retrieve_unknown_is_404(viewer: APIClient, pk: str) -> None:
    assert viewer.get(detail(pk)).status_code == 404


# -- approve and deny ------------------------------------------------------------------------


def test_approve(approver: APIClient, approver_user: Any) -> None:
    effect = make_effect()
    response = approver.post(detail(effect, "approve"), {"reason": "looks fine"}, format="json")
    assert response.status_code == 200
    assert response.data["status"] == "ready"
    last = response.data["history"][-1]
    assert last["actor"] == {"label": "api", "user_id": str(approver_user.pk), "name": "alice"}
    assert last["reason"] == "looks fine"
    effect.refresh_from_db()
    assert effect.status == EffectStatus.READY


def test_approve_with_an_empty_body(approver: APIClient) -> None:
    effect = make_effect()
    assert approver.post(detail(effect, "approve")).status_code == 200


def test_deny(approver: APIClient) -> None:
    effect = make_effect()
    response = approver.post(detail(effect, "deny"), {"reason": "not today"}, format="json")
    assert response.status_code == 200
    assert response.data["status"] == "denied"
    assert response.data["error"] == {"message": "not today", "code": "denied"}
    assert response.data["history"][-1]["reason"] == "not today"


@pytest.mark.parametrize("action", ["approve", "deny"])
def test_not_awaiting_approval_is_409_with_the_status(approver: APIClient, action: str) -> None:
    effect = make_effect(status=EffectStatus.SUCCEEDED)
    response = approver.post(detail(effect, action), format="json")
    assert response.status_code == 409
    assert response.data["status"] == "succeeded"
    assert response.data["code"] == "not_awaiting_approval"


def test_second_decision_is_409(approver: APIClient) -> None:
    effect = make_effect()
    assert approver.post(detail(effect, "approve"), format="json").status_code == 200
    response = approver.post(detail(effect, "deny"), {"reason": "late"}, format="json")
    assert response.status_code == 409
    assert response.data["status"] == "ready"


@pytest.mark.parametrize("action", ["approve", "deny"])
def test_unknown_effect_is_404(approver: APIClient, action: str) -> None:
    path = detail("00000000-0000-0000-0000-000000000000", action)
    assert approver.post(path, format="json").status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"reason": "x", "reson": "typo"}, "reson"),
        ({"reason": 42}, "reason"),
        ({"reason": True}, "reason"),
        ({"reason": ["a"]}, "reason"),
        ({"reason": "x" * 2001}, "reason"),
        (["reason"], "non_field_errors"),
    ],
)
@pytest.mark.parametrize("action", ["approve", "deny"])
def test_bad_body_is_400(approver: APIClient, action: str, body: Any, field: str) -> None:
    effect = make_effect()
    response = approver.post(detail(effect, action), body, format="json")
    assert response.status_code == 400
    assert field in response.data
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL


def test_malformed_json_is_400(approver: APIClient) -> None:
    effect = make_effect()
    response = approver.post(
        detail(effect, "approve"), "{not json", content_type="application/json"
    )
    assert response.status_code == 400


@pytest.mark.parametrize("action", ["approve", "deny"])
def test_get_on_a_decision_is_405(approver: APIClient, action: str) -> None:
    effect = make_effect()
    assert approver.get(detail(effect, action)).status_code == 405
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL


def test_list_and_retrieve_are_read_only(approver: APIClient) -> None:
    effect = make_effect()
    assert approver.post(LIST, {"tool": "x"}, format="json").status_code == 405
    assert approver.patch(detail(effect), {"status": "ready"}, format="json").status_code == 405
    assert approver.delete(detail(effect)).status_code == 405


def test_nobody_deletes_an_effect_through_the_api() -> None:
    """Deleting would reopen the key; not even a superuser with every permission can."""
    effect = make_effect()
    root = client_for(make_user("root", is_superuser=True))
    assert root.delete(detail(effect)).status_code == 405
    assert root.delete(LIST).status_code == 405
    assert Effect.objects.filter(pk=effect.pk).exists()
    assert effect.transitions.count() == 1


# -- hostile input ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [100_000, 1_000_000])
@pytest.mark.parametrize("action", ["approve", "deny"])
def test_deeply_nested_json_is_400(approver: APIClient, action: str, depth: int) -> None:
    effect = make_effect()
    for raw in ("[" * depth + "]" * depth, '{"reason": ' + "[" * depth + "]" * depth + "}"):
        response = approver.post(detail(effect, action), raw, content_type="application/json")
        assert response.status_code == 400
        assert "nested too deeply" in response.data["detail"]
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL


def cursor(query: str) -> str:
    return base64.b64encode(query.encode()).decode()


@pytest.mark.parametrize(
    "value",
    [
        "not-base64!",
        cursor("p=garbage"),
        cursor("p=2024-13-45 00:00:00"),
        cursor("p=\x00"),
        cursor("p=2024-01-01 00:00:00\x00"),
        cursor("o=abc"),
        cursor("r=x&p=1"),
        "\x00",
    ],
    ids=[
        "not-base64",
        "garbage",
        "bad-date",
        "nul",
        "date-then-nul",
        "bad-offset",
        "bad",
        "raw-nul",
    ],
)
def test_a_tampered_cursor_is_400(viewer: APIClient, value: str) -> None:
    make_effect()
    response = viewer.get(LIST, {"cursor": value})
    assert response.status_code == 400
    assert response.data == {"cursor": ["Invalid cursor."]}


def test_a_real_cursor_still_works(viewer: APIClient) -> None:
    start = timezone.now() - timedelta(hours=1)
    for minutes in range(3):
        make_effect(created_at=start + timedelta(minutes=minutes))
    first = viewer.get(LIST, {"page_size": 2}).data
    second = viewer.get(first["next"])
    assert second.status_code == 200
    assert len(second.data["results"]) == 1


@pytest.mark.parametrize("where", ["tool", "workflow_id"])
def test_a_nul_byte_in_an_api_filter_is_400(viewer: APIClient, where: str) -> None:
    assert viewer.get(LIST, {where: "a\x00b"}).status_code == 400


# -- effects keyed by a ResourceDescriptor ---------------------------------------------------


def resource_effect() -> Effect:
    descriptor = ResourceDescriptor(namespace="billing", type="invoice", id={"number": 42})
    return make_effect(resource_id_canonical=resource_canonical(descriptor))


def test_an_effect_keyed_by_a_resource_reads_in_list_and_detail(viewer: APIClient) -> None:
    effect = resource_effect()
    assert viewer.get(LIST).status_code == 200
    response = viewer.get(detail(effect))
    assert response.status_code == 200
    assert response.data["resource"] == {
        "namespace": "billing",
        "type": "invoice",
        "id": {"number": 42},
    }
    assert response.data["resource_id"] == {"number": 42}


@pytest.mark.parametrize("action", ["approve", "deny"])
def test_an_effect_keyed_by_a_resource_is_decided_once(approver: APIClient, action: str) -> None:
    effect = resource_effect()
    response = approver.post(detail(effect, action), {"reason": "ok"}, format="json")
    assert response.status_code == 200
    assert response.data["resource"]["namespace"] == "billing"
    again = approver.post(detail(effect, action), {"reason": "ok"}, format="json")
    assert again.status_code == 409


# -- approvers who may not read --------------------------------------------------------------


@pytest.mark.parametrize("action", ["approve", "deny"])
def test_an_approver_without_view_gets_the_outcome_only(action: str) -> None:
    effect = make_effect(args={"card": "4242 4242 4242 4242"})
    client = client_for(make_user("blind", APPROVE, staff=False))
    assert client.get(detail(effect)).status_code == 403
    response = client.post(detail(effect, action), {"reason": "no"}, format="json")
    assert response.status_code == 200
    status = "ready" if action == "approve" else "denied"
    assert response.data == {
        "id": str(effect.pk),
        "idem_key": effect.idem_key,
        "status": status,
        "status_label": str(EffectStatus(status).label),
    }
    assert "4242" not in response.content.decode()


def test_status_labels_match_the_admin(viewer: APIClient) -> None:
    for status in EffectStatus:
        effect = make_effect(status=status)
        assert viewer.get(detail(effect)).data["status_label"] == str(status.label)


# -- schema ----------------------------------------------------------------------------------


def test_openapi_schema(viewer: APIClient) -> None:
    response = APIClient().get(reverse("agent_ledger_api:schema"), {"format": "json"})
    assert response.status_code == 200
    schema = response.json()
    assert schema["servers"] == [{"url": "/api/ledger/"}]
    assert {"/effects/", "/effects/{id}/", "/effects/{id}/approve/", "/webhook/"} <= set(
        schema["paths"]
    )
    names = {p["name"] for p in schema["paths"]["/effects/"]["get"]["parameters"]}
    assert {"status", "tool", "workflow_id", "created_after", "created_before", "cursor"} <= names


def test_the_api_works_without_drf_spectacular() -> None:
    """The ``spectacular`` extra is optional: without it there is no schema route, and no error."""
    script = """
import sys
sys.modules["drf_spectacular"] = None  # as if not installed
import django
django.setup()
from django.test import Client
from django.test.utils import setup_test_environment
from django.urls import NoReverseMatch, reverse
setup_test_environment()
import agent_ledger.api.urls as urls
assert not urls.HAVE_SPECTACULAR
try:
    reverse("agent_ledger_api:schema")
except NoReverseMatch:
    pass
else:
    raise AssertionError("schema route without drf-spectacular")
response = Client().get(reverse("agent_ledger_api:effect-list"))
assert response.status_code == 403, response.status_code
print("ok")
"""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.strip() == "ok", result.stderr
