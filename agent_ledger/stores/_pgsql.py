"""The PostgreSQL statements both PostgreSQL paths run: ``PostgresStore`` (psycopg) and
``DjangoStore`` on a PostgreSQL database (Django's cursor), so the two cannot drift apart.

Each write is one statement (a data-modifying CTE) that changes the effect and appends its
history row together: one round trip, and atomic even in autocommit.

Waking waiters: ``commit`` and ``transition`` call ``pg_notify(CHANNEL, effect id)``, which
PostgreSQL delivers when the statement's transaction commits. A commit notifies only when
``dedup_count > 0``: every waiter counted itself (``begin`` on an existing key) before it
started waiting, so a commit nobody else asked about costs no notification.

Replays, counted without making them writes that wait:

- A replay of a *live* effect (processing, awaiting approval, ready) is a caller about to wait:
  ``BEGIN`` counts it at once, since the winner's commit notifies only when someone counted
  themselves. That branch sets ``synchronous_commit`` for its own transaction
  (``replay_commit``, "off" by default), so it does not wait for a WAL flush either.
- A replay of a *finished* effect (the common one: an agent retrying a call that is done)
  reads the row and writes nothing, like a plain ``SELECT``: no transaction id, no row lock,
  no WAL. The store adds it to ``ReplayCounts`` and writes the counts of the process in one
  ``COUNT_REPLAYS`` statement per ``REPLAY_COUNT_DELAY_S`` (also with ``replay_commit``), and
  before it reads an effect that still has counts to write, so its own reads are exact. A
  store set to write every count at once passes ``defer_count`` false: finished effects are
  then counted like live ones.

Concurrent begins of one key in one process (a retry storm) share one statement
(``SharedBegins``): the others are replays of its outcome, counted together in one more
statement if it is live (finished: with the batch), and woken by the process's own notifier.

What comes back: a created row sends only its timestamps (the store knows the rest), and a
commit by the store that handed the effect to its owner only what changed (``OwnedEffects``).

What a crash can lose: replay counts only, never an effect, an outcome or a history row
(creations and outcomes keep the server's ``synchronous_commit``). A crash of the worker process
loses the counts of finished effects it had not written yet (at most ``REPLAY_COUNT_DELAY_S``
worth, unless the database was unreachable); a crash of the database loses counts committed in
the last few hundred milliseconds (``wal_writer_delay`` x 3). Until they are written, other
processes (the admin, say) see a count up to ``REPLAY_COUNT_DELAY_S`` behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from ..errors import EffectStoreError
from ..types import CommitOutcome, CommitSucceeded, Effect, EffectError, EffectStatus
from .base import CHANNEL, BeginRecord, NewEffect

logger = logging.getLogger("agent_ledger")

__all__ = [
    "BEGIN",
    "BEGIN_ATTEMPTS",
    "CLAIM",
    "COLUMNS",
    "COMMIT_FAILED",
    "COMMIT_FAILED_BRIEF",
    "COMMIT_SUCCEEDED",
    "COMMIT_SUCCEEDED_BRIEF",
    "COUNT_REPLAYS",
    "GET",
    "GET_BY_KEY",
    "HISTORY_OF",
    "LOCK_BY_KEY",
    "REPLAY_COUNT_DELAY_S",
    "TRANSITION",
    "OwnedEffects",
    "ReplayCounts",
    "SharedBegins",
    "begin_row",
    "begin_row_sync",
    "commit_statement",
    "count_params",
    "effect_committed",
    "effect_created",
    "effect_from_row",
]

COLUMNS = (
    "id, idem_key, workflow_id, call_id, tool, status, args_canonical, resource_id_canonical, "
    "result, error, dedup_count, fence, created_at, updated_at, completed_at"
)

#: Casts in the SELECT lists: a parameter there has no column to take its type from.
HISTORY = """
INSERT INTO agent_ledger_effecttransition
    (effect_id, from_status, to_status, at, actor_label, actor_user_id, actor_name, reason)
SELECT id, %(from_status)s::varchar, status, {at}, %(actor_label)s::varchar,
       %(actor_user_id)s::integer, %(actor_name)s::varchar, %(reason)s::text
