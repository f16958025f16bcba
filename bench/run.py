"""Issue 5's benchmark: every target, interleaved round by round, reported as median ratios.

    .venv/bin/python bench/run.py [--rounds 5] [--n 300] [--quick] [--json out.json]

See ``bench/README.md`` for what each figure means and how round trips are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import traceback
from collections import defaultdict
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
    machine_facts,
    server_address,
    setup_django,
)
from bench.targets import (  # noqa: E402
    FloorTarget,
    OursDjangoTarget,
    OursPostgresTarget,
    Target,
    Unavailable,
    UpstreamTarget,
)
from bench.wire import WireCounter  # noqa: E402

TARGETS = {
    "floor": FloorTarget,
    "ours-pg": OursPostgresTarget,
    "ours-django": OursDjangoTarget,
    "upstream": UpstreamTarget,
}

#: (metric, label, unit)
THROUGHPUT = [
    ("fresh_seq", "fresh, sequential", "ops/s"),
    ("fresh_conc", "fresh, {c} callers", "ops/s"),
    ("replay_seq", "replay, sequential", "ops/s"),
    ("replay_conc", "replay, {c} callers", "ops/s"),
    ("same_key_ms", "{k} callers one key, {h} ms handler", "ms"),
]
COUNTS = [
    ("fresh", "statements", "statements / fresh run"),
    ("fresh", "round_trips", "round trips / fresh run"),
    ("fresh", "tx_control", "  of them BEGIN/COMMIT/SAVEPOINT..."),
    ("fresh", "rows_written", "rows written / fresh run (server)"),
    ("replay", "statements", "statements / replay"),
    ("replay", "round_trips", "round trips / replay"),
    ("replay", "tx_control", "  of them BEGIN/COMMIT/SAVEPOINT..."),
    ("replay", "rows_written", "rows written / replay (server)"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--n", type=int, default=300, help="calls per throughput phase")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent callers")
    parser.add_argument("--pool-size", type=int, default=16, help="connections per target")
    parser.add_argument("--callers", type=int, default=32, help="callers of the one key")
    parser.add_argument("--handler-ms", type=float, default=50, help="the slow handler's time")
    parser.add_argument("--same-key-reps", type=int, default=3, help="one-key runs per round")
    parser.add_argument(
        "--slices", type=int, default=5, help="alternating slices per throughput phase"
    )
    parser.add_argument("--count-ops", type=int, default=20, help="runs counted on the wire")
    parser.add_argument(
        "--targets",
        help=f"comma-separated, from {', '.join(TARGETS)} (default: all; --quick: no upstream)",
    )
    parser.add_argument(
        "--django-conn",
        choices=["pool", "persistent", "close"],
        default="pool",
        help="how Django holds connections (bench/settings.py); default: Django's pool",
    )
    parser.add_argument(
        "--floor",
        choices=["issue", "history", "dedup"],
        default="issue",
        help="the floor's SQL (bench/floor.py): issue 5's as written (default), + history rows, "
        "+ history rows and dedup_count on replay",
    )
    parser.add_argument(
        "--pool-check",
        action="store_true",
        help="every pool checks connections on checkout (psycopg check_connection; Django "
        "CONN_HEALTH_CHECKS): one more round trip per checkout",
    )
    parser.add_argument("--quick", action="store_true", help="smoke: 1 round, n=20, no upstream")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target of issue 5 fails")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.n, args.same_key_reps, args.count_ops, args.slices = 1, 20, 1, 5, 2
    if args.targets is None:
        args.targets = "floor,ours-pg,ours-django" if args.quick else ",".join(TARGETS)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    return args


def build_targets(names: list[str]) -> tuple[list[Target], dict[str, str]]:
    targets, skipped = [], {}
    for name in names:
        try:
            targets.append(TARGETS[name]())
        except Unavailable as exc:
            skipped[name] = str(exc)
            print(f"== {name}: skipped: {exc}", file=sys.stderr)
    return targets, skipped


#: Each round measures these groups in turn.
GROUPS = ("sequential", "concurrent", "same_key")
METRICS = [metric for metric, *_ in THROUGHPUT]


class MemberFailed(Exception):
    """A target failed inside a session; ``name`` says which one (not the floor beside it)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


async def _guard(target: Target, awaitable: Any) -> Any:
    try:
        return await awaitable
    except Exception as exc:
        raise MemberFailed(target.name) from exc


def _slice_sizes(total: int, callers: int, slices: int) -> list[int]:
    """``slices`` equal slices of about ``total`` calls, each a multiple of ``callers``."""
    per = max(callers, round(total / slices / callers) * callers)
    return [per] * slices


