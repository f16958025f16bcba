"""Retention that keeps keys closed: prune finished effects, leave their keys behind.

``prune(older_than="90d")`` deletes effects that finished (succeeded, failed, denied, canceled)
longer ago than ``older_than``, with their history, in batches, and leaves a tombstone under
each key (``EffectTombstone``): every store's ``begin`` refuses a tombstoned key with
``EffectPurgedError``, so a retried charge whose record was pruned does not run again.
Tombstones go once the key's lifetime (``AGENT_LEDGER["KEY_LIFETIME"]``, counted from the
effect's creation; default None, forever) has passed; after that the same call may run anew.
Pending, approved and running effects are never pruned, nor one whose agent is still to be
resumed (a pending or running ``Resumption``); finished resumptions go with their effect.

Each batch is two short transactions on at most ``batch_size`` rows, so locks stay bounded and
ledger traffic goes on: (1) write the batch's tombstones; (2) lock the rows again, check they
are still finished and old enough (an operator may have reopened one), delete their history and
them. On PostgreSQL, between the two, the run waits until every snapshot older than the
tombstones is gone: a ``BEGIN`` statement that started before them and could still insert the
key once its effect is deleted (see ``stores/_tombstones.py``). Used by the management command
``agent_ledger_prune`` and by ``prune_task`` for a periodic task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.db import connections, transaction
from django.db.models import ExpressionWrapper, Value
from django.db.models import fields as model_fields
from django.db.models.functions import Now

from .conf import ledger_settings
from .errors import EffectLedgerValidationError, EffectStoreError
from .models import Effect, EffectTombstone, EffectTransition, Resumption, ResumptionStatus
from .types import PruneReport, parse_duration

__all__ = ["key_lifetime", "prune", "prune_task"]

DEFAULT_BATCH_SIZE = 1_000
_LIVE_RESUMPTIONS = (ResumptionStatus.PENDING.value, ResumptionStatus.RUNNING.value)
MAX_BATCH_SIZE = 50_000
#: How long a batch waits for older snapshots (PostgreSQL) before the run gives up; the
#: tombstones it wrote stay, harmless, and the next run deletes their effects.
SNAPSHOT_WAIT_S = 60.0


def key_lifetime() -> timedelta | None:
    """``AGENT_LEDGER["KEY_LIFETIME"]``: how long a pruned key stays closed (None: forever)."""
    value = ledger_settings.KEY_LIFETIME
    return None if value is None else parse_duration(value, "KEY_LIFETIME")


def prune(
    older_than: str | timedelta,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dry_run: bool = False,
    using: str | None = None,
    progress: Callable[[PruneReport], None] | None = None,
    snapshot_wait_s: float = SNAPSHOT_WAIT_S,
) -> PruneReport:
    """Delete effects finished longer than ``older_than`` ago (``"90d"`` or a ``timedelta``)
    and their history, leaving tombstones; then drop tombstones past the key lifetime.

    ``progress`` is called after each batch with the running totals.
    """
    age = parse_duration(older_than, "older_than")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise EffectLedgerValidationError("must be an int", field="batch_size")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise EffectLedgerValidationError(
            f"must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}", field="batch_size"
        )
    lifetime = key_lifetime()
    using = using or ledger_settings.DATABASE
    report = PruneReport(dry_run=dry_run)
    candidates = (
        Effect.objects.using(using)
        .terminal()
        .filter(completed_at__lt=_ago(age))
        # An agent still to be resumed after a decision keeps its effect (and decision) alive.
        .exclude(resumptions__status__in=_LIVE_RESUMPTIONS)
    )
    if dry_run:
        report.effects = candidates.count()
        report.transitions = (
            EffectTransition.objects.using(using).filter(effect__in=candidates.values("pk")).count()
        )
        if lifetime is not None:
            report.tombstones_expired = (
                EffectTombstone.objects.using(using).expired(lifetime).count()
            )
        return report
    while True:
        batch: list[Any] = list(
            candidates.order_by("completed_at").values(
                "pk", "idem_key", "workflow_id", "tool", "status", "created_at", "completed_at"
            )[:batch_size]
        )
        if not batch:
            break
        _prune_batch(using, batch, candidates, report, snapshot_wait_s)
        report.batches += 1
        if progress is not None:
            progress(report)
    if lifetime is not None:
        report.tombstones_expired = _expire_tombstones(using, lifetime, batch_size)
        if progress is not None and report.tombstones_expired:
            progress(report)
    return report


def prune_task(older_than: str = "90d", batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, Any]:
    """``prune`` for a periodic task (Celery beat, django.tasks): plain arguments, and a
    JSON-serialisable result."""
    report = prune(older_than, batch_size=batch_size)
    return {
        "effects": report.effects,
        "transitions": report.transitions,
        "tombstones_expired": report.tombstones_expired,
        "batches": report.batches,
    }


def _prune_batch(
    using: str,
    batch: list[Any],
    candidates: Any,
    report: PruneReport,
    snapshot_wait_s: float,
) -> None:
    # (1) The tombstones first, committed on their own: from now on the key is closed even
    # once the effect is gone.
    with transaction.atomic(using=using):
        EffectTombstone.objects.using(using).bulk_create(
            [
                EffectTombstone(
                    effect_id=row["pk"],
                    idem_key=row["idem_key"],
                    workflow_id=row["workflow_id"],
                    tool=row["tool"],
                    status=row["status"],
                    created_at=row["created_at"],
                    completed_at=row["completed_at"],
                )
                for row in batch
            ],
            ignore_conflicts=True,
        )
        xid = _transaction_id(using)
    if xid is not None:
        _wait_for_older_snapshots(using, xid, snapshot_wait_s)
    ids = [row["pk"] for row in batch]
    # (2) Lock the batch's rows (a replay counting itself waits a moment; nothing else is
    # blocked), check them again, delete history and effects.
    with transaction.atomic(using=using):
        still = list(candidates.select_for_update().filter(pk__in=ids).values_list("pk", flat=True))
        # Raw deletes, children first (finished resumptions, history, then the effects):
        # Django's collector would load every row to cascade, and here there is nothing left
        # to cascade to.
        Resumption.objects.using(using).filter(effect_id__in=still)._raw_delete(using)
        transitions = EffectTransition.objects.using(using).filter(effect_id__in=still)
        report.transitions += transitions._raw_delete(using)
        report.effects += Effect.objects.using(using).filter(pk__in=still)._raw_delete(using)
        reopened = set(ids) - set(still)
        if reopened:
            # Reopened by an operator since (1): the effect lives on, so its key needs no
            # tombstone.
            EffectTombstone.objects.using(using).filter(effect_id__in=reopened).delete()


def _expire_tombstones(using: str, lifetime: timedelta, batch_size: int) -> int:
    expired = 0
    tombstones = EffectTombstone.objects.using(using)
    while True:
        keys = list(tombstones.expired(lifetime).values_list("pk", flat=True)[:batch_size])
        if not keys:
            return expired
        deleted, _ = tombstones.filter(pk__in=keys).delete()
        expired += deleted


def _ago(age: timedelta) -> ExpressionWrapper[Any]:
    """``now - age`` by the database clock, like the ledger's staleness."""
    return ExpressionWrapper(
        Now() - Value(age, output_field=model_fields.DurationField()),
        output_field=model_fields.DateTimeField(),
    )


def _transaction_id(using: str) -> int | None:
    """The current transaction's 32-bit id on PostgreSQL (what ``backend_xmin`` holds)."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_current_xact_id()::text")
        (full,) = cursor.fetchone()
    return int(full) % 2**32


def _wait_for_older_snapshots(using: str, xid: int, timeout_s: float) -> None:
    """Return once no session of this database holds a snapshot taken before transaction
    ``xid`` committed (as ``CREATE INDEX CONCURRENTLY`` waits for older snapshots)."""
    deadline = time.monotonic() + timeout_s
    query = """
        SELECT array_agg(pid) FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()
          AND backend_xmin IS NOT NULL AND age(backend_xmin) >= age(%s::text::xid)
    """
    with connections[using].cursor() as cursor:
        while True:
            cursor.execute(query, [str(xid)])
            (pids,) = cursor.fetchone()
            if not pids:
                return
            if time.monotonic() > deadline:
                raise EffectStoreError(
                    f"waited {timeout_s:g} s for transactions older than the tombstones "
                    f"(server pids {sorted(pids)}); end them or run the prune again",
                    operation="prune",
                )
            time.sleep(0.005)