FROM {source}
"""

_LIVE = "('processing', 'requires_approval', 'ready')"

#: A created row holds what the caller sent; only the database's clock is news (the rest is
#: NULL, which costs nothing to send and parse): see ``effect_created``.
_CREATED_COLUMNS = ", ".join(
    column if column in ("id", "created_at", "updated_at") else f"NULL AS {column}"
    for column in COLUMNS.split(", ")
)

# Insert, count a live replay, or read a finished one, in one statement. Under READ COMMITTED a
# row inserted, or finished, by a transaction that commits while this statement runs can make
# every branch come back empty (the INSERT finds the key, the snapshot does not show the row, or
# shows it live while the UPDATE, re-checking the newest version, finds it finished): the
# statement is then simply run again, with a fresh snapshot.
BEGIN = f"""
WITH ins AS (
    INSERT INTO agent_ledger_effect
        (id, idem_key, workflow_id, call_id, tool, status, args_canonical,
         resource_id_canonical, dedup_count, fence, created_at, updated_at)
    VALUES (%(id)s, %(idem_key)s, %(workflow_id)s, %(call_id)s, %(tool)s, %(status)s,
            %(args_canonical)s, %(resource_id_canonical)s, 0, 1,
            statement_timestamp(), statement_timestamp())
    ON CONFLICT (idem_key) DO NOTHING
    RETURNING {COLUMNS}
), hist AS (
    {HISTORY.format(at="created_at", source="ins")}
), live AS (
    UPDATE agent_ledger_effect SET dedup_count = dedup_count + 1
    WHERE idem_key = %(idem_key)s AND NOT EXISTS (SELECT 1 FROM ins)
      AND (status IN {_LIVE} OR NOT %(defer_count)s::boolean)
    RETURNING {COLUMNS}
)
SELECT true AS created, true AS counted, {_CREATED_COLUMNS}, NULL AS durability FROM ins
UNION ALL
SELECT false, true, {COLUMNS}, set_config('synchronous_commit', %(replay_commit)s, true)
FROM live
UNION ALL
SELECT false, false, {COLUMNS}, NULL FROM agent_ledger_effect
WHERE idem_key = %(idem_key)s AND NOT EXISTS (SELECT 1 FROM ins)
  AND status NOT IN {_LIVE} AND %(defer_count)s::boolean
"""

#: How often ``BEGIN`` is run again when every branch came back empty (see above); each new
#: run has a newer snapshot, so more than one retry is rare.
BEGIN_ATTEMPTS = 10


Row = dict[str, Any]


async def begin_row(run: Callable[[], Awaitable[Row | None]], idem_key: str) -> Row:
    """Run ``BEGIN`` (``run``) until a branch answers."""
    for _ in range(BEGIN_ATTEMPTS):
        if (row := await run()) is not None:
            return row
    raise _vanished(idem_key)


def begin_row_sync(run: Callable[[], Row | None], idem_key: str) -> Row:
    for _ in range(BEGIN_ATTEMPTS):
        if (row := run()) is not None:
            return row
    raise _vanished(idem_key)


def _vanished(idem_key: str) -> EffectStoreError:
    return EffectStoreError(
        f"key {idem_key} was neither inserted nor found after {BEGIN_ATTEMPTS} attempts",
        operation="begin",
    )


#: Write the replay counts of finished effects, ids in order so that two processes writing
#: overlapping batches take the row locks in the same order.
COUNT_REPLAYS = """
WITH durability AS (SELECT set_config('synchronous_commit', %(replay_commit)s, true))
UPDATE agent_ledger_effect AS e SET dedup_count = e.dedup_count + c.n
FROM unnest(%(ids)s::uuid[], %(counts)s::integer[]) AS c (id, n), durability
WHERE e.id = c.id
"""

#: How long a finished effect's replay count may wait in the process before it is written.
REPLAY_COUNT_DELAY_S = 0.1


class ReplayCounts:
    """Replays of finished effects that this process has not written yet (thread-safe).

    The store decides when to write (a timer, a read, closing) and holds its own lock around a
    write; this keeps the numbers, including those of a write under way, so that a read can tell
    it must wait, and a batch that fails to write is put back instead of lost.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[int, str]] = {}  # effect id -> (count, idem key)
        self._writing: dict[str, tuple[int, str]] = {}

    def add(self, effect_id: str, idem_key: str) -> tuple[int, bool]:
        """Count one replay; return the effect's count not yet written, and whether the caller
        must schedule a write (the first count since the last one)."""
        with self._lock:
            schedule = not self._pending
            count = self._pending.get(effect_id, (0, ""))[0] + 1
            self._pending[effect_id] = (count, idem_key)
        return count, schedule

    def owes(self, *, effect_id: str | None = None, idem_key: str | None = None) -> bool:
        """Must a read of this effect first wait for counts still in this process?"""
        with self._lock:
            for counts in (self._pending, self._writing):
                if effect_id in counts or (
                    idem_key is not None and any(key == idem_key for _, key in counts.values())
                ):
                    return True
        return False

    def take(self) -> dict[str, tuple[int, str]]:
        """Everything pending, for one write; then ``written`` or ``back``."""
        with self._lock:
            taken, self._pending = self._pending, {}
            self._writing.update(taken)
        return taken

    def written(self, taken: Mapping[str, tuple[int, str]]) -> None:
        with self._lock:
            for effect_id in taken:
                self._writing.pop(effect_id, None)

    def back(self, taken: Mapping[str, tuple[int, str]]) -> None:
        """The write failed: count these again with whatever came in meanwhile."""
        with self._lock:
            for effect_id, (count, key) in taken.items():
                self._writing.pop(effect_id, None)
                self._pending[effect_id] = (self._pending.get(effect_id, (0, key))[0] + count, key)

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._pending)


