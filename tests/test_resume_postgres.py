"""A decision through ``PostgresStore`` (a worker outside Django) writes the same resumption row
as ``DjangoStore``, in the same statement as the decision; the Django side's sweep runs it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from agent_ledger import Actor, EffectStatus
from agent_ledger.stores.postgres import PostgresStore
from tests.effects import new_effect
from tests.stores.postgres import connect, ledger_schema, schema_pool, search_path

#: Needs the PostgreSQL at ``TEST_POSTGRES_URL`` (whatever ``DATABASE_URL`` says).
pytestmark = pytest.mark.postgres

ANN = Actor("admin", "7", "Ann")
CONTINUATION = {"resumer": "support-agent", "thread": "t-9"}


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
    async with await connect(options=search_path(schema)) as conn:
        yield conn


async def decide(store: PostgresStore, idem_key: str, to: EffectStatus) -> bool:
    from_statuses = {EffectStatus.REQUIRES_APPROVAL}
    if to is EffectStatus.CANCELED:
        from_statuses |= {EffectStatus.READY, EffectStatus.PROCESSING}
    record = await store.transition(idem_key, from_statuses=from_statuses, to_status=to, actor=ANN)
    return record.changed


async def resumptions(db: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
    cursor = await db.execute(
        "SELECT r.decision, r.resumer, r.status, r.attempts, r.last_error, t.to_status,"
        " r.effect_id = t.effect_id FROM agent_ledger_resumption r"
        " JOIN agent_ledger_effecttransition t ON t.id = r.transition_id ORDER BY r.id"
    )
    return await cursor.fetchall()


@pytest.mark.parametrize(
    ("to", "decision"), [(EffectStatus.READY, "approve"), (EffectStatus.DENIED, "deny")]
)
async def test_a_decision_writes_its_resumption_in_the_same_statement(
    store: PostgresStore, db: psycopg.AsyncConnection[Any], to: EffectStatus, decision: str
) -> None:
    new = new_effect(EffectStatus.REQUIRES_APPROVAL, continuation=CONTINUATION)
    await store.begin(new)
    assert await decide(store, new.idem_key, to)
    assert await resumptions(db) == [(decision, "support-agent", "pending", 0, "", to.value, True)]
    # Deciding again changes nothing, so owes nothing.
    assert not await decide(store, new.idem_key, to)
    assert len(await resumptions(db)) == 1


async def test_no_resumption_without_a_resumer_or_for_a_cancel(
    store: PostgresStore, db: psycopg.AsyncConnection[Any]
) -> None:
    plain = new_effect(EffectStatus.REQUIRES_APPROVAL)
    canceled = new_effect(EffectStatus.REQUIRES_APPROVAL, continuation=CONTINUATION)
    not_a_name = new_effect(EffectStatus.REQUIRES_APPROVAL, continuation={"resumer": 7})
    for new in (plain, canceled, not_a_name):
        await store.begin(new)
    assert await decide(store, plain.idem_key, EffectStatus.READY)
    assert await decide(store, canceled.idem_key, EffectStatus.CANCELED)
    assert await decide(store, not_a_name.idem_key, EffectStatus.READY)
    assert await resumptions(db) == []