async def session(
    members: list[Target], r: int, group: str, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Open every member (the floor and one target), warm each up, time one group of phases,
    close. Only phases are timed.

    The phases run in ``--slices`` slices that alternate between the members, the order reversed
    every other slice (A B B A ...), so both see the same machine: a burst of load elsewhere
    lands on both, and the ratio of the two is taken from calls made within a second or so of
    each other.
    """
    c = args.concurrency
    # Throughput groups: every connection runs (and prepares) each statement before timing.
    # The one-key group is dominated by the 50 ms handler and waiting; a shorter warm-up does.
    warm = 16 if args.quick else (2 if group == "same_key" else 6) * args.pool_size
    same_key = {"kind": "same_key", "callers": args.callers, "handler_ms": args.handler_ms}
    out: dict[str, dict[str, float]] = {m.name: {} for m in members}
    opened: list[Target] = []

    def order(i: int) -> list[Target]:
        return members if i % 2 == 0 else members[::-1]

    try:
        for m in members:
            await _guard(m, m.open(pool_size=args.pool_size))
            opened.append(m)
            await _guard(m, m.truncate())
            warm_spec = {"prefix": f"w{r}{group}", "n": warm, "concurrency": c}
            await _guard(m, m.phase({"kind": "fresh", **warm_spec}))
            await _guard(m, m.phase({"kind": "replay", **warm_spec}))
        if group == "same_key":
            walls: dict[str, list[float]] = {m.name: [] for m in members}
            for m in members:
                await _guard(m, m.phase({**same_key, "prefix": f"w{r}k"}))
            for i in range(args.same_key_reps):
                for m in order(i):
                    result = await _guard(m, m.phase({**same_key, "prefix": f"r{r}k{i}"}))
                    walls[m.name].append(result["wall_ms"])
            for m in members:
                out[m.name]["same_key_ms"] = statistics.median(walls[m.name])
            return out
        label, callers = ("seq", 1) if group == "sequential" else ("conc", c)
        sizes = _slice_sizes(args.n, callers, args.slices)
        for kind in ("fresh", "replay"):
            elapsed = dict.fromkeys(out, 0.0)
            for i, size in enumerate(sizes):
                spec = {
                    "kind": kind,
                    "prefix": f"r{r}{label}{i}",
                    "n": size,
                    "concurrency": callers,
                }
                for m in order(i):
                    elapsed[m.name] += (await _guard(m, m.phase(spec)))["elapsed_s"]
            for m in members:
                out[m.name][f"{kind}_{label}"] = sum(sizes) / elapsed[m.name]
        return out
    finally:
        for m in opened:
            await _guard(m, m.close())


ROWS_WRITTEN_SQL = """
SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables
WHERE schemaname = %s
"""


LINGERING_SQL = """
SELECT pid, state, backend_start, left(query, 80) FROM pg_stat_activity
WHERE application_name = %s
"""


async def _rows_written(target: Target) -> int:
    """Rows inserted, updated or deleted in the target's tables, by the server's counters.

    A backend flushes its counters when it exits, so first wait for the target's connections to
    be gone, then for the sum to stop moving.
    """
    app = f"{APP_PREFIX}:{target.name}"
    async with await AsyncConnection.connect(conninfo(app="count-stats"), autocommit=True) as conn:
        for _ in range(200):
            cursor = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
            )
            if (await cursor.fetchone()) == (0,):
                break
            await asyncio.sleep(0.05)
        else:
            cursor = await conn.execute(LINGERING_SQL, (app,))
            print(
                f"== {target.name}: connections still open 10 s after close (rows written may "
                f"be undercounted): {await cursor.fetchall()}",
                file=sys.stderr,
            )
        value = previous = -1
        for _ in range(50):
            row = await (await conn.execute(ROWS_WRITTEN_SQL, (target.schema,))).fetchone()
            value = int(row[0]) if row else 0
            if value == previous:
                break
            previous = value
            await asyncio.sleep(0.1)
        return value


async def count_round_trips(
    target: Target, counter: WireCounter, args: argparse.Namespace
) -> dict[str, Any]:
    """Statements and round trips per fresh run and per replay, seen on the wire, and rows
    written, by the server's counters (untimed).

    One window per kind, on one pooled connection: a warm-up (psycopg prepares a statement on
    its 6th execution on a connection, which costs one extra round trip once; steady state is
    what is counted), one traced call, ``--count-ops`` counted calls. Every call in a window is
    of its kind, so the rows the server counts for the window divide evenly among them.
    """
    warm, n = 12, args.count_ops
    out: dict[str, Any] = {}
    for kind in ("fresh", "replay"):
        before = await _rows_written(target)
        await target.open(pool_size=1, port=counter.port)
        try:
            if kind == "fresh":
                await target.truncate()
            await target.phase({"kind": kind, "prefix": "cw", "n": warm, "concurrency": 1})
            counter.reset(trace=True)
            await target.phase({"kind": kind, "prefix": "ct", "n": 1, "concurrency": 1})
            trace = counter.trace or []
            counter.reset()
            await target.phase({"kind": kind, "prefix": "cn", "n": n, "concurrency": 1})
            # Writes a target holds back (our stores' batched replay counts) belong to the
            # calls that caused them: count them here, shared among the n calls.
            await target.finish_writes()
            stats = counter.snapshot().as_dict()
        finally:
            await target.close()
        rows = await _rows_written(target)
        per_op = {k: stats[k] / n for k in ("statements", "round_trips", "writes", "tx_control")}
        out[kind] = {
            **per_op,
            "rows_written": (rows - before) / (warm + 1 + n),
            "kinds": {k: v / n for k, v in stats["kinds"].items()},
        }
        out[f"{kind}_trace"] = trace
    return out


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def report(
    names: list[str],
    rounds: dict[str, dict[str, list[float | None]]],
    ratios: dict[str, dict[str, list[float | None]]],
    counts: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    facts: dict[str, str],
) -> tuple[str, list[tuple[str, str, bool]]]:
    labels = {"c": args.concurrency, "k": args.callers, "h": f"{args.handler_ms:g}"}
    width = 42
    col = 20
    lines = [
        f"{'':{width}}" + "".join(f"{n:>{col}}" for n in names),
    ]
    for metric, label, unit in THROUGHPUT:
        cells = []
        for name in names:
            value = _median(rounds.get(name, {}).get(metric, []))
            if value is None:
                cells.append("-")
                continue
            ratio = _median(ratios[name][metric]) if name != "floor" else None
            text = f"{value:,.0f}" if unit == "ops/s" else f"{value:,.1f}"
            cells.append(text + (f" ({ratio:.2f}x)" if ratio is not None else ""))
        title = f"{label.format(**labels)} [{unit}]"
        lines.append(f"{title:{width}}" + "".join(f"{c:>{col}}" for c in cells))
    for kind, field, label in COUNTS:
        cells = []
        for name in names:
            value = counts.get(name, {}).get(kind, {}).get(field)
            cells.append("-" if value is None else f"{value:.2f}".rstrip("0").rstrip("."))
        lines.append(f"{label:{width}}" + "".join(f"{c:>{col}}" for c in cells))

    checks: list[tuple[str, str, bool]] = []
    for name in names:
        if not name.startswith("ours-") or "floor" not in names:
            continue
        for metric, minimum in (
            ("fresh_seq", 0.8),
            ("fresh_conc", 0.7),
            ("replay_seq", 0.7),
            ("replay_conc", 0.7),
        ):
            ratio = _median(ratios[name][metric])
            if ratio is not None:
                checks.append((name, f"{metric} {ratio:.3f}x >= {minimum}x", ratio >= minimum))
        ratio = _median(ratios[name]["same_key_ms"])
        if ratio is not None:
            checks.append((name, f"same-key wall {ratio:.3f}x <= 1.1x", ratio <= 1.1))
        trips = counts.get(name, {}).get("fresh", {}).get("round_trips")
        if trips is not None:
            checks.append((name, f"round trips / fresh {trips:g} <= 2", trips <= 2))
    header = [
        f"agent-ledger benchmark: {args.rounds} interleaved rounds, n={args.n}, "
        f"{args.concurrency} callers, pool {args.pool_size} per target, "
        f"Django connections: {args.django_conn}, floor variant: {args.floor}"
        + (", pools check connections" if args.pool_check else ""),
        f"machine: {facts['cpu']}; PostgreSQL {facts['postgresql']}; Python {facts['python']}; "
        f"psycopg {facts['psycopg']}",
        f"date: {facts['date']}; git {facts['git']}",
        f"command: {facts['command']}",
        f"figures: median over rounds; (x) = median over rounds of target/floor, both timed in "
        f"one session, {args.slices} alternating slices per phase",
        f"counts: on the wire ({args.count_ops} sequential runs each); "
        f"pg_stat_statements {facts['pg_stat_statements']}",
        "",
    ]
    table = "\n".join(header + lines)
    if checks:
        table += "\n\nissue 5 targets:\n" + "\n".join(
            f"  {'PASS' if ok else 'FAIL'}  {name:12} {text}" for name, text, ok in checks
        )
    return table, checks


def print_traces(counts: dict[str, dict[str, Any]]) -> None:
    for name, figures in counts.items():
        for kind in ("fresh", "replay"):
            trace = figures.get(f"{kind}_trace") or []
            print(f"-- {name}, one {kind} run on the wire ({len(trace)} statements):")
            for trip, sql in trace:
                text = sql if len(sql) <= 110 else sql[:107] + "..."
                print(f"   rt {trip:>2}  {text}")


async def main_async(args: argparse.Namespace) -> int:
    url = bench_url()
    database = ensure_database(url)
    facts = machine_facts(url)
    print(f"== database {database}; preparing schemas", file=sys.stderr)
    Target.pool_check = args.pool_check
    if args.pool_check:
        os.environ["AGENT_LEDGER_BENCH_HEALTH_CHECKS"] = "1"  # read by bench/settings.py
    await asyncio.to_thread(
        setup_django, SCHEMA_OURS, pool_size=args.pool_size, django_conn=args.django_conn
    )
    FloorTarget.variant = args.floor
    targets, skipped = build_targets(args.targets)
    for target in targets:
        await target.setup()
    names = [t.name for t in targets]
    # rounds[target][metric][r]: the figure; ratios[target][metric][r]: target / floor, both
    # measured in the same session (None where a target failed or there is no floor).
    rounds: dict[str, dict[str, list[float | None]]] = {
        n: {m: [None] * args.rounds for m in METRICS} for n in names
    }
    ratios: dict[str, dict[str, list[float | None]]] = {
        n: {m: [None] * args.rounds for m in METRICS} for n in names
    }
    failed: dict[str, str] = {}
    started = time.monotonic()
    try:
        floor = next((t for t in targets if t.name == "floor"), None)
        others = [t for t in targets if t is not floor]
        for r in range(args.rounds):
            for group in GROUPS:
                live = [t for t in others if t.name not in failed]
                shift = r % len(live) if live else 0
                order = live[shift:] + live[:shift]
                if floor is not None:
                    sessions = [[floor, t] for t in order] or [[floor]]
                else:
                    sessions = [[t] for t in order]
                floor_values: dict[str, list[float]] = defaultdict(list)
                for members in sessions:
                    names_now = " + ".join(m.name for m in members)
                    turn = time.monotonic()
                    try:
                        figures = await session(members, r, group, args)
                    except MemberFailed as exc:
                        failed[exc.name] = traceback.format_exc()
                        print(f"== {exc.name} failed:\n{failed[exc.name]}", file=sys.stderr)
                        if exc.name == "floor":
                            raise
                        continue
                    print(
                        f"   round {r + 1}/{args.rounds} {group:10} {names_now}: "
                        f"{time.monotonic() - turn:.1f} s",
                        file=sys.stderr,
                    )
                    for m in members:
                        for metric, value in figures[m.name].items():
                            if m is floor:
                                floor_values[metric].append(value)
                            else:
                                rounds[m.name][metric][r] = value
                                if floor is not None:
                                    ratios[m.name][metric][r] = value / figures["floor"][metric]
                for metric, values in floor_values.items():
                    rounds["floor"][metric][r] = statistics.median(values)

        print("== counting statements and round trips on the wire", file=sys.stderr)
        host, port = server_address(url)
        counter = WireCounter(host, port)
        await counter.start()
        counts: dict[str, dict[str, Any]] = {}
        try:
            for target in targets:
                if target.name in failed:
                    continue
                turn = time.monotonic()
                try:
                    counts[target.name] = await count_round_trips(target, counter, args)
                    print(f"   {target.name}: {time.monotonic() - turn:.1f} s", file=sys.stderr)
                except Exception:
                    failed[target.name] = traceback.format_exc()
                    print(f"== {target.name} failed:\n{failed[target.name]}", file=sys.stderr)
        finally:
            await counter.close()
    finally:
        for target in targets:
            if isinstance(target, UpstreamTarget):
                await target.shutdown()
    elapsed = time.monotonic() - started
    print_traces(counts)
    table, checks = report(names, rounds, ratios, counts, args, facts)
    print()
    print(table)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    for name in failed:
        print(f"FAILED {name} (traceback above)")
    print(f"benchmark time: {elapsed:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "facts": facts,
                    "args": {
                        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    },
                    "rounds": rounds,
                    "ratios_by_round": ratios,
                    "ratios": {n: {m: _median(ratios[n][m]) for m in METRICS} for n in names},
                    "counts": counts,
                    "checks": [{"target": n, "check": t, "pass": ok} for n, t, ok in checks],
                    "skipped": skipped,
                    "failed": failed,
                },
                indent=2,
            )
        )
    if failed:
        return 1
    if args.check and not all(ok for *_, ok in checks):
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
