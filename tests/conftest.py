"""Shared fixtures. ``store`` runs the contract suite once per store implementation.

Each store's fixture lives in ``tests/stores/<name>.py`` as ``async def make(request)`` (an async
generator that yields a ready, empty store and cleans up after). Adding a store = adding a module
and its name to ``STORES``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import AsyncIterator, Iterator

import pytest

from agent_ledger import EffectLedger, EffectLedgerOptions
from agent_ledger.stores.base import EffectStore

STORES = ["memory", "django", "postgres"]

#: The PostgreSQL the PostgresStore tests use, whatever DATABASE_URL the Django side uses.
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[EffectStore]:
    module = importlib.import_module(f"tests.stores.{request.param}")
    async for made in module.make(request):
        yield made


@pytest.fixture
async def ledger(store: EffectStore) -> EffectLedger:
    return EffectLedger(EffectLedgerOptions(store=store))


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None) -> Iterator[None]:
    """Close the store's own connections (threads, LISTEN) before the test database is dropped."""
    yield
    from agent_ledger.stores.django import close_connections

    close_connections()
