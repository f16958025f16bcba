"""What the worker processes share: Django set-up on a schema, stores, the start barrier and
the handler-run counter.

Workers import no pytest and no ``tests.settings``: everything (server, schema) comes on the
command line, so a worker sees exactly the tables the spawning test made.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from agent_ledger.stores.base import EffectStore

#: The table each handler run inserts a row into, on its own connection: the count the race
#: tests check is kept outside the ledger, so a ledger bug cannot hide a second run.
HANDLER_RUNS_SQL = """
CREATE TABLE IF NOT EXISTS handler_runs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workflow_id text NOT NULL,
    pid integer NOT NULL,
    fence integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--conninfo", required=True)
    p.add_argument("--schema", required=True)
    p.add_argument("--application-name", default="agent-ledger-worker")
    return p


def options(schema: str) -> str:
    return f"-c search_path={schema}"


def configure_django(
    conninfo: str,
    schema: str,
    *,
    application_name: str = "agent-ledger-worker",
    threads: int = 4,
    connect_timeout: int = 5,
    conn_max_age: int | None = 60,
    health_checks: bool = False,
) -> None:
    """Django with just the apps the ledger needs, on ``schema`` of the given server."""
    import django
    from django.conf import settings

    info = conninfo_to_dict(conninfo)
    settings.configure(
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": info.get("dbname", ""),
                "USER": info.get("user", ""),
                "PASSWORD": info.get("password", ""),
                "HOST": info.get("host", ""),
                "PORT": str(info.get("port", "")),
                "CONN_MAX_AGE": conn_max_age,
                "CONN_HEALTH_CHECKS": health_checks,
                "OPTIONS": {
                    "options": options(schema),
                    "application_name": application_name,
                    "connect_timeout": connect_timeout,
                },
            }
        },
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "agent_ledger"],
        USE_TZ=True,
        TIME_ZONE="UTC",
        SECRET_KEY="workers-only-not-secret",
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        AGENT_LEDGER={"ASYNC_THREADS": threads},
    )
    django.setup()


@asynccontextmanager
async def open_store(
    kind: str,
    conninfo: str,
    schema: str,
    *,
    application_name: str = "agent-ledger-worker",
    pool_size: int = 4,
) -> AsyncIterator[EffectStore]:
    """A PostgresStore on its own pool, or a DjangoStore (Django configured first)."""
    if kind == "django":
        configure_django(conninfo, schema, application_name=application_name, threads=pool_size)
        from agent_ledger.stores.django import DjangoStore, close_connections

        try:
            yield DjangoStore()
        finally:
            # What a worker's shutdown must do: also writes the replay counts it still holds.
            await asyncio.to_thread(close_connections)
        return
    from psycopg_pool import AsyncConnectionPool

    from agent_ledger.stores.postgres import PostgresStore

    pool = AsyncConnectionPool(
        conninfo,
        kwargs={"options": options(schema), "application_name": application_name},
        min_size=1,
        max_size=pool_size,
        timeout=20,
        check=AsyncConnectionPool.check_connection,
        open=False,
    )
    await pool.open(wait=True, timeout=10)
    store = PostgresStore(pool=pool)
    try:
        yield store
    finally:
        try:
            await store.aclose()  # writes the replay counts it still holds
        finally:
            await pool.close()


async def connect(conninfo: str, schema: str, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(
        conninfo, autocommit=True, options=options(schema), **kwargs
    )


async def wait_at_barrier(conn: psycopg.AsyncConnection[Any], group: int, step: int) -> None:
    """Block until the test releases ``(group, step)``: it holds that advisory lock exclusively
    and lets go once every worker waits for it, so all of them start the step together."""
    await conn.execute("SELECT pg_advisory_lock_shared(%s, %s)", (group, step))
    await conn.execute("SELECT pg_advisory_unlock_shared(%s, %s)", (group, step))


async def record_run(conninfo: str, schema: str, workflow_id: str, fence: int) -> None:
    """Count one handler run, committed at once on a connection of its own."""
    async with await connect(conninfo, schema) as conn:
        await conn.execute(
            "INSERT INTO handler_runs (workflow_id, pid, fence) VALUES (%s, %s, %s)",
            (workflow_id, os.getpid(), fence),
        )
