"""Pruned keys stay closed: the SQL pieces ``BEGIN`` uses to refuse a key with a tombstone.

Retention (``agent_ledger.retention``) deletes a finished effect and leaves a row in
``agent_ledger_effecttombstone`` under its key. ``BEGIN`` inserts a new effect only when the key
has no tombstone, and answers a tombstoned key with a row whose ``created`` is NULL, which the
stores turn into ``EffectPurgedError``: the handler never runs. Retention writes the tombstone
and deletes the effect in separate transactions, and waits in between until every snapshot
older than the tombstone is gone, so a ``BEGIN`` either finds the effect (a replay) or sees the
tombstone; never neither.
"""

from __future__ import annotations

from ..errors import EffectPurgedError

TABLE = "agent_ledger_effecttombstone"

#: Appended to the ``SELECT`` that feeds ``BEGIN``'s insert.
NOT_TOMBSTONED = f"WHERE NOT EXISTS (SELECT 1 FROM {TABLE} WHERE idem_key = %(idem_key)s)"


def purged_branch(columns: str) -> str:
    """``BEGIN``'s third answer: neither inserted nor found, because the key was pruned: a row
    of NULLs (``created`` and ``side`` too) but for the tombstone's ``status``."""
    values = ["status" if name.strip() == "status" else "NULL" for name in columns.split(",")]
    return f"""UNION ALL
SELECT NULL, {", ".join(values)}, NULL FROM {TABLE}
WHERE idem_key = %(idem_key)s AND NOT EXISTS (SELECT 1 FROM ins)
  AND NOT EXISTS (SELECT 1 FROM replay)
"""


def purged(idem_key: str, row: dict[str, object]) -> EffectPurgedError:
    """The error for ``BEGIN``'s answer to a tombstoned key (``row["created"]`` is NULL)."""
    status = row.get("status")
    return EffectPurgedError(idem_key, status if isinstance(status, str) else None)
