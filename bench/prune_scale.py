"""Retention at scale (issue 13, point 2): prune 1M effects / 3M history rows while the ledger
keeps working.

    .venv/bin/python bench/prune_scale.py [--batch-size 1000] [--baseline 10] [--callers 4]

Seeds 1,000,000 effects and 3,000,000 history rows (``bench/audit_scale.py``'s seed: 96 % of
them finished months ago) into schema ``bench_prune`` of the bench database, every run afresh
(a prune consumes it). Then a traffic process (its own interpreter, ``--callers`` coroutines on
``DjangoStore``) makes ledger calls the whole time: fresh ``run``s of new keys, and ``begin``s of
seeded keys, which the prune is deleting (each answers as a replay, or ``EffectPurgedError``
once pruned; an insert would mean a pruned key ran again). After ``--baseline`` seconds of
traffic alone, ``manage.py agent_ledger_prune --older-than 90d`` runs; the traffic goes on two
seconds past its end. Printed: the prune's time and rates, and the traffic's latency (median,
p95, p99, max) and throughput before and during the prune. Exit status 1 if a pruned key was
inserted again or a traffic call failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not bench/

import psycopg  # noqa: E402

from bench.audit_scale import (  # noqa: E402
    CHUNK,
    EFFECTS,
    SEED_EFFECTS_SQL,
    SEED_TRANSITIONS_SQL,
    TRANSITIONS_PER_EFFECT,
    _create_indexes,
    _secondary_indexes,
)
from bench.common import conninfo, ensure_database, machine_facts, setup_django  # noqa: E402

SCHEMA = "bench_prune"
#: Seeded keys the traffic begins again while they are pruned (``sha256('key-' || g)``).
PROBED_KEYS = 20_000


def seed() -> None:
    dsn = conninfo(schema=SCHEMA, app="prune-seed")
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE agent_ledger_effect, agent_ledger_effecttransition,"
            " agent_ledger_effecttombstone"
        )
        for _model, index in _secondary_indexes():
            conn.execute(
                psycopg.sql.SQL("DROP INDEX IF EXISTS {}").format(
                    psycopg.sql.Identifier(index.name)
                )
            )
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET session_replication_role = replica")
        conn.execute("SET maintenance_work_mem = '256MB'")
        for start in range(1, EFFECTS + 1, CHUNK):
            stop = min(start + CHUNK - 1, EFFECTS)
            with conn.transaction():
                conn.execute(SEED_EFFECTS_SQL, {"start": start, "stop": stop})
                conn.execute(
                    SEED_TRANSITIONS_SQL,
                    {"start": start, "stop": stop, "per": TRANSITIONS_PER_EFFECT},
                )
        conn.execute("SET session_replication_role = origin")
        _create_indexes()
        conn.execute("VACUUM (ANALYZE) agent_ledger_effect")
        conn.execute("VACUUM (ANALYZE) agent_ledger_effecttransition")
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM agent_ledger_effect),"
            " (SELECT count(*) FROM agent_ledger_effecttransition)"
        ).fetchone()
    assert counts is not None
    print(
        f"== seeded {counts[0]:,} effects, {counts[1]:,} history rows "
        f"({time.monotonic() - started:.0f} s)",
        flush=True,
    )


# -- the traffic process -------------------------------------------------------------------------


def traffic(callers: int) -> None:
    """Run until stdin closes; then print one JSON list of (start, kind, ms, outcome)."""
    setup_django(SCHEMA, pool_size=callers, django_conn="persistent")
    import hashlib
    import threading
    import uuid

    from agent_ledger import EffectPurgedError, ToolCall
    from agent_ledger.services import get_ledger
    from agent_ledger.stores.base import NewEffect
    from agent_ledger.types import SYSTEM, EffectStatus

    ledger = get_ledger()
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    samples: list[tuple[float, str, float, str]] = []

    async def caller(index: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            started = time.time()
            t0 = time.perf_counter()
            call = ToolCall(
                workflow_id=f"traffic-{index}", tool="t", args={"n": n, "r": os.getpid()}
            )
            try:
                await ledger.run(call, lambda effect: {"ok": True})
                outcome = "ok"
            except Exception as exc:
                outcome = f"error:{type(exc).__name__}"
            samples.append((started, "fresh run", (time.perf_counter() - t0) * 1000, outcome))
            g = 1 + (n * callers + index) * 997 % PROBED_KEYS
            key = hashlib.sha256(f"key-{g}".encode()).hexdigest()
            new = NewEffect(
                id=str(uuid.uuid4()),
                idem_key=key,
                workflow_id="probe",
                call_id=str(uuid.uuid4()),
                tool="t",
                status=EffectStatus.PROCESSING,
                args_canonical="{}",
                resource_id_canonical=None,
                actor=SYSTEM,
            )
            started = time.time()
            t0 = time.perf_counter()
            try:
                record = await ledger.store.begin(new)
                outcome = "INSERTED AGAIN" if record.created else "replay"
            except EffectPurgedError:
                outcome = "purged"
            except Exception as exc:
                outcome = f"error:{type(exc).__name__}"
            samples.append(
                (started, "begin of a pruned key", (time.perf_counter() - t0) * 1000, outcome)
            )

    async def main() -> None:
        await asyncio.gather(*(caller(i) for i in range(callers)))

    print("ready", flush=True)
    asyncio.run(main())
    print(json.dumps(samples), flush=True)


# -- the measurement -----------------------------------------------------------------------------


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def summary(samples: list[Any], start: float, end: float) -> list[str]:
    lines = []
    for kind in ("fresh run", "begin of a pruned key"):
        times = [ms for at, k, ms, _ in samples if k == kind and start <= at < end]
        if not times:
            continue
        rate = len(times) / (end - start)
        lines.append(
            f"   {kind:22} {len(times):7,} calls {rate:7.0f}/s"
            f"  median {statistics.median(times):6.1f}"
            f"  p95 {percentile(times, 0.95):6.1f}  p99 {percentile(times, 0.99):6.1f}"
            f"  max {max(times):7.1f} ms"
        )
    return lines


def measure(batch_size: int, baseline_s: float, callers: int) -> int:
    process = subprocess.Popen(
        [sys.executable, __file__, "--traffic", "--callers", str(callers)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert process.stdin is not None and process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    traffic_start = time.time()
    time.sleep(baseline_s)  # the bench's own pacing, not synchronisation
    from django.core.management import call_command

    prune_start = time.time()
    call_command("agent_ledger_prune", "--older-than", "90d", "--batch-size", str(batch_size))
    # (the command prints its progress at most once a second)
    prune_end = time.time()
    time.sleep(2)
    process.stdin.close()
    samples = json.loads(process.stdout.readline())
    process.wait(60)
    seconds = prune_end - prune_start
    with psycopg.connect(conninfo(schema=SCHEMA, app="prune-check"), autocommit=True) as conn:
        left = conn.execute(
            "SELECT (SELECT count(*) FROM agent_ledger_effect"
            "        WHERE workflow_id NOT LIKE 'traffic-%%'),"
            " (SELECT count(*) FROM agent_ledger_effecttombstone)"
        ).fetchone()
    assert left is not None
    pruned = left[1]
    print()
    print(
        f"prune: {pruned:,} effects and ~{pruned * TRANSITIONS_PER_EFFECT:,} history rows in "
        f"{seconds:.1f} s ({pruned / seconds:,.0f} effects/s, batches of {batch_size}); "
        f"{left[0]:,} seeded effects left (pending, approved or running: never pruned)"
    )
    print(f"traffic ({callers} coroutines on DjangoStore, one process):")
    print(f"  alone, {prune_start - traffic_start:.0f} s before the prune:")
    print("\n".join(summary(samples, traffic_start + 1, prune_start)))
    print(f"  during the prune ({seconds:.0f} s):")
    print("\n".join(summary(samples, prune_start, prune_end)))
    outcomes: dict[str, int] = {}
    for _, kind, _, outcome in samples:
        outcomes[f"{kind}: {outcome}"] = outcomes.get(f"{kind}: {outcome}", 0) + 1
    print("  outcomes: " + ", ".join(f"{k} {v:,}" for k, v in sorted(outcomes.items())))
    bad = [k for k in outcomes if "INSERTED" in k or "error" in k]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--baseline", type=float, default=10, help="seconds of traffic alone")
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--traffic", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.traffic:
        traffic(args.callers)
        return 0
    ensure_database()
    facts = machine_facts()
    print(
        f"machine: {facts['cpu']}; PostgreSQL {facts['postgresql']}; {facts['date']};"
        f" git {facts['git']}"
    )
    setup_django(SCHEMA, pool_size=2, django_conn="persistent")
    seed()
    return measure(args.batch_size, args.baseline, args.callers)


if __name__ == "__main__":
    sys.exit(main())
