"""Operator retry and resolve on every store (``agent_ledger.operator``)."""

from __future__ import annotations

import asyncio

import pytest

from agent_ledger import (
    Actor,
    CommitFailed,
    CommitSucceeded,
    EffectError,
    EffectFailedError,
    EffectLedger,
    EffectLedgerValidationError,
    EffectNotFoundError,
    EffectStatus,
)

from .helpers import Calls, checked_history, make_call, never_called, options, wait_for_status

ANN = Actor("admin", 7, "Ann")


async def test_a_retried_failed_effect_runs_again_as_a_new_attempt(ledger: EffectLedger) -> None:
    call = make_call(amount=1000)
    key = ledger.idem_key(call)
    broken = Calls(error=TimeoutError("upstream timed out"))
    with pytest.raises(TimeoutError):
        await ledger.run(call, broken.async_handler)
    with pytest.raises(EffectFailedError):
        await ledger.run(call, never_called)  # failed for good, until an operator steps in

    assert await ledger.retry(key, actor=ANN, reason="fixed the timeout in v2.3") is True
    reopened = await ledger.find_by_idem_key(key)
    assert reopened is not None
    assert (reopened.status, reopened.error, reopened.completed_at) == (
        EffectStatus.READY,
        None,
        None,
    )
    fixed = Calls(result={"charge": "ch_2"})
    assert await ledger.run(call, fixed.async_handler) == {"charge": "ch_2"}
    assert await ledger.run(call, never_called) == {"charge": "ch_2"}
    assert (broken.count, fixed.count) == (1, 1)

    effect = await ledger.find_by_idem_key(key)
    assert effect is not None and effect.fence == 2
    assert await checked_history(ledger, effect) == [
        (None, "processing", "system", None),
        ("processing", "failed", "system", None),
        (
            "failed",
            "ready",
            "admin",
            "fixed the timeout in v2.3 (previous error: [TimeoutError] upstream timed out)",
        ),
        ("ready", "processing", "system", None),
        ("processing", "succeeded", "system", None),
    ]
    history = await ledger.history(effect.id)
    assert (history[2].actor.user_id, history[2].actor.name) == (7, "Ann")


async def test_retry_applies_to_failed_effects_only(ledger: EffectLedger) -> None:
    call = make_call()
    await ledger.run(call, Calls(result=1).async_handler)
    assert await ledger.retry(ledger.idem_key(call), actor=ANN, reason="again") is False
    with pytest.raises(EffectNotFoundError):
        await ledger.retry("0" * 64, actor=ANN, reason="again")
    for reason in ("", "   ", None, 5, "x" * 2001):
        with pytest.raises(EffectLedgerValidationError) as caught:
            await ledger.retry(ledger.idem_key(call), actor=ANN, reason=reason)  # type: ignore[arg-type]
        assert caught.value.field == "reason"


@pytest.mark.parametrize("recorded", ["succeeded", "failed"])
async def test_resolving_an_orphaned_effect_answers_its_waiters(
    ledger: EffectLedger, recorded: str
) -> None:
    call = make_call(amount=4500)
    key = ledger.idem_key(call)
    owner = await ledger.begin(call)  # the owner then dies: nobody knows if the charge went out
    assert owner.claimed
    waiter = asyncio.create_task(ledger.run(call, never_called, options(wait_ms=10_000)))
    await wait_for_status(ledger, key, EffectStatus.PROCESSING)
    while (await ledger.find_by_idem_key(key)).dedup_count < 1:  # type: ignore[union-attr]
        await asyncio.sleep(0.005)  # the waiter has counted itself and waits

    outcome = (
        CommitSucceeded({"charge": "ch_found_in_dashboard"})
        if recorded == "succeeded"
        else CommitFailed(EffectError("card declined per the provider", "card_declined"))
    )
    reason = "checked the provider's dashboard"
    assert await ledger.resolve(key, outcome, actor=ANN, reason=reason) is True
    if recorded == "succeeded":
        assert await asyncio.wait_for(waiter, 10) == {"charge": "ch_found_in_dashboard"}
    else:
        with pytest.raises(EffectFailedError) as caught:
            await asyncio.wait_for(waiter, 10)
        assert caught.value.error == EffectError("card declined per the provider", "card_declined")

    # The old owner's late commit is refused: the fence rose.
    late = await ledger.commit(owner.effect.id, CommitSucceeded("late"), fence=owner.effect.fence)
    assert late is False
    effect = await ledger.find_by_idem_key(key)
    assert effect is not None and effect.fence == owner.effect.fence + 1
    assert (await checked_history(ledger, effect))[-1] == ("processing", recorded, "admin", reason)


async def test_resolve_applies_to_processing_effects_only(ledger: EffectLedger) -> None:
    call = make_call()
    await ledger.run(call, Calls(result=1).async_handler)
    key = ledger.idem_key(call)
    assert await ledger.resolve(key, CommitSucceeded(2), actor=ANN, reason="no") is False
    effect = await ledger.find_by_idem_key(key)
    assert effect is not None and effect.result == 1
    with pytest.raises(EffectLedgerValidationError) as caught:
        await ledger.resolve(key, "succeeded", actor=ANN, reason="no")  # type: ignore[arg-type]
    assert caught.value.field == "outcome"
    with pytest.raises(EffectLedgerValidationError) as caught:
        await ledger.resolve(key, CommitSucceeded({1, 2}), actor=ANN, reason="no")
    assert caught.value.field == "result"
    with pytest.raises(EffectLedgerValidationError) as caught:
        await ledger.resolve(key, CommitFailed(EffectError("  ")), actor=ANN, reason="no")
    assert caught.value.field == "error.message"
