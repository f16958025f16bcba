"""What the adapter tests share: Redis, a key prefix per test, the test database for workers,
the ORM from async tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def require_redis() -> None:
    """An unreachable Redis fails the test (``.ci/run`` starts it), it never skips it."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is unreachable at {REDIS_URL} (start redis-server): {exc}")


def unique_prefix() -> str:
    return f"agent-ledger-test-{uuid.uuid4().hex[:12]}:"


def drop_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)


def database_env() -> dict[str, str]:
    """Environment for a process that must use this test's database through tests.settings."""
    from django.db import connection

    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        return {"DATABASE_URL": "sqlite://:memory:", "SQLITE_TEST_NAME": settings["NAME"]}
    user = settings["USER"] or "postgres"
    auth = f"{user}:{settings['PASSWORD']}" if settings["PASSWORD"] else user
    host = settings["HOST"] or "127.0.0.1"
    return {
        "DATABASE_URL": f"postgres://{auth}@{host}:{settings['PORT'] or 5432}/{settings['NAME']}"
    }


def poll(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Wait for an event another process reports (a file, a row); fail after ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


async def orm(fn: Callable[[], T]) -> T:
    """Run sync ORM code (a query, ``services.approve``) from an async test on a thread whose
    connection is closed afterwards, so none outlives the test database."""
    import asyncio

    from django.db import connections

    def run() -> T:
        try:
            return fn()
        finally:
            connections.close_all()

    return await asyncio.to_thread(run)
