"""Replays never call the handler: they return or raise the stored outcome and are counted."""

from __future__ import annotations

import pytest

from agent_ledger import (
    ApprovalPendingError,
    EffectDeniedError,
    EffectError,
    EffectFailedError,
    EffectLedger,
    EffectStatus,
)

from .helpers import Calls, checked_history, make_call, never_called, options


async def _dedup_count(ledger: EffectLedger, idem_key: str) -> int:
    effect = await ledger.find_by_idem_key(idem_key)
    assert effect is not None
    return effect.dedup_count


async def test_replay_of_success_returns_stored_result(ledger: EffectLedger) -> None:
    calls = Calls(result={"charge": "ch_1", "amount": 1000})
    call = make_call(amount=1000)
    key = ledger.idem_key(call)

    first = await ledger.run(call, calls.async_handler)
    assert await _dedup_count(ledger, key) == 0

    for expected_count in (1, 2, 3):
        assert await ledger.run(call, never_called) == first
        assert await _dedup_count(ledger, key) == expected_count
    assert calls.count == 1


async def test_replay_is_the_same_for_a_rebuilt_call_with_reordered_args(
    ledger: EffectLedger,
) -> None:
    await ledger.run(make_call(a=1, b={"x": 1, "y": 2}), Calls(result="first").async_handler)

    assert await ledger.run(make_call(b={"y": 2, "x": 1}, a=1), never_called) == "first"


async def test_replay_of_failure_raises_stored_error(ledger: EffectLedger) -> None:
    class Declined(Exception):
        code = "card_declined"

    call = make_call()
    key = ledger.idem_key(call)
    with pytest.raises(Declined):
        await ledger.run(call, Calls(error=Declined("insufficient funds")).async_handler)

    for expected_count in (1, 2):
        with pytest.raises(EffectFailedError) as raised:
            await ledger.run(call, never_called)
        assert raised.value.error == EffectError("insufficient funds", "card_declined")
        assert raised.value.code == "card_declined"
        assert raised.value.idem_key == key
        assert await _dedup_count(ledger, key) == expected_count


async def test_replay_of_denied_raises_denied_error(ledger: EffectLedger) -> None:
    call = make_call()
    key = ledger.idem_key(call)
    with pytest.raises(ApprovalPendingError):
        await ledger.run(call, never_called, options(0, requires_approval=True))
    assert await ledger.deny(key, reason="Not authorized") is True
    assert await _dedup_count(ledger, key) == 0

    for expected_count in (1, 2):
        with pytest.raises(EffectDeniedError) as raised:
            await ledger.run(call, never_called)
        assert raised.value.reason == "Not authorized"
        assert raised.value.status is EffectStatus.DENIED
        assert raised.value.idem_key == key
        assert await _dedup_count(ledger, key) == expected_count


async def test_replay_of_canceled_raises_denied_error_with_status(ledger: EffectLedger) -> None:
    call = make_call()
    key = ledger.idem_key(call)
    begun = await ledger.begin(call)
    assert await ledger.cancel(key, reason="workflow aborted") is True

    with pytest.raises(EffectDeniedError) as raised:
        await ledger.run(call, never_called)

    assert raised.value.status is EffectStatus.CANCELED
    assert raised.value.reason == "workflow aborted"
    assert await _dedup_count(ledger, key) == 1
    effect = await ledger.get_effect(begun.effect.id)
    assert effect is not None
    assert effect.status is EffectStatus.CANCELED
    assert await checked_history(ledger, effect) == [
        (None, "processing", "system", None),
        ("processing", "canceled", "system", "workflow aborted"),
    ]


async def test_replays_do_not_add_history(ledger: EffectLedger) -> None:
    call = make_call()
    await ledger.run(call, Calls(result=1).async_handler)
    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    assert effect is not None
    before = await ledger.store.history(effect.id)

    await ledger.run(call, never_called)
    await ledger.begin(call)

    assert await ledger.store.history(effect.id) == before
    after = await ledger.get_effect(effect.id)
    assert after is not None
    assert after.dedup_count == 2
    assert (after.status, after.result, after.completed_at) == (
        effect.status,
        effect.result,
        effect.completed_at,
    )
