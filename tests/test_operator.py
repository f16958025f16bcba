"""Operator retry and resolve through Django: the services, the admin panel (Django test client,
CSRF enforced) and the API, with their permissions and every refusal. The store-level behaviour
on every store is in ``tests/contract/test_operator.py``."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import pytest
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.db import connections
from django.test import Client, override_settings
from django.urls import reverse
from rest_framework.test import APIClient

from agent_ledger import (
    Actor,
    CommitFailed,
    CommitSucceeded,
    EffectError,
    EffectLedgerValidationError,
    EffectNotFoundError,
    RunOptions,
    StaleOptions,
    ToolCall,
    services,
    signals,
)
from agent_ledger.models import Effect, EffectStatus, EffectTransition
from agent_ledger.stores.django import close_connections
from tests.ledger_rows import make_effect, make_user

pytestmark = pytest.mark.django_db

VIEW = "agent_ledger.view_effect"
RETRY = "agent_ledger.retry_effect"
RESOLVE = "agent_ledger.resolve_effect"
ANN = Actor("admin", name="Ann")


def failed(**fields: Any) -> Effect:
    effect = make_effect(status=EffectStatus.FAILED, **fields)
    Effect.objects.filter(pk=effect.pk).update(error={"message": "timed out", "code": "Timeout"})
    effect.refresh_from_db()
    return effect


def admin_url(name: str, effect: Effect) -> str:
    return reverse(f"admin:agent_ledger_effect_{name}", args=[effect.pk])


def api_url(name: str, effect: Effect | str) -> str:
    pk = effect.pk if isinstance(effect, Effect) else effect
    return reverse(f"agent_ledger_api:effect-{name}", args=[pk])


_users = itertools.count(1)


def logged_in(*perms: str, csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(make_user(f"user{next(_users)}", VIEW, *perms))
    return client


def api_client(*perms: str) -> APIClient:
    client = APIClient()
    client.force_authenticate(make_user(f"api{next(_users)}", VIEW, *perms))
    return client


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


# -- services ---------------------------------------------------------------------------------


def test_retry_reopens_and_keeps_the_old_error_and_the_operator_in_history() -> None:
    effect = failed()
    record = services.retry(effect.idem_key, actor=ANN, reason="bug fixed")
    assert record.changed and record.effect.status.value == "ready"
    effect.refresh_from_db()
    assert (effect.error, effect.completed_at) == (None, None)
    last = EffectTransition.objects.of_effect(effect.pk).last()
    assert last is not None
    assert (last.from_status, last.to_status, last.actor_label, last.actor_name, last.reason) == (
        "failed",
        "ready",
        "admin",
        "Ann",
        "bug fixed (previous error: [Timeout] timed out)",
    )
    assert not services.retry(effect.idem_key, actor=ANN, reason="again").changed


@pytest.mark.django_db(transaction=True)
def test_the_next_run_after_a_retry_runs_the_handler_and_signals_say_so() -> None:
    call = ToolCall(workflow_id="wf", tool="mail.send", args={"to": "a@example.com"})
    ledger = services.get_ledger()
    reopened: list[Any] = []

    def receiver(sender: Any, effect: Any, actor: Any, **kwargs: Any) -> None:
        reopened.append((effect.status.value, actor.name))

    def broken(effect: Any) -> Any:
        raise RuntimeError("smtp down")

    signals.effect_reopened.connect(receiver, weak=False)
    try:
        with pytest.raises(RuntimeError):
            asyncio.run(ledger.run(call, broken))
        key = ledger.idem_key(call)
        assert services.retry(key, actor=ANN, reason="smtp back").changed
        assert asyncio.run(ledger.run(call, lambda e: {"sent": True})) == {"sent": True}
    finally:
        signals.effect_reopened.disconnect(receiver)
        close_connections()
    assert reopened == [("ready", "Ann")]
    effect = Effect.objects.get(idem_key=key)
    assert [(t.from_status, t.to_status) for t in effect.transitions.order_by("at", "id")] == [
        (None, "processing"),
        ("processing", "failed"),
        ("failed", "ready"),
        ("ready", "processing"),
        ("processing", "succeeded"),
    ]


def test_resolve_records_the_outcome_and_raises_the_fence() -> None:
    effect = make_effect(status=EffectStatus.PROCESSING)
    record = services.resolve(
        effect.idem_key, CommitSucceeded({"charge": "ch_1"}), actor=ANN, reason="dashboard"
    )
    assert record.changed
    effect.refresh_from_db()
    assert (effect.status, effect.result, effect.fence) == ("succeeded", {"charge": "ch_1"}, 2)
    assert effect.completed_at is not None
    other = make_effect(status=EffectStatus.PROCESSING)
    services.resolve(
        other.idem_key, CommitFailed(EffectError("declined", "card")), actor=ANN, reason="r"
    )
    other.refresh_from_db()
    assert (other.status, other.error) == ("failed", {"message": "declined", "code": "card"})
    assert not services.resolve(
        effect.idem_key, CommitSucceeded(1), actor=ANN, reason="again"
    ).changed


def test_a_resolved_result_is_redacted() -> None:
    effect = make_effect(status=EffectStatus.PROCESSING, tool="stripe.charge")
    with override_settings(AGENT_LEDGER={**settings.AGENT_LEDGER, "REDACT": ["card.number"]}):
        services.resolve(
            effect.idem_key,
            CommitSucceeded({"card": {"number": "4242424242424242"}}),
            actor=ANN,
            reason="seen in the dashboard",
        )
    effect.refresh_from_db()
    assert effect.result == {"card": {"number": "[redacted]"}}


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda key: services.retry(key, actor=ANN, reason=""), "reason"),
        (lambda key: services.retry(key, actor=ANN, reason=None), "reason"),
        (lambda key: services.retry(123, actor=ANN, reason="r"), "idem_key"),
        (lambda key: services.resolve(key, "ok", actor=ANN, reason="r"), "outcome"),
        (lambda key: services.resolve(key, CommitSucceeded({1}), actor=ANN, reason="r"), "result"),
        (lambda key: services.resolve(key, CommitSucceeded(1), actor=ANN, reason=" "), "reason"),
    ],
)
def test_services_refuse_bad_input(call: Any, field: str) -> None:
    effect = make_effect(status=EffectStatus.PROCESSING)
    with pytest.raises(EffectLedgerValidationError) as caught:
        call(effect.idem_key)
    assert caught.value.field == field
    with pytest.raises(EffectNotFoundError):
        services.retry("f" * 64, actor=ANN, reason="r")


# -- admin --------------------------------------------------------------------------------------


def test_the_retry_panel_shows_to_those_who_may_retry_a_failed_effect() -> None:
    effect = failed()
    page = logged_in(RETRY).get(admin_url("change", effect)).content.decode()
    assert "agent-ledger-operator-retry" in page
    page = logged_in().get(admin_url("change", effect)).content.decode()
    assert "agent-ledger-operator-retry" not in page
    running = make_effect(status=EffectStatus.PROCESSING)
    page = logged_in(RESOLVE).get(admin_url("change", running)).content.decode()
    assert "agent-ledger-operator-resolve" in page and "agent-ledger-operator-retry" not in page


def test_retry_in_the_admin_records_the_user() -> None:
    effect = failed()
    client = logged_in(RETRY)
    response = client.post(admin_url("retry", effect), {"reason": "fixed in v2"}, follow=True)
    assert "Reopened" in " ".join(messages_of(response))
    effect.refresh_from_db()
    assert effect.status == "ready"
    last = EffectTransition.objects.of_effect(effect.pk).last()
    assert last is not None and last.actor_name.startswith("user") and last.actor_label == "admin"
    assert LogEntry.objects.filter(object_id=str(effect.pk)).exists()
    again = client.post(admin_url("retry", effect), {"reason": "twice"}, follow=True)
    assert "Not reopened" in " ".join(messages_of(again))


def test_admin_operator_views_need_post_csrf_a_reason_and_their_permission() -> None:
    effect = failed()
    assert logged_in(RETRY).get(admin_url("retry", effect)).status_code == 405
    assert logged_in(RESOLVE).post(admin_url("retry", effect), {"reason": "r"}).status_code == 403
    assert (
        logged_in(RETRY, csrf=True).post(admin_url("retry", effect), {"reason": "r"}).status_code
        == 403
    )
    response = logged_in(RETRY).post(admin_url("retry", effect), {"reason": ""}, follow=True)
    assert "reason" in " ".join(messages_of(response))
    effect.refresh_from_db()
    assert effect.status == "failed"
    running = make_effect(status=EffectStatus.PROCESSING)
    assert (
        logged_in(RETRY).post(admin_url("resolve", running), {"outcome": "failed"}).status_code
        == 403
    )


@pytest.mark.parametrize(
    ("form", "message", "status"),
    [
        (
            {"outcome": "succeeded", "result": '{"charge": "ch_1"}', "reason": "dashboard"},
            "Resolved",
            "succeeded",
        ),
        (
            {"outcome": "failed", "error_message": "declined", "error_code": "card", "reason": "r"},
            "Resolved",
            "failed",
        ),
        ({"outcome": "succeeded", "result": "{not json", "reason": "r"}, "not JSON", "processing"),
        ({"outcome": "maybe", "reason": "r"}, "outcome", "processing"),
        ({"outcome": "failed", "error_message": "", "reason": "r"}, "error.message", "processing"),
        (
            {"outcome": "failed", "error_message": "x", "result": "1", "reason": "r"},
            "result",
            "processing",
        ),
        ({"outcome": "succeeded", "reason": ""}, "reason", "processing"),
    ],
)
def test_resolve_in_the_admin(form: dict[str, str], message: str, status: str) -> None:
    running = make_effect(status=EffectStatus.PROCESSING)
    response = logged_in(RESOLVE).post(admin_url("resolve", running), form, follow=True)
    assert message in " ".join(messages_of(response))
    running.refresh_from_db()
    assert running.status == status


# -- API ----------------------------------------------------------------------------------------


def test_retry_over_the_api() -> None:
    effect = failed()
    response = api_client(RETRY).post(api_url("retry", effect), {"reason": "fixed"}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ready"
    assert body["history"][-1]["actor"]["label"] == "api"
    assert body["history"][-1]["reason"].startswith("fixed (previous error")
    again = api_client(RETRY).post(api_url("retry", effect), {"reason": "x"}, format="json")
    assert again.status_code == 409 and again.json()["status"] == "ready"


def test_resolve_over_the_api() -> None:
    running = make_effect(status=EffectStatus.PROCESSING)
    client = api_client(RESOLVE)
    body = {"outcome": "succeeded", "result": {"charge": "ch_1"}, "reason": "dashboard"}
    response = client.post(api_url("resolve", running), body, format="json")
    assert response.status_code == 200, response.content
    assert (response.json()["status"], response.json()["result"]) == (
        "succeeded",
        {"charge": "ch_1"},
    )
    assert client.post(api_url("resolve", running), body, format="json").status_code == 409
    other = make_effect(status=EffectStatus.PROCESSING)
    failed_body = {"outcome": "failed", "error": {"message": "declined"}, "reason": "r"}
    response = client.post(api_url("resolve", other), failed_body, format="json")
    assert response.json()["error"] == {"message": "declined", "code": None}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "reason"),
        ({"reason": ""}, "reason"),
        ({"reason": 5}, "reason"),
        ({"reason": "x" * 2001}, "reason"),
        ({"reason": "r", "reson": "typo"}, "reson"),
    ],
)
def test_the_api_refuses_bad_retry_bodies(body: dict[str, Any], field: str) -> None:
    response = api_client(RETRY).post(api_url("retry", failed()), body, format="json")
    assert response.status_code == 400 and field in response.json()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"outcome": "maybe", "reason": "r"}, "outcome"),
        ({"outcome": "failed", "reason": "r"}, "error"),
        ({"outcome": "succeeded", "error": {"message": "x"}, "reason": "r"}, "error"),
        ({"outcome": "failed", "error": {"message": "x"}, "result": 1, "reason": "r"}, "result"),
        ({"outcome": "failed", "error": {"message": ""}, "reason": "r"}, "error"),
        ({"outcome": "succeeded"}, "reason"),
    ],
)
def test_the_api_refuses_bad_resolve_bodies(body: dict[str, Any], field: str) -> None:
    running = make_effect(status=EffectStatus.PROCESSING)
    response = api_client(RESOLVE).post(api_url("resolve", running), body, format="json")
    assert response.status_code == 400 and field in response.json(), response.content


def test_the_api_checks_permissions_and_finds_effects() -> None:
    effect = failed()
    assert (
        api_client().post(api_url("retry", effect), {"reason": "r"}, format="json").status_code
        == 403
    )
    assert (
        api_client(RETRY)
        .post(api_url("resolve", effect), {"reason": "r"}, format="json")
        .status_code
        == 403
    )
    assert APIClient().post(
        api_url("retry", effect), {"reason": "r"}, format="json"
    ).status_code in (
        401,
        403,
    )
    missing = "00000000-0000-0000-0000-000000000000"
    assert (
        api_client(RETRY)
        .post(api_url("retry", missing), {"reason": "r"}, format="json")
        .status_code
        == 404
    )
    assert json.loads(
        api_client(RETRY).post(api_url("retry", effect), "nope", content_type="text/plain").content
    )


@pytest.mark.django_db(transaction=True)
def test_a_waiting_caller_receives_the_outcome_an_operator_resolved_over_the_api() -> None:
    """The owner is gone (begun, never committed); a caller waits with a long stale window;
    the operator resolves over the API; the caller returns that result, its handler unrun."""
    call = ToolCall(workflow_id="wf", tool="stripe.charge", args={"amount": 4500})
    ledger = services.get_ledger()
    begun = asyncio.run(ledger.begin(call))
    options = RunOptions(stale=StaleOptions(after_ms=600_000))

    async def wait_then_resolve() -> Any:
        waiter = asyncio.create_task(ledger.run(call, lambda e: "ran again", options))
        while (await ledger.get_effect(begun.effect.id)).dedup_count < 1:  # type: ignore[union-attr]
            await asyncio.sleep(0.005)

        def operator() -> int:
            try:
                body = {"outcome": "succeeded", "result": {"charge": "ch_9"}, "reason": "seen"}
                url = api_url("resolve", begun.effect.id)
                return int(api_client(RESOLVE).post(url, body, format="json").status_code)
            finally:
                connections.close_all()  # this thread's, before the test database goes

        assert await asyncio.to_thread(operator) == 200
        return await asyncio.wait_for(waiter, 10)

    try:
        assert asyncio.run(wait_then_resolve()) == {"charge": "ch_9"}
    finally:
        close_connections()
