"""The floor: what any correct PostgreSQL ledger must do, in raw SQL (issue 5).

A fresh run is two round trips: one statement claims the key (``INSERT ... ON CONFLICT
(idem_key) DO NOTHING RETURNING``, falling back in the same statement to reading the existing
row); the handler runs; one conditional ``UPDATE`` finishes the effect (still processing, same
fence). A replay is one round trip: the same claim statement, which finds the row and writes
nothing. Autocommit connections from a psycopg pool; no explicit transactions. That is the
``issue`` variant, issue 5's floor as written; ``VARIANTS`` also has ``history`` (each statement
writes its history row too) and ``dedup`` (history rows, and a replay adds 1 to ``dedup_count``
as our stores do, so every replay is a write).

Its tables are defined exactly like ``agent_ledger``'s (``CREATE TABLE ... (LIKE ... INCLUDING
ALL)`` of the migrated tables, plus the foreign key), so the only difference to our stores is the
code path. Callers of a key that is being run wait for an in-process wake-up (what
``ChangeNotifier`` does for our stores) with polling as the fallback, then read the row. It
implements the run/replay/wait paths only: no approvals, no stale takeover.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

EFFECT = "agent_ledger_effect"
TRANSITION = "agent_ledger_effecttransition"

_INSERT = f"""
    INSERT INTO {EFFECT} (id, idem_key, workflow_id, call_id, tool, status, args_canonical)
    VALUES (%(id)s, %(key)s, %(workflow_id)s, %(call_id)s, %(tool)s, 'processing', %(args)s)
    ON CONFLICT (idem_key) DO NOTHING
    RETURNING id, status, result, error, fence, created_at"""
_FIRST_HISTORY = f"""
    INSERT INTO {TRANSITION} (effect_id, from_status, to_status, at, actor_label)
    SELECT id, NULL, status, created_at, 'system' FROM ins"""
_FOUND = "SELECT true, id, status, result, error, fence FROM ins UNION ALL"

#: Claim: insert, or (same statement) read the existing row. A replay writes nothing.
CLAIM_READ_SQL = f"""
WITH ins AS ({_INSERT}
)
{_FOUND}
SELECT false, id, status, result, error, fence FROM {EFFECT}
WHERE idem_key = %(key)s AND NOT EXISTS (SELECT FROM ins)
"""

#: Claim with the first history row; a replay reads.
CLAIM_HISTORY_SQL = f"""
WITH ins AS ({_INSERT}
), history AS ({_FIRST_HISTORY}
)
{_FOUND}
SELECT false, id, status, result, error, fence FROM {EFFECT}
WHERE idem_key = %(key)s AND NOT EXISTS (SELECT FROM ins)
"""

#: Claim with the first history row; a replay adds 1 to dedup_count (what our stores do).
CLAIM_DEDUP_SQL = f"""
WITH ins AS ({_INSERT}
), history AS ({_FIRST_HISTORY}
), existing AS (
    UPDATE {EFFECT} SET dedup_count = dedup_count + 1
    WHERE idem_key = %(key)s AND NOT EXISTS (SELECT FROM ins)
    RETURNING id, status, result, error, fence
)
{_FOUND}
SELECT false, id, status, result, error, fence FROM existing
"""

_FINISH = f"""
    UPDATE {EFFECT}
    SET status = %(status)s, result = %(result)s, error = %(error)s,
        updated_at = statement_timestamp(), completed_at = statement_timestamp()
    WHERE id = %(id)s AND status = 'processing' AND fence = %(fence)s"""

#: Finish: one conditional UPDATE (still processing, same fence).
FINISH_SQL = _FINISH

#: Finish and write the history row in the same statement.
FINISH_HISTORY_SQL = f"""
WITH done AS ({_FINISH}
    RETURNING id, updated_at
)
INSERT INTO {TRANSITION} (effect_id, from_status, to_status, at, actor_label)
SELECT id, 'processing', %(status)s, updated_at, 'system' FROM done
"""

#: The floor's variants: (claim, finish). ``issue`` is issue 5's floor as written; ``history``
#: adds our history rows; ``dedup`` also counts replays, which makes every replay a write.
VARIANTS = {
    "issue": (CLAIM_READ_SQL, FINISH_SQL),
    "history": (CLAIM_HISTORY_SQL, FINISH_HISTORY_SQL),
    "dedup": (CLAIM_DEDUP_SQL, FINISH_HISTORY_SQL),
}

READ_SQL = f"SELECT status, result, error FROM {EFFECT} WHERE id = %s"

#: Copies of agent_ledger's migrated tables (from ``source`` schema) into the current schema.
TABLES_SQL = """
CREATE TABLE IF NOT EXISTS {effect} (LIKE {source}.{effect} INCLUDING ALL);
CREATE TABLE IF NOT EXISTS {transition} (LIKE {source}.{transition} INCLUDING ALL);
DO $$ BEGIN
    ALTER TABLE {transition} ADD CONSTRAINT floor_transition_effect_fk FOREIGN KEY (effect_id)
        REFERENCES {effect} (id) DEFERRABLE INITIALLY DEFERRED;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
