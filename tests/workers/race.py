"""Many coroutines of one process run the same calls; the spawning test starts several of these.

Each round every coroutine runs ``ToolCall(workflow_id=f"{prefix}-{round}", ...)``; the handler
counts itself in ``handler_runs``, sleeps ``--sleep-ms`` (so the others really find it processing)
and returns who ran it. With ``--barrier`` each round starts when the test releases it. Prints one
JSON line: per round, what every coroutine got back. ``--sleep-ms`` huge makes the "owner that
hangs" of the kill test; it announces itself through its ``handler_runs`` row.

``--replay-forever`` instead runs ``f"{prefix}-0"`` once, then replays it until killed,
printing ``replayed <n>`` once the n-th replay has returned (the SIGKILL test of replay counts).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from agent_ledger import (
    ConcurrencyOptions,
    EffectLedger,
    EffectLedgerOptions,
    RunOptions,
    StaleOptions,
    ToolCall,
)
from tests.workers.common import connect, open_store, parser, record_run, wait_at_barrier


def call_for(prefix: str, step: int) -> ToolCall:
    return ToolCall(workflow_id=f"{prefix}-{step}", tool="race.count", args={"round": step})


async def replay_forever(ledger: EffectLedger, call: ToolCall) -> None:
    """Finish ``call``, then replay it one call after another until the process is killed."""

    async def handler(effect: Any) -> Any:
        return {"pid": os.getpid()}

    first = await ledger.run(call, handler)
    print("ready", flush=True)
    replays = 0
    while True:
        assert await ledger.run(call, handler) == first
        replays += 1
        print(f"replayed {replays}", flush=True)


async def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--store", choices=["postgres", "django"], default="postgres")
    p.add_argument("--prefix", required=True)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--coroutines", type=int, default=25)
    p.add_argument("--barrier", type=int, default=0, help="advisory lock group; 0: none")
    p.add_argument("--sleep-ms", type=float, default=50)
    p.add_argument("--stale-ms", type=float, default=0)
    p.add_argument("--pool-size", type=int, default=4)
    p.add_argument("--replay-forever", action="store_true")
    args = p.parse_args()

    run_options = RunOptions(
        concurrency=ConcurrencyOptions(
            wait_timeout_ms=30_000, initial_interval_ms=50, max_interval_ms=200
        ),
        stale=StaleOptions(after_ms=args.stale_ms),
    )
    async with open_store(
        args.store,
        args.conninfo,
        args.schema,
        application_name=args.application_name,
        pool_size=args.pool_size,
    ) as store:
        ledger = EffectLedger(EffectLedgerOptions(store=store))
        if args.replay_forever:
            await replay_forever(ledger, call_for(args.prefix, 0))
        barrier = await connect(args.conninfo, args.schema) if args.barrier else None
        report: list[dict[str, Any]] = []
        for step in range(args.rounds):
            call = call_for(args.prefix, step)

            async def handler(effect: Any, workflow_id: str = call.workflow_id) -> Any:
                await record_run(args.conninfo, args.schema, workflow_id, effect.fence)
                await asyncio.sleep(args.sleep_ms / 1000)
                return {"pid": os.getpid(), "fence": effect.fence}

            if barrier is not None:
                await wait_at_barrier(barrier, args.barrier, step)
            outcomes = await asyncio.gather(
                *(ledger.run(call, handler, run_options) for _ in range(args.coroutines)),
                return_exceptions=True,
            )
            report.append(
                {
                    "workflow_id": call.workflow_id,
                    "results": [
                        {"error": repr(o)} if isinstance(o, BaseException) else o for o in outcomes
                    ],
                }
            )
        if barrier is not None:
            await barrier.close()
    print(json.dumps({"pid": os.getpid(), "rounds": report}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
