"""``run_sync`` and the sync forms: sync code (WSGI views, Celery tasks, management commands)
calls the ledger directly, and a sync handler runs in the caller's own thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.test import Client

from agent_ledger import (
    ConcurrencyOptions,
    Effect,
    EffectLedger,
    EffectLedgerError,
    EffectLedgerOptions,
    EffectStatus,
    RunOptions,
    SyncCallInEventLoopError,
    ToolCall,
)
from agent_ledger.stores.base import EffectStore
from agent_ledger.stores.django import DjangoStore, close_connections

SHORT = RunOptions(concurrency=ConcurrencyOptions(wait_timeout_ms=5_000, initial_interval_ms=10))


def call(n: int = 1) -> ToolCall:
    return ToolCall(workflow_id="sync", tool="celery.charge", args={"n": n})


async def test_a_sync_handler_sees_the_callers_thread_locals(store: EffectStore) -> None:
    """Inside a Celery task, ``self.request.id`` (a thread-local) was None in the handler."""
    ledger = EffectLedger(EffectLedgerOptions(store=store))
    request = threading.local()
    seen: list[tuple[int, Any]] = []

    def task_body() -> Any:
        request.id = "task-42"

        def handler(effect: Effect) -> dict[str, Any]:
            seen.append((threading.get_ident(), getattr(request, "id", None)))
            return {"task": request.id}

        return threading.get_ident(), ledger.run_sync(call(), handler, SHORT)

    caller, result = await asyncio.to_thread(task_body)
    assert result == {"task": "task-42"}
    assert seen == [(caller, "task-42")]


async def test_threads_racing_one_key_through_run_sync_run_it_once(store: EffectStore) -> None:
    ledger = EffectLedger(EffectLedgerOptions(store=store))
    barrier = threading.Barrier(8)
    runs: list[int] = []

    def handler(effect: Effect) -> str:
        runs.append(threading.get_ident())
        return "charged"

    def worker() -> Any:
        barrier.wait(timeout=30)
        return ledger.run_sync(call(), handler, SHORT)

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(8) as threads:
        results = await asyncio.gather(*(loop.run_in_executor(threads, worker) for _ in range(8)))
    assert results == ["charged"] * 8
    assert len(runs) == 1


async def test_the_sync_forms_decide_and_read(store: EffectStore) -> None:
    ledger = EffectLedger(EffectLedgerOptions(store=store))

    def operator() -> list[Any]:
        effect = ledger.propose_sync(call(2))
        approved = ledger.approve_sync(effect.idem_key, actor="cli", reason="looks fine")
        found = ledger.find_by_idem_key_sync(effect.idem_key)
        steps = [t.to_status.value for t in ledger.history_sync(effect.id)]
        other = ledger.propose_sync(call(3))
        denied = ledger.deny_sync(other.idem_key, "no", actor="cli")
        third = ledger.propose_sync(call(4))
        return [approved, found and found.status, steps, denied, ledger.cancel_sync(third.idem_key)]

    approved, status, steps, denied, canceled = await asyncio.to_thread(operator)
    assert (approved, status, denied, canceled) == (True, EffectStatus.READY, True, True)
    assert steps == ["requires_approval", "ready"]


async def test_sync_forms_refuse_to_block_a_running_event_loop(store: EffectStore) -> None:
    ledger = EffectLedger(EffectLedgerOptions(store=store))
    with pytest.raises(SyncCallInEventLoopError, match=r"await ledger\.run\("):
        ledger.run_sync(call(), lambda effect: "never")
    with pytest.raises(SyncCallInEventLoopError, match="approve_sync"):
        ledger.approve_sync("any-key")
    assert await ledger.find_by_idem_key(ledger.idem_key(call())) is None


# -- Django: the caller's connection and transaction -------------------------------------------


@pytest.fixture
def django_ledger(transactional_db: None) -> Iterator[EffectLedger]:
    yield EffectLedger(EffectLedgerOptions(store=DjangoStore()))
    close_connections()


@pytest.mark.skipif(connection.vendor == "sqlite", reason="SQLite has one writer: see below")
def test_a_sync_handler_runs_in_the_callers_atomic_block(django_ledger: EffectLedger) -> None:
    """The handler's ORM writes belong to the caller's transaction (they roll back with it);
    the ledger's own record is written on its own connection and stays."""
    User = get_user_model()
    inside: list[bool] = []

    def handler(effect: Effect) -> str:
        inside.append(connection.in_atomic_block)
        User.objects.create(username="made-by-the-tool")
        return "created"

    class Abort(Exception):
        pass

    with pytest.raises(Abort), transaction.atomic():
        assert django_ledger.run_sync(call(5), handler, SHORT) == "created"
        assert User.objects.filter(username="made-by-the-tool").exists()
        raise Abort
    assert inside == [True]
    assert not User.objects.filter(username="made-by-the-tool").exists()
    effect = django_ledger.find_by_idem_key_sync(django_ledger.idem_key(call(5)))
    assert effect is not None and effect.status is EffectStatus.SUCCEEDED


def test_a_sync_view_can_run_a_tool(transactional_db: None) -> None:
    """A WSGI view calling the ledger answered 500 ("coroutine is not JSON serializable")."""
    client = Client()
    first = client.get("/tests/ledger-echo-sync/", {"text": "hi"})
    again = client.get("/tests/ledger-echo-sync/", {"text": "hi"})
    close_connections()
    assert first.status_code == again.status_code == 200
    assert first.json() == {"result": {"echo": "hi"}, "ran": True}
    assert again.json() == {"result": {"echo": "hi"}, "ran": False}


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's single writer")
def test_on_sqlite_run_sync_inside_atomic_fails_at_once_with_a_clear_error(
    django_ledger: EffectLedger,
) -> None:
    """The caller's transaction holds SQLite's only write lock, so the ledger's own write on its
    connection could only time out ("database is locked") after 20 s: refuse it up front."""
    with pytest.raises(EffectLedgerError, match="atomic"), transaction.atomic():
        django_ledger.run_sync(call(6), lambda effect: "never", SHORT)
    assert django_ledger.find_by_idem_key_sync(django_ledger.idem_key(call(6))) is None
