"""``PostgresStore``: the store protocol on PostgreSQL with psycopg 3, for workers outside Django.

It imports no Django. Its tables are the ones the Django migrations create (``SCHEMA_SQL``, kept
in ``schema.sql`` beside this module, makes the same; a test compares the catalogs), so workers
here and the admin on ``DjangoStore`` share one ledger. ``DjangoStore`` on PostgreSQL runs this
module's ``BEGIN`` and ``COMMIT`` through Django's cursor, so the two cannot drift apart.

Every write changes the effect, appends its history row and calls ``pg_notify`` (delivered on
commit, so other processes' waiters wake at once) in one atomic step: ``begin``, ``commit`` and
``claim`` are single data-modifying CTEs in autocommit; ``transition`` is a short transaction.
Replays are counted by the ``BEGIN`` that finds the key, before it returns, so a killed worker
loses no count; that write skips the WAL flush (``synchronous_commit`` off for its transaction),
so a *database* crash can lose its last few hundred milliseconds of counts, never an effect, an
outcome or a history row. Timestamps and staleness use the database clock.

Pool: the caller's, with ``check=AsyncConnectionPool.check_connection``. A connection whose step
failed for any reason but bad data is closed, so the pool replaces it (``_connection``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Collection, Coroutine, Mapping
from contextlib import asynccontextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg.rows import dict_row

from ..errors import EffectLedgerError, EffectNotFoundError, EffectStoreError
from ..types import (
    TERMINAL_STATUSES,
    Actor,
    CommitOutcome,
    CommitSucceeded,
    Effect,
    EffectError,
    EffectStatus,
    Transition,
)
from ._decide import TRANSITION
from ._listen import Listener
from ._postgres_operator import OperatorMixin
from ._tombstones import NOT_TOMBSTONED, purged, purged_branch
from .base import (
    CHANNEL,
    BeginRecord,
    ChangeNotifier,
    NewEffect,
    TransitionRecord,
    effect_from_columns,
    int_user_id,
    parse_uuid,
    transition_from_columns,
)

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

__all__ = ["SCHEMA_SQL", "PostgresStore"]

_T = TypeVar("_T")

#: Run it at start-up (see ``schema.sql`` for what it makes); safe on migrated databases.
SCHEMA_SQL = (Path(__file__).parent / "schema.sql").read_text(encoding="utf-8")


# -- the statements ------------------------------------------------------------------------------

COLUMNS = (
    "id, idem_key, workflow_id, call_id, tool, status, args_canonical, resource_id_canonical, "
    "result, error, dedup_count, fence, created_at, updated_at, completed_at, attempts, "
    "continuation"
)

#: The history row of whatever ``{source}`` returned. Casts: a parameter in a SELECT list has no
#: column to take its type from.
_HISTORY = """
INSERT INTO agent_ledger_effecttransition
    (effect_id, from_status, to_status, at, actor_label, actor_user_id, actor_name, reason)
SELECT id, {from_status}, status, {at}, %(actor_label)s::varchar, %(actor_user_id)s::integer,
       %(actor_name)s::varchar, {reason}
