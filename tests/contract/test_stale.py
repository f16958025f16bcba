"""Stale takeover: an effect whose owner went quiet is claimed by exactly one later caller, and
the old owner's late commit is refused by the fence."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent_ledger import (
    Actor,
    CommitFailed,
    CommitSucceeded,
    Effect,
    EffectError,
    EffectLedger,
    EffectStatus,
    EffectTimeoutError,
)

from .helpers import (
    STALE_REASON,
    Calls,
    checked_history,
    make_call,
    never_called,
    options,
    wait_for_status,
)

#: Long enough that the new owner finishes well within it, so nobody takes over twice. The new
#: owner usually needs ~25 ms, but one CI run saw a SQLite write (an fsync on a busy disk) stall
#: past 300 ms, which rightly made a second waiter take over: the margin is for such stalls.
STALE_MS = 1_500


async def test_stale_effect_is_taken_over_by_exactly_one_caller(ledger: EffectLedger) -> None:
    call = make_call()
    old = await ledger.begin(call)  # the old owner begins and then goes quiet
    assert old.claimed is True
    old_fence = old.effect.fence
    late_commits: list[bool] = []
    calls = Calls()

    async def new_owner(effect: Effect) -> Any:
        calls.effects.append(effect)
        # The old owner wakes up while the new one works: both kinds of late commit fail.
        late_commits.append(await ledger.commit(effect.id, CommitSucceeded({"by": "old"})))
        late_commits.append(
            await ledger.commit(effect.id, CommitFailed(EffectError("old", "old")), fence=old_fence)
        )
        return {"by": "new"}

    results = await asyncio.gather(
        *(ledger.run(call, new_owner, options(10_000, stale_ms=STALE_MS)) for _ in range(20))
    )

    assert results == [{"by": "new"}] * 20
    assert calls.count == 1
    assert late_commits == [False, False]
    (taken,) = calls.effects
    assert taken.id == old.effect.id
    assert taken.fence > old_fence
    effect = await ledger.get_effect(old.effect.id)
    assert effect is not None
    assert effect.status is EffectStatus.SUCCEEDED
    assert effect.result == {"by": "new"}
    assert effect.dedup_count == 20
    # After the new owner finished, the old one still cannot overwrite its outcome.
    assert await ledger.commit(old.effect.id, CommitSucceeded({"by": "old"})) is False
    assert await ledger.commit(old.effect.id, CommitSucceeded("x"), fence=old_fence) is False
    assert await ledger.get_effect(old.effect.id) == effect
    assert await checked_history(ledger, effect) == [
        (None, "processing", "system", None),
        ("processing", "processing", "system", STALE_REASON),
        ("processing", "succeeded", "system", None),
    ]


async def test_owner_that_loses_its_effect_mid_run_reports_the_new_outcome(
    ledger: EffectLedger,
) -> None:
    """A run whose handler stalls past ``after_ms`` is taken over; its own result is dropped
    and it returns the outcome the ledger holds, so every caller sees the same answer."""
    call = make_call()
    key = ledger.idem_key(call)
    taken_over = asyncio.Event()
    calls = Calls()

    async def stalled(effect: Effect) -> Any:
        calls.effects.append(effect)
        await asyncio.wait_for(taken_over.wait(), 10)
        return "from the stalled owner"

    async def fresh(effect: Effect) -> Any:
        calls.effects.append(effect)
        taken_over.set()
        return "from the new owner"

    first = asyncio.create_task(ledger.run(call, stalled, options(10_000, stale_ms=100)))
    await wait_for_status(ledger, key, EffectStatus.PROCESSING)
    second = await ledger.run(call, fresh, options(10_000, stale_ms=100))

    assert second == "from the new owner"
    assert await asyncio.wait_for(first, 10) == "from the new owner"
    assert calls.count == 2
    assert calls.effects[1].fence > calls.effects[0].fence
    effect = await ledger.find_by_idem_key(key)
    assert effect is not None
    assert effect.result == "from the new owner"
    assert await checked_history(ledger, effect) == [
        (None, "processing", "system", None),
        ("processing", "processing", "system", STALE_REASON),
        ("processing", "succeeded", "system", None),
    ]


async def test_zero_after_ms_disables_takeover(ledger: EffectLedger) -> None:
    call = make_call()
    old = await ledger.begin(call)
    await asyncio.sleep(0.15)  # stale by any positive after_ms below

    with pytest.raises(EffectTimeoutError):
        await ledger.run(call, never_called, options(100, stale_ms=0))

    effect = await ledger.get_effect(old.effect.id)
    assert effect is not None
    assert effect.status is EffectStatus.PROCESSING
    assert effect.fence == old.effect.fence
    assert len(await ledger.store.history(effect.id)) == 1
    # The control: a positive after_ms does take the same effect over.
    assert await ledger.run(call, Calls(result="taken").async_handler, options(stale_ms=50)) == (
        "taken"
    )


async def test_effect_that_is_not_stale_yet_is_not_taken_over(ledger: EffectLedger) -> None:
    call = make_call()
    old = await ledger.begin(call)

    with pytest.raises(EffectTimeoutError):
        await ledger.run(call, never_called, options(100, stale_ms=60_000))

    assert await ledger.commit(old.effect.id, CommitSucceeded("mine")) is True
    assert await ledger.run(call, never_called) == "mine"


async def test_store_claim_of_a_stale_effect_raises_the_fence(ledger: EffectLedger) -> None:
    """The store rule under the ledger: one claim wins, the fence rises by one, and a commit
    with the old fence is refused while one with the new fence is accepted."""
    store = ledger.store
    old = await ledger.begin(make_call())
    # Claims are serialised by the store; every loser must still find the winner's claim fresh,
    # so after_ms is far longer than ten claims take even on a slow database.
    await asyncio.sleep(0.55)

    assert await store.claim(old.effect.id, stale_after_ms=0, actor=Actor("system")) is None
    claims = await asyncio.gather(
        *(store.claim(old.effect.id, stale_after_ms=500, actor=Actor("system")) for _ in range(10))
    )
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1
    (winner,) = winners
    assert winner.status is EffectStatus.PROCESSING
    assert winner.fence == old.effect.fence + 1

    stale_commit = await store.commit(
        old.effect.id, CommitSucceeded("old"), fence=old.effect.fence, actor=Actor("system")
    )
    assert stale_commit is None
    committed = await store.commit(
        old.effect.id, CommitSucceeded("new"), fence=winner.fence, actor=Actor("system")
    )
    assert committed is not None
    assert committed.result == "new"
