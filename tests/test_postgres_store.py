"""What ``PostgresStore`` does beyond the contract suite: no Django, the insert race it retries,
the columns it writes, the database clock, pool settings and event loops.

The contract suite (``tests/contract``, ``-k postgres``) covers the behaviour every store
shares; these tests look at the rows and at PostgreSQL-specific paths.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta, timezone
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

from agent_ledger import (
    Actor,
    CommitFailed,
    CommitSucceeded,
    EffectError,
    EffectLedgerValidationError,
    EffectStatus,
    EffectStoreError,
)
from agent_ledger.stores.postgres import SCHEMA_SQL, PostgresStore
from agent_ledger.types import SYSTEM
from tests.conftest import POSTGRES_URL
from tests.effects import new_effect
from tests.stores.postgres import connect, ledger_schema, schema_pool, search_path

#: Needs the PostgreSQL at ``TEST_POSTGRES_URL`` (whatever ``DATABASE_URL`` says); an
#: unreachable server fails these tests, it never skips them.
pytestmark = pytest.mark.postgres


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    async with ledger_schema() as name:
        yield name


@pytest.fixture
async def store(schema: str) -> AsyncIterator[PostgresStore]:
    async with schema_pool(schema) as pool:
        yield PostgresStore(pool=pool)


@pytest.fixture
async def db(schema: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection of the test's own, to read and write rows past the store."""
    async with await connect(options=search_path(schema)) as conn:
        yield conn


async def fetch(db: psycopg.AsyncConnection[Any], query: str, *params: Any) -> list[Any]:
    cursor = await db.execute(query, params)
    return await cursor.fetchall()


async def waiting_for_a_lock(db: psycopg.AsyncConnection[Any], application_name: str) -> None:
    """Return once a connection of ``application_name`` waits for a row lock."""

    async def blocked() -> None:
        while not await fetch(
            db,
            "SELECT 1 FROM pg_stat_activity"
            " WHERE application_name = %s AND wait_event_type = 'Lock'",
            application_name,
        ):
            await asyncio.sleep(0.01)

    await asyncio.wait_for(blocked(), 10)


