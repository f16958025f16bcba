"""Every caller of a key sees the one recorded outcome, option objects merge field by field, and
a store that fails for a while does not cost a waiter its answer nor an owner its commit."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from agent_ledger import (
    ApprovalPendingError,
    CommitSucceeded,
    ConcurrencyOptions,
    Effect,
    EffectDeniedError,
    EffectLedger,
    EffectLedgerOptions,
    EffectStatus,
    EffectStoreError,
    EffectTimeoutError,
    RunOptions,
    StaleOptions,
)
from agent_ledger.stores.base import EffectStore

from .helpers import Calls, make_call, options, wait_for_status


class Failing(RuntimeError):
    """The handler's own error, which a caller whose commit was refused must not see."""


# -- a refused failure commit reports the recorded outcome, like a refused success commit ------


async def test_a_handler_that_fails_after_a_cancel_reports_the_cancel(
    ledger: EffectLedger,
) -> None:
    call = make_call()
    started, canceled = asyncio.Event(), asyncio.Event()

    async def handler(effect: Effect) -> Any:
        started.set()
        await canceled.wait()
        raise Failing("the charge API timed out")

    run = asyncio.ensure_future(ledger.run(call, handler, options()))
    await started.wait()
    assert await ledger.cancel(ledger.idem_key(call), "operator stopped it")
    canceled.set()
    with pytest.raises(EffectDeniedError) as caught:
        await run
    assert caught.value.status is EffectStatus.CANCELED
    assert caught.value.reason == "operator stopped it"


async def test_a_handler_that_fails_after_a_takeover_reports_the_new_owners_result(
    ledger: EffectLedger,
) -> None:
    call = make_call()
    first_started, second_done = asyncio.Event(), asyncio.Event()

    async def slow_then_fails(effect: Effect) -> Any:
        first_started.set()
        await second_done.wait()
        raise Failing("lost the connection to the provider")

    first = asyncio.ensure_future(ledger.run(call, slow_then_fails, options(10_000)))
    await first_started.wait()
    # A second caller finds the first owner stale (1 ms) and takes over.
    second = await ledger.run(call, Calls({"charged": 1}).async_handler, options(stale_ms=1))
    second_done.set()
    assert second == {"charged": 1}
    assert await first == {"charged": 1}
    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    assert effect is not None and effect.status is EffectStatus.SUCCEEDED


# -- option objects merge field by field --------------------------------------------------------


async def test_a_calls_requires_approval_false_wins_over_a_ledger_default_of_true(
    store: EffectStore,
) -> None:
    ledger = EffectLedger(
        EffectLedgerOptions(store=store, defaults=RunOptions(requires_approval=True))
    )
    calls = Calls("sent")
    assert await ledger.run(make_call(), calls.async_handler, RunOptions(requires_approval=False))
    assert calls.count == 1
    # ...and a call that sets nothing keeps the ledger's default.
    gated = make_call(n=2)
    waits_not = RunOptions(concurrency=ConcurrencyOptions(wait_timeout_ms=0))
    with pytest.raises(ApprovalPendingError):
        await ledger.run(gated, calls.async_handler, waits_not)
    assert calls.count == 1


async def test_nested_options_keep_the_ledger_defaults_the_call_did_not_set(
    store: EffectStore,
) -> None:
    defaults = RunOptions(concurrency=ConcurrencyOptions(wait_timeout_ms=150))
    ledger = EffectLedger(EffectLedgerOptions(store=store, defaults=defaults))
    call = make_call()
    assert (await ledger.begin(call)).claimed  # someone else holds it and never finishes
    given = RunOptions(concurrency=ConcurrencyOptions(initial_interval_ms=10))
    with pytest.raises(EffectTimeoutError) as caught:
        await ledger.run(call, Calls().async_handler, given)
    assert caught.value.timeout_ms == 150  # not the spec's 30 s


