"""The measured workload, identical for every target (standard library only).

Both the parent (``run.py``, for in-process targets) and the upstream driver (in its own
virtualenv, where this file is imported as a plain module) call ``run_phase`` with the target's
``run_one(fields, handler)``: one idempotent call of the target's ``ledger.run``. Every phase also
checks the answers, so a target cannot look fast by being wrong.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

#: What the throughput handler returns: a small dict, stored and replayed.
HANDLER_RESULT = {"ok": True, "message_id": "bench-1"}

RunOne = Callable[[dict[str, Any], Callable[[Any], Awaitable[Any]]], Awaitable[Any]]


def call_fields(prefix: str, index: int) -> dict[str, Any]:
    """The ToolCall fields of call ``index``: distinct args give distinct idempotency keys."""
    return {
        "workflow_id": f"bench-{prefix}",
        "tool": "slack.send_message",
        "args": {"channel": "#bench", "text": f"message {index}", "n": index},
    }


async def run_phase(run_one: RunOne, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one phase described by ``spec`` (JSON-able, so it can cross a process boundary)."""
    kind = spec["kind"]
    if kind in ("fresh", "replay"):
        return await _throughput(
            run_one, spec["prefix"], spec["n"], spec["concurrency"], fresh=kind == "fresh"
        )
    if kind == "same_key":
        return await _same_key(run_one, spec["prefix"], spec["callers"], spec["handler_ms"])
    if kind == "soak":
        return await _soak(run_one, spec["prefix"], spec["seconds"], spec["concurrency"])
    raise ValueError(f"unknown phase kind {kind!r}")


async def _throughput(
    run_one: RunOne, prefix: str, n: int, concurrency: int, *, fresh: bool
) -> dict[str, Any]:
    """``n`` calls on distinct keys: ``concurrency`` coroutines, each taking every c-th index."""
    calls = 0

    async def handler(effect: Any) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return HANDLER_RESULT

    wrong: list[Any] = []

    async def caller(start: int) -> None:
        for index in range(start, n, concurrency):
            result = await run_one(call_fields(prefix, index), handler)
            if result != HANDLER_RESULT:
                wrong.append(result)

    started = time.perf_counter()
    await asyncio.gather(*(caller(w) for w in range(min(concurrency, n))))
    elapsed = time.perf_counter() - started
    expected_calls = n if fresh else 0
    if wrong or calls != expected_calls:
        raise AssertionError(
            f"{'fresh' if fresh else 'replay'} phase {prefix!r}: handler ran {calls} times "
            f"(expected {expected_calls}); {len(wrong)} wrong results, first {wrong[:1]}"
        )
    return {"ops": n, "elapsed_s": elapsed, "ops_per_s": n / elapsed if elapsed else 0.0}


async def _same_key(
    run_one: RunOne, prefix: str, callers: int, handler_ms: float
) -> dict[str, Any]:
    """``callers`` calls of one key at once, the handler taking ``handler_ms``: wall time until
    all return. Exactly one handler call is allowed; everyone must get its result."""
    calls = 0

    async def slow(effect: Any) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(handler_ms / 1000)
        return {"slow": True, "prefix": prefix}

    fields = call_fields(prefix, 0)
    started = time.perf_counter()
    results = await asyncio.gather(
        *(run_one(fields, slow) for _ in range(callers)), return_exceptions=True
    )
    wall_ms = (time.perf_counter() - started) * 1000
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    wrong = [r for r in results if not isinstance(r, BaseException) and r != slow_result(prefix)]
    if errors or wrong or calls != 1:
        raise AssertionError(
            f"same-key phase {prefix!r}: handler ran {calls} times (expected 1); "
            f"{len(errors)} errors (first {errors[:1]}), {len(wrong)} wrong results"
        )
    return {"wall_ms": wall_ms, "handler_calls": calls, "callers": callers}


def slow_result(prefix: str) -> dict[str, Any]:
    return {"slow": True, "prefix": prefix}


class SoakToolError(Exception):
    """What the soak's failing handler raises; its replays must raise too (any error type)."""


async def _soak(run_one: RunOne, prefix: str, seconds: float, concurrency: int) -> dict[str, Any]:
    """``concurrency`` callers for ``seconds``: each loops fresh run, replay, and every 10th time
    a failing handler and its replay (error paths must give their connections back as well)."""
    deadline = time.monotonic() + seconds
    ops = 0
    unexpected: list[str] = []

    async def ok(effect: Any) -> dict[str, Any]:
        return HANDLER_RESULT

    async def fail(effect: Any) -> dict[str, Any]:
        raise SoakToolError("soak: the tool failed on purpose")

    async def caller(worker: int) -> None:
        nonlocal ops
        i = 0
        while time.monotonic() < deadline and len(unexpected) < 10:
            fields = call_fields(f"{prefix}-{worker}", i)
            try:
                for _ in range(2):
                    if await run_one(fields, ok) != HANDLER_RESULT:
                        unexpected.append(f"wrong result for {fields}")
                    ops += 1
                if i % 10 == 0:
                    failing = call_fields(f"{prefix}-{worker}-fail", i)
                    for _ in range(2):
                        try:
                            await run_one(failing, fail)
                        except Exception:
                            ops += 1
                        else:
                            unexpected.append(f"no error for {failing}")
            except Exception as exc:
                unexpected.append(f"{type(exc).__name__}: {exc}")
            i += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"ops": ops, "elapsed_s": elapsed, "unexpected": unexpected}
