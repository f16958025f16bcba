"""``requires_approval``: the handler waits for a human, and runs once only after approval."""

from __future__ import annotations

import asyncio

import pytest

from agent_ledger import (
    Actor,
    ApprovalPendingError,
    CommitSucceeded,
    EffectDeniedError,
    EffectLedger,
    EffectStatus,
)

from .helpers import Calls, checked_history, make_call, never_called, options, wait_for_status

APPROVAL = options(5_000, requires_approval=True)


async def test_run_waits_for_approval_then_runs_handler_once(ledger: EffectLedger) -> None:
    calls = Calls(result={"deployed": "app:v2"})
    call = make_call(workflow_id="deploy-prod", tool="k8s.deploy", image="app:v2")
    key = ledger.idem_key(call)

    waiting = asyncio.create_task(ledger.run(call, calls.async_handler, APPROVAL))
    pending = await wait_for_status(ledger, key)
    assert pending.status is EffectStatus.REQUIRES_APPROVAL
    await asyncio.sleep(0.05)  # give a broken ledger the chance to run the handler early
    assert calls.count == 0
    assert not waiting.done()

    admin = Actor("admin", user_id=7, name="Ada")
    assert await ledger.approve(key, actor=admin, reason="change window") is True

    assert await asyncio.wait_for(waiting, 5) == {"deployed": "app:v2"}
    assert calls.count == 1
    effect = await ledger.get_effect(pending.id)
    assert effect is not None
    assert effect.status is EffectStatus.SUCCEEDED
    assert effect.dedup_count == 0
    assert await checked_history(ledger, effect) == [
        (None, "requires_approval", "system", None),
        ("requires_approval", "ready", "admin", "change window"),
        ("ready", "processing", "system", None),
        ("processing", "succeeded", "system", None),
    ]
    history = await ledger.store.history(effect.id)
    assert history[1].actor == admin


async def test_deny_makes_waiting_run_raise_with_reason(ledger: EffectLedger) -> None:
    call = make_call(workflow_id="deploy-prod", tool="k8s.deploy", image="app:v2")
    key = ledger.idem_key(call)

    waiting = asyncio.create_task(ledger.run(call, never_called, APPROVAL))
    pending = await wait_for_status(ledger, key, EffectStatus.REQUIRES_APPROVAL)
    assert await ledger.deny(key, reason="Not authorized", actor="admin") is True

    with pytest.raises(EffectDeniedError) as raised:
        await asyncio.wait_for(waiting, 5)
    assert raised.value.reason == "Not authorized"
    assert raised.value.status is EffectStatus.DENIED
    assert raised.value.idem_key == key
    effect = await ledger.get_effect(pending.id)
    assert effect is not None
    assert effect.status is EffectStatus.DENIED
    assert effect.completed_at is not None
    assert effect.error is not None
    assert effect.error.message == "Not authorized"
    assert await checked_history(ledger, effect) == [
        (None, "requires_approval", "system", None),
        ("requires_approval", "denied", "admin", "Not authorized"),
    ]


async def test_no_decision_in_time_raises_approval_pending(ledger: EffectLedger) -> None:
    call = make_call()
    key = ledger.idem_key(call)

    with pytest.raises(ApprovalPendingError) as raised:
        await ledger.run(call, never_called, options(50, requires_approval=True))

    assert raised.value.idem_key == key
    assert raised.value.timeout_ms == 50
    effect = await ledger.find_by_idem_key(key)
    assert effect is not None
    assert effect.status is EffectStatus.REQUIRES_APPROVAL
    assert effect.completed_at is None


async def test_later_run_picks_up_an_approval_given_meanwhile(ledger: EffectLedger) -> None:
    calls = Calls(result="ran")
    call = make_call()
    key = ledger.idem_key(call)
    with pytest.raises(ApprovalPendingError):
        await ledger.run(call, never_called, options(0, requires_approval=True))

    assert await ledger.approve(key) is True
    assert (await wait_for_status(ledger, key)).status is EffectStatus.READY
    assert calls.count == 0

    assert await ledger.run(call, calls.async_handler, options(requires_approval=True)) == "ran"
    assert calls.count == 1
    assert await ledger.run(call, never_called, options(requires_approval=True)) == "ran"
    effect = await ledger.find_by_idem_key(key)
    assert effect is not None
    assert effect.dedup_count == 2


