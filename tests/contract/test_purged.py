"""A pruned key stays closed on every store: ``run`` and ``begin`` raise ``EffectPurgedError``
and the handler never runs; other keys are untouched.

Each store is pruned its own way: ``MemoryStore.prune``; ``agent_ledger.retention.prune`` on the
Django tables; for ``PostgresStore`` (which has no retention of its own: it shares the Django
tables) the rows a Django prune leaves, written with SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

import pytest

from agent_ledger import EffectLedger, EffectPurgedError, EffectStatus
from agent_ledger.stores.memory import MemoryStore

from .helpers import Calls, make_call, never_called


async def prune_everything(ledger: EffectLedger) -> None:
    """Prune every finished effect of the ledger's store."""
    store: Any = ledger.store
    if isinstance(store, MemoryStore):
        await store.prune(timedelta(microseconds=1))  # everything finished before now
        return
    if type(store).__name__ == "DjangoStore":
        from agent_ledger.models import Effect
        from agent_ledger.retention import prune

        def backdate_and_prune() -> None:
            from django.db import connections

            try:
                Effect.objects.terminal().update(completed_at=_days_ago(2), created_at=_days_ago(3))
                prune("1d")
            finally:
                connections.close_all()  # this thread's, before the test database goes

        await asyncio.to_thread(backdate_and_prune)
        return
    async with store._pool.connection() as conn:  # PostgresStore: what a Django prune leaves
        await conn.execute(
            "INSERT INTO agent_ledger_effecttombstone"
            " (effect_id, idem_key, workflow_id, tool, status, created_at, completed_at)"
            " SELECT id, idem_key, workflow_id, tool, status, created_at, completed_at"
            " FROM agent_ledger_effect"
            " WHERE status IN ('succeeded', 'failed', 'denied', 'canceled')"
        )
        await conn.execute(
            "DELETE FROM agent_ledger_effecttransition WHERE effect_id IN"
            " (SELECT effect_id FROM agent_ledger_effecttombstone)"
        )
        await conn.execute(
            "DELETE FROM agent_ledger_effect WHERE id IN"
            " (SELECT effect_id FROM agent_ledger_effecttombstone)"
        )


def _days_ago(days: int) -> Any:
    from django.utils import timezone

    return timezone.now() - timedelta(days=days)


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
async def test_a_pruned_key_never_runs_again(ledger: EffectLedger, outcome: str) -> None:
    call = make_call(amount=1000)
    calls = Calls(
        result={"charge": "ch_1"}, error=ValueError("no") if outcome == "failed" else None
    )
    with pytest.raises(ValueError) if outcome == "failed" else contextlib.nullcontext():
        await ledger.run(call, calls.async_handler)
    key = ledger.idem_key(call)
    await prune_everything(ledger)

    assert await ledger.find_by_idem_key(key) is None
    with pytest.raises(EffectPurgedError) as caught:
        await ledger.run(call, never_called)
    assert (caught.value.idem_key, caught.value.status) == (key, outcome)
    with pytest.raises(EffectPurgedError):
        await ledger.begin(call)
    assert await ledger.find_by_idem_key(key) is None  # nothing was inserted either
    assert calls.count == 1


async def test_pending_keys_are_not_pruned_and_other_keys_still_run(ledger: EffectLedger) -> None:
    waiting = await ledger.begin(make_call(n=1))
    await ledger.request_approval(waiting.effect.idem_key)
    await ledger.run(make_call(n=2), Calls(result=2).async_handler)
    await prune_everything(ledger)

    pending = await ledger.find_by_idem_key(waiting.effect.idem_key)
    assert pending is not None and pending.status is EffectStatus.REQUIRES_APPROVAL
    assert await ledger.run(make_call(n=3), Calls(result=3).async_handler) == 3
