"""Expiry that fails closed: read time in a waiting run, the sweep, the notice sent once; the
edited effect followed by the waiting run; concurrent approvers of a quorum."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.db import close_old_connections, connection
from django.db.models.functions import Now

from agent_ledger import (
    ConcurrencyOptions,
    EffectDeniedError,
    RunOptions,
    ToolCall,
    services,
    signals,
)
from agent_ledger.errors import DecisionRefusedError
from agent_ledger.models import Effect, EffectStatus, EffectTransition
from agent_ledger.types import Actor
from tests.approval_rows import approver, expire_now, pending
from tests.surfaces import settings_with

pytestmark = pytest.mark.django_db(transaction=True)
RA = EffectStatus.REQUIRES_APPROVAL
QUICK = RunOptions(concurrency=ConcurrencyOptions(wait_timeout_ms=5_000, max_interval_ms=50))


def call(amount: int = 4500) -> ToolCall:
    return ToolCall(workflow_id="order-7", tool="stripe.refund", args={"amount": amount})


def test_the_django_ledger_applies_tools_and_sets_expires_at() -> None:
    with settings_with({"stripe.*": {"requires_approval": True, "expires_after": 3600}}):
        effect = services.get_ledger().propose_sync(call())
        row = Effect.objects.get(pk=effect.id)
        assert row.expires_at is not None
        assert timedelta(minutes=59) < row.expires_at - row.created_at <= timedelta(hours=1)
        assert effect.expires_at == row.expires_at


def test_a_waiting_run_sees_an_expired_request_as_denied() -> None:
    ran = []
    with settings_with({"stripe.*": {"requires_approval": True, "expires_after": 3600}}):
        ledger = services.get_ledger()
        effect = ledger.propose_sync(call())
        expire_now(Effect.objects.get(pk=effect.id))
        with pytest.raises(EffectDeniedError) as denied:
            ledger.run_sync(call(), lambda e: ran.append(e), QUICK)
    assert denied.value.code == "expired" and not ran
    row = Effect.objects.get(pk=effect.id)
    assert row.status == EffectStatus.DENIED and row.error["code"] == "expired"
    last = EffectTransition.objects.filter(effect=row).order_by("id").last()
    assert (last.actor_label, last.reason) == ("system", "approval expired")


def test_the_sweep_denies_expired_requests_in_batches() -> None:
    live, *old = pending(), pending(), pending(), pending()
    Effect.objects.filter(pk=live.pk).update(expires_at=Now() + timedelta(hours=1))
    for effect in old:
        expire_now(effect)
    denied: list[Any] = []
    signals.effect_denied.connect(
        receiver := lambda sender, effect, actor, **kw: denied.append(
            (effect.id, actor.label, effect.error.code)
        ),
        weak=False,
    )
    try:
        with settings_with():
            call_command(
                "agent_ledger_expire", "--batch-size", "2", stdout=__import__("io").StringIO()
            )
    finally:
        signals.effect_denied.disconnect(receiver)
    assert sorted(d[0] for d in denied) == sorted(str(e.pk) for e in old)
    assert {d[1:] for d in denied} == {("system", "expired")}
    assert Effect.objects.get(pk=live.pk).status == RA


def test_approval_expiring_is_sent_once() -> None:
    from agent_ledger import expiry

    soon, later = pending(), pending()
    Effect.objects.filter(pk=soon.pk).update(expires_at=Now() + timedelta(minutes=5))
    Effect.objects.filter(pk=later.pk).update(expires_at=Now() + timedelta(hours=5))
    heard: list[str] = []
    signals.approval_expiring.connect(
        receiver := lambda sender, effect, actor, **kw: heard.append(effect.id), weak=False
    )
    try:
        with settings_with({}, EXPIRING_NOTICE_BEFORE=600):
            assert expiry.notify_expiring() == 1
            assert expiry.notify_expiring() == 0
    finally:
        signals.approval_expiring.disconnect(receiver)
    assert heard == [str(soon.pk)]
    assert Effect.objects.get(pk=soon.pk).expiring_notified_at is not None


def test_the_waiting_run_receives_the_edited_calls_outcome() -> None:
    bob = approver("bob")
    seen: list[Any] = []
    with settings_with({"stripe.*": {"requires_approval": True, "allow_edit": True}}):
        ledger = services.get_ledger()
        effect = ledger.propose_sync(call(4500))
        services.approve(effect.idem_key, actor=Actor("api", bob.pk, "bob"), args={"amount": 450})
        # The agent runs (or was waiting on) the original key: it runs the edited call.
        result = ledger.run_sync(call(4500), lambda e: seen.append(e.args) or {"ok": e.args}, QUICK)
        assert result == {"ok": {"amount": 450}} and seen == [{"amount": 450}]
        # A replay of the original key answers with the edited call's stored outcome.
        assert ledger.run_sync(call(4500), lambda e: seen.append("again"), QUICK) == result
    assert seen == [{"amount": 450}]


def test_ledgered_functions_run_with_the_edited_arguments() -> None:
    from agent_ledger import ledgered

    bob = approver("bob")
    calls: list[int] = []

    @ledgered(tool="stripe.refund", workflow_id="order-9", requires_approval=True)
    def refund(amount: int) -> dict[str, int]:
        calls.append(amount)
        return {"refunded": amount}

    with settings_with({"stripe.*": {"allow_edit": True}}):
        effect = services.get_ledger().propose_sync(refund.tool_call(4500))
        services.approve(effect.idem_key, actor=Actor("api", bob.pk, "bob"), args={"amount": 450})
        assert refund(4500) == {"refunded": 450}
    assert calls == [450]


def test_concurrent_approvers_of_a_quorum() -> None:
    """Eight approvers race for a quorum of 3: exactly three approvals count, the effect is
    approved once, and the rest are told it is not awaiting approval any more (row lock)."""
    users = [approver(f"u{n}") for n in range(8)]
    effect = pending()
    barrier = threading.Barrier(len(users))
    outcomes: list[str] = []
    lock = threading.Lock()

    def decide(user: Any) -> None:
        try:
            barrier.wait()
            record = services.approve(effect.idem_key, actor=Actor("api", user.pk, user.username))
            result = "recorded" if record.changed else "late"
        except DecisionRefusedError as exc:
            result = exc.code
        finally:
            close_old_connections()
            connection.close()
        with lock:
            outcomes.append(result)

    with settings_with({"stripe.*": {"quorum": 3}}):
        threads = [threading.Thread(target=decide, args=(u,)) for u in users]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(outcomes) == ["late"] * 5 + ["recorded"] * 3
    history = EffectTransition.objects.filter(effect=effect).order_by("id")
    assert [(r.from_status, r.to_status) for r in history][1:] == [
        (RA, RA),
        (RA, RA),
        (RA, "ready"),
    ]
    assert len({r.actor_user_id for r in history[1:]}) == 3
    assert Effect.objects.get(pk=effect.pk).status == EffectStatus.READY


@pytest.mark.parametrize("how", ["sweep", "read time"])
def test_an_expiry_resumes_the_continuation_with_the_expired_outcome(how: str) -> None:
    """Fails closed and tells the agent: the continuation's resumer runs once, with a deny
    whose error code is ``expired``, through the resume machinery (inline backend here)."""
    from agent_ledger import resume

    heard: list[tuple[str, str, str | None]] = []

    def agent(effect: Any, decision: str) -> None:
        heard.append((effect.id, decision, effect.error.code if effect.error else None))

    resume.register("tests.expiry-agent", agent)
    try:
        with settings_with({"stripe.*": {"requires_approval": True, "expires_after": 3600}}):
            ledger = services.get_ledger()
            effect = ledger.propose_sync(
                call(), continuation={"resumer": "tests.expiry-agent", "order": 7}
            )
            expire_now(Effect.objects.get(pk=effect.id))
            if how == "sweep":
                call_command("agent_ledger_expire", stdout=__import__("io").StringIO())
            else:
                with pytest.raises(DecisionRefusedError):
                    services.approve(
                        effect.idem_key, actor=Actor("admin", approver("ann").pk, "ann")
                    )
    finally:
        resume.unregister("tests.expiry-agent")
    assert heard == [(effect.id, "deny", "expired")]