class SharedBegins:
    """Concurrent begins of one key in one process and event loop share one statement.

    A retry storm (many coroutines of one agent process making the same tool call at once)
    then costs one statement instead of a queue of writers on the same row: the first caller's
    statement decides, and the others are replays of its outcome. They are counted the way a
    replay is: those of a finished effect with ``count_later`` (``ReplayCounts``), those of a
    live one (who will wait for it) at once, all together, by ``count_now(effect_id, n)``
    before anyone goes on. They wait in this process, woken by its own notifier. Use one
    instance per event loop.
    """

    def __init__(
        self,
        count_later: Callable[[str, str], int],
        count_now: Callable[[str, int], Awaitable[None]],
    ) -> None:
        self._count_later = count_later
        self._count_now = count_now
        self._inflight: dict[str, _Flight] = {}

    async def begin(self, idem_key: str, run: Callable[[], Awaitable[BeginRecord]]) -> BeginRecord:
        while (flight := self._inflight.get(idem_key)) is not None:
            flight.followers += 1
            position = flight.followers
            first = await asyncio.shield(flight.outcome)
            if first is not None:
                effect = first.effect
                if effect.is_terminal:
                    self._count_later(effect.id, idem_key)
                effect = replace(effect, dedup_count=effect.dedup_count + position)
                return BeginRecord(effect, created=False)
            # The first caller was cancelled before its statement settled: try again.
        flight = self._inflight[idem_key] = _Flight(asyncio.get_running_loop().create_future())
        try:
            record = await run()
        except asyncio.CancelledError:
            del self._inflight[idem_key]
            flight.outcome.set_result(None)
            raise
        except BaseException as exc:
            del self._inflight[idem_key]
            flight.outcome.set_exception(exc)
            flight.outcome.exception()  # the followers re-raise it; nobody else must look
            raise
        del self._inflight[idem_key]  # later callers make their own statement
        try:
            if flight.followers and not record.effect.is_terminal:
                await self._count_now(record.effect.id, flight.followers)
        except Exception:
            # The begin itself stands: keep the counts for the next batch instead.
            logger.warning("agent_ledger: counting replays later", exc_info=True)
            for _ in range(flight.followers):
                self._count_later(record.effect.id, idem_key)
        finally:
            flight.outcome.set_result(record)
        return record


class _Flight:
    __slots__ = ("followers", "outcome")

    def __init__(self, outcome: asyncio.Future[BeginRecord | None]) -> None:
        self.outcome = outcome
        self.followers = 0


def count_params(taken: Mapping[str, tuple[int, str]], replay_commit: str) -> dict[str, Any]:
    ids = sorted(taken)
    return {
        "ids": [uuid.UUID(effect_id) for effect_id in ids],
        "counts": [taken[effect_id][0] for effect_id in ids],
        "replay_commit": replay_commit,
    }


