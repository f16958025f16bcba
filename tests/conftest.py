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

#: Modules whose tests do not depend on ``DATABASE_URL`` (pure Python, or their own PostgreSQL
#: at ``TEST_POSTGRES_URL``, or a subprocess with its own settings). ``scripts/test.sh`` runs the
#: suite once per database; the second pass sets ``AGENT_LEDGER_TEST_PASS=again`` and leaves
#: these, and the contract tests of the stores that are not Django's, to the first.
DATABASE_INDEPENDENT = frozenset(
    {
        "test_bench_smoke",
        "test_demo_agent_browser",
        "test_example_project",
        "test_faults",
        "test_keys",
        "test_langgraph_postgres",
        "test_links",
        "test_memory_store",
        "test_multiprocess",
        "test_notifier",
        "test_postgres_store",
        "test_redaction",
        "test_resume_postgres",
        "test_schema_parity",
        "test_spec_examples",
        "test_tracing",
        "test_types",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("AGENT_LEDGER_TEST_PASS") != "again":
        return
    keep: list[pytest.Item] = []
    again: list[pytest.Item] = []
    for item in items:
        (again if _database_independent(item) else keep).append(item)
    if again:
        config.hook.pytest_deselected(items=again)
        items[:] = keep


def _database_independent(item: pytest.Item) -> bool:
    module = getattr(item, "module", None)
    if module is not None and module.__name__.rsplit(".", 1)[-1] in DATABASE_INDEPENDENT:
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("store") in ("memory", "postgres")


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
