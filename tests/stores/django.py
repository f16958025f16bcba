"""``DjangoStore`` for the contract suite, on whatever database ``DATABASE_URL`` names.

``transactional_db``, not ``db``: the store's async methods run on worker threads with their own
connections, which cannot see rows inside the test thread's uncommitted transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from django.db import connections


async def make(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    # Requested from an async fixture, so the marker (not ``request.fixturenames``) is what
    # tells pytest-django to use a TransactionTestCase.
    request.node.add_marker(pytest.mark.django_db(transaction=True))
    # Set up off the event loop's thread: creating the test database the first time is
    # synchronous Django, which refuses to run in a thread with a running loop.
    await asyncio.to_thread(_set_up_database, request)
    from agent_ledger.stores.django import DjangoStore, close_connections

    yield DjangoStore()
    # Before pytest-django flushes the tables (or drops the database at the end).
    await asyncio.to_thread(close_connections)


def _set_up_database(request: pytest.FixtureRequest) -> None:
    try:
        request.getfixturevalue("transactional_db")
    finally:
        for connection in connections.all(initialized_only=True):
            # When this thread created the test database, pytest-django drops it at the end of
            # the session from the main thread with these same connection objects.
            connection.inc_thread_sharing()
            # Open, it would block DROP DATABASE; closed, it is reopened where needed.
            connection.close()
