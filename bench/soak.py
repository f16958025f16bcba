"""Soak: 16 callers for ``--minutes`` per target; server connections must stay flat.

    .venv/bin/python bench/soak.py [--minutes 10] [--targets ours-pg,ours-django]
    .venv/bin/python bench/soak.py --smoke        # 0.2 minutes, 1 s samples

Each caller loops: a fresh run, its replay, and every 10th time a failing handler and its replay
(error paths must give connections back too). Meanwhile ``pg_stat_activity`` is sampled every
``--interval`` seconds: all connections to the bench database, and the target's own (by
application_name); the target's own must not move after a warm-up (15% of the run, at most
30 s; connections opened lazily as callers start are not a leak). After the target closes,
its connections must be gone. Exit status 1 when a count moved, a connection was left behind,
or a call gave an unexpected answer.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not bench/

from psycopg import AsyncConnection  # noqa: E402

from bench.common import (  # noqa: E402
    APP_PREFIX,
    SCHEMA_OURS,
    bench_url,
    conninfo,
    ensure_database,
    setup_django,
    url_parts,
)
from bench.targets import Target, Unavailable  # noqa: E402

SAMPLE_SQL = """
SELECT count(*), count(*) FILTER (WHERE application_name = %s)
FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()
"""


async def sample(conn: AsyncConnection[Any], app: str, database: str) -> tuple[int, int]:
    row = await (await conn.execute(SAMPLE_SQL, (app, database))).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def soak_one(target: Target, args: argparse.Namespace, database: str) -> bool:
    app = f"{APP_PREFIX}:{target.name}"
    seconds = args.minutes * 60
    async with await AsyncConnection.connect(
        conninfo(app="soak-sampler"), autocommit=True
    ) as monitor:
        before = await sample(monitor, app, database)
        await target.setup()
        await target.open(pool_size=args.pool_size)
        await target.truncate()
        samples: list[tuple[float, int, int]] = []
        started = time.monotonic()
        work = asyncio.create_task(
            target.phase(
                {
                    "kind": "soak",
                    "prefix": f"soak{int(time.time())}",
                    "seconds": seconds,
                    "concurrency": args.concurrency,
                }
            )
        )
        try:
            while not work.done():
                total, mine = await sample(monitor, app, database)
                elapsed = time.monotonic() - started
                samples.append((elapsed, total, mine))
                if args.verbose:
                    print(f"   {elapsed:7.1f} s  bench db {total:3}  {target.name} {mine:3}")
                await asyncio.wait({work}, timeout=args.interval)
            result = work.result()
        finally:
            await target.close()
        leftover = (0, 0)
        for _ in range(50):  # closing is asynchronous on the server side: give it 5 s
            leftover = await sample(monitor, app, database)
            if leftover[1] == 0:
                break
            await asyncio.sleep(0.1)
    # Connections opened lazily while the callers start (Django's per-thread ones) are not a
    # leak: judge flatness after the warm-up.
    warm = min(30.0, 0.15 * seconds)
    steady = [s for s in samples if s[0] >= warm] or samples[-1:]
    mine_counts = [s[2] for s in steady]
    totals = [s[1] for s in steady]
    flat = max(mine_counts) == min(mine_counts)
    ok = flat and leftover[1] == 0 and not result["unexpected"]
    print(
        f"{target.name:12} {len(steady)} samples after {warm:.0f} s warm-up "
        f"({result['elapsed_s']:.0f} s in all): "
        f"{target.name} connections min {min(mine_counts)} max {max(mine_counts)} "
        f"({'flat' if flat else 'NOT FLAT'}); whole bench db min {min(totals)} max {max(totals)} "
        f"(before: {before[0]}); after close: {leftover[1]} left; "
        f"{result['ops']} calls ({result['ops'] / result['elapsed_s']:.0f}/s); "
        f"unexpected: {len(result['unexpected'])} {result['unexpected'][:3]}"
        f" -> {'OK' if ok else 'FAIL'}"
    )
    return ok


async def main_async(args: argparse.Namespace) -> int:
    from bench.run import TARGETS

    database = ensure_database(bench_url())
    await asyncio.to_thread(
        setup_django, SCHEMA_OURS, pool_size=args.pool_size, django_conn=args.django_conn
    )
    print(
        f"soak: {args.concurrency} callers, {args.minutes:g} min per target, "
        f"pool {args.pool_size}, "
        f"Django connections: {args.django_conn}, sample every {args.interval:g} s "
        f"(database {url_parts(bench_url())['dbname']})"
    )
    results = []
    for name in args.targets:
        try:
            target = TARGETS[name]()
        except Unavailable as exc:
            print(f"{name:12} skipped: {exc}")
            continue
        try:
            results.append(await soak_one(target, args, database))
        finally:
            shutdown = getattr(target, "shutdown", None)
            if shutdown is not None:
                await shutdown()
    return 0 if results and all(results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--interval", type=float, default=5, help="seconds between samples")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--pool-size", type=int, default=16)
    parser.add_argument("--targets", default="ours-pg,ours-django")
    parser.add_argument("--django-conn", choices=["pool", "persistent", "close"], default="pool")
    parser.add_argument("--smoke", action="store_true", help="0.2 minutes, 1 s samples")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every sample")
    args = parser.parse_args(argv)
    if args.smoke:
        args.minutes, args.interval = 0.2, 1.0
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
