"""The PostgreSQL statements both PostgreSQL paths run: ``PostgresStore`` (psycopg) and
``DjangoStore`` on a PostgreSQL database (Django's cursor), so the two cannot drift apart.

Each write is one statement (a data-modifying CTE) that changes the effect and appends its
history row together: one round trip, and atomic even in autocommit.

Waking waiters: ``commit`` and ``transition`` call ``pg_notify(CHANNEL, effect id)``, which
PostgreSQL delivers when the statement's transaction commits. A commit notifies only when
``dedup_count > 0``: every waiter counted itself (``begin`` on an existing key) before it
started waiting, so a commit nobody else asked about costs no notification.

Replays: the branch of ``BEGIN`` that only counts a replay sets ``synchronous_commit`` for its
own transaction (``replay_commit``, "off" by default), so a replay does not wait for a WAL
flush. A database crash can lose the last few hundred milliseconds of such counts, never an
effect, an outcome or a history row: creations and outcomes keep the server's setting.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from ..types import Effect, EffectError, EffectStatus
from .base import CHANNEL

__all__ = [
    "BEGIN",
    "CLAIM",
    "COLUMNS",
    "COMMIT_FAILED",
    "COMMIT_SUCCEEDED",
    "GET",
    "GET_BY_KEY",
    "HISTORY_OF",
    "LOCK_BY_KEY",
    "TRANSITION",
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

# Insert-or-count in one statement. Under READ COMMITTED, a row inserted by a transaction that
# commits while this statement runs makes the INSERT do nothing (the key exists) while the
# UPDATE cannot see it (it is newer than the statement's snapshot): both branches come back
# empty and the statement is simply run again, with a fresh snapshot.
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
), upd AS (
    UPDATE agent_ledger_effect SET dedup_count = dedup_count + 1
    WHERE idem_key = %(idem_key)s AND NOT EXISTS (SELECT 1 FROM ins)
    RETURNING {COLUMNS}
)
SELECT true AS created, {COLUMNS}, NULL AS durability FROM ins
UNION ALL
SELECT false AS created, {COLUMNS},
       set_config('synchronous_commit', %(replay_commit)s, true) AS durability
FROM upd
"""

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
    RETURNING {columns}
), hist AS (
    {history}
)
SELECT {columns},
       CASE WHEN dedup_count > 0 THEN pg_notify('{channel}', id::text) END AS notified
FROM upd
"""
COMMIT_SUCCEEDED = COMMIT.format(
    column="result",
    channel=CHANNEL,
    columns=COLUMNS,
    history=HISTORY.format(at="updated_at", source="upd"),
)
COMMIT_FAILED = COMMIT.format(
    column="error",
    channel=CHANNEL,
    columns=COLUMNS,
    history=HISTORY.format(at="updated_at", source="upd"),
)

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


def effect_from_row(row: Mapping[str, Any], *, json_as_text: bool = False) -> Effect:
    """An ``Effect`` from a row of ``COLUMNS``. ``json_as_text``: the connection hands jsonb
    over unparsed (Django's do: JSONField parses it), so parse ``result`` and ``error`` here."""
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
        dedup_count=row["dedup_count"],
        created_at=utc(row["created_at"]),
        updated_at=utc(row["updated_at"]),
        result=result,
        error=EffectError.from_dict(error),
        completed_at=None if completed_at is None else utc(completed_at),
        fence=row["fence"],
    )


def utc(value: datetime) -> datetime:
    """In UTC whatever the session's TimeZone, like the other stores' timestamps."""
    return value.astimezone(timezone.utc)
