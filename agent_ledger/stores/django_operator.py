"""``DjangoStore``'s operator actions on the ORM (``agent_ledger.operator`` has the rules):
reopen a failed effect, resolve a processing one. Each is lock (``select_for_update()``),
check, change, history row, NOTIFY, in one transaction, like every decision."""

from __future__ import annotations

import uuid

from django.db import connections, transaction
from django.db.models import F
from django.db.models.functions import Now

from .. import signals
from ..errors import EffectNotFoundError
from ..models import Effect as EffectRow
from ..models import EffectTransition
from ..operator import reopen_reason
from ..types import Actor, CommitOutcome, CommitSucceeded, EffectError, EffectStatus
from ._process import notifier
from .base import CHANNEL, TransitionRecord
from .django import _effect, _record, _send, _store_errors, _user_id


def reopen_sync(using: str, idem_key: str, *, actor: Actor, reason: str) -> TransitionRecord:
    """``failed -> ready``: the next run of the key runs the handler again."""
    user_id = _user_id(actor)
    with _store_errors("retry"), transaction.atomic(using=using):
        # Lock for the check-then-write: two operators (or a prune) racing act once.
        current = _locked(using, idem_key)
        if current.status != EffectStatus.FAILED.value:
            return TransitionRecord(_effect(current), changed=False)
        previous = EffectError.from_dict(current.error)
        EffectRow.objects.using(using).filter(pk=current.pk).update(
            status=EffectStatus.READY.value,
            error=None,
            result=None,
            completed_at=None,
            updated_at=Now(),
        )
        effect = _effect(EffectRow.objects.using(using).get(pk=current.pk))
        EffectTransition.objects.using(using).record(
            effect_id=uuid.UUID(effect.id),
            from_status=EffectStatus.FAILED.value,
            to_status=EffectStatus.READY.value,
            actor_label=actor.label,
            actor_user_id=user_id,
            actor_name=actor.name or "",
            reason=reopen_reason(reason, previous),
        )
        conn = connections[using]
        if conn.vendor == "postgresql":
            with conn.cursor() as cursor:
                cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, effect.id])
        transaction.on_commit(lambda: notifier.notify(effect.id, effect), using=using)
        transaction.on_commit(lambda: _send(signals.effect_reopened, effect, actor), using=using)
    return TransitionRecord(effect, changed=True)


def resolve_sync(
    using: str, idem_key: str, outcome: CommitOutcome, *, actor: Actor, reason: str
) -> TransitionRecord:
    """``processing -> succeeded|failed`` with the operator's outcome; the fence rises so the
    old owner's late commit is refused."""
    user_id = _user_id(actor)
    if isinstance(outcome, CommitSucceeded):
        status, changes = EffectStatus.SUCCEEDED, {"result": outcome.result, "error": None}
    else:
        status, changes = EffectStatus.FAILED, {"result": None, "error": outcome.error.to_dict()}
    with _store_errors("resolve"), transaction.atomic(using=using):
        # Lock for the check-then-write: a late commit or a takeover waits, then finds the
        # effect no longer processing (or its fence moved) and changes nothing.
        current = _locked(using, idem_key)
        if current.status != EffectStatus.PROCESSING.value:
            return TransitionRecord(_effect(current), changed=False)
        EffectRow.objects.using(using).filter(pk=current.pk).update(
            status=status.value,
            fence=F("fence") + 1,
            updated_at=Now(),
            completed_at=Now(),
            **changes,
        )
        effect = _effect(EffectRow.objects.using(using).get(pk=current.pk))
        # History, NOTIFY (for whoever counted themselves waiting) and the outcome's signal.
        _record(using, effect, EffectStatus.PROCESSING, actor, user_id, reason)
    return TransitionRecord(effect, changed=True)


def _locked(using: str, idem_key: str) -> EffectRow:
    current = EffectRow.objects.using(using).select_for_update().filter(idem_key=idem_key).first()
    if current is None:
        raise EffectNotFoundError(idem_key)
    return current
