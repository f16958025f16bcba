"""Many callers of one key at once: one handler call, one outcome, shared by everybody."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from agent_ledger import (
    Effect,
    EffectFailedError,
    EffectLedger,
    EffectStatus,
    EffectTimeoutError,
)

from .helpers import (
    Calls,
    checked_history,
    make_call,
    never_called,
    options,
    run_in_threads,
    wait_for_status,
)

CALLERS = 40


class Slow:
    """A handler that holds the effect until all ``others`` callers have arrived (each counted
    itself on the effect with its ``begin``), so every one of them really waits for it."""

    def __init__(
        self,
        ledger: EffectLedger,
        others: int,
        result: Any = None,
        error: Exception | None = None,
    ) -> None:
        self.ledger = ledger
        self.others = others
        self.calls = Calls(result=result, error=error)

    async def _all_arrived(self, effect: Effect) -> None:
        deadline = time.monotonic() + 60  # a hang guard, not a timing assumption
        while time.monotonic() < deadline:
            current = await self.ledger.get_effect(effect.id)
            if current is not None and current.dedup_count >= self.others:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"only some of {self.others} other callers arrived")

    async def async_handler(self, effect: Effect) -> Any:
        await self._all_arrived(effect)
        return await self.calls.async_handler(effect)

    def sync_handler(self, effect: Effect) -> Any:
        asyncio.run(self._all_arrived(effect))
        return self.calls.sync_handler(effect)


async def test_concurrent_callers_share_one_handler_call(ledger: EffectLedger) -> None:
    slow = Slow(ledger, CALLERS - 1, result={"id": "msg-1"})
    call = make_call()

    results = await asyncio.gather(
        *(ledger.run(call, slow.async_handler, options()) for _ in range(CALLERS))
    )

    assert slow.calls.count == 1
    assert results == [{"id": "msg-1"}] * CALLERS
    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    assert effect is not None
    assert effect.status is EffectStatus.SUCCEEDED
    assert effect.dedup_count == CALLERS - 1
    assert await checked_history(ledger, effect) == [
        (None, "processing", "system", None),
        ("processing", "succeeded", "system", None),
    ]


class Boom(Exception):
    code = "boom"


async def test_concurrent_callers_share_one_failure(ledger: EffectLedger) -> None:
    error = Boom("exploded")
    slow = Slow(ledger, CALLERS - 1, error=error)
    call = make_call()

    outcomes = await asyncio.gather(
        *(ledger.run(call, slow.async_handler, options()) for _ in range(CALLERS)),
        return_exceptions=True,
    )

    assert slow.calls.count == 1
    originals = [o for o in outcomes if o is error]
    replays = [o for o in outcomes if isinstance(o, EffectFailedError)]
    assert len(originals) == 1  # the caller whose handler raised gets its own exception
    assert len(replays) == CALLERS - 1
    assert {(r.error.message, r.code) for r in replays} == {("exploded", "boom")}


async def test_waiters_past_wait_timeout_get_timeout_error(ledger: EffectLedger) -> None:
    release = asyncio.Event()
    calls = Calls(result="late")

    async def blocked(effect: Effect) -> Any:
        await release.wait()
        return await calls.async_handler(effect)

    call = make_call()
    key = ledger.idem_key(call)
    owner = asyncio.create_task(ledger.run(call, blocked, options()))
    try:
        effect = await wait_for_status(ledger, key, EffectStatus.PROCESSING)
        outcomes = await asyncio.gather(
            *(ledger.run(call, never_called, options(50)) for _ in range(10)),
            return_exceptions=True,
        )
        assert all(isinstance(o, EffectTimeoutError) for o in outcomes), outcomes
        assert {(o.idem_key, o.timeout_ms) for o in outcomes} == {(key, 50)}  # type: ignore[union-attr]
        current = await ledger.get_effect(effect.id)
        assert current is not None
        assert current.status is EffectStatus.PROCESSING
    finally:
        release.set()
    assert await asyncio.wait_for(owner, 5) == "late"
    assert calls.count == 1


async def test_concurrent_callers_of_different_keys_each_run_once(ledger: EffectLedger) -> None:
    counts: dict[int, int] = {}
    lock = threading.Lock()

    def handler_for(n: int) -> Any:
        async def handler(effect: Effect) -> Any:
            with lock:
                counts[n] = counts.get(n, 0) + 1
            await asyncio.sleep(0.02)
            return {"n": n}

        return handler

    runs = [
        ledger.run(make_call(n=n), handler_for(n), options()) for n in range(8) for _ in range(5)
    ]
    results = await asyncio.gather(*runs)

    assert counts == dict.fromkeys(range(8), 1)
    assert results == [{"n": n} for n in range(8) for _ in range(5)]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_threads_with_their_own_loops_share_one_handler_call(
    ledger: EffectLedger, kind: str
) -> None:
    threads, per_thread = 4, 8
    slow = Slow(ledger, threads * per_thread - 1, result={"id": "msg-1"})
    handler = slow.async_handler if kind == "async" else slow.sync_handler
    call = make_call()

    async def caller(_: int) -> list[Any]:
        return await asyncio.gather(
            *(ledger.run(call, handler, options(10_000)) for _ in range(per_thread))
        )

    results = await asyncio.to_thread(run_in_threads, threads, caller)

    assert slow.calls.count == 1
    assert results == [[{"id": "msg-1"}] * per_thread] * threads
    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    assert effect is not None
    assert effect.dedup_count == threads * per_thread - 1


async def test_threads_with_their_own_loops_share_one_failure(ledger: EffectLedger) -> None:
    error = Boom("exploded")
    threads, per_thread = 4, 5
    slow = Slow(ledger, threads * per_thread - 1, error=error)
    call = make_call()

    async def caller(_: int) -> list[Any]:
        return await asyncio.gather(
            *(ledger.run(call, slow.sync_handler, options(10_000)) for _ in range(per_thread)),
            return_exceptions=True,
        )

    outcomes = [
        o for batch in await asyncio.to_thread(run_in_threads, threads, caller) for o in batch
    ]

    assert slow.calls.count == 1
    assert sum(o is error for o in outcomes) == 1
    assert sum(isinstance(o, EffectFailedError) for o in outcomes) == threads * per_thread - 1
