"""``PostgresStore`` for the contract suite, in a throwaway schema of its own.

Stores live in random schemas (``ledger_<hex>``) of the ``TEST_POSTGRES_URL`` database, with
tables made by ``SCHEMA_SQL``, so parallel runs, pytest-django's test databases and other tests
never see each other's rows. An unreachable server is an error, never a skip. The helpers here
are shared by the other PostgreSQL tests.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

from agent_ledger.stores.postgres import SCHEMA_SQL, PostgresStore
from tests.conftest import POSTGRES_URL

CONNECT_TIMEOUT_S = 5

#: The contract suite's schema: made once per session (its DDL costs more than most tests),
#: emptied before each test, dropped when the session ends.
_contract_schema: str | None = None


async def make(request: pytest.FixtureRequest) -> AsyncIterator[PostgresStore]:
    global _contract_schema
    if _contract_schema is None:
        _contract_schema = await create_schema()
        request.config.add_cleanup(lambda: drop_schema_sync(_contract_schema))
    schema = _contract_schema
    async with await connect(options=search_path(schema)) as conn:
        await conn.execute("DELETE FROM agent_ledger_resumption")
        await conn.execute("DELETE FROM agent_ledger_effecttransition")
        await conn.execute("DELETE FROM agent_ledger_effect")
        await conn.execute("DELETE FROM agent_ledger_effecttombstone")
    async with schema_pool(schema) as pool:
        yield PostgresStore(pool=pool)


async def connect(**kwargs: Any) -> psycopg.AsyncConnection[Any]:
    """A plain autocommit connection to the test server, outside any pool."""
    return await psycopg.AsyncConnection.connect(
        POSTGRES_URL, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, **kwargs
    )


def search_path(schema: str) -> str:
    """libpq ``options`` that put a connection's unqualified names in ``schema``."""
    return f"-c search_path={schema}"


async def create_schema(*, tables: bool = True, prefix: str = "ledger") -> str:
    """A fresh schema, with the ledger's tables (by ``SCHEMA_SQL``) unless ``tables=False``."""
    schema = f"{prefix}_{secrets.token_hex(6)}"
    async with await connect() as conn:
        await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        if tables:
            await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            await conn.execute(SCHEMA_SQL)
    return schema


def drop_schema_sync(schema: str | None) -> None:
    if schema is not None:
        with psycopg.connect(
            POSTGRES_URL, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
        ) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@asynccontextmanager
async def ledger_schema(*, tables: bool = True, prefix: str = "ledger") -> AsyncIterator[str]:
    """A fresh schema (see ``create_schema``), dropped afterwards."""
    schema = await create_schema(tables=tables, prefix=prefix)
    try:
        yield schema
    finally:
        async with await connect() as conn:
            await conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )


@asynccontextmanager
async def schema_pool(
    schema: str, *, conninfo: str = POSTGRES_URL, **kwargs: Any
) -> AsyncIterator[AsyncConnectionPool]:
    """An open pool whose connections see ``schema``; checked on checkout, as the README says.

    ``kwargs`` override the pool's settings; ``kwargs["kwargs"]`` adds connection parameters.
    """
    settings: dict[str, Any] = {
        "min_size": 1,
        "max_size": 10,
        "timeout": 10,
        "check": AsyncConnectionPool.check_connection,
    }
    settings.update(kwargs)
    connection_kwargs = {"options": search_path(schema), "connect_timeout": CONNECT_TIMEOUT_S}
    connection_kwargs.update(settings.pop("kwargs", {}))
    pool = AsyncConnectionPool(conninfo, kwargs=connection_kwargs, open=False, **settings)
    await pool.open(wait=settings["min_size"] > 0, timeout=CONNECT_TIMEOUT_S)
    try:
        yield pool
    finally:
        await pool.close()


# -- login roles of their own (for faults that change a role's settings) -------------------------


async def create_login_role(schema: str, *, prefix: str = "faults") -> str:
    """A new login role (``<prefix>_<hex>``) that may use and change ``schema``'s tables.

    Settings a test changes for this role (``ALTER ROLE CURRENT_USER SET ...``, which any role
    may do for itself) reach only its own new sessions, never other test runs sharing the
    server. Trust auth: the role needs no password. Drop it with ``drop_login_role``.
    """
    role = f"{prefix}_{secrets.token_hex(6)}"
    ident, where = sql.Identifier(role), sql.Identifier(schema)
    async with await connect() as conn:
        await conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
        await conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA {} TO {}").format(where, ident))
        await conn.execute(
            sql.SQL("GRANT ALL ON ALL TABLES IN SCHEMA {} TO {}").format(where, ident)
        )
        await conn.execute(
            sql.SQL("GRANT ALL ON ALL SEQUENCES IN SCHEMA {} TO {}").format(where, ident)
        )
    return role


def role_conninfo(role: str, conninfo: str = POSTGRES_URL) -> str:
    """``conninfo`` logging in as ``role`` instead."""
    return make_conninfo(conninfo, user=role)


def _drop_role_statements(role: str) -> list[sql.Composable]:
    ident = sql.Identifier(role)
    return [
        # Its sessions first (a test that failed half-way may have left some).
        sql.SQL("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = {}").format(
            sql.Literal(role)
        ),
        sql.SQL("DROP OWNED BY {}").format(ident),
        sql.SQL("DROP ROLE {}").format(ident),
    ]


async def drop_login_role(role: str) -> None:
    async with await connect() as conn:
        for statement in _drop_role_statements(role):
            await conn.execute(statement)


def drop_login_role_sync(role: str) -> None:
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        for statement in _drop_role_statements(role):
            conn.execute(statement)


@asynccontextmanager
async def login_role(schema: str, *, prefix: str = "faults") -> AsyncIterator[str]:
    """A login role of its own on ``schema`` (see ``create_login_role``): its conninfo,
    dropped afterwards."""
    role = await create_login_role(schema, prefix=prefix)
    try:
        yield role_conninfo(role)
    finally:
        await drop_login_role(role)
