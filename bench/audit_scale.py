"""Audit browsing at scale (issue 5, point 3): admin changelist and API list on 1M effects.

    .venv/bin/python bench/audit_scale.py [--requests 20] [--plans] [--reseed]

Seeds 1,000,000 effects and 3,000,000 history rows into the Django tables of schema
``bench_audit`` of the bench database (``INSERT ... SELECT generate_series``, then ``VACUUM
ANALYZE``; skipped when the same seed is already there), then requests each page with Django's
test client as a superuser: every case ``--requests`` times after one warm-up request, median and
p95 against the issue's 250 ms / 500 ms. Each case's answer is checked (status 200, rows match
the filter), and the SQL of one request is captured and run again under ``EXPLAIN (ANALYZE,
BUFFERS)``, so the plans show which indexes serve it. Exit status 1 when a page fails or misses
a target.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not bench/

import psycopg  # noqa: E402

from bench.common import SCHEMA_AUDIT, conninfo, ensure_database, machine_facts, setup_django  # noqa: E402

EFFECTS = 1_000_000
TRANSITIONS_PER_EFFECT = 3
WORKFLOWS = 100_000
TOOLS = 40
SEED_MARK = f"agent-ledger-bench seed v1: {EFFECTS} effects x {TRANSITIONS_PER_EFFECT}"
CHUNK = 250_000
MEDIAN_TARGET_MS = 250
P95_TARGET_MS = 500

# Statuses by share of rows (per cent): most calls succeed, a few wait for a human.
_STATUS_CASE = """CASE
    WHEN g %% 100 < 85 THEN 'succeeded' WHEN g %% 100 < 93 THEN 'failed'
    WHEN g %% 100 < 95 THEN 'requires_approval' WHEN g %% 100 < 96 THEN 'ready'
    WHEN g %% 100 < 97 THEN 'processing' WHEN g %% 100 < 99 THEN 'denied' ELSE 'canceled' END"""

SEED_EFFECTS_SQL = f"""
INSERT INTO agent_ledger_effect (
    id, idem_key, workflow_id, call_id, tool, status, args_canonical, resource_id_canonical,
    result, error, dedup_count, fence, created_at, updated_at, completed_at)
SELECT md5('effect-' || g)::uuid,
       encode(sha256(('key-' || g)::bytea), 'hex'),
       'wf-' || (g %% {WORKFLOWS}),
       'call-' || g,
       'tool.' || ((g * 7919) %% {TOOLS}),
       s.status,
       '{{"n":' || g || ',"text":"seeded"}}',
       NULL,
       CASE WHEN s.status = 'succeeded' THEN '{{"ok":true}}'::jsonb END,
       CASE WHEN s.status = 'failed' THEN '{{"message":"boom","code":"E"}}'::jsonb END,
       g %% 3,
       1,
       t.at, t.at + interval '2 seconds',
       CASE WHEN s.status IN ('succeeded', 'failed', 'denied', 'canceled')
            THEN t.at + interval '2 seconds' END
FROM generate_series(%(start)s::bigint, %(stop)s::bigint) AS g,
     LATERAL (SELECT {_STATUS_CASE} AS status) AS s,
     LATERAL (SELECT timestamptz '2026-01-01' + g * interval '5 seconds' AS at) AS t
"""

SEED_TRANSITIONS_SQL = f"""
INSERT INTO agent_ledger_effecttransition (
    effect_id, from_status, to_status, at, actor_label, actor_user_id, actor_name, reason)
SELECT md5('effect-' || g)::uuid,
       CASE k WHEN 1 THEN NULL WHEN 2 THEN 'processing' ELSE 'requires_approval' END,
       CASE k WHEN 1 THEN 'processing' WHEN 2 THEN 'requires_approval' ELSE s.status END,
       timestamptz '2026-01-01' + g * interval '5 seconds' + (k - 1) * interval '1 second',
       CASE k WHEN 3 THEN 'admin' ELSE 'system' END,
       NULL,
       CASE k WHEN 3 THEN 'bench' ELSE '' END,
       NULL
FROM generate_series(%(start)s::bigint, %(stop)s::bigint) AS g,
     LATERAL (SELECT {_STATUS_CASE} AS status) AS s,
     generate_series(1, %(per)s) AS k
