"""Expiry that fails closed: a pending approval past its ``expires_at`` is denied.

Three ways, one rule (the database clock decides, under the effect's row lock):

- at decision time (``approvals.decide``): nobody approves an expired request, on any surface,
  even before a sweep ran;
- at read time in a waiting ``run`` (``DjangoStore.expire``, called by the ledger);
- by ``sweep()``: ``manage.py agent_ledger_expire`` or ``run()`` from a periodic task
  (Celery beat, a ``django.tasks`` schedule, cron), in batches that skip rows other sweepers
  or deciders hold.

The denial is an ordinary decision (``requires_approval -> denied``, actor ``system``, error code
``expired``), so it is in the history, sends ``effect_denied`` and resumes the effect's
continuation like any deny. ``approval_expiring`` is sent once per effect, ``notify_before``
(the tool's policy) or ``EXPIRING_NOTICE_BEFORE`` ahead, for escalation.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.db import connections, transaction
from django.db.models import DateTimeField, DurationField, ExpressionWrapper, Value
from django.db.models.functions import Now

from . import signals
from .models import Effect as EffectRow
from .models import EffectStatus
from .policies import notify_before, policy_for
from .stores.base import NewEffect, effect_from_columns, parse_uuid
from .stores.django import DjangoStore
from .types import SYSTEM, Effect

__all__ = ["expire_sync", "notify_expiring", "run", "sweep"]

logger = logging.getLogger(__name__)
RA = EffectStatus.REQUIRES_APPROVAL.value


def expire_sync(effect_id: str, *, using: str | None = None) -> Effect | None:
    """Deny one effect if it is a pending approval past ``expires_at``; the denied effect, or
    None when it was not (yet) expired by the database clock."""
    from .approvals import expire_locked

    pk = parse_uuid(effect_id)
    store = DjangoStore(using)
    if pk is None:
        return None
    with transaction.atomic(using=store.using):
        row = (
            EffectRow.objects.using(store.using)
            .select_for_update()
            .filter(pk=pk, status=RA, expires_at__lte=Now())
            .first()
        )
        if row is None:
            return None
        return expire_locked(store, row).effect


def sweep(*, using: str | None = None, batch_size: int = 100) -> int:
    """Deny every expired pending approval, ``batch_size`` per transaction; how many."""
    from .approvals import expire_locked

    store = DjangoStore(using)
    skip = connections[store.using].features.has_select_for_update_skip_locked
    total = 0
    while True:
        with transaction.atomic(using=store.using):
            # skip_locked: a row a decider or another sweeper holds is theirs to settle now.
            rows = list(
                EffectRow.objects.using(store.using)
                .select_for_update(skip_locked=skip)
                .filter(status=RA, expires_at__lte=Now())
                .order_by("expires_at")[:batch_size]
            )
            for row in rows:
                if expire_locked(store, row).changed:
                    total += 1
        if len(rows) < batch_size:
            return total


def notify_expiring(*, using: str | None = None, batch_size: int = 100) -> int:
    """Send ``approval_expiring`` for pending approvals about to expire, once each; how many."""
    store = DjangoStore(using)
    longest = _longest_notice()
    horizon = ExpressionWrapper(
        Now() + Value(longest, output_field=DurationField()), output_field=DateTimeField()
    )
    sent = 0
    candidates = (
        EffectRow.objects.using(store.using)
        .filter(status=RA, expires_at__lte=horizon, expiring_notified_at__isnull=True)
        .annotate(db_now=Now())
        .order_by("expires_at")
    )
    for row in candidates[: batch_size * 10]:
        before = notify_before(policy_for(row.tool))
        db_now = row.db_now  # type: ignore[attr-defined]
        if row.expires_at is None or row.expires_at - before > db_now:
            continue
        with transaction.atomic(using=store.using):
            # The conditional update is the "sent once" record: one process wins it.
            won = (
                EffectRow.objects.using(store.using)
                .filter(pk=row.pk, status=RA, expiring_notified_at__isnull=True)
                .update(expiring_notified_at=Now())
            )
            if won:
                effect = effect_from_columns(row.__dict__)
                transaction.on_commit(lambda e=effect: _send(e), using=store.using)  # type: ignore[misc]
                sent += 1
    return sent


def run(*, using: str | None = None, batch_size: int = 100) -> dict[str, int]:
    """The periodic task: notices first (an effect about to expire), then the sweep."""
    return {
        "notified": notify_expiring(using=using, batch_size=batch_size),
        "expired": sweep(using=using, batch_size=batch_size),
    }


def _longest_notice() -> timedelta:
    from .policies import DEFAULT, policies

    return max(notify_before(policy) for policy in [DEFAULT, *policies()])


def _send(effect: Effect) -> None:
    for receiver, response in signals.approval_expiring.send_robust(
        sender=EffectRow, effect=effect, actor=SYSTEM
    ):
        if isinstance(response, Exception):
            logger.error(
                "approval_expiring receiver %r failed for effect %s",
                receiver,
                effect.id,
                exc_info=response,
            )


def expires_at_for(new: NewEffect) -> Any:
    """``Now() + expires_after_s`` by the database clock, for a new pending approval."""
    if new.expires_after_s is None or new.status.value != "requires_approval":
        return None
    after = Value(timedelta(seconds=new.expires_after_s), output_field=DurationField())
    return ExpressionWrapper(Now() + after, output_field=DateTimeField())
