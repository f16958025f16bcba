"""approve / deny / cancel / request_approval: True when they changed the effect, False when it
was not awaiting that decision, and terminal effects never change."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from agent_ledger import (
    ApprovalPendingError,
    CommitFailed,
    CommitSucceeded,
    Effect,
    EffectDeniedError,
    EffectError,
    EffectLedger,
    EffectNotFoundError,
    EffectStatus,
)

from .helpers import Calls, checked_history, make_call, never_called, options, wait_for_status

DECISIONS = ["approve", "deny", "cancel", "request_approval"]


async def _decide(ledger: EffectLedger, name: str, key: str) -> bool:
    method: Callable[..., Awaitable[bool]] = getattr(ledger, name)
    return await method(key)


async def _pending(ledger: EffectLedger) -> Effect:
    call = make_call()
    with pytest.raises(ApprovalPendingError):
        await ledger.run(call, never_called, options(0, requires_approval=True))
    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    assert effect is not None
    return effect


async def _succeeded(ledger: EffectLedger) -> Effect:
    begun = await ledger.begin(make_call())
    assert await ledger.commit(begun.effect.id, CommitSucceeded({"ok": 1}))
    return begun.effect


async def _failed(ledger: EffectLedger) -> Effect:
    begun = await ledger.begin(make_call())
    assert await ledger.commit(begun.effect.id, CommitFailed(EffectError("x", "y")))
    return begun.effect


async def _denied(ledger: EffectLedger) -> Effect:
    effect = await _pending(ledger)
    assert await ledger.deny(effect.idem_key, reason="no")
    return effect


async def _canceled(ledger: EffectLedger) -> Effect:
    begun = await ledger.begin(make_call())
    assert await ledger.cancel(begun.effect.idem_key, reason="stop")
    return begun.effect


TERMINAL: dict[str, Callable[[EffectLedger], Awaitable[Effect]]] = {
    "succeeded": _succeeded,
    "failed": _failed,
    "denied": _denied,
    "canceled": _canceled,
}


@pytest.mark.parametrize("status", list(TERMINAL))
async def test_terminal_effects_never_change(ledger: EffectLedger, status: str) -> None:
    made = await TERMINAL[status](ledger)
    before = await ledger.get_effect(made.id)
    assert before is not None
    assert before.status.value == status
    history = await ledger.store.history(made.id)

    for name in DECISIONS:
        assert await _decide(ledger, name, made.idem_key) is False, name
    assert await ledger.commit(made.id, CommitSucceeded("late")) is False
    assert await ledger.commit(made.id, CommitFailed(EffectError("late"))) is False
    assert await ledger.commit(made.id, CommitSucceeded("late"), fence=made.fence) is False

    assert await ledger.get_effect(made.id) == before
    assert await ledger.store.history(made.id) == history


@pytest.mark.parametrize("name", DECISIONS)
async def test_decision_on_unknown_key_raises_not_found(ledger: EffectLedger, name: str) -> None:
    key = "f" * 64

    with pytest.raises(EffectNotFoundError) as raised:
        await _decide(ledger, name, key)

    assert raised.value.key == key
    assert await ledger.find_by_idem_key(key) is None


async def test_decisions_on_a_pending_effect(ledger: EffectLedger) -> None:
    effect = await _pending(ledger)
    key = effect.idem_key

    assert await ledger.request_approval(key) is False  # already awaiting approval
    assert await ledger.approve(key) is True
    assert await ledger.approve(key) is False  # already approved
    assert await ledger.deny(key) is False  # too late to deny an approved effect
    assert await ledger.request_approval(key) is False
    current = await ledger.find_by_idem_key(key)
    assert current is not None
    assert current.status is EffectStatus.READY


async def test_approve_and_deny_of_a_processing_effect_return_false(ledger: EffectLedger) -> None:
    begun = await ledger.begin(make_call())
    key = begun.effect.idem_key

    assert await ledger.approve(key) is False
    assert await ledger.deny(key, reason="no") is False

    current = await ledger.get_effect(begun.effect.id)
    assert current is not None
    assert current.status is EffectStatus.PROCESSING
    assert await ledger.commit(begun.effect.id, CommitSucceeded("ok")) is True


async def test_deny_after_deny_returns_false_and_keeps_first_reason(ledger: EffectLedger) -> None:
    effect = await _pending(ledger)

    assert await ledger.deny(effect.idem_key, reason="first") is True
    assert await ledger.deny(effect.idem_key, reason="second") is False

    with pytest.raises(EffectDeniedError) as raised:
        await ledger.run(make_call(), never_called)
    assert raised.value.reason == "first"


async def test_cancel_of_a_processing_effect_refuses_its_owners_commit(
    ledger: EffectLedger,
) -> None:
    call = make_call()
    begun = await ledger.begin(call)

    assert await ledger.cancel(begun.effect.idem_key, reason="user gave up", actor="cli") is True
    assert await ledger.cancel(begun.effect.idem_key) is False

    assert await ledger.commit(begun.effect.id, CommitSucceeded("too late")) is False
    effect = await ledger.get_effect(begun.effect.id)
    assert effect is not None
    assert effect.status is EffectStatus.CANCELED
    assert effect.result is None
    assert effect.completed_at is not None
    assert effect.error is not None
    assert effect.error.message == "user gave up"
    assert await checked_history(ledger, effect) == [
        (None, "processing", "system", None),
        ("processing", "canceled", "cli", "user gave up"),
    ]


async def test_cancel_while_the_handler_runs(ledger: EffectLedger) -> None:
    """The running caller's result is dropped and it learns the effect was canceled."""
    call = make_call()
    key = ledger.idem_key(call)
    calls = Calls()

    async def handler(effect: Effect) -> Any:
        calls.effects.append(effect)
        assert await ledger.cancel(key, reason="operator stop") is True
        return "finished anyway"

    with pytest.raises(EffectDeniedError) as raised:
        await ledger.run(call, handler, options())

    assert raised.value.status is EffectStatus.CANCELED
    assert raised.value.reason == "operator stop"
    assert calls.count == 1
    effect = await ledger.find_by_idem_key(key)
    assert effect is not None
    assert effect.status is EffectStatus.CANCELED
    assert effect.result is None