"""


def seed(reseed: bool) -> None:
    """Fill the tables once; a rerun with the same seed mark and counts does nothing."""
    dsn = conninfo(schema=SCHEMA_AUDIT, app="audit-seed")
    with psycopg.connect(dsn, autocommit=True) as conn:
        mark = conn.execute(
            "SELECT obj_description('agent_ledger_effect'::regclass, 'pg_class')"
        ).fetchone()
        effects = conn.execute("SELECT count(*) FROM agent_ledger_effect").fetchone()
        transitions = conn.execute("SELECT count(*) FROM agent_ledger_effecttransition").fetchone()
        seeded = (
            mark is not None
            and mark[0] == SEED_MARK
            and effects == (EFFECTS,)
            and transitions == (EFFECTS * TRANSITIONS_PER_EFFECT,)
        )
        if seeded and not reseed:
            rows = EFFECTS * TRANSITIONS_PER_EFFECT
            print(f"== seed present: {EFFECTS:,} effects, {rows:,} transitions")
            return
        started = time.monotonic()
        conn.execute("TRUNCATE agent_ledger_effect, agent_ledger_effecttransition CASCADE")
        # Secondary indexes are built once at the end (faster than 4M row-by-row inserts),
        # exactly as the migrations define them (Django's schema editor writes them back).
        for _model, index in _secondary_indexes():
            conn.execute(
                psycopg.sql.SQL("DROP INDEX IF EXISTS {}").format(
                    psycopg.sql.Identifier(index.name)
                )
            )
        # Session settings only: no fsync wait per chunk, no FK trigger queue for 3M rows (the
        # rows are consistent by construction).
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
            print(f"   seeded {stop:,} effects ({time.monotonic() - started:.0f} s)", flush=True)
        conn.execute("SET session_replication_role = origin")
        _create_indexes()
        print(f"   indexes built ({time.monotonic() - started:.0f} s)", flush=True)
        conn.execute("VACUUM (ANALYZE) agent_ledger_effect")
        conn.execute("VACUUM (ANALYZE) agent_ledger_effecttransition")
        conn.execute(
            psycopg.sql.SQL("COMMENT ON TABLE agent_ledger_effect IS {}").format(
                psycopg.sql.Literal(SEED_MARK)
            )
        )
        print(f"== seeded in {time.monotonic() - started:.0f} s (with VACUUM ANALYZE)")


def _secondary_indexes() -> list[tuple[Any, Any]]:
    from agent_ledger.models import Effect, EffectTransition

    return [(model, index) for model in (Effect, EffectTransition) for index in model._meta.indexes]


def _create_indexes() -> None:
    from django.db import connection

    with connection.schema_editor() as editor:
        for model, index in _secondary_indexes():
            editor.add_index(model, index)
    connection.close()


def sample_values() -> dict[str, str]:
    """Real values from the seed to filter and search by."""
    with psycopg.connect(conninfo(schema=SCHEMA_AUDIT, app="audit"), autocommit=True) as conn:
        row = conn.execute(
            "SELECT idem_key, workflow_id, tool FROM agent_ledger_effect"
            " WHERE call_id = 'call-424242'"
        ).fetchone()
    assert row is not None, "the seed is missing call-424242"
    return {"idem_key": row[0], "workflow_id": row[1], "tool": row[2]}


def cases(values: dict[str, str]) -> tuple[list[tuple[str, str, dict[str, str]]], list[str]]:
    """(name, url, the field values every returned row must have); and skip messages."""
    from django.urls import NoReverseMatch, reverse

    from bench import urls

    out: list[tuple[str, str, dict[str, str]]] = []
    skipped: list[str] = []
    if urls.ADMIN_ERROR:
        skipped.append(f"admin: {urls.ADMIN_ERROR}")
    else:
        try:
            admin = reverse("admin:agent_ledger_effect_changelist")
        except NoReverseMatch as exc:
            skipped.append(f"admin: no changelist for Effect ({exc})")
        else:
            out += [
                ("admin unfiltered", admin, {}),
                (
                    "admin ?status=requires_approval",
                    f"{admin}?status=requires_approval",
                    {"status": "requires_approval"},
                ),
                ("admin ?status=failed", f"{admin}?status=failed", {"status": "failed"}),
                ("admin ?tool=", f"{admin}?tool={values['tool']}", {"tool": values["tool"]}),
                (
                    "admin ?workflow_id=",
                    f"{admin}?workflow_id={values['workflow_id']}",
                    {"workflow_id": values["workflow_id"]},
                ),
                (
                    "admin ?q=<idem_key>",
                    f"{admin}?q={values['idem_key']}",
                    {"idem_key": values["idem_key"]},
                ),
            ]
    if urls.API_ERROR:
        skipped.append(f"API: {urls.API_ERROR}")
    else:
        try:
            api = reverse("agent_ledger_api:effect-list")
        except NoReverseMatch as exc:
            skipped.append(f"API: no effect-list route ({exc})")
        else:
            out += [
                ("API unfiltered", api, {}),
                (
                    "API ?status=requires_approval",
                    f"{api}?status=requires_approval",
                    {"status": "requires_approval"},
                ),
                ("API ?status=failed", f"{api}?status=failed", {"status": "failed"}),
                ("API ?tool=", f"{api}?tool={values['tool']}", {"tool": values["tool"]}),
                (
                    "API ?workflow_id=",
                    f"{api}?workflow_id={values['workflow_id']}",
                    {"workflow_id": values["workflow_id"]},
                ),
                ("API unfiltered, cursor page 2", f"{api}#next", {}),
                (
                    "API ?tool=, cursor page 2",
                    f"{api}?tool={values['tool']}#next",
                    {"tool": values["tool"]},
                ),
            ]
    return out, skipped


def resolve(client: Any, url: str) -> str:
    """``<url>#next``: the URL of the page after ``url``'s first, as a client would follow it."""
    if not url.endswith("#next"):
        return url
    response = client.get(url[: -len("#next")])
    following = response.json().get("next")
    if not following:
        raise AssertionError(f"{url}: no next page")
    return str(following)


