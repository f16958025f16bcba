"""``MemoryStore`` specifics: one lock across threads and event loops, and early wake-ups."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

from agent_ledger import (
    Actor,
    CommitSucceeded,
    EffectLedger,
    EffectLedgerOptions,
    EffectStatus,
    EffectStore,
    MemoryStore,
    ToolCall,
)
from agent_ledger.stores.base import NewEffect

from .contract.helpers import run_in_threads

SYSTEM = Actor("system")


def new_effect(
    idem_key: str = "k" * 64, status: EffectStatus = EffectStatus.PROCESSING
) -> NewEffect:
    return NewEffect(
        id=str(uuid.uuid4()),
        idem_key=idem_key,
        workflow_id="wf",
        call_id=str(uuid.uuid4()),
        tool="t",
        status=status,
        args_canonical="{}",
        resource_id_canonical=None,
        actor=SYSTEM,
    )


def test_memory_store_implements_the_protocol() -> None:
    assert isinstance(MemoryStore(), EffectStore)


async def test_threads_hammering_one_key_create_exactly_one_effect() -> None:
    store = MemoryStore()
    threads, per_thread = 8, 25

    async def hammer(_: int) -> list[Any]:
        return await asyncio.gather(*(store.begin(new_effect()) for _ in range(per_thread)))

    records = [
        r for batch in await asyncio.to_thread(run_in_threads, threads, hammer) for r in batch
    ]

    created = [r for r in records if r.created]
    assert len(created) == 1
    assert {r.effect.id for r in records} == {created[0].effect.id}
    effect = await store.get_by_idem_key("k" * 64)
    assert effect is not None
    assert effect.dedup_count == threads * per_thread - 1
    assert len(await store.history(effect.id)) == 1


async def test_threads_running_one_call_run_the_handler_once() -> None:
    ledger = EffectLedger(EffectLedgerOptions(store=MemoryStore()))
    call = ToolCall(workflow_id="wf", tool="t", args={"a": 1})
    count = 0
    lock = threading.Lock()

    def handler(effect: Any) -> str:
        nonlocal count
        with lock:
            count += 1
        time.sleep(0.05)
        return "once"

    async def caller(_: int) -> list[Any]:
        return await asyncio.gather(*(ledger.run(call, handler) for _ in range(10)))

    results = await asyncio.to_thread(run_in_threads, 6, caller)

    assert count == 1
    assert results == [["once"] * 10] * 6


async def test_threads_racing_to_claim_a_ready_effect_have_one_winner() -> None:
    store = MemoryStore()
    record = await store.begin(new_effect(status=EffectStatus.REQUIRES_APPROVAL))
    changed = await store.transition(
        record.effect.idem_key,
        from_statuses={EffectStatus.REQUIRES_APPROVAL},
        to_status=EffectStatus.READY,
        actor=SYSTEM,
    )
    assert changed.changed

    async def claim(_: int) -> list[Any]:
        return await asyncio.gather(
            *(store.claim(record.effect.id, stale_after_ms=0, actor=SYSTEM) for _ in range(10))
        )

    claims = [c for batch in await asyncio.to_thread(run_in_threads, 8, claim) for c in batch]

    winners = [c for c in claims if c is not None]
    assert len(winners) == 1
    assert winners[0].fence == record.effect.fence + 1


async def test_wait_for_change_wakes_early_on_a_change_from_another_thread() -> None:
    store = MemoryStore()
    record = await store.begin(new_effect())
    since = time.monotonic()

    def commit_later() -> None:
        time.sleep(0.05)
        asyncio.run(
            store.commit(record.effect.id, CommitSucceeded("done"), fence=None, actor=SYSTEM)
        )

    other = threading.Thread(target=commit_later)
    other.start()
    try:
        woken = await store.wait_for_change(record.effect.id, 60.0, since)
    finally:
        await asyncio.to_thread(other.join, 10)

    # Woken by the commit (which hands over the new state), not by the timeout (None).
    assert woken is not None and woken.status is EffectStatus.SUCCEEDED
    effect = await store.get(record.effect.id)
    assert effect is not None
    assert effect.status is EffectStatus.SUCCEEDED


async def test_wait_for_change_returns_at_once_for_a_change_after_since() -> None:
    """A change between the caller's read and its wait must not be slept through."""
    store = MemoryStore()
    record = await store.begin(new_effect())
    since = time.monotonic()
    await store.commit(record.effect.id, CommitSucceeded(1), fence=None, actor=SYSTEM)

    started = time.monotonic()
    changed = await store.wait_for_change(record.effect.id, 10.0, since)

    assert time.monotonic() - started < 5.0
    # The committed state comes with the wake-up, so a waiter need not read it again.
    assert changed is not None
    assert (changed.status, changed.result) == (EffectStatus.SUCCEEDED, 1)


async def test_wait_for_change_times_out_without_a_change() -> None:
    store = MemoryStore()
    waited = await store.begin(new_effect("a" * 64))
    other = await store.begin(new_effect("b" * 64))
    since = time.monotonic()

    async def change_the_other_effect() -> None:
        await asyncio.sleep(0.01)
        await store.commit(other.effect.id, CommitSucceeded(1), fence=None, actor=SYSTEM)

    started = time.monotonic()
    await asyncio.gather(
        store.wait_for_change(waited.effect.id, 0.2, since), change_the_other_effect()
    )

    assert time.monotonic() - started >= 0.15  # a change to another effect did not wake it


async def test_effects_are_snapshots() -> None:
    store = MemoryStore()
    record = await store.begin(new_effect())
    before = await store.get(record.effect.id)

    await store.commit(record.effect.id, CommitSucceeded(1), fence=None, actor=SYSTEM)

    assert before is not None
    assert before.status is EffectStatus.PROCESSING
    after = await store.get(record.effect.id)
    assert after is not None
    assert after.status is EffectStatus.SUCCEEDED


async def test_stores_do_not_share_state() -> None:
    one, two = MemoryStore(), MemoryStore()
    await one.begin(new_effect())

    assert await two.get_by_idem_key("k" * 64) is None
    assert (await two.begin(new_effect())).created