async def test_cancel_of_a_waiting_approval(ledger: EffectLedger) -> None:
    call = make_call()
    key = ledger.idem_key(call)
    waiting = asyncio.create_task(
        ledger.run(call, never_called, options(5_000, requires_approval=True))
    )
    await wait_for_status(ledger, key, EffectStatus.REQUIRES_APPROVAL)

    assert await ledger.cancel(key, reason="obsolete") is True

    with pytest.raises(EffectDeniedError) as raised:
        await asyncio.wait_for(waiting, 5)
    assert raised.value.status is EffectStatus.CANCELED
    assert await ledger.approve(key) is False


async def test_cancel_of_an_approved_effect(ledger: EffectLedger) -> None:
    effect = await _pending(ledger)
    assert await ledger.approve(effect.idem_key) is True

    assert await ledger.cancel(effect.idem_key) is True

    current = await ledger.get_effect(effect.id)
    assert current is not None
    assert current.status is EffectStatus.CANCELED
    assert (await ledger.begin(make_call())).claimed is False
    with pytest.raises(EffectDeniedError):
        await ledger.run(make_call(), never_called)


async def test_request_approval_of_a_processing_effect_refuses_its_commit(
    ledger: EffectLedger,
) -> None:
    begun = await ledger.begin(make_call())

    assert await ledger.request_approval(begun.effect.idem_key) is True

    assert await ledger.commit(begun.effect.id, CommitSucceeded("x")) is False
    current = await ledger.get_effect(begun.effect.id)
    assert current is not None
    assert current.status is EffectStatus.REQUIRES_APPROVAL