def rows_of(response: Any) -> list[dict[str, Any]]:
    """The rows a page shows, as dicts: the admin's ChangeList, or the API's results."""
    if response.get("Content-Type", "").startswith("application/json"):
        body = response.json()
        return list(body.get("results", body))
    changelist = response.context["cl"]
    return [
        {f: getattr(obj, f) for f in ("status", "tool", "workflow_id", "idem_key")}
        for obj in changelist.result_list
    ]


def check(name: str, response: Any, expect: dict[str, str]) -> str | None:
    if response.status_code != 200:
        return f"HTTP {response.status_code}"
    rows = rows_of(response)
    if not rows:
        return "no rows"
    for row in rows:
        for field, value in expect.items():
            if field in row and row[field] != value:
                return f"row with {field}={row[field]!r}, filtered for {value!r}"
    return None


def explain(captured: list[dict[str, str]], show: bool) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) each captured query on the ledger's tables."""
    from django.db import connection

    lines: list[str] = []
    for query in captured:
        sql = query["sql"]
        if "agent_ledger_effect" not in sql or not sql.lstrip().upper().startswith("SELECT"):
            continue
        with connection.cursor() as cursor:
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql)
            plan = [r[0] for r in cursor.fetchall()]
        text = "\n".join(plan)
        scans = sorted({line.split(" on ")[1].split()[0] for line in plan if "Seq Scan on" in line})
        indexes = sorted(
            {
                line.split(" using ")[1].split()[0]
                for line in plan
                if " using " in line and ("Index" in line)
            }
        )
        took = next((p for p in plan if p.startswith("Execution Time")), "")
        short = sql if len(sql) <= 160 else sql[:157] + "..."
        lines.append(
            f"    {took or '?'}; indexes: {', '.join(indexes) or '-'}"
            + (f"; SEQ SCAN on {', '.join(scans)}" if scans else "")
            + f"\n      {short}"
        )
        if show:
            lines.append("\n".join("        " + p for p in text.splitlines()))
    return lines


def measure(requests: int, show_plans: bool) -> int:
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import (
        CaptureQueriesContext,
        setup_test_environment,
        teardown_test_environment,
    )

    user_model = get_user_model()
    user = user_model.objects.filter(username="bench-audit").first()
    if user is None:
        user = user_model.objects.create_superuser("bench-audit", "bench@example.invalid", "x")
    client = Client()
    client.force_login(user)
    todo, skipped = cases(sample_values())
    for message in skipped:
        print(f"SKIPPED {message}")
    failures = 0
    table = [f"{'page':38} {'median':>9} {'p95':>9} {'queries':>8}  result"]
    plans: list[str] = []
    for name, url, expect in todo:
        try:
            target = resolve(client, url)
        except Exception as exc:
            table.append(f"{name:38} {'-':>9} {'-':>9} {'-':>8}  FAIL: {exc}")
            failures += 1
            continue
        setup_test_environment()  # lets the client capture the template context: untimed only
        try:
            response = client.get(target)  # warm-up, and the answer to check
        finally:
            teardown_test_environment()
        problem = check(name, response, expect)
        with CaptureQueriesContext(connection) as captured:
            client.get(target)
        # Copy now: the next request clears the connection's query log this reads from.
        queries = list(captured.captured_queries)
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            client.get(target)
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        median = statistics.median(times)
        p95 = times[max(0, math.ceil(0.95 * len(times)) - 1)]
        ok = problem is None and median < MEDIAN_TARGET_MS and p95 < P95_TARGET_MS
        failures += not ok
        verdict = "ok" if ok else f"FAIL: {problem or 'over target'}"
        table.append(f"{name:38} {median:7.1f}ms {p95:7.1f}ms {len(queries):8}  {verdict}")
        plans.append(f"-- {name}: {target}")
        plans += explain(queries, show_plans)
    print("\n".join(plans))
    print()
    print(
        f"audit at scale: {EFFECTS:,} effects, {EFFECTS * TRANSITIONS_PER_EFFECT:,} transitions; "
        f"{requests} requests per page after one warm-up; targets median < {MEDIAN_TARGET_MS} ms, "
        f"p95 < {P95_TARGET_MS} ms"
    )
    print("\n".join(table))
    return 1 if failures or skipped else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20, help="timed requests per page")
    parser.add_argument("--plans", action="store_true", help="print whole query plans")
    parser.add_argument("--reseed", action="store_true", help="seed again even if present")
    args = parser.parse_args(argv)
    ensure_database()
    facts = machine_facts()
    print(f"machine: {facts['cpu']}; PostgreSQL {facts['postgresql']}; {facts['date']}")
    setup_django(SCHEMA_AUDIT, pool_size=2, django_conn="persistent")
    seed(args.reseed)
    return measure(args.requests, args.plans)


if __name__ == "__main__":
    sys.exit(main())