# No lock needed: the UPDATE's own conditions (still processing, fence unchanged) are
# re-checked on the newest row version if it waits for another writer, so a commit that lost
# its effect to a takeover or a cancel changes nothing.
COMMIT = """
WITH upd AS (
    UPDATE agent_ledger_effect
    SET status = %(status)s, {column} = %(value)s,
        updated_at = statement_timestamp(), completed_at = statement_timestamp()
    WHERE id = %(id)s AND status = 'processing'
      AND (%(fence)s::integer IS NULL OR fence = %(fence)s::integer)
    RETURNING {returning}
), hist AS (
    {history}
)
SELECT {columns},
       CASE WHEN dedup_count > 0 THEN pg_notify('{channel}', id::text) END AS notified
FROM upd
"""

#: What a commit changes besides status and outcome, for a store that still holds the
#: effect it handed to the owner (``OwnedEffects``): the rest need not come back.
_BRIEF = "dedup_count, fence, updated_at, completed_at"


def _commit(column: str, *, brief: bool) -> str:
    return COMMIT.format(
        column=column,
        channel=CHANNEL,
        returning=f"id, status, {_BRIEF}" if brief else COLUMNS,
        columns=_BRIEF if brief else COLUMNS,
        history=HISTORY.format(at="updated_at", source="upd"),
    )


COMMIT_SUCCEEDED = _commit("result", brief=False)
COMMIT_FAILED = _commit("error", brief=False)
COMMIT_SUCCEEDED_BRIEF = _commit("result", brief=True)
COMMIT_FAILED_BRIEF = _commit("error", brief=True)

TRANSITION = f"""
WITH upd AS (
    UPDATE agent_ledger_effect
    SET status = %(to_status)s, updated_at = statement_timestamp(),
        error = coalesce(%(error)s::jsonb, error),
        completed_at = CASE WHEN %(terminal)s THEN statement_timestamp() END
    WHERE id = %(id)s
    RETURNING {COLUMNS}
), hist AS (
    {HISTORY.format(at="updated_at", source="upd")}
)
SELECT {COLUMNS}, pg_notify('{CHANNEL}', id::text) AS notified FROM upd
"""

# The claim rule of ``base.claimable`` by the database clock: ready, or processing and idle for
# at least the stale threshold (NULL: stale takeover disabled), judged as of when ``claim`` was
# called: ``now()`` less the time the call waited for a connection (a duration, so the worker's
# clock is never compared with the database's). A claimer that queued behind the winner, for a
# pooled connection or for the row lock, then sees the winner's fresh ``updated_at`` as newer
# than its own moment and loses, instead of finding the new owner stale in turn.
CLAIM = f"""
WITH cur AS (
    SELECT id, status FROM agent_ledger_effect WHERE id = %(id)s FOR UPDATE
), upd AS (
    UPDATE agent_ledger_effect AS e
    SET status = 'processing', fence = e.fence + 1, updated_at = statement_timestamp()
    FROM cur
    WHERE e.id = cur.id
      AND (e.status = 'ready'
           OR (e.status = 'processing' AND %(stale)s::interval IS NOT NULL
               AND e.updated_at <= now() - %(waited)s::interval - %(stale)s::interval))
    RETURNING {", ".join(f"e.{column}" for column in COLUMNS.split(", "))},
              cur.status AS from_status
), hist AS (
    INSERT INTO agent_ledger_effecttransition
        (effect_id, from_status, to_status, at, actor_label, actor_user_id, actor_name, reason)
    SELECT id, from_status, status, updated_at, %(actor_label)s::varchar,
           %(actor_user_id)s::integer, %(actor_name)s::varchar,
           CASE WHEN from_status = 'processing' THEN 'stale takeover' END
    FROM upd
)
SELECT {COLUMNS} FROM upd
"""

LOCK_BY_KEY = f"SELECT {COLUMNS} FROM agent_ledger_effect WHERE idem_key = %s FOR UPDATE"
GET = f"SELECT {COLUMNS} FROM agent_ledger_effect WHERE id = %s"
GET_BY_KEY = f"SELECT {COLUMNS} FROM agent_ledger_effect WHERE idem_key = %s"
HISTORY_OF = """
SELECT effect_id, from_status, to_status, at, actor_label, actor_user_id, actor_name, reason
FROM agent_ledger_effecttransition WHERE effect_id = %s ORDER BY at, id
"""


