"""``DjangoStore``: the store protocol on the Django ORM, for any database Django supports.

Every protocol method ``x`` has a sync twin ``x_sync`` holding the ORM code (a transition is
lock with ``select_for_update()``, check, change, history row, in one ``atomic()``); the sync
service (admin, DRF, commands) calls the twins on the request's own connection and transaction.
The async methods run the twins on the process's bounded thread pool (``_process``), so Django's
connection settings govern every connection. On PostgreSQL, outside the caller's ``atomic()``,
``begin``, ``commit`` and ``release`` are single statements (``postgres.BEGIN``/``COMMIT``) run
through Django's cursor; every change someone can wait for sends NOTIFY in its own transaction.
Timestamps and staleness use the database clock (``Now()``), not the app servers' clocks.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

from django.core.exceptions import ValidationError
from django.db import (
    Error,
    IntegrityError,
    connections,
    transaction,
)
from django.db.models import F
from django.db.models.functions import Now
from django.dispatch import Signal

from .. import resume, signals
from ..conf import ledger_settings
from ..errors import (
    EffectLedgerError,
    EffectLedgerValidationError,
    EffectNotFoundError,
    EffectStoreError,
)
from ..models import Effect as EffectRow
from ..models import EffectTransition
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
from ._django_data import DjangoDataMixin, refuse_tombstoned
from ._process import close_connections, in_thread, listen, notifier
from .base import (
    CHANNEL,
    BeginRecord,
    NewEffect,
    TransitionRecord,
    claimable,
    effect_from_columns,
    parse_uuid,
    worth_waking,
)

__all__ = ["DjangoStore", "close_connections"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_SIGNALS: dict[EffectStatus, Signal] = {
    EffectStatus.REQUIRES_APPROVAL: signals.approval_requested,
    EffectStatus.READY: signals.effect_approved,
    EffectStatus.DENIED: signals.effect_denied,
    EffectStatus.CANCELED: signals.effect_canceled,
    EffectStatus.SUCCEEDED: signals.effect_succeeded,
    EffectStatus.FAILED: signals.effect_failed,
}


class DjangoStore(DjangoDataMixin):
    """Effects and their history in ``agent_ledger``'s tables on the ``using`` database."""

    def __init__(self, using: str | None = None) -> None:
        self._using = using

    @property
    def using(self) -> str:
        """The alias, read at call time so ``override_settings(AGENT_LEDGER=...)`` applies."""
        return self._using or ledger_settings.DATABASE

    def __repr__(self) -> str:
        return f"DjangoStore(using={self._using!r})"

    # -- the async protocol: each runs its sync twin on the store's threads --------------------

    async def begin(self, new: NewEffect) -> BeginRecord:
        return await in_thread(self.begin_sync, new)

    async def get(self, effect_id: str) -> Effect | None:
        return await in_thread(self.get_sync, effect_id)

    async def get_by_idem_key(self, idem_key: str) -> Effect | None:
        return await in_thread(self.get_by_idem_key_sync, idem_key)

    async def commit(
        self, effect_id: str, outcome: CommitOutcome, *, fence: int | None, actor: Actor
    ) -> Effect | None:
        return await in_thread(self.commit_sync, effect_id, outcome, fence=fence, actor=actor)

    # The keyword arguments are the protocol's (``base.EffectStore``), checked by the twins.
    async def transition(self, idem_key: str, **kwargs: Any) -> TransitionRecord:
        return await in_thread(self.transition_sync, idem_key, **kwargs)

    async def release(self, effect_id: str, **kwargs: Any) -> Effect | None:
        return await in_thread(self.release_sync, effect_id, **kwargs)

    async def claim(self, effect_id: str, *, stale_after_ms: float, actor: Actor) -> Effect | None:
        return await in_thread(
            self.claim_sync, effect_id, stale_after_ms=stale_after_ms, actor=actor
        )

    async def history(self, effect_id: str) -> list[Transition]:
        return await in_thread(self.history_sync, effect_id)

    async def wait_for_change(
        self, effect_id: str, timeout_s: float, since: float
    ) -> Effect | None:
        listen(self.using)
        return await notifier.wait(effect_id, timeout_s, since)

    async def expire(self, effect_id: str) -> Effect | None:
        """Deny a pending approval past its ``expires_at`` (``agent_ledger.expiry``)."""
        from ..expiry import expire_sync

        return await in_thread(expire_sync, effect_id, using=self.using)

    def check_sync_caller(self) -> None:
        """``run_sync`` in ``atomic()`` on SQLite: our writes would wait for the caller's lock."""
        conn = connections[self.using]
        if conn.vendor == "sqlite" and conn.in_atomic_block:
            raise EffectLedgerError(
                "run_sync inside transaction.atomic() cannot work on SQLite (one writer, and "
                "your transaction holds it): call it outside the block, or use PostgreSQL"
            )

    # -- sync twins: the ORM code ---------------------------------------------------------------

    def begin_sync(self, new: NewEffect) -> BeginRecord:
        using = self.using
        user_id = _user_id(new.actor)
        # An expiring approval takes the ORM path: the single statement has no expires_at.
        if _fast_path(using) and new.expires_after_s is None:
            from . import postgres as pg

            params = pg.begin_params(new, pg.actor_params(new.actor, user_id))
            with _store_errors("begin"):
                row = _fetch(using, pg.BEGIN, params, attempts=pg.BEGIN_ATTEMPTS)
            row = pg.begun(new.idem_key, row)  # raises for a vanished or a pruned key
            record = BeginRecord(effect_from_columns(row, json_as_text=True), row["created"])
            if record.created:
                _announce(using, record.effect, None, new.actor)
            return record
        from .. import expiry

        with _store_errors("begin"), transaction.atomic(using=using):
            try:
                # The unique constraint on idem_key decides fresh vs replay; the savepoint keeps
                # the outer transaction usable when the insert loses (PostgreSQL aborts it else).
                with transaction.atomic(using=using):
                    row = EffectRow.objects.using(using).create(
                        id=uuid.UUID(new.id),
                        idem_key=new.idem_key,
                        workflow_id=new.workflow_id,
                        call_id=new.call_id,
                        tool=new.tool,
                        status=new.status.value,
                        args_canonical=new.args_canonical,
                        resource_id_canonical=new.resource_id_canonical,
                        attempts=1 if new.status is EffectStatus.PROCESSING else 0,
                        continuation=new.continuation,
                        expires_at=expiry.expires_at_for(new),
                    )
                    refuse_tombstoned(using, new.idem_key)
            except IntegrityError as exc:
                replayed = (
                    EffectRow.objects.using(using)
                    .filter(idem_key=new.idem_key)
                    .update(dedup_count=F("dedup_count") + 1)
                )
                if not replayed:
                    # Not the key: some other constraint refused the row.
                    raise EffectStoreError(str(exc), operation="begin") from exc
                row = EffectRow.objects.using(using).get(idem_key=new.idem_key)
                return BeginRecord(_effect(row), created=False)
            if not isinstance(row.created_at, datetime):
                # Backends that cannot RETURN the db_default columns: read them back.
                row.refresh_from_db(using=using, fields=["created_at", "updated_at"])
            if row.expires_at is not None and not isinstance(row.expires_at, datetime):
                row.refresh_from_db(using=using, fields=["expires_at"])  # computed by the DB
            effect = _effect(row)
            _record(using, effect, None, new.actor, user_id, None)
        return BeginRecord(effect, created=True)

    def get_sync(self, effect_id: str) -> Effect | None:
        pk = parse_uuid(effect_id)
        if pk is None:
            return None
        with _store_errors("get"):
            row = EffectRow.objects.using(self.using).filter(pk=pk).first()
        return None if row is None else _effect(row)

    def get_by_idem_key_sync(self, idem_key: str) -> Effect | None:
        with _store_errors("get_by_idem_key"):
            row = EffectRow.objects.using(self.using).filter(idem_key=idem_key).first()
        return None if row is None else _effect(row)

    def commit_sync(
        self, effect_id: str, outcome: CommitOutcome, *, fence: int | None, actor: Actor
    ) -> Effect | None:
        if isinstance(outcome, CommitSucceeded):
            # A success after retried attempts clears their last error.
            changes = {"status": EffectStatus.SUCCEEDED.value, "result": outcome.result}
            changes["error"] = None
        else:
            changes = {"status": EffectStatus.FAILED.value, "error": outcome.error.to_dict()}
        changes["completed_at"] = Now()
        return self._owner_writes("commit", effect_id, fence, actor, outcome, changes)

    def release_sync(
        self,
        effect_id: str,
        *,
        fence: int,
        actor: Actor,
        reason: str,
        error: EffectError | None = None,
    ) -> Effect | None:
        changes = {"status": EffectStatus.READY.value, "error": error and error.to_dict()}
        return self._owner_writes("release", effect_id, fence, actor, None, changes, error, reason)

    def _owner_writes(
        self,
        operation: str,
        effect_id: str,
        fence: int | None,
        actor: Actor,
        outcome: CommitOutcome | None,
        changes: dict[str, Any],
        error: EffectError | None = None,
        reason: str | None = None,
    ) -> Effect | None:
        """Commit or release: only the owner (``fence``) of a processing effect may. No lock
        needed: the UPDATE's conditions are checked and applied in one statement (PostgreSQL
        re-checks them on the row version it waited for), so an owner that lost its effect
        to a takeover or a cancel changes nothing."""
        pk = parse_uuid(effect_id)
        if pk is None:
            return None
        using = self.using
        user_id = _user_id(actor)
        if _fast_path(using):
            from . import postgres as pg

            actor_columns = pg.actor_params(actor, user_id)
            params = pg.commit_params(pk, outcome, fence, actor_columns, error=error, reason=reason)
            with _store_errors(operation):
                row = _fetch(using, pg.COMMIT, params)
            if row is None:
                return None
            effect = effect_from_columns(row, json_as_text=True)
            _announce(using, effect, EffectStatus.PROCESSING, actor)
            return effect
        with _store_errors(operation), transaction.atomic(using=using):
            owned = EffectRow.objects.using(using).filter(
                pk=pk, status=EffectStatus.PROCESSING.value
            )
            if fence is not None:
                owned = owned.filter(fence=fence)
            if not owned.update(updated_at=Now(), **changes):
                return None
            effect = _effect(EffectRow.objects.using(using).get(pk=pk))
            _record(using, effect, EffectStatus.PROCESSING, actor, user_id, reason)
        return effect

    def transition_sync(
        self,
        idem_key: str,
        *,
        from_statuses: Collection[EffectStatus],
        to_status: EffectStatus,
        actor: Actor,
        reason: str | None = None,
        error: EffectError | None = None,
    ) -> TransitionRecord:
        using = self.using
        user_id = _user_id(actor)
        allowed = {EffectStatus(s).value for s in from_statuses}
        with _store_errors("transition"), transaction.atomic(using=using):
            # Lock the row for the whole check-then-write: without it, approve and deny racing
            # could both read requires_approval and both write a decision.
            row = EffectRow.objects.using(using).select_for_update().filter(idem_key=idem_key)
            current = row.first()
            if current is None:
                raise EffectNotFoundError(idem_key)
            if current.status not in allowed:
                return TransitionRecord(_effect(current), changed=False)
            changes: dict[str, Any] = {"status": to_status.value, "updated_at": Now()}
            if error is not None:
                changes["error"] = error.to_dict()
            changes["completed_at"] = Now() if to_status in TERMINAL_STATUSES else None
            # Conditional on the status just read as well, for backends that ignore
            # select_for_update() (SQLite serialises writers instead, but belt and braces).
            if not row.filter(status=current.status).update(**changes):
                latest = EffectRow.objects.using(using).get(pk=current.pk)
                return TransitionRecord(_effect(latest), changed=False)
            effect = _effect(EffectRow.objects.using(using).get(pk=current.pk))
            recorded = _record(using, effect, EffectStatus(current.status), actor, user_id, reason)
            resume.decided(using, effect, EffectStatus(current.status), recorded.pk)
        return TransitionRecord(effect, changed=True)

    def claim_sync(self, effect_id: str, *, stale_after_ms: float, actor: Actor) -> Effect | None:
        pk = parse_uuid(effect_id)
        if pk is None:
            return None
        using = self.using
        user_id = _user_id(actor)
        # skip_locked, as django-tasks' get_locked(): a row another claimer holds is being
        # claimed, and at most one can win, so "someone else was first" is the answer now,
        # instead of queueing on the lock (which under load can outlast a short stale window
        # and turn one takeover into several).
        skip = connections[using].features.has_select_for_update_skip_locked
        with _store_errors("claim"), transaction.atomic(using=using):
            current = (
                EffectRow.objects.using(using)
                .select_for_update(skip_locked=skip)
                .filter(pk=pk)
                .annotate(db_now=Now())
                .first()
            )
            if current is None:
                return None
            before = _effect(current)
            # The database's clock, read by the locking statement itself.
            db_now: datetime = current.db_now  # type: ignore[attr-defined]
            if not claimable(before, stale_after_ms=stale_after_ms, now=db_now):
                return None
            # Conditional on the fence too, for backends that ignore select_for_update().
            taken = (
                EffectRow.objects.using(using)
                .filter(pk=pk, status=current.status, fence=current.fence)
                .update(
                    status=EffectStatus.PROCESSING.value,
                    fence=F("fence") + 1,
                    attempts=F("attempts") + 1,
                    updated_at=Now(),
                )
            )
            if not taken:
                return None
            effect = _effect(EffectRow.objects.using(using).get(pk=pk))
            reason = "stale takeover" if before.status is EffectStatus.PROCESSING else None
            _record(using, effect, before.status, actor, user_id, reason)
        return effect

    def history_sync(self, effect_id: str) -> list[Transition]:
        pk = parse_uuid(effect_id)
        if pk is None:
            return []
        with _store_errors("history"):
            rows = list(EffectTransition.objects.using(self.using).of_effect(pk))
        return [
            Transition(
                effect_id=str(row.effect_id),
                from_status=EffectStatus(row.from_status) if row.from_status else None,
                to_status=EffectStatus(row.to_status),
                at=row.at,
                actor=Actor(row.actor_label, row.actor_user_id, row.actor_name),
                reason=row.reason,
            )
            for row in rows
        ]