async def test_later_run_after_deny_raises(ledger: EffectLedger) -> None:
    call = make_call()
    key = ledger.idem_key(call)
    with pytest.raises(ApprovalPendingError):
        await ledger.run(call, never_called, options(0, requires_approval=True))
    assert await ledger.deny(key, reason="no") is True

    with pytest.raises(EffectDeniedError) as raised:
        await ledger.run(call, never_called, options(requires_approval=True))
    assert raised.value.reason == "no"


async def test_approval_of_one_call_does_not_let_other_args_through(ledger: EffectLedger) -> None:
    approved_call = make_call(amount=10)
    other_call = make_call(amount=10_000)
    calls = Calls(result="paid")
    with pytest.raises(ApprovalPendingError):
        await ledger.run(approved_call, never_called, options(0, requires_approval=True))
    assert await ledger.approve(ledger.idem_key(approved_call)) is True

    with pytest.raises(ApprovalPendingError) as raised:
        await ledger.run(other_call, calls.async_handler, options(100, requires_approval=True))

    assert raised.value.idem_key == ledger.idem_key(other_call)
    assert calls.count == 0
    other = await ledger.find_by_idem_key(ledger.idem_key(other_call))
    assert other is not None
    assert other.status is EffectStatus.REQUIRES_APPROVAL
    approved = await ledger.find_by_idem_key(ledger.idem_key(approved_call))
    assert approved is not None
    assert other.id != approved.id
    assert approved.status is EffectStatus.READY


async def test_call_without_approval_option_cannot_bypass_a_pending_approval(
    ledger: EffectLedger,
) -> None:
    call = make_call()
    with pytest.raises(ApprovalPendingError):
        await ledger.run(call, never_called, options(0, requires_approval=True))

    with pytest.raises(ApprovalPendingError):
        await ledger.run(call, never_called, options(100))

    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    assert effect is not None
    assert effect.status is EffectStatus.REQUIRES_APPROVAL


async def test_many_waiters_on_an_approved_key_run_the_handler_once(ledger: EffectLedger) -> None:
    calls = Calls(result={"n": 1})
    call = make_call()
    key = ledger.idem_key(call)

    waiters = [
        asyncio.create_task(ledger.run(call, calls.async_handler, APPROVAL)) for _ in range(20)
    ]
    await wait_for_status(ledger, key, EffectStatus.REQUIRES_APPROVAL)
    assert await ledger.approve(key, actor="admin") is True
    results = await asyncio.wait_for(asyncio.gather(*waiters), 10)

    assert results == [{"n": 1}] * 20
    assert calls.count == 1
    effect = await ledger.find_by_idem_key(key)
    assert effect is not None
    assert effect.dedup_count == 19
    assert await checked_history(ledger, effect) == [
        (None, "requires_approval", "system", None),
        ("requires_approval", "ready", "admin", None),
        ("ready", "processing", "system", None),
        ("processing", "succeeded", "system", None),
    ]


async def test_requested_approval_of_a_begun_effect(ledger: EffectLedger) -> None:
    """``request_approval`` parks a manually begun effect; after approval ``begin`` claims it."""
    call = make_call()
    key = ledger.idem_key(call)
    begun = await ledger.begin(call)
    assert begun.claimed is True

    assert await ledger.request_approval(key, actor="policy", reason="amount over limit") is True
    assert await ledger.request_approval(key) is False
    effect = await ledger.find_by_idem_key(key)
    assert effect is not None
    assert effect.status is EffectStatus.REQUIRES_APPROVAL

    assert await ledger.approve(key, actor="admin") is True
    again = await ledger.begin(call)
    assert again.claimed is True
    assert again.cached is False
    assert again.effect.status is EffectStatus.PROCESSING
    assert await ledger.commit(again.effect.id, CommitSucceeded({"ok": True})) is True
    effect = await ledger.get_effect(begun.effect.id)
    assert effect is not None
    assert effect.status is EffectStatus.SUCCEEDED
    assert await checked_history(ledger, effect) == [
        (None, "processing", "system", None),
        ("processing", "requires_approval", "policy", "amount over limit"),
        ("requires_approval", "ready", "admin", None),
        ("ready", "processing", "system", None),
        ("processing", "succeeded", "system", None),
    ]
