"""Helpers shared by the contract tests: only the ledger API and the store protocol."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from agent_ledger import (
    ConcurrencyOptions,
    Effect,
    EffectLedger,
    EffectStatus,
    RunOptions,
    StaleOptions,
    ToolCall,
    Transition,
)

#: The reason every store records on a ``processing -> processing`` stale takeover.
STALE_REASON = "stale takeover"


def make_call(workflow_id: str = "wf-1", tool: str = "mail.send", **args: Any) -> ToolCall:
    """A tool call with harmless defaults; keyword arguments become its args."""
    return ToolCall(workflow_id=workflow_id, tool=tool, args=args or {"to": "a@example.com"})


def options(
    wait_ms: float = 5_000,
    *,
    requires_approval: bool = False,
    stale_ms: float | None = None,
    interval_ms: float = 10,
) -> RunOptions:
    """Run options with short polling so tests finish fast on stores that cannot notify."""
    return RunOptions(
        requires_approval=requires_approval,
        concurrency=ConcurrencyOptions(
            wait_timeout_ms=wait_ms,
            initial_interval_ms=interval_ms,
            max_interval_ms=max(interval_ms, 50),
        ),
        stale=StaleOptions(after_ms=stale_ms) if stale_ms is not None else None,
    )


class Calls:
    """Counts handler calls (from any thread) and returns ``result`` or raises ``error``."""

    def __init__(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result = result
        self.error = error
        self.effects: list[Effect] = []
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.effects)

    def _enter(self, effect: Effect) -> None:
        with self._lock:
            self.effects.append(effect)

    def _outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result

    async def async_handler(self, effect: Effect) -> Any:
        self._enter(effect)
        await asyncio.sleep(0)
        return self._outcome()

    def sync_handler(self, effect: Effect) -> Any:
        self._enter(effect)
        return self._outcome()


def never_called(effect: Effect) -> Any:
    raise AssertionError(f"the handler must not run (effect {effect.id} {effect.status})")


async def wait_for_status(
    ledger: EffectLedger, idem_key: str, *statuses: EffectStatus, timeout_s: float = 5.0
) -> Effect:
    """Poll until the effect of ``idem_key`` exists (and has one of ``statuses``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        effect = await ledger.find_by_idem_key(idem_key)
        if effect is not None and (not statuses or effect.status in statuses):
            return effect
        if time.monotonic() > deadline:
            raise AssertionError(f"effect {idem_key} never reached {statuses}: {effect}")
        await asyncio.sleep(0.005)


def steps(history: list[Transition]) -> list[tuple[Any, ...]]:
    """History as comparable tuples: (from, to, actor label, reason)."""
    return [
        (t.from_status.value if t.from_status else None, t.to_status.value, t.actor.label, t.reason)
        for t in history
    ]


async def checked_history(ledger: EffectLedger, effect: Effect) -> list[tuple[Any, ...]]:
    """``steps`` of the effect's history, after checking what every history must satisfy."""
    history = await ledger.store.history(effect.id)
    assert all(t.effect_id == effect.id for t in history)
    assert [t.at for t in history] == sorted(t.at for t in history)
    assert history, "every effect has at least its creation row"
    assert history[0].from_status is None
    assert history[-1].to_status is effect.status
    # Each row starts where the previous one ended: no change went unrecorded.
    for before, after in itertools.pairwise(history):
        assert after.from_status is before.to_status
    return steps(history)


def run_in_threads(count: int, target: Callable[[int], Coroutine[Any, Any, Any]]) -> list[Any]:
    """Run ``target(i)`` in ``count`` OS threads, each with its own event loop; return results
    in thread order, re-raising the first exception any thread hit."""
    results: list[Any] = [None] * count
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def work(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[index] = asyncio.run(target(index))
        except BaseException as exc:  # re-raised in the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a worker thread hung"
    if errors:
        raise errors[0]
    return results