@contextmanager
def _store_errors(operation: str) -> Iterator[None]:
    """Turn the driver's failures into ``EffectStoreError`` with the original chained."""
    try:
        yield
    except EffectStoreError:
        raise
    except Error as exc:
        raise EffectStoreError(f"{type(exc).__name__}: {exc}", operation=operation) from exc


# -- rows, history and announcements -------------------------------------------------------------


def _effect(row: EffectRow) -> Effect:
    return effect_from_columns(row.__dict__)


def _record(
    using: str,
    effect: Effect,
    from_status: EffectStatus | None,
    actor: Actor,
    user_id: Any,
    reason: str | None,
) -> EffectTransition:
    """In the caller's transaction: the history row (returned) and, on PostgreSQL, the NOTIFY
    delivered to other processes when it commits; then announce it here."""
    row = EffectTransition.objects.using(using).record(
        effect_id=uuid.UUID(effect.id),
        from_status=from_status.value if from_status is not None else None,
        to_status=effect.status.value,
        actor_label=actor.label,
        actor_user_id=user_id,
        actor_name=actor.name or "",
        reason=reason,
    )
    conn = connections[using]
    if conn.vendor == "postgresql" and worth_waking(effect, from_status):
        with conn.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, effect.id])
    _announce(using, effect, from_status, actor)
    return row