def test_importing_the_store_does_not_import_django() -> None:
    """Agent workers install psycopg, not Django, and have no settings to configure."""
    code = (
        "import sys, agent_ledger.stores.postgres\n"
        "loaded = sorted(m for m in sys.modules if m == 'django' or m.startswith('django.'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_schema_sql_can_run_in_several_workers_at_once() -> None:
    """Workers starting together all run SCHEMA_SQL; concurrent CREATE ... IF NOT EXISTS on
    the same names can fail in the catalog, which the advisory lock in SCHEMA_SQL prevents."""
    async with ledger_schema(tables=False) as schema:
        connections = [await connect(options=search_path(schema)) for _ in range(4)]
        outcomes = await asyncio.gather(
            *(conn.execute(SCHEMA_SQL) for conn in connections), return_exceptions=True
        )
        for conn in connections:
            await conn.close()
        assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
        async with await connect(options=search_path(schema)) as conn:
            tables = await fetch(
                conn, "SELECT count(*) FROM pg_tables WHERE schemaname = %s", schema
            )
        assert tables == [(4,)]  # effects, history, resumptions, tombstones


async def test_begin_retries_when_it_loses_the_insert_to_a_row_it_cannot_see_yet(
    schema: str, db: psycopg.AsyncConnection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another caller's insert of the same key commits while our statement runs: our INSERT
    finds the key taken, our UPDATE cannot see the row (older snapshot), so the statement is
    run again and counts the replay instead of reporting nothing (without the second run the
    store would raise "neither inserted nor found")."""
    name = f"ledger-begin-race-{uuid.uuid4().hex[:8]}"
    new = new_effect()
    async with (
        schema_pool(schema, kwargs={"application_name": name}) as pool,
        await connect(options=search_path(schema)) as other,
    ):
        await other.execute("BEGIN")
        await other.execute(
            "INSERT INTO agent_ledger_effect (id, idem_key, workflow_id, call_id, tool, status,"
            " args_canonical) VALUES (%s, %s, 'other', 'other', 't', 'processing', '{}')",
            (uuid.uuid4(), new.idem_key),
        )
        begin = asyncio.ensure_future(PostgresStore(pool=pool).begin(new))
        await waiting_for_a_lock(db, name)
        await other.execute("COMMIT")
        record = await begin
    assert not record.created
    assert record.effect.workflow_id == "other"
    assert record.effect.dedup_count == 1
    # The loser wrote no history row for the winner's effect.
    assert await fetch(db, "SELECT count(*) FROM agent_ledger_effecttransition") == [(0,)]


async def test_history_rows_carry_the_actor_and_the_effects_own_timestamp(
    store: PostgresStore, db: psycopg.AsyncConnection[Any]
) -> None:
    new = new_effect(EffectStatus.REQUIRES_APPROVAL)
    await store.begin(new)
    record = await store.transition(
        new.idem_key,
        from_statuses={EffectStatus.REQUIRES_APPROVAL},
        to_status=EffectStatus.READY,
        actor=Actor("admin", "7", "Ann"),
        reason="looks fine",
    )
    assert record.changed
    rows = await fetch(
        db,
        "SELECT from_status, to_status, actor_label, actor_user_id, actor_name, reason"
        " FROM agent_ledger_effecttransition ORDER BY id",
    )
    assert rows == [
        (None, "requires_approval", "system", None, "", None),
        ("requires_approval", "ready", "admin", 7, "Ann", "looks fine"),
    ]
    history = await store.history(record.effect.id)
    assert [t.actor for t in history] == [SYSTEM, Actor("admin", 7, "Ann")]
    assert history[0].at == record.effect.created_at
    assert history[-1].at == record.effect.updated_at


@pytest.mark.parametrize("user_id", ["bob", 2**31, 1.5, True])
async def test_a_bad_user_id_is_refused_before_anything_is_written(
    store: PostgresStore, db: psycopg.AsyncConnection[Any], user_id: Any
) -> None:
    new = new_effect(EffectStatus.REQUIRES_APPROVAL)
    await store.begin(new)
    with pytest.raises(EffectLedgerValidationError) as caught:
        await store.transition(
            new.idem_key,
            from_statuses={EffectStatus.REQUIRES_APPROVAL},
            to_status=EffectStatus.READY,
            actor=Actor("admin", user_id),
        )
    assert caught.value.field == "actor.user_id"
    assert await fetch(db, "SELECT status FROM agent_ledger_effect") == [("requires_approval",)]
    assert await fetch(db, "SELECT count(*) FROM agent_ledger_effecttransition") == [(1,)]


async def test_results_and_errors_are_stored_as_jsonb(
    store: PostgresStore, db: psycopg.AsyncConnection[Any]
) -> None:
    """jsonb, as the Django model's JSONField reads and writes it; None is SQL NULL, as there."""
    effects = [(await store.begin(new_effect())).effect for _ in range(3)]
    outcomes = [
        CommitSucceeded({"id": "msg-1", "n": [1, 2.5, None]}),
        CommitSucceeded(None),
        CommitFailed(EffectError("boom", code="E42")),
    ]
    for effect, outcome in zip(effects, outcomes, strict=True):
        assert await store.commit(effect.id, outcome, fence=1, actor=SYSTEM) is not None
    rows = await fetch(
        db,
        "SELECT jsonb_typeof(result), result IS NULL, error FROM agent_ledger_effect"
        " WHERE id = ANY(%s) ORDER BY array_position(%s, id)",
        [uuid.UUID(e.id) for e in effects],
        [uuid.UUID(e.id) for e in effects],
    )
    assert rows == [
        ("object", False, None),
        (None, True, None),
        (None, True, {"message": "boom", "code": "E42"}),
    ]
    assert (await store.get(effects[0].id)).result == {"id": "msg-1", "n": [1, 2.5, None]}  # type: ignore[union-attr]
    assert (await store.get(effects[2].id)).error == EffectError("boom", code="E42")  # type: ignore[union-attr]


async def test_timestamps_are_utc_whatever_the_session_time_zone(schema: str) -> None:
    async with schema_pool(
        schema, kwargs={"options": f"{search_path(schema)} -c TimeZone=Asia/Kolkata"}
    ) as pool:
        store = PostgresStore(pool=pool)
        effect = (await store.begin(new_effect())).effect
        history = await store.history(effect.id)
    assert effect.created_at.tzinfo is timezone.utc
    assert history[0].at.tzinfo is timezone.utc
    assert effect.created_at == effect.updated_at == history[0].at


async def test_staleness_is_judged_by_the_database_clock(
    store: PostgresStore, db: psycopg.AsyncConnection[Any]
) -> None:
    idle = (await store.begin(new_effect())).effect
    fresh = (await store.begin(new_effect())).effect
    # Ten seconds idle by the database's clock, whatever this process's clock says.
    await db.execute(
        "UPDATE agent_ledger_effect SET updated_at = now() - interval '10 seconds' WHERE id = %s",
        (uuid.UUID(idle.id),),
    )
    assert await store.claim(fresh.id, stale_after_ms=5_000, actor=SYSTEM) is None
    assert await store.claim(idle.id, stale_after_ms=20_000, actor=SYSTEM) is None
    assert await store.claim(idle.id, stale_after_ms=1e300, actor=SYSTEM) is None
    claimed = await store.claim(idle.id, stale_after_ms=5_000, actor=SYSTEM)
    assert claimed is not None
    assert claimed.fence == 2
    history = await store.history(idle.id)
    assert (history[-1].from_status, history[-1].reason) == (
        EffectStatus.PROCESSING,
        "stale takeover",
    )


async def test_a_claim_that_waited_for_a_connection_does_not_take_over_the_new_owner(
    schema: str, db: psycopg.AsyncConnection[Any]
) -> None:
    """Staleness is judged as of the call, not as of when a pooled connection came free: a
    claimer queued behind a busy pool must not find the owner who claimed meanwhile stale."""
    async with schema_pool(schema, max_size=1) as pool:
        store = PostgresStore(pool=pool)
        effect = (await store.begin(new_effect())).effect
        await db.execute(
            "UPDATE agent_ledger_effect SET updated_at = now() - interval '1 second' WHERE id = %s",
            (uuid.UUID(effect.id),),
        )
        async with pool.connection():
            late = asyncio.ensure_future(
                store.claim(effect.id, stale_after_ms=100, actor=Actor("late"))
            )
            await asyncio.sleep(0.05)
            # Another worker claims it meanwhile (fence 2, fresh updated_at).
            await db.execute(
                "UPDATE agent_ledger_effect SET fence = 2, updated_at = statement_timestamp()"
                " WHERE id = %s",
                (uuid.UUID(effect.id),),
            )
            # Long enough that, judged when the connection comes free, it would look stale.
            await asyncio.sleep(0.3)
        assert await late is None
        current = await store.get(effect.id)
    assert current is not None
    assert current.fence == 2


async def test_an_autocommit_pool_works_too(schema: str) -> None:
    """The store makes its own transactions, so it does not care how the pool is set up."""
    async with schema_pool(schema, kwargs={"autocommit": True}) as pool:
        store = PostgresStore(pool=pool)
        new = new_effect(EffectStatus.REQUIRES_APPROVAL)
        effect = (await store.begin(new)).effect
        assert (await store.begin(new)).effect.dedup_count == 1
        approved = await store.transition(
            new.idem_key,
            from_statuses={EffectStatus.REQUIRES_APPROVAL},
            to_status=EffectStatus.READY,
            actor=SYSTEM,
        )
        assert approved.changed
        claimed = await store.claim(effect.id, stale_after_ms=0, actor=SYSTEM)
        assert claimed is not None
        done = await store.commit(effect.id, CommitSucceeded(1), fence=2, actor=SYSTEM)
        assert done is not None
        assert done.completed_at is not None
        assert len(await store.history(effect.id)) == 4


def test_a_store_used_from_another_loop_while_its_pool_loop_is_idle_fails_clearly() -> None:
    """The pool belongs to the loop it was opened on; with that loop stopped, a call from
    another loop cannot be handed over, and says so instead of hanging."""
    home = asyncio.new_event_loop()

    async def open_store() -> tuple[PostgresStore, AsyncConnectionPool]:
        pool = AsyncConnectionPool(POSTGRES_URL, min_size=1, open=False)
        await pool.open(wait=True)
        return PostgresStore(pool=pool), pool

    try:
        store, pool = home.run_until_complete(open_store())
        with pytest.raises(EffectStoreError, match="another event loop"):
            asyncio.run(store.get(str(uuid.uuid4())))
        home.run_until_complete(pool.close())
    finally:
        home.close()


async def test_database_errors_are_store_errors_with_the_driver_error_chained(
    store: PostgresStore, db: psycopg.AsyncConnection[Any]
) -> None:
    await db.execute(sql.SQL("DROP TABLE agent_ledger_effecttransition CASCADE"))
    with pytest.raises(EffectStoreError, match="history: UndefinedTable") as caught:
        await store.history(str(uuid.uuid4()))
    assert isinstance(caught.value.__cause__, psycopg.errors.UndefinedTable)
    assert caught.value.operation == "history"


async def test_stale_thresholds_beyond_a_century_never_overflow(store: PostgresStore) -> None:
    effect = (await store.begin(new_effect())).effect
    for ms in (timedelta.max.total_seconds() * 1000, 1e300):
        assert await store.claim(effect.id, stale_after_ms=ms, actor=SYSTEM) is None


# psycopg-pool 3.2+ wants ``open=False`` and ``await pool.open()``; the spec's code still works.
@pytest.mark.filterwarnings("ignore:opening the async pool:RuntimeWarning")
async def test_the_readmes_postgresql_setup_works_as_written(schema: str) -> None:
    """The spec's "PostgreSQL Setup", line for line, on a schema of its own."""
    from psycopg_pool import AsyncConnectionPool

    from agent_ledger import EffectLedger, EffectLedgerOptions, ToolCall

    conninfo = make_conninfo(POSTGRES_URL, options=search_path(schema))

    async def setup() -> tuple[EffectLedger, AsyncConnectionPool]:
        pool = AsyncConnectionPool(conninfo=conninfo)

        # Create schema
        async with pool.connection() as conn:
            await conn.execute(SCHEMA_SQL)

        store = PostgresStore(pool=pool)
        ledger = EffectLedger(EffectLedgerOptions(store=store))
        return ledger, pool

    ledger, pool = await setup()
    try:
        call = ToolCall(workflow_id="order-123", tool="stripe.charge", args={"amount": 1000})
        assert await ledger.run(call, lambda effect: {"charged": 1000}) == {"charged": 1000}
        assert await ledger.run(call, lambda effect: {"charged": 2000}) == {"charged": 1000}
    finally:
        await pool.close()


# -- replay counts of finished effects --------------------------------------------------------
