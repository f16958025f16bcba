"""``TRANSITION``: a decision in one statement, with the resumption it owes (``resume.py``).

Kept apart from ``postgres.py`` (its size is capped); ``PostgresStore`` imports it from there.
Django-free, like ``postgres.py``: workers outside Django decide with it too.
"""

from __future__ import annotations

from .base import CHANNEL

#: ``postgres.COLUMNS``, repeated here so this module needs nothing from ``postgres.py``.
COLUMNS = (
    "id, idem_key, workflow_id, call_id, tool, status, args_canonical, resource_id_canonical, "
    "result, error, dedup_count, fence, created_at, updated_at, completed_at, attempts, "
    "continuation"
)
_UPDATED = ", ".join(f"e.{column}" for column in COLUMNS.split(", "))

# Lock, check, change, history, resumption, in one statement. ``cur`` locks the row and, under
# READ COMMITTED, reads its newest version once the lock is ours: approve and deny racing cannot
# both find it awaiting approval. Unchanged (not awaiting that decision): ``cur`` comes back as
# is. No row at all: the key is unknown. An approve or deny of an effect whose continuation names
# a resumer also inserts its ``agent_ledger_resumption`` row (unique per history row): the Django
# side's sweep (``manage.py agent_ledger_resume``) runs it, as workers here have no task engine.
TRANSITION = f"""
WITH cur AS (
    SELECT {COLUMNS} FROM agent_ledger_effect WHERE idem_key = %(idem_key)s FOR UPDATE
), upd AS (
    UPDATE agent_ledger_effect AS e
    SET status = %(to_status)s, updated_at = statement_timestamp(),
        error = coalesce(%(error)s::jsonb, e.error),
        completed_at = CASE WHEN %(terminal)s THEN statement_timestamp() END
    FROM cur
    WHERE e.id = cur.id AND cur.status = ANY(%(from_statuses)s::varchar[])
    RETURNING {_UPDATED}, cur.status AS from_status
), hist AS (
    INSERT INTO agent_ledger_effecttransition
        (effect_id, from_status, to_status, at, actor_label, actor_user_id, actor_name, reason)
    SELECT id, from_status, status, updated_at, %(actor_label)s::varchar,
           %(actor_user_id)s::integer, %(actor_name)s::varchar, %(reason)s::text
    FROM upd
    RETURNING id, effect_id, from_status, to_status
), res AS (
    INSERT INTO agent_ledger_resumption (effect_id, transition_id, decision, resumer)
    SELECT hist.effect_id, hist.id,
           CASE hist.to_status WHEN 'ready' THEN 'approve' ELSE 'deny' END,
           left(upd.continuation ->> 'resumer', 255)
    FROM hist JOIN upd ON upd.id = hist.effect_id
    WHERE hist.from_status = 'requires_approval' AND hist.to_status IN ('ready', 'denied')
      AND jsonb_typeof(upd.continuation -> 'resumer') = 'string'
    ON CONFLICT ON CONSTRAINT agent_ledger_resumption_once DO NOTHING
)
SELECT true AS changed, {COLUMNS}, pg_notify('{CHANNEL}', id::text)::text AS side FROM upd
UNION ALL
SELECT false, {COLUMNS}, NULL FROM cur WHERE NOT EXISTS (SELECT 1 FROM upd)
"""