def _announce(using: str, effect: Effect, from_status: EffectStatus | None, actor: Actor) -> None:
    """Once the change commits: wake this process's waiters and send the status's signal."""
    transaction.on_commit(lambda: notifier.notify(effect.id, effect), using=using)
    signal = _SIGNALS.get(effect.status) if from_status is not effect.status else None
    if signal is not None:
        transaction.on_commit(lambda: _send(signal, effect, actor), using=using)


def _send(signal: Signal, effect: Effect, actor: Actor) -> None:
    # The change is committed: a failing receiver must not turn it into an error for the
    # caller (who would then retry a decision that was recorded), so log and carry on.
    for receiver, response in signal.send_robust(sender=EffectRow, effect=effect, actor=actor):
        if isinstance(response, Exception):
            logger.error(
                "agent_ledger signal receiver %r failed for effect %s",
                receiver,
                effect.id,
                exc_info=response,
            )


def _user_id(actor: Actor) -> Any:
    """``actor.user_id`` as the user model's primary key, checked before anything is written."""
    if actor.user_id is None:
        return None
    field = EffectTransition._meta.get_field("actor_user").target_field
    try:
        return field.to_python(actor.user_id)
    except ValidationError as exc:
        raise EffectLedgerValidationError(
            f"{actor.user_id!r} is not a valid user id", field="actor.user_id"
        ) from exc


# -- PostgreSQL: single statements and LISTEN -----------------------------------------------------


def _fast_path(using: str) -> bool:
    """One statement instead of the ORM's transaction, savepoint and several statements; inside
    the caller's ``atomic()`` the ORM path keeps the caller's transaction semantics."""
    conn = connections[using]
    return conn.vendor == "postgresql" and not conn.in_atomic_block


def _fetch(using: str, query: str, params: dict[str, Any], attempts: int = 1) -> Any:
    """The statement's first row as a dict, through Django's cursor (its error classes,
    ``execute_wrapper`` and query logging); run again while it returns none."""
    with connections[using].cursor() as cursor:
        for _ in range(attempts):
            cursor.execute(query, params)
            row = cursor.fetchone()
            if row is not None:
                return dict(zip([column.name for column in cursor.description], row, strict=True))
    return None
