"""The ledger on ``DjangoStore`` from async code: a plain script, an ASGI view, many coroutines.

What must hold: no coroutine blocks the event loop on the database, concurrent coroutines are
not queued behind one connection, and a decision made elsewhere wakes a waiter at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections
from django.db import transaction as db_transaction
from django.test import AsyncClient

from agent_ledger import (
    Actor,
    ApprovalPendingError,
    ConcurrencyOptions,
    EffectLedger,
    EffectLedgerOptions,
    RunOptions,
    StaleOptions,
    ToolCall,
    services,
)
from agent_ledger.models import Effect as EffectRow
from agent_ledger.stores.django import DjangoStore, close_connections

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def close_store_connections() -> Iterator[None]:
    """The store's threads keep connections briefly; close them before the test database goes."""
    yield
    close_connections()


def make_ledger() -> EffectLedger:
    return EffectLedger(EffectLedgerOptions(store=DjangoStore()))


def test_works_from_a_plain_asyncio_script() -> None:
    """``asyncio.run`` in a script: no request, no ASGI server, nothing set up by Django."""
    calls = 0

    async def send(effect: Any) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {"sent": effect.args["to"]}

    async def main() -> list[Any]:
        ledger = services.get_ledger()
        call = ToolCall(workflow_id="script", tool="mail.send", args={"to": "a@example.com"})
        return [await ledger.run(call, send), await ledger.run(call, send)]

    assert asyncio.run(main()) == [{"sent": "a@example.com"}] * 2
    assert calls == 1
    close_connections()  # what a script's shutdown does; it also writes held replay counts
    row = EffectRow.objects.get()
    assert (row.status, row.dedup_count) == ("succeeded", 1)


async def test_works_in_an_async_view_under_asgi() -> None:
    client = AsyncClient()
    first = await client.get("/tests/ledger-echo/", {"text": "hi"})
    again = await client.get("/tests/ledger-echo/", {"text": "hi"})
    assert first.status_code == again.status_code == 200
    assert first.json() == {"result": {"echo": "hi"}, "replays": 0}
    assert again.json() == {"result": {"echo": "hi"}, "replays": 1}


async def test_concurrent_coroutines_are_not_funnelled_through_one_connection() -> None:
    ledger = make_ledger()

    inside = 0
    everyone_inside = asyncio.Event()

    async def handler(effect: Any) -> str:
        # All 16 calls are in their handlers at once: none waited for another's statements.
        nonlocal inside
        inside += 1
        if inside == 16:
            everyone_inside.set()
        await asyncio.wait_for(everyone_inside.wait(), 60)  # a hang guard
        return effect.id

    results = await asyncio.gather(
        *(
            ledger.run(ToolCall(workflow_id="parallel", tool="t", args={"n": n}), handler)
            for n in range(16)
        )
    )
    assert len(set(results)) == 16


async def test_the_event_loop_runs_while_a_store_call_waits_for_a_lock() -> None:
    store = DjangoStore()
    ledger = EffectLedger(EffectLedgerOptions(store=store))
    call = ToolCall(workflow_id="lock", tool="t", args={})
    idem_key = ledger.idem_key(call)
    waiting = asyncio.create_task(
        ledger.run(
            call,
            lambda effect: None,
            RunOptions(requires_approval=True, concurrency=ConcurrencyOptions(wait_timeout_ms=1)),
        )
    )
    with pytest.raises(ApprovalPendingError):
        await waiting
    locked = threading.Event()
    release = threading.Event()

    def hold_the_row() -> None:
        try:
            with db_transaction.atomic():
                EffectRow.objects.select_for_update().get(idem_key=idem_key)
                locked.set()
                release.wait(10)
        finally:
            connections.close_all()

    holder = threading.Thread(target=hold_the_row)
    holder.start()
    await asyncio.to_thread(locked.wait, 10)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    approving = asyncio.create_task(ledger.approve(idem_key))
    while ticks < 15:  # the loop keeps running (a hang guard below)...
        await asyncio.wait_for(asyncio.sleep(0.01), 60)
    assert not approving.done()  # ...while the approve is blocked on the row lock
    release.set()
    assert await approving
    ticker.cancel()
    await asyncio.to_thread(holder.join, 10)


async def test_a_decision_from_the_sync_service_wakes_the_waiter_at_once() -> None:
    ledger = make_ledger()
    call = ToolCall(workflow_id="approve-me", tool="deploy", args={"v": 2})
    slow_polling = ConcurrencyOptions(
        wait_timeout_ms=20_000, initial_interval_ms=10_000, max_interval_ms=10_000
    )

    async def deploy(effect: Any) -> str:
        return "deployed"

    run = asyncio.create_task(
        ledger.run(call, deploy, RunOptions(requires_approval=True, concurrency=slow_polling))
    )
    idem_key = ledger.idem_key(call)
    while await ledger.find_by_idem_key(idem_key) is None:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # let the run start waiting
    started = time.monotonic()

    def approve_elsewhere() -> Any:
        """What an admin view on another thread does; it closes its connection afterwards."""
        try:
            return services.approve(idem_key, actor=Actor("admin", name="Ann"))
        finally:
            connections.close_all()

    record = await asyncio.to_thread(approve_elsewhere)
    assert record.changed
    assert await asyncio.wait_for(run, 5) == "deployed"
    assert time.monotonic() - started < 2


async def test_stale_takeover_through_the_ledger() -> None:
    store = DjangoStore()
    ledger = EffectLedger(EffectLedgerOptions(store=store))
    call = ToolCall(workflow_id="stale", tool="t", args={})
    begun = await ledger.begin(call)  # an owner that then dies without committing
    assert begun.claimed

    async def finish(effect: Any) -> int:
        return effect.fence

    await asyncio.sleep(0.25)
    result = await ledger.run(call, finish, RunOptions(stale=StaleOptions(after_ms=200)))
    assert result == 2
    steps = [(t.from_status, t.to_status, t.reason) for t in await store.history(begun.effect.id)]
    assert steps[1] == ("processing", "processing", "stale takeover")
