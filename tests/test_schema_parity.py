"""``SCHEMA_SQL`` makes exactly the tables the Django migrations make, and both stores share them.

The migrated side is real: a worker process runs ``manage.py migrate`` into a fresh schema
(``tests/workers/django_ledger.py``), so a migration added without the matching change to
``SCHEMA_SQL`` (or the reverse) fails here. The catalogs are compared through ``pg_catalog``:
columns, types, defaults, nullability, identity, constraints, indexes, sequences and triggers.
The Django side runs in its own process, so these tests need no particular ``DATABASE_URL``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from agent_ledger import (
    Actor,
    ConcurrencyOptions,
    Effect,
    EffectLedger,
    EffectLedgerOptions,
    EffectStatus,
    RunOptions,
)
from agent_ledger.stores.postgres import SCHEMA_SQL, PostgresStore
from tests.conftest import POSTGRES_URL
from tests.stores.postgres import CONNECT_TIMEOUT_S, drop_schema_sync, schema_pool
from tests.workers.django_ledger import call_for

#: Needs the PostgreSQL at ``TEST_POSTGRES_URL`` (whatever ``DATABASE_URL`` says); an
#: unreachable server fails these tests, it never skips them.
pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parent.parent
TABLES = (
    "agent_ledger_effect",
    "agent_ledger_effecttransition",
    "agent_ledger_resumption",
    "agent_ledger_effecttombstone",
)

# Every query takes the schema and looks only at the ledger's relations (the migrated schema
# also holds auth, contenttypes and django_migrations).
_RELATIONS = """
SELECT c.relname, c.relkind, c.relpersistence
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname LIKE 'agent\\_ledger\\_%%'
"""
_COLUMNS = """
SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated, coll.collname
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_collation coll ON coll.oid = a.attcollation
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s)
  AND a.attnum > 0 AND NOT a.attisdropped
"""
_CONSTRAINTS = """
SELECT c.relname, con.conname, con.contype, pg_get_constraintdef(con.oid),
       con.condeferrable, con.condeferred, con.convalidated
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s)
"""
_INDEXES = """
SELECT tablename, indexname, indexdef FROM pg_indexes
WHERE schemaname = %(schema)s AND tablename = ANY(%(tables)s)
"""
_SEQUENCES = """
SELECT c.relname, format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmin,
       s.seqmax, s.seqcache, s.seqcycle
FROM pg_sequence s
JOIN pg_class c ON c.oid = s.seqrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname LIKE 'agent\\_ledger\\_%%'
"""
_TRIGGERS = """
SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid)
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = ANY(%(tables)s) AND NOT t.tgisinternal
"""
CATALOG = {
    "relations": _RELATIONS,
    "columns": _COLUMNS,
    "constraints": _CONSTRAINTS,
    "indexes": _INDEXES,
    "sequences": _SEQUENCES,
    "triggers": _TRIGGERS,
}


def catalog(schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """What the tables in ``schema`` look like, with the schema's own name taken out."""
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        # Definitions print names unqualified when they are on the search path.
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        found = {}
        for part, query in CATALOG.items():
            rows = conn.execute(query, {"schema": schema, "tables": list(TABLES)}).fetchall()
            found[part] = sorted(
                tuple(v.replace(f"{schema}.", "") if isinstance(v, str) else v for v in row)
                for row in rows
            )
    return found


def run_sql(schema: str, *statements: str) -> None:
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        for statement in statements:
            conn.execute(statement)  # type: ignore[call-overload]


def new_schema(prefix: str) -> str:
    schema = f"{prefix}_{secrets.token_hex(6)}"
    run_sql("public", f"CREATE SCHEMA {schema}")
    return schema


def django_args(schema: str, steps: list[dict[str, Any]]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tests.workers.django_ledger",
        "--conninfo",
        POSTGRES_URL,
        "--schema",
        schema,
        "--steps",
        json.dumps(steps),
    ]


def parse(stdout: bytes, stderr: bytes, returncode: int | None) -> list[Any]:
    assert returncode == 0, f"Django worker failed:\n{stderr.decode()}"
    return list(json.loads(stdout.decode().strip().splitlines()[-1]))