def test_option_merging_refuses_a_combination_that_is_invalid_as_a_whole() -> None:
    from agent_ledger.ledger import _resolve

    defaults = RunOptions(concurrency=ConcurrencyOptions(max_interval_ms=80))
    resolved = _resolve(defaults, RunOptions(stale=StaleOptions(after_ms=5)))
    assert resolved.concurrency.max_interval_ms == 80
    assert resolved.stale.after_ms == 5
    with pytest.raises(ValueError, match="initial_interval_ms"):
        _resolve(defaults, RunOptions(concurrency=ConcurrencyOptions(initial_interval_ms=100)))


# -- a store that fails for a while ---------------------------------------------------------------


class Flaky:
    """A real store whose reads, claims, waits and commits fail while ``failures`` > 0: what a
    restart or failover looks like to the ledger (a driver error chained)."""

    def __init__(self, store: EffectStore, failures: int = 0) -> None:
        self._store = store
        self.failures = failures
        self.failed = 0

    def _maybe_fail(self, operation: str) -> None:
        if self.failures > 0:
            self.failures -= 1
            self.failed += 1
            try:
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            except psycopg.OperationalError as exc:
                raise EffectStoreError(str(exc), operation=operation) from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def begin(self, new: Any) -> Any:
        return await self._store.begin(new)

    async def transition(self, idem_key: str, **kwargs: Any) -> Any:
        return await self._store.transition(idem_key, **kwargs)

    async def history(self, effect_id: str) -> Any:
        return await self._store.history(effect_id)

    async def get_by_idem_key(self, idem_key: str) -> Any:
        return await self._store.get_by_idem_key(idem_key)

    async def get(self, effect_id: str) -> Any:
        self._maybe_fail("get")
        return await self._store.get(effect_id)

    async def release(self, effect_id: str, **kwargs: Any) -> Any:
        return await self._store.release(effect_id, **kwargs)

    async def claim(self, effect_id: str, **kwargs: Any) -> Any:
        self._maybe_fail("claim")
        return await self._store.claim(effect_id, **kwargs)

    async def commit(self, effect_id: str, outcome: Any, **kwargs: Any) -> Any:
        self._maybe_fail("commit")
        return await self._store.commit(effect_id, outcome, **kwargs)

    async def wait_for_change(self, effect_id: str, timeout_s: float, since: float) -> Any:
        self._maybe_fail("wait_for_change")
        return await self._store.wait_for_change(effect_id, timeout_s, since)


async def test_a_waiter_rides_out_failing_reads_and_gets_the_owners_result(
    store: EffectStore,
) -> None:
    flaky = Flaky(store)
    ledger = EffectLedger(EffectLedgerOptions(store=flaky))
    call = make_call()
    owner = await ledger.begin(call)
    waiter = asyncio.ensure_future(ledger.run(call, Calls().async_handler, options(10_000)))
    await wait_for_status(ledger, ledger.idem_key(call), EffectStatus.PROCESSING)
    flaky.failures = 6  # the next six reads and waits fail, then the database is back
    while flaky.failures:
        await asyncio.sleep(0.01)
    assert await ledger.commit(owner.effect.id, CommitSucceeded({"sent": True}))
    assert await waiter == {"sent": True}
    assert flaky.failed == 6


async def test_a_waiter_raises_the_store_error_once_its_deadline_passes(
    store: EffectStore,
) -> None:
    flaky = Flaky(store)
    ledger = EffectLedger(EffectLedgerOptions(store=flaky))
    call = make_call()
    await ledger.begin(call)
    flaky.failures = 10**9  # never comes back
    with pytest.raises(EffectStoreError) as caught:
        await ledger.run(call, Calls().async_handler, options(200))
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)


async def test_an_owner_retries_a_failed_commit_and_the_tool_runs_once(
    store: EffectStore,
) -> None:
    flaky = Flaky(store)
    ledger = EffectLedger(EffectLedgerOptions(store=flaky))
    calls = Calls()

    async def charge(effect: Effect) -> Any:
        calls.effects.append(effect)
        flaky.failures = 3  # the commit fails three times, then lands
        return {"charged": 4500}

    assert await ledger.run(make_call(), charge, options(stale_ms=60_000)) == {"charged": 4500}
    assert calls.count == 1
    assert flaky.failed == 3
    assert await ledger.run(make_call(), charge, options()) == {"charged": 4500}  # a replay
    assert calls.count == 1