"""


class FloorFailed(Exception):
    """A replay of a failed (or denied/canceled) effect."""


class FloorLedger:
    def __init__(self, pool: AsyncConnectionPool[Any], variant: str = "issue") -> None:
        self._pool = pool
        self._claim_sql, self._finish_sql = VARIANTS[variant]
        # In-process wake-ups: set once the effect is finished (never cleared; ``reset`` drops
        # them with the rows), so a waiter that registers late returns at once.
        self._finished: dict[str, asyncio.Event] = {}

    def reset(self) -> None:
        self._finished.clear()

    async def run(self, workflow_id: str, tool: str, args: dict[str, Any], handler: Any) -> Any:
        args_canonical = json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        key = hashlib.sha256(f"{workflow_id}|{tool}|{args_canonical}".encode()).hexdigest()
        params = {
            "id": uuid.uuid4(),
            "key": key,
            "workflow_id": workflow_id,
            "call_id": str(uuid.uuid4()),
            "tool": tool,
            "args": args_canonical,
        }
        while True:
            async with self._pool.connection() as conn:
                row = await (await conn.execute(self._claim_sql, params)).fetchone()
            if row is not None:
                break
            # The key was inserted by a transaction that committed after this statement's
            # snapshot was taken: neither branch saw it. A new statement will.
        created, effect_id, status, result, error, fence = row
        effect_id = str(effect_id)
        if created:
            return await self._execute(effect_id, fence, handler)
        return await self._settle(effect_id, status, result, error)

    async def _execute(self, effect_id: str, fence: int, handler: Any) -> Any:
        try:
            value = await handler(effect_id)
        except Exception as exc:
            await self._finish(effect_id, fence, "failed", None, {"message": str(exc)})
            raise
        if await self._finish(effect_id, fence, "succeeded", value, None):
            return value
        return await self._settle(effect_id, "processing", None, None)

    async def _finish(
        self, effect_id: str, fence: int, status: str, result: Any, error: Any
    ) -> bool:
        params = {
            "id": effect_id,
            "fence": fence,
            "status": status,
            "result": None if result is None else Jsonb(result),
            "error": None if error is None else Jsonb(error),
        }
        async with self._pool.connection() as conn:
            cursor = await conn.execute(self._finish_sql, params)
            finished = cursor.rowcount == 1
        self._finished.setdefault(effect_id, asyncio.Event()).set()
        return finished

    async def _settle(self, effect_id: str, status: str, result: Any, error: Any) -> Any:
        deadline = time.monotonic() + 30
        interval = 0.05
        while True:
            if status == "succeeded":
                return result
            if status in ("failed", "denied", "canceled"):
                raise FloorFailed((error or {}).get("message", status))
            if time.monotonic() > deadline:
                raise TimeoutError(f"effect {effect_id} still {status} after 30 s")
            event = self._finished.setdefault(effect_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), interval)
            except asyncio.TimeoutError:
                interval = min(interval * 1.5, 1.0)
            async with self._pool.connection() as conn:
                row = await (await conn.execute(READ_SQL, (effect_id,))).fetchone()
            if row is None:
                raise LookupError(f"effect {effect_id} disappeared")
            status, result, error = row