FROM {source}
"""
_NOTIFY = f"pg_notify('{CHANNEL}', id::text)::text"
# NOTIFY serialises commits server-wide: changes nobody can wait for send none (``worth_waking``).
_NOTIFY_CREATED = f"CASE WHEN status = 'requires_approval' THEN {_NOTIFY} END"
_NOTIFY_COMMITTED = f"CASE WHEN dedup_count > 0 OR status = 'ready' THEN {_NOTIFY} END"
_CREATED = _HISTORY.format(from_status="NULL", at="created_at", reason="NULL", source="ins")
_COMMITTED = _HISTORY.format(
    from_status="'processing'", at="updated_at", reason="%(reason)s::text", source="upd"
)
_CLAIMED = _HISTORY.format(
    from_status="from_status",
    at="updated_at",
    reason="CASE WHEN from_status = 'processing' THEN 'stale takeover' END",
    source="upd",
)

# Insert, or count a replay, in one statement. Under READ COMMITTED a row inserted by a
# transaction that commits while this statement runs makes both branches come back empty (the
# INSERT finds the key, the UPDATE's snapshot does not show the row): it is then run again.
BEGIN = f"""
WITH ins AS (
    INSERT INTO agent_ledger_effect
        (id, idem_key, workflow_id, call_id, tool, status, args_canonical,
         resource_id_canonical, dedup_count, fence, created_at, updated_at, attempts,
         continuation)
    SELECT %(id)s, %(idem_key)s::varchar, %(workflow_id)s, %(call_id)s, %(tool)s, %(status)s,
           %(args_canonical)s, %(resource_id_canonical)s, 0, 1,
           statement_timestamp(), statement_timestamp(),
           CASE WHEN %(status)s::varchar = 'processing' THEN 1 ELSE 0 END, %(continuation)s::jsonb
    {NOT_TOMBSTONED}
    ON CONFLICT (idem_key) DO NOTHING
    RETURNING {COLUMNS}
), hist AS (
    {_CREATED}
), replay AS (
    UPDATE agent_ledger_effect SET dedup_count = dedup_count + 1
    WHERE idem_key = %(idem_key)s AND NOT EXISTS (SELECT 1 FROM ins)
    RETURNING {COLUMNS}
)
SELECT true AS created, {COLUMNS}, {_NOTIFY_CREATED} AS side FROM ins
UNION ALL
SELECT false, {COLUMNS}, set_config('synchronous_commit', 'off', true) FROM replay
{purged_branch(COLUMNS)}"""

#: ``BEGIN`` is run again while both branches come back empty (each run has a newer snapshot).
BEGIN_ATTEMPTS = 10

# Commit (to succeeded or failed) or release (back to ready), by the owner. No lock needed: the
# UPDATE's conditions (still processing, fence unchanged) are re-checked on the newest row
# version if it waits for another writer, so an owner that lost its effect changes nothing.
COMMIT = f"""
WITH upd AS (
    UPDATE agent_ledger_effect
    SET status = %(status)s, result = %(result)s::jsonb, error = %(error)s::jsonb,
        updated_at = statement_timestamp(),
        completed_at = CASE WHEN %(status)s::varchar = 'ready' THEN NULL
                            ELSE statement_timestamp() END
    WHERE id = %(id)s AND status = 'processing'
      AND (%(fence)s::integer IS NULL OR fence = %(fence)s::integer)
    RETURNING {COLUMNS}
), hist AS (
    {_COMMITTED}
)
SELECT {COLUMNS}, {_NOTIFY_COMMITTED} AS side FROM upd
"""

# ``base.claimable`` by the database clock, as of when ``claim`` was called (``now()`` less the
# time it waited for a connection): a claimer that queued behind the winner then sees the
# winner's fresh ``updated_at`` and loses. The row lock (``cur``) makes one claimer the owner.
CLAIM = f"""
WITH cur AS (
    SELECT id, status FROM agent_ledger_effect WHERE id = %(id)s FOR UPDATE
), upd AS (
    UPDATE agent_ledger_effect AS e
    SET status = 'processing', fence = e.fence + 1, attempts = e.attempts + 1,
        updated_at = statement_timestamp()
    FROM cur
    WHERE e.id = cur.id
      AND (e.status = 'ready'
           OR (e.status = 'processing' AND %(stale)s::interval IS NOT NULL
               AND e.updated_at <= now() - %(waited)s::interval - %(stale)s::interval))
    RETURNING {", ".join(f"e.{column}" for column in COLUMNS.split(", "))},
              cur.status AS from_status
), hist AS (
    {_CLAIMED}
)
SELECT {COLUMNS}, {_NOTIFY} AS side FROM upd
"""

GET = f"SELECT {COLUMNS} FROM agent_ledger_effect WHERE id = %s"
GET_BY_KEY = f"SELECT {COLUMNS} FROM agent_ledger_effect WHERE idem_key = %s"
HISTORY_OF = """
SELECT effect_id, from_status, to_status, at, actor_label, actor_user_id, actor_name, reason
FROM agent_ledger_effecttransition WHERE effect_id = %s ORDER BY at, id
"""

_MAX_STALE = timedelta(days=36_500)  # longer would overflow timestamp arithmetic


# -- parameters and rows -------------------------------------------------------------------------


def begin_params(new: NewEffect, actor: Mapping[str, Any]) -> dict[str, Any]:
    fields = {field.name: getattr(new, field.name) for field in dataclasses.fields(new)}
    continuation = None if new.continuation is None else json.dumps(new.continuation)
    status = EffectStatus(new.status).value
    return {**fields, "id": uuid.UUID(new.id), "status": status, "continuation": continuation,
            **actor}  # fmt: skip


def commit_params(
    pk: uuid.UUID,
    outcome: CommitOutcome | None,
    fence: int | None,
    actor: Mapping[str, Any],
    *,
    error: EffectError | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """For ``COMMIT``: an outcome, or None to release (with the failed attempt's ``error``).
    JSON goes as text with a ``::jsonb`` cast: the same on psycopg's and Django's cursors."""
    status, result = EffectStatus.READY, None
    if isinstance(outcome, CommitSucceeded):
        # None is SQL NULL (as Django's JSONField stores it), not a JSON null.
        result = None if outcome.result is None else json.dumps(outcome.result)
        status = EffectStatus.SUCCEEDED
    elif outcome is not None:
        status, error = EffectStatus.FAILED, outcome.error
    error_json = None if error is None else json.dumps(error.to_dict())
    return {"id": pk, "status": status.value, "result": result, "error": error_json,
            "fence": fence, "reason": reason, **actor}  # fmt: skip


def claim_params(
    pk: uuid.UUID, stale_after_ms: float, waited_s: float, actor: Mapping[str, Any]
) -> dict[str, Any]:
    stale = None
    if stale_after_ms > 0:
        stale = min(timedelta(milliseconds=min(stale_after_ms, 1e15)), _MAX_STALE)
    return {"id": pk, "stale": stale, "waited": timedelta(seconds=max(0.0, waited_s)), **actor}


def actor_params(actor: Actor, user_id: Any) -> dict[str, Any]:
    return {"actor_label": actor.label, "actor_user_id": user_id, "actor_name": actor.name or ""}


def begun(idem_key: str, row: dict[str, Any] | None) -> dict[str, Any]:
    """``BEGIN``'s row, or the error for its two other answers: nothing (``vanished``) and a
    pruned key (``EffectPurgedError``, see ``_tombstones``)."""
    if row is None:
        raise vanished(idem_key)
    if row["created"] is None:
        raise purged(idem_key, row)
    return row


def vanished(idem_key: str) -> EffectStoreError:
    """For a ``BEGIN`` that answered nothing ``BEGIN_ATTEMPTS`` times (see ``BEGIN``)."""
    return EffectStoreError(
        f"key {idem_key} was neither inserted nor found after {BEGIN_ATTEMPTS} attempts",
        operation="begin",
    )


# -- the store -----------------------------------------------------------------------------------

#: The database failed, refused or is out of reach (``PoolTimeout`` is a psycopg error too)...
_DRIVER_ERRORS = (psycopg.Error, OSError)
#: ...but these say nothing about the connection: the statement's data was refused.
_DATA_ERRORS = (psycopg.DataError, psycopg.IntegrityError)


class PostgresStore(OperatorMixin):
    """Effects and their history in ``agent_ledger``'s tables, through a psycopg 3 async pool.

    The pool is the caller's to open and close; the tables are found on its connections'
    ``search_path``. Calls from threads running their own event loops are carried out on the
    pool's loop, which must keep running meanwhile (awaiting, not blocked in a sync call).
    """

    def __init__(self, *, pool: AsyncConnectionPool, listen: bool = True) -> None:
        """``listen``: wake waiters through LISTEN/NOTIFY (one extra connection per store)
        rather than by polling alone."""
        self._pool = pool
        self._notifier = ChangeNotifier()
        self._listener = Listener(self._listen_connection, self._notifier) if listen else None
        # The loop the pool lives on: its locks and workers belong to it. Known here when the
        # store is made inside a coroutine (as in the README), else at the first call.
        self._loop: asyncio.AbstractEventLoop | None = _running_loop()

    def __repr__(self) -> str:
        return f"PostgresStore(pool={self._pool.name!r})"

    async def begin(self, new: NewEffect) -> BeginRecord:
        params = begin_params(new, _actor_params(new.actor))
        rows = await self._fetch("begin", BEGIN, params, attempts=BEGIN_ATTEMPTS)
        row = begun(new.idem_key, rows[0] if rows else None)
        effect = effect_from_columns(row)
        if row["created"]:
            self._notifier.notify(effect.id, effect)
        return BeginRecord(effect, created=row["created"])

    async def commit(
        self, effect_id: str, outcome: CommitOutcome, *, fence: int | None, actor: Actor
    ) -> Effect | None:
        pk = parse_uuid(effect_id)
        if pk is None:
            return None
        params = commit_params(pk, outcome, fence, _actor_params(actor))
        return await self._changed(await self._one("commit", COMMIT, params))

    async def release(
        self,
        effect_id: str,
        *,
        fence: int,
        actor: Actor,
        reason: str,
        error: EffectError | None = None,
    ) -> Effect | None:
        pk = parse_uuid(effect_id)
        if pk is None:
            return None
        params = commit_params(pk, None, fence, _actor_params(actor), error=error, reason=reason)
        return await self._changed(await self._one("release", COMMIT, params))

    async def claim(self, effect_id: str, *, stale_after_ms: float, actor: Actor) -> Effect | None:
        pk = parse_uuid(effect_id)
        if pk is None:
            return None
        requested = time.monotonic()
        actor_columns = _actor_params(actor)

        def params() -> dict[str, Any]:
            waited = time.monotonic() - requested
            return claim_params(pk, stale_after_ms, waited, actor_columns)

        return await self._changed(await self._one("claim", CLAIM, params))

    async def transition(
        self,
        idem_key: str,
        *,
        from_statuses: Collection[EffectStatus],
        to_status: EffectStatus,
        actor: Actor,
        reason: str | None = None,
        error: EffectError | None = None,
    ) -> TransitionRecord:
        to_status = EffectStatus(to_status)
        params = {
            "idem_key": idem_key,
            "to_status": to_status.value,
            "from_statuses": [EffectStatus(status).value for status in from_statuses],
            "error": None if error is None else json.dumps(error.to_dict()),
            "terminal": to_status in TERMINAL_STATUSES,
            "reason": reason,
            **_actor_params(actor),
        }
        row = await self._one("transition", TRANSITION, params)
        if row is None:
            raise EffectNotFoundError(idem_key)
        effect = effect_from_columns(row)
        if row["changed"]:
            self._notifier.notify(effect.id, effect)
        return TransitionRecord(effect, changed=row["changed"])

    async def get(self, effect_id: str) -> Effect | None:
        pk = parse_uuid(effect_id)
        if pk is None:
            return None
        row = await self._one("get", GET, (pk,))
        return None if row is None else effect_from_columns(row)

    async def get_by_idem_key(self, idem_key: str) -> Effect | None:
        row = await self._one("get_by_idem_key", GET_BY_KEY, (idem_key,))
        return None if row is None else effect_from_columns(row)

    async def history(self, effect_id: str) -> list[Transition]:
        pk = parse_uuid(effect_id)
        if pk is None:
            return []

        rows = await self._fetch("history", HISTORY_OF, (pk,))
        return [transition_from_columns(row) for row in rows]

    async def wait_for_change(
        self, effect_id: str, timeout_s: float, since: float
    ) -> Effect | None:
        if self._listener is not None:
            self._listener.start()
        return await self._notifier.wait(effect_id, timeout_s, since)

    def close(self) -> None:
        """Stop listening (the pool is the caller's to close, after this)."""
        if self._listener is not None:
            self._listener.stop()

    async def aclose(self) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------

    async def _fetch(
        self, operation: str, query: str, params: Any, attempts: int = 1
    ) -> list[dict[str, Any]]:
        """A statement's rows; ``attempts``: run it again while it returns none. ``params`` may
        be a callable, called once a connection is ours (``claim`` counts the wait for it)."""

        async def step() -> list[dict[str, Any]]:
            async with self._connection(operation) as conn:
                params_now = params() if callable(params) else params
                for _ in range(attempts):
                    cursor = conn.cursor(row_factory=dict_row)
                    await cursor.execute(query, params_now, binary=True)
                    if rows := await cursor.fetchall():
                        return rows
            return []

        return await self._on_pool_loop(step())

    async def _one(self, operation: str, query: str, params: Any) -> dict[str, Any] | None:
        rows = await self._fetch(operation, query, params)
        return rows[0] if rows else None

    async def _changed(self, row: dict[str, Any] | None) -> Effect | None:
        """Wake this process's waiters with the new state at once (other processes hear the
        statement's NOTIFY)."""
        if row is None:
            return None
        effect = effect_from_columns(row)
        self._notifier.notify(effect.id, effect)
        return effect

    @asynccontextmanager
    async def _connection(self, operation: str) -> AsyncIterator[AsyncConnection[Any]]:
        """A pooled connection in autocommit (a statement commits as it runs, no COMMIT round
        trip; the pool's setting is put back). One whose step failed but for bad data is closed,
        so the pool replaces it: never a broken, read-only or shutting-down server's again."""
        try:
            async with self._pool.connection() as conn:
                restore = not conn.autocommit
                if restore:
                    await conn.set_autocommit(True)
                try:
                    yield conn
                except BaseException as exc:
                    if not isinstance(exc, (*_DATA_ERRORS, EffectLedgerError)):
                        await conn.close()
                    raise
                finally:
                    if restore and not conn.closed:
                        await conn.set_autocommit(False)
        except _DRIVER_ERRORS as exc:
            raise EffectStoreError(f"{type(exc).__name__}: {exc}", operation=operation) from exc

    async def _on_pool_loop(self, step: Coroutine[Any, Any, _T]) -> _T:
        """Await ``step`` here, or on the pool's loop when called from another thread's loop:
        an asyncio pool is bound to the loop it was opened on, which must keep running."""
        loop = asyncio.get_running_loop()
        home = self._loop
        if home is None:
            self._loop = home = loop
        if home is loop:
            return await step
        if home.is_closed() or not home.is_running():
            step.close()
            raise EffectStoreError(
                "called from another event loop while the pool's loop is not running; "
                "give each loop its own pool and PostgresStore"
            )
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(step, home))

    def _listen_connection(self) -> psycopg.Connection[Any]:
        conninfo, kwargs = self._pool.conninfo, self._pool.kwargs or {}
        if not isinstance(conninfo, str) or not isinstance(kwargs, dict):
            # Computed per connection (possibly async): nothing a plain thread can call.
            raise EffectStoreError("the pool's conninfo is dynamic; waiting by polling only")
        kwargs = {key: value for key, value in kwargs.items() if key != "autocommit"}
        return psycopg.connect(conninfo, autocommit=True, **kwargs)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    with suppress(RuntimeError):
        return asyncio.get_running_loop()
    return None


def _actor_params(actor: Actor) -> dict[str, Any]:
    return actor_params(actor, int_user_id(actor))
