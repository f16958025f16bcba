"""The database failing under a store: a clear ``EffectStoreError``, no half-written step, and
the next call works.

The scenarios live in ``tests/workers/faults.py`` so ``PostgresStore`` (here, in-process) and
``DjangoStore`` (in a Django process configured for a throwaway schema) go through the same
ones. Failures are simulated with ``pg_terminate_backend``, closed ports and a read-only spell
(``default_transaction_read_only`` set for a login role made for the test); the server itself
is never stopped, since other test runs share it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from agent_ledger import EffectStoreError
from agent_ledger.stores.postgres import PostgresStore
from tests.conftest import POSTGRES_URL
from tests.stores.postgres import (
    create_login_role,
    create_schema,
    drop_login_role_sync,
    drop_schema_sync,
    ledger_schema,
    login_role,
    role_conninfo,
    schema_pool,
)
from tests.workers import faults
from tests.workers.faults import Kit

#: Needs the PostgreSQL at ``TEST_POSTGRES_URL`` (whatever ``DATABASE_URL`` says); an
#: unreachable server fails these tests, it never skips them.
pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parent.parent


def closed_port() -> int:
    """A local port nobody listens on (just released by the OS)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def kit() -> AsyncIterator[Kit]:
    name = f"ledger-faults-{secrets.token_hex(4)}"
    async with (
        ledger_schema(prefix="faults") as schema,
        # A role of its own: the read-only spell changes its settings, nobody else's.
        login_role(schema) as conninfo,
        # One connection: after it is killed, the pool's check finds it dead and waits a
        # reconnection delay (about 1 s) per dead connection before trying the next.
        schema_pool(
            schema, conninfo=conninfo, max_size=1, kwargs={"application_name": name}
        ) as pool,
    ):
        store = PostgresStore(pool=pool)
        try:
            yield Kit(store, conninfo, schema, name)
        finally:
            await store.aclose()


def report_measured(name: str, measured: dict[str, object]) -> None:
    """Shown with ``pytest -s`` (and in the JUnit XML): figures, never thresholds."""
    if measured:
        print(f"\n{name}: {json.dumps(measured)}")


@pytest.mark.parametrize("scenario", list(faults.SCENARIOS))
async def test_postgres_store(
    kit: Kit, scenario: str, record_property: pytest.RecordProperty
) -> None:
    await faults.SCENARIOS[scenario](kit)
    if scenario in kit.measured:
        record_property("measured", kit.measured[scenario])
        report_measured(f"PostgresStore {scenario}", kit.measured[scenario])


async def test_postgres_store_unreachable_fails_fast_with_a_chained_error() -> None:
    pool = AsyncConnectionPool(
        make_conninfo(POSTGRES_URL, port=closed_port()),
        min_size=0,
        max_size=1,
        timeout=0.5,
        open=False,
        check=AsyncConnectionPool.check_connection,
    )
    await pool.open()
    try:
        store = PostgresStore(pool=pool)
        await faults.unreachable(store)
        with pytest.raises(EffectStoreError, match="get: PoolTimeout") as caught:
            await store.get(str(uuid.uuid4()))
        assert isinstance(caught.value.__cause__, PoolTimeout)
    finally:
        await pool.close()


async def test_without_pool_checks_a_dropped_connection_fails_one_call_only() -> None:
    """Why the README's pool has ``check=``: without it the dead connection is found by the
    next call, which fails cleanly (the pool then drops it), and the call after works."""
    name = f"ledger-faults-{secrets.token_hex(4)}"
    async with (
        ledger_schema(prefix="faults") as schema,
        schema_pool(
            schema, min_size=1, max_size=1, check=None, kwargs={"application_name": name}
        ) as pool,
    ):
        store = PostgresStore(pool=pool)
        missing = str(uuid.uuid4())
        assert await store.get(missing) is None
        async with await psycopg.AsyncConnection.connect(POSTGRES_URL, autocommit=True) as admin:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (name,),
            )
        with pytest.raises(EffectStoreError) as caught:
            await store.get(missing)
        assert isinstance(caught.value.__cause__, psycopg.OperationalError)
        assert await store.get(missing) is None


# -- DjangoStore, in a Django process on its own schema -----------------------------------------


def run_django_faults(*args: str, conninfo: str = POSTGRES_URL) -> dict[str, Any]:
    """The worker's report: ``results`` (scenario: "ok" or a traceback) and ``measured``."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.workers.faults", "--conninfo", conninfo, *args],
        cwd=ROOT,
        capture_output=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return dict(json.loads(done.stdout.decode().strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def django_report() -> Iterator[dict[str, Any]]:
    """Every scenario, run once in one Django process (Django starts slowly), logged in as a
    role of its own like the in-process kit."""
    schema = asyncio.run(create_schema(prefix="faults"))
    try:
        role = asyncio.run(create_login_role(schema))
        try:
            yield run_django_faults(
                "--schema",
                schema,
                "--application-name",
                f"ledger-faults-{secrets.token_hex(4)}",
                conninfo=role_conninfo(role),
            )
        finally:
            drop_login_role_sync(role)
    finally:
        drop_schema_sync(schema)


@pytest.mark.parametrize("scenario", list(faults.SCENARIOS))
def test_django_store(
    django_report: dict[str, Any], scenario: str, record_property: pytest.RecordProperty
) -> None:
    result = django_report["results"][scenario]
    assert result == "ok", result
    measured = django_report["measured"].get(scenario)
    if measured:
        record_property("measured", measured)
        report_measured(f"DjangoStore {scenario}", measured)


def test_django_store_unreachable_fails_with_a_chained_error() -> None:
    report = run_django_faults("--schema", "public", "--port", str(closed_port()))["results"]
    assert report == {"unreachable": "ok"}, report["unreachable"]