def effect_from_row(
    row: Mapping[str, Any], *, json_as_text: bool = False, unwritten_replays: int = 0
) -> Effect:
    """An ``Effect`` from a row of ``COLUMNS``. ``json_as_text``: the connection hands jsonb
    over unparsed (Django's do: JSONField parses it), so parse ``result`` and ``error`` here.
    ``unwritten_replays``: counted in this process, not in the row yet (``ReplayCounts``)."""
    completed_at = row["completed_at"]
    result, error = row["result"], row["error"]
    if json_as_text:
        result = None if result is None else json.loads(result)
        error = None if error is None else json.loads(error)
    return Effect(
        id=str(row["id"]),
        idem_key=row["idem_key"],
        workflow_id=row["workflow_id"],
        call_id=row["call_id"],
        tool=row["tool"],
        status=EffectStatus(row["status"]),
        args_canonical=row["args_canonical"],
        resource_id_canonical=row["resource_id_canonical"],
        dedup_count=row["dedup_count"] + unwritten_replays,
        created_at=utc(row["created_at"]),
        updated_at=utc(row["updated_at"]),
        result=result,
        error=EffectError.from_dict(error),
        completed_at=None if completed_at is None else utc(completed_at),
        fence=row["fence"],
    )


def effect_created(new: NewEffect, row: Mapping[str, Any]) -> Effect:
    """The ``Effect`` a ``BEGIN`` created: what the caller sent, on the database's clock."""
    return new.created(utc(row["created_at"]), utc(row["updated_at"]))


def effect_committed(owned: Effect, outcome: CommitOutcome, row: Mapping[str, Any]) -> Effect:
    """The ``Effect`` a brief ``COMMIT`` finished, from the one its owner was handed."""
    if isinstance(outcome, CommitSucceeded):
        status, result, error = EffectStatus.SUCCEEDED, outcome.result, None
    else:
        status, result, error = EffectStatus.FAILED, None, outcome.error
    return replace(
        owned,
        status=status,
        result=result,
        error=error,
        dedup_count=row["dedup_count"],
        fence=row["fence"],
        updated_at=utc(row["updated_at"]),
        completed_at=utc(row["completed_at"]),
    )


class OwnedEffects:
    """The effects a store handed to their owner (created or claimed), until they are
    committed, so that a commit need not send back what the store already knows. Bounded:
    an owner that never commits is forgotten, and its commit just asks for the whole row."""

    _MAX = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._effects: OrderedDict[str, Effect] = OrderedDict()

    def add(self, effect: Effect) -> None:
        with self._lock:
            self._effects[effect.id] = effect
            if len(self._effects) > self._MAX:
                self._effects.popitem(last=False)

    def pop(self, effect_id: str) -> Effect | None:
        with self._lock:
            return self._effects.pop(effect_id, None)


def commit_statement(
    pk: uuid.UUID,
    outcome: CommitOutcome,
    fence: int | None,
    actor_params: Mapping[str, Any],
    *,
    brief: bool,
) -> tuple[str, dict[str, Any]]:
    """The ``COMMIT`` to run and its parameters; ``brief`` when the store still holds the
    effect it handed to the owner (``OwnedEffects``)."""
    from psycopg.types.json import Jsonb  # here: SQLite projects import this module too

    if isinstance(outcome, CommitSucceeded):
        query = COMMIT_SUCCEEDED_BRIEF if brief else COMMIT_SUCCEEDED
        status = EffectStatus.SUCCEEDED
        value = None if outcome.result is None else Jsonb(outcome.result)
    else:
        query = COMMIT_FAILED_BRIEF if brief else COMMIT_FAILED
        status, value = EffectStatus.FAILED, Jsonb(outcome.error.to_dict())
    return query, {
        "id": pk,
        "status": status.value,
        "value": value,
        "fence": fence,
        "from_status": EffectStatus.PROCESSING.value,
        "reason": None,
        **actor_params,
    }


def utc(value: datetime) -> datetime:
    """In UTC whatever the session's TimeZone, like the other stores' timestamps."""
    return value.astimezone(timezone.utc)
