"""``PostgresStore``'s operator actions (``agent_ledger.operator``): reopen a failed effect,
resolve a processing one. Lock, check, change, history row and NOTIFY in one short
transaction, the same columns ``DjangoStore``'s ORM writes (``django_operator``)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from ..errors import EffectNotFoundError, EffectStoreError
from ..operator import reopen_reason
from ..types import Actor, CommitOutcome, CommitSucceeded, EffectStatus
from .base import CHANNEL, TransitionRecord, effect_from_columns, int_user_id

# ``{columns}``: ``postgres.COLUMNS`` (filled in at call time: that module imports this one).
LOCK = "SELECT {columns} FROM agent_ledger_effect WHERE idem_key = %s FOR UPDATE"
REOPEN = """
UPDATE agent_ledger_effect
SET status = 'ready', error = NULL, result = NULL, completed_at = NULL,
    updated_at = statement_timestamp()
WHERE id = %(id)s RETURNING {columns}
"""
RESOLVE = """
UPDATE agent_ledger_effect
SET status = %(status)s, result = %(result)s::jsonb, error = %(error)s::jsonb,
    fence = fence + 1, updated_at = statement_timestamp(), completed_at = statement_timestamp()
WHERE id = %(id)s RETURNING {columns}
"""
HISTORY = """
INSERT INTO agent_ledger_effecttransition
    (effect_id, from_status, to_status, at, actor_label, actor_user_id, actor_name, reason)
VALUES (%(id)s, %(from_status)s, %(to_status)s, statement_timestamp(), %(actor_label)s,
        %(actor_user_id)s, %(actor_name)s, %(reason)s);
"""


class OperatorMixin:
    """Mixed into ``PostgresStore`` (which provides ``_connection``, ``_on_pool_loop`` and
    ``_notifier``)."""

    async def reopen(self, idem_key: str, *, actor: Actor, reason: str) -> TransitionRecord:
        """``failed -> ready``; the error goes into the history row's reason."""
        return await self._operate(
            idem_key,
            EffectStatus.FAILED,
            actor,
            lambda current: (REOPEN, {}),
            reason=lambda current: reopen_reason(reason, current.error),
        )

    async def resolve(
        self, idem_key: str, outcome: CommitOutcome, *, actor: Actor, reason: str
    ) -> TransitionRecord:
        """``processing -> succeeded|failed`` with the operator's outcome; the fence rises."""
        if isinstance(outcome, CommitSucceeded):
            result = None if outcome.result is None else json.dumps(outcome.result)
            params = {"status": EffectStatus.SUCCEEDED.value, "result": result, "error": None}
        else:
            error = json.dumps(outcome.error.to_dict())
            params = {"status": EffectStatus.FAILED.value, "result": None, "error": error}
        return await self._operate(
            idem_key,
            EffectStatus.PROCESSING,
            actor,
            lambda current: (RESOLVE, params),
            reason=lambda current: reason,
        )

    async def _operate(
        self, idem_key: str, from_status: EffectStatus, actor: Actor, change: Any, *, reason: Any
    ) -> TransitionRecord:
        from .postgres import COLUMNS

        store: Any = self
        user_id = int_user_id(actor)

        async def step() -> TransitionRecord:
            async with store._connection("operator") as conn, conn.transaction():
                cursor = conn.cursor(row_factory=_dict_row())
                # Lock for the check-then-write: a late commit, a takeover or a second
                # operator waits, then finds the effect changed and changes nothing.
                await cursor.execute(LOCK.format(columns=COLUMNS), (idem_key,))
                row = await cursor.fetchone()
                if row is None:
                    raise EffectNotFoundError(idem_key)
                current = effect_from_columns(row)
                if current.status is not from_status:
                    return TransitionRecord(current, changed=False)
                query, params = change(current)
                query = query.format(columns=COLUMNS)
                await cursor.execute(query, {"id": uuid.UUID(current.id), **params})
                updated = await cursor.fetchone()
                if updated is None:  # pragma: no cover - the row is locked
                    raise EffectStoreError("locked row vanished", operation="operator")
                effect = effect_from_columns(updated)
                await cursor.execute(
                    HISTORY,
                    {
                        "id": uuid.UUID(effect.id),
                        "from_status": from_status.value,
                        "to_status": effect.status.value,
                        "actor_label": actor.label,
                        "actor_user_id": user_id,
                        "actor_name": actor.name or "",
                        "reason": reason(current),
                    },
                )
                await cursor.execute("SELECT pg_notify(%s, %s)", (CHANNEL, effect.id))
                return TransitionRecord(effect, changed=True)

        record: TransitionRecord = await store._on_pool_loop(step())
        if record.changed:
            store._notifier.notify(record.effect.id, record.effect)
        return record


def _dict_row() -> Any:
    from psycopg.rows import dict_row

    return dict_row