async def django_steps(schema: str, steps: list[dict[str, Any]]) -> list[Any]:
    """Run ``steps`` in a Django process on ``schema`` (see the worker's docstring)."""
    process = await asyncio.create_subprocess_exec(
        *django_args(schema, steps),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    return parse(stdout, stderr, process.returncode)


@pytest.fixture(scope="module")
def migrated() -> Iterator[str]:
    """A schema with the tables ``manage.py migrate`` makes (every agent_ledger migration)."""
    schema = new_schema("migrated")
    try:
        done = subprocess.run(
            django_args(schema, [{"op": "migrate"}]),
            cwd=ROOT,
            capture_output=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=False,
        )
        assert parse(done.stdout, done.stderr, done.returncode) == ["migrated"]
        yield schema
    finally:
        drop_schema_sync(schema)


@pytest.fixture
def made_by_schema_sql() -> Iterator[str]:
    schema = new_schema("schemasql")
    try:
        run_sql(schema, SCHEMA_SQL)
        yield schema
    finally:
        drop_schema_sync(schema)


def test_schema_sql_makes_the_tables_the_migrations_make(
    migrated: str, made_by_schema_sql: str
) -> None:
    expected = catalog(migrated)
    # Guard against comparing two empty catalogs.
    assert {row[0] for row in expected["relations"] if row[1] == "r"} == set(TABLES)
    assert len(expected["indexes"]) >= 8
    assert len(expected["constraints"]) >= 6
    actual = catalog(made_by_schema_sql)
    for part in CATALOG:
        assert actual[part] == expected[part], f"SCHEMA_SQL and the migrations differ in {part}"


def test_schema_sql_changes_nothing_on_migrated_tables(migrated: str) -> None:
    """Workers run SCHEMA_SQL at start-up against databases Django already migrated."""
    before = catalog(migrated)
    run_sql(migrated, SCHEMA_SQL)
    assert catalog(migrated) == before


def test_schema_sql_is_idempotent(made_by_schema_sql: str) -> None:
    before = catalog(made_by_schema_sql)
    run_sql(made_by_schema_sql, SCHEMA_SQL)
    assert catalog(made_by_schema_sql) == before


def test_the_comparison_sees_every_kind_of_drift(made_by_schema_sql: str) -> None:
    """Each change below must show in the catalog, or the parity test could miss it."""
    drifts = [
        ("columns", "ALTER TABLE agent_ledger_effect ALTER COLUMN dedup_count SET DEFAULT 5"),
        ("columns", "ALTER TABLE agent_ledger_effect ALTER COLUMN call_id DROP NOT NULL"),
        ("columns", "ALTER TABLE agent_ledger_effect ALTER COLUMN tool TYPE varchar(300)"),
        ("columns", "ALTER TABLE agent_ledger_effecttransition ADD COLUMN extra text"),
        (
            "constraints",
            "ALTER TABLE agent_ledger_effect DROP CONSTRAINT agent_ledger_effect_fence_gte_1,"
            " ADD CONSTRAINT agent_ledger_effect_fence_gte_1 CHECK (fence >= 0)",
        ),
        (
            "constraints",
            "ALTER TABLE agent_ledger_effecttransition ALTER CONSTRAINT"
            " agent_ledger_effectt_effect_id_7c17c707_fk_agent_led NOT DEFERRABLE",
        ),
        ("indexes", "DROP INDEX agent_ledger_active"),
        (
            "indexes",
            "CREATE INDEX agent_ledger_active ON agent_ledger_effect (status, updated_at)"
            " WHERE status IN ('processing', 'ready')",
        ),
        (
            "sequences",
            "ALTER TABLE agent_ledger_effecttransition ALTER COLUMN id SET INCREMENT BY 2",
        ),
    ]
    for part, statement in drifts:
        before = catalog(made_by_schema_sql)
        run_sql(made_by_schema_sql, statement)
        after = catalog(made_by_schema_sql)
        assert after[part] != before[part], statement


# -- one ledger, two stores ----------------------------------------------------------------------


#: Callers wait for the other side's decision, polling briskly.
WAIT = ConcurrencyOptions(wait_timeout_ms=30_000, initial_interval_ms=20, max_interval_ms=100)


def as_rows(history: list[Any]) -> list[tuple[Any, ...]]:
    return [
        (
            t.from_status.value if t.from_status else None,
            t.to_status.value,
            t.actor.label,
            t.actor.user_id,
            t.actor.name,
            t.reason,
        )
        for t in history
    ]


async def wait_for_effect(ledger: EffectLedger, key: str, status: EffectStatus) -> None:
    async def reached() -> None:
        while True:
            effect = await ledger.find_by_idem_key(key)
            if effect is not None and effect.status is status:
                return
            await asyncio.sleep(0.02)

    await asyncio.wait_for(reached(), 30)


async def test_a_waiting_postgres_worker_runs_the_call_once_django_approves_it(
    migrated: str,
) -> None:
    async with schema_pool(migrated) as pool:
        ledger = EffectLedger(EffectLedgerOptions(store=PostgresStore(pool=pool)))
        call = call_for(f"pg-first-{secrets.token_hex(4)}")
        key = ledger.idem_key(call)

        async def handler(effect: Effect) -> Any:
            return {"by": "postgres", "fence": effect.fence}

        waiting = asyncio.create_task(
            ledger.run(call, handler, RunOptions(requires_approval=True, concurrency=WAIT))
        )
        await wait_for_effect(ledger, key, EffectStatus.REQUIRES_APPROVAL)
        (approved,) = await django_steps(
            migrated,
            [{"op": "approve", "idem_key": key, "actor": ["admin", 7, "Ann"], "reason": "ok"}],
        )
        assert approved == {"changed": True, "status": "ready"}
        assert await waiting == {"by": "postgres", "fence": 2}

        effect = await ledger.find_by_idem_key(key)
        assert effect is not None
        assert effect.status is EffectStatus.SUCCEEDED
        assert as_rows(await ledger.history(effect.id)) == [
            (None, "requires_approval", "system", None, "", None),
            ("requires_approval", "ready", "admin", 7, "Ann", "ok"),
            ("ready", "processing", "system", None, "", None),
            ("processing", "succeeded", "system", None, "", None),
        ]


async def test_a_waiting_django_caller_runs_the_call_once_a_postgres_worker_approves_it(
    migrated: str,
) -> None:
    workflow_id = f"django-first-{secrets.token_hex(4)}"
    async with schema_pool(migrated) as pool:
        ledger = EffectLedger(EffectLedgerOptions(store=PostgresStore(pool=pool)))
        key = ledger.idem_key(call_for(workflow_id))
        django = asyncio.create_task(
            django_steps(
                migrated,
                [
                    {
                        "op": "run",
                        "workflow_id": workflow_id,
                        "requires_approval": True,
                        "wait_ms": 30_000,
                    },
                    {"op": "history", "idem_key": key},
                ],
            )
        )
        await wait_for_effect(ledger, key, EffectStatus.REQUIRES_APPROVAL)
        assert await ledger.approve(key, actor=Actor("api", 3, "Bob"), reason="fine") is True
        finished, history = await django

        assert finished == {"result": {"by": "django", "fence": 2}}
        effect = await ledger.find_by_idem_key(key)
        assert effect is not None
        assert (effect.status, effect.result, effect.fence) == (
            EffectStatus.SUCCEEDED,
            {"by": "django", "fence": 2},
            2,
        )
        rows = as_rows(await ledger.history(effect.id))
        assert rows == [
            (None, "requires_approval", "system", None, "", None),
            ("requires_approval", "ready", "api", 3, "Bob", "fine"),
            ("ready", "processing", "system", None, "", None),
            ("processing", "succeeded", "system", None, "", None),
        ]
        # Both stores read the same rows the same way.
        assert [tuple(t) for t in history["transitions"]] == rows
        assert (history["status"], history["result"], history["fence"]) == (
            "succeeded",
            {"by": "django", "fence": 2},
            2,
        )
