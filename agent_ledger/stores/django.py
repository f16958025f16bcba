"""``DjangoStore``: the store protocol on the Django ORM, for any database Django supports.

Every protocol method ``x`` has a sync twin ``x_sync`` with the same arguments that holds the
real ORM code. The sync twins are what the sync service (admin, DRF, management commands) calls,
on the request's own connection and transaction. The async methods run the twin on the store's
own thread pool (as ``sync_to_async(thread_sensitive=False)`` would), so concurrent coroutines
use different threads and therefore different connections; a single thread would serialise
every coroutine of the process behind one connection. On PostgreSQL the calls on every tool
call's path, ``begin`` and ``commit``, and the reads waiters poll with, skip the threads: they
run the shared statements on the caller's event loop (``_aio``), and only signals go to a
thread, when someone listens. Concurrent begins of one key share one statement there.

Connections: at most ``AGENT_LEDGER["ASYNC_THREADS"]`` threads, one connection each, and on
PostgreSQL at most as many of each event loop's own. With ``CONN_MAX_AGE = 0`` a connection is
closed once it has had no ledger work for a second (a burst of calls shares it); with a positive
or ``None`` ``CONN_MAX_AGE`` connections persist as Django's do. Broken connections are dropped
after the call that found them broken. ``close_connections()`` closes them all at once (tests,
shutdown) and writes the replay counts still held (see ``_pgsql``).

Clocks: ``created_at``/``updated_at`` are written with ``Now()`` and staleness is judged against
``Now()`` read in the same locked query, so the database clock decides, not the clocks of the
(possibly many) application servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import queue
import threading
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from django.core.exceptions import ValidationError
from django.db import (
    DataError,
    Error,
    IntegrityError,
    connections,
    transaction,
)
from django.db.models import F
from django.db.models.functions import Now
from django.dispatch import Signal

from .. import signals
from ..conf import ledger_settings
from ..errors import EffectLedgerValidationError, EffectNotFoundError, EffectStoreError
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
from . import _aio
from . import _pgsql as pgsql
from ._listen import Listener
from .base import (
    BeginRecord,
    ChangeNotifier,
    NewEffect,
    TransitionRecord,
    claimable,
    parse_uuid,
)

if TYPE_CHECKING:
    import psycopg

__all__ = ["DjangoStore", "close_connections"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Wakes waiters in this process as soon as a change commits (any DjangoStore instance, any
#: thread, including the sync service). Changes made by other processes are seen by polling.
_notifier = ChangeNotifier()

_executor: _LedgerThreads | None = None
_executor_lock = threading.Lock()

_SIGNALS: dict[EffectStatus, Signal] = {
    EffectStatus.REQUIRES_APPROVAL: signals.approval_requested,
    EffectStatus.READY: signals.effect_approved,
    EffectStatus.DENIED: signals.effect_denied,
    EffectStatus.CANCELED: signals.effect_canceled,
    EffectStatus.SUCCEEDED: signals.effect_succeeded,
    EffectStatus.FAILED: signals.effect_failed,
}


class DjangoStore:
    """Effects and their history in ``agent_ledger``'s tables on the ``using`` database."""

    def __init__(self, using: str | None = None) -> None:
        self._using = using
        self._claims: dict[str, Future[Effect | None]] = {}
        self._claims_lock = threading.Lock()
        self._owned = pgsql.OwnedEffects()

    @property
    def using(self) -> str:
        """The alias, read at call time so ``override_settings(AGENT_LEDGER=...)`` applies."""
        return self._using or ledger_settings.DATABASE

    def __repr__(self) -> str:
        return f"DjangoStore(using={self._using!r})"

    # -- the async protocol: each runs its sync twin on a worker thread -----------------------

    async def begin(self, new: NewEffect) -> BeginRecord:
        native = self._native()
        if native is None:
            return await self._in_thread(self.begin_sync, new)
        using = self.using
        params = _begin_params(new, _user_id(new.actor))

        async def statement() -> BeginRecord:
            async with native.connection("begin") as conn:
                found = await pgsql.begin_row(
                    lambda: _fetch_async(conn, pgsql.BEGIN, params), new.idem_key
                )
            record = _begin_record(using, new, found)
            if record.created:
                self._owned.add(record.effect)
            return record

        record = await _shared_begins(native, using).begin(new.idem_key, statement)
        if record.created:
            await self._announce(record.effect, None, new.actor)
        return record

    async def get(self, effect_id: str) -> Effect | None:
        # Waiters poll with reads, many at once: on the loop too, or they crowd the threads.
        native = self._native()
        if native is None:
            return await self._in_thread(self.get_sync, effect_id)
        pk = parse_uuid(effect_id)
        if pk is None:
            return None
        await _write_counts_owed_async(self.using, native, effect_id=effect_id)
        async with native.connection("get") as conn:
            row = await _fetch_async(conn, pgsql.GET, (pk,))
        return None if row is None else pgsql.effect_from_row(row, json_as_text=True)

    async def get_by_idem_key(self, idem_key: str) -> Effect | None:
        native = self._native()
        if native is None:
            return await self._in_thread(self.get_by_idem_key_sync, idem_key)
        await _write_counts_owed_async(self.using, native, idem_key=idem_key)
        async with native.connection("get_by_idem_key") as conn:
            row = await _fetch_async(conn, pgsql.GET_BY_KEY, (idem_key,))
        return None if row is None else pgsql.effect_from_row(row, json_as_text=True)

    async def commit(
        self, effect_id: str, outcome: CommitOutcome, *, fence: int | None, actor: Actor
    ) -> Effect | None:
        native = self._native()
        if native is None:
            return await self._in_thread(
                self.commit_sync, effect_id, outcome, fence=fence, actor=actor
            )
        pk = parse_uuid(effect_id)
        if pk is None:
            return None
        owned = self._owned.pop(effect_id)
        query, params = pgsql.commit_statement(
            pk, outcome, fence, _actor_params(actor, _user_id(actor)), brief=owned is not None
        )
        async with native.connection("commit") as conn:
            committed = await _fetch_async(conn, query, params)
        if committed is None:
            return None
        effect = _committed(owned, outcome, committed)
        await self._announce(effect, EffectStatus.PROCESSING, actor)
        return effect

    def _native(self) -> _aio.LoopConnections | None:
        """This loop's own connections for the hot path (PostgreSQL), else None: threads."""
        return _aio.for_alias(self.using)

    async def _announce(
        self, effect: Effect, from_status: EffectStatus | None, actor: Actor
    ) -> None:
        """``_announce`` for a change committed on the loop: wake waiters here, and send the
        signal on a store thread (receivers are sync code that may use the ORM), if anyone
        listens."""
        _notifier.notify(effect.id, effect)
        signal = _signal_for(effect, from_status)
        if signal is not None and signal.has_listeners(EffectRow):
            await self._in_thread(_send, signal, effect, actor)

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
        return await self._in_thread(
            self.transition_sync,
            idem_key,
            from_statuses=from_statuses,
            to_status=to_status,
            actor=actor,
            reason=reason,
            error=error,
        )

    async def claim(self, effect_id: str, *, stale_after_ms: float, actor: Actor) -> Effect | None:
        """Concurrent claims of one effect through this store share one database round trip.

        Waiters of a stale or just-approved effect all try to claim it at once; at most one can
        win, so the others wait for the first attempt and report "someone else was first"
        (None) instead of queueing on the row lock, which under load can take longer than a
        short ``stale_after_ms`` and turn one takeover into several.
        """
        with self._claims_lock:
            shared = self._claims.get(effect_id)
            mine = shared is None
            if shared is None:
                shared = self._claims[effect_id] = Future()
        if not mine:
            await asyncio.wrap_future(shared)
            return None
        try:
            claimed = await self._in_thread(
                self.claim_sync, effect_id, stale_after_ms=stale_after_ms, actor=actor
            )
        except asyncio.CancelledError:
            shared.set_result(None)  # the others were not canceled; they just did not win
            raise
        except BaseException as exc:
            shared.set_exception(exc)
            raise
        else:
            shared.set_result(claimed)
            return claimed
        finally:
            with self._claims_lock:
                del self._claims[effect_id]

    async def history(self, effect_id: str) -> list[Transition]:
        return await self._in_thread(self.history_sync, effect_id)

    async def wait_for_change(
        self, effect_id: str, timeout_s: float, since: float
    ) -> Effect | None:
        _listen(self.using)
        return await _notifier.wait(effect_id, timeout_s, since)

    # -- sync twins: the ORM code ---------------------------------------------------------------

    def begin_sync(self, new: NewEffect) -> BeginRecord:
        using = self.using
        user_id = _user_id(new.actor)
        if _fast_path(using):
            params = _begin_params(new, user_id)
            with _store_errors("begin"):
                found = pgsql.begin_row_sync(
                    lambda: _fetch(using, pgsql.BEGIN, params), new.idem_key
                )
            record = _begin_record(using, new, found)
            if record.created:
                self._owned.add(record.effect)
                _announce(using, record.effect, None, new.actor)
            return record
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
                    )
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
            effect = _effect(row)
            _record(using, effect, None, new.actor, user_id, None)
        return BeginRecord(effect, created=True)

    def get_sync(self, effect_id: str) -> Effect | None:
        pk = parse_uuid(effect_id)
        if pk is None:
            return None
        _write_counts_owed(self.using, effect_id=effect_id)
        with _store_errors("get"):
            row = EffectRow.objects.using(self.using).filter(pk=pk).first()
        return None if row is None else _effect(row)

    def get_by_idem_key_sync(self, idem_key: str) -> Effect | None:
        _write_counts_owed(self.using, idem_key=idem_key)
        with _store_errors("get_by_idem_key"):
            row = EffectRow.objects.using(self.using).filter(idem_key=idem_key).first()
        return None if row is None else _effect(row)

    def commit_sync(
        self, effect_id: str, outcome: CommitOutcome, *, fence: int | None, actor: Actor
    ) -> Effect | None:
        pk = parse_uuid(effect_id)
        if pk is None:
            return None
        using = self.using
        user_id = _user_id(actor)
        if isinstance(outcome, CommitSucceeded):
            status, changes = EffectStatus.SUCCEEDED, {"result": outcome.result}
        else:
            status, changes = EffectStatus.FAILED, {"error": outcome.error.to_dict()}
        handed_out = self._owned.pop(effect_id)
        if _fast_path(using):
            query, params = pgsql.commit_statement(
                pk, outcome, fence, _actor_params(actor, user_id), brief=handed_out is not None
            )
            with _store_errors("commit"):
                committed = _fetch(using, query, params)
            if committed is None:
                return None
            effect = _committed(handed_out, outcome, committed)
            _announce(using, effect, EffectStatus.PROCESSING, actor)
            return effect
        with _store_errors("commit"), transaction.atomic(using=using):
            # No lock needed: the UPDATE's own conditions (still processing, fence unchanged)
            # are checked and applied in one statement (PostgreSQL re-checks them on the row
            # version it waited for), so a commit that lost its effect to a takeover or a
            # cancel changes nothing.
            owned = EffectRow.objects.using(using).filter(
                pk=pk, status=EffectStatus.PROCESSING.value
            )
            if fence is not None:
                owned = owned.filter(fence=fence)
            if not owned.update(
                status=status.value, updated_at=Now(), completed_at=Now(), **changes
            ):
                return None
            effect = _effect(EffectRow.objects.using(using).get(pk=pk))
            _record(using, effect, EffectStatus.PROCESSING, actor, user_id, None)
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
            _record(using, effect, EffectStatus(current.status), actor, user_id, reason)
        return TransitionRecord(effect, changed=True)

    def claim_sync(self, effect_id: str, *, stale_after_ms: float, actor: Actor) -> Effect | None:
        pk = parse_uuid(effect_id)
        if pk is None:
            return None
        using = self.using
        user_id = _user_id(actor)
        with _store_errors("claim"), transaction.atomic(using=using):
            # Lock the row so that of two waiters who both see it ready (or stale), only one
            # becomes the owner; the other blocks here and then sees the raised fence.
            current = (
                EffectRow.objects.using(using)
                .select_for_update()
                .filter(pk=pk)
                .annotate(db_now=Now())
                .first()
            )
            if current is None:
                return None
            before = _effect(current)
            # The database's clock, read by the locking statement itself: on PostgreSQL that is
            # when the statement started, so a claim that queued behind the winner's lock sees
            # the winner's fresh updated_at as "not stale yet" instead of taking over again.
            db_now: datetime = current.db_now  # type: ignore[attr-defined]
            if not claimable(before, stale_after_ms=stale_after_ms, now=db_now):
                return None
            # Conditional on the fence too, for backends that ignore select_for_update().
            taken = (
                EffectRow.objects.using(using)
                .filter(pk=pk, status=current.status, fence=current.fence)
                .update(
                    status=EffectStatus.PROCESSING.value, fence=F("fence") + 1, updated_at=Now()
                )
            )
            if not taken:
                return None
            effect = _effect(EffectRow.objects.using(using).get(pk=pk))
            reason = "stale takeover" if before.status is EffectStatus.PROCESSING else None
            _record(using, effect, before.status, actor, user_id, reason)
        self._owned.add(effect)
        return effect

    def history_sync(self, effect_id: str) -> list[Transition]:
        pk = parse_uuid(effect_id)
        if pk is None:
            return []
        with _store_errors("history"):
            rows = list(
                EffectTransition.objects.using(self.using).filter(effect_id=pk).order_by("at", "id")
            )
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

    # -- threads and connections ----------------------------------------------------------------

    async def _in_thread(self, func: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        # What sync_to_async(thread_sensitive=False) does, minus its machinery for calling back
        # into async code, which store calls never do: this sits on every call's hot path.
        context = contextvars.copy_context()
        call = functools.partial(context.run, _in_worker, func, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(_get_executor(), call)


def _in_worker(func: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run ``func`` on one of the store's threads, which no request cycle cleans up after."""
    _tidy_connections(idle=False)
    try:
        return func(*args, **kwargs)
    except EffectStoreError as exc:
        cause = exc.__cause__
        if isinstance(cause, Error) and not isinstance(cause, (DataError, IntegrityError)):
            # The connection may be broken, and SQLite's is_usable() always says yes: drop it
            # so the next call on this thread opens a fresh one. Errors are rare; reconnecting
            # is cheap next to handing a dead connection to every later call.
            for conn in connections.all(initialized_only=True):
                conn.close()
        raise


def _tidy_connections(*, idle: bool) -> None:
    """What ``close_old_connections()`` does at a request's start and end, for these threads.

    Broken connections and connections older than ``CONN_MAX_AGE`` are closed. With
    ``CONN_MAX_AGE = 0`` (Django's default) a connection counts as old once its thread goes
    idle rather than after every call: a burst of ledger calls (waiters polling, many
    coroutines) then reuses it instead of paying for a new connection each time, and every
    connection is still closed within ``_IDLE_CLOSE_S`` of the burst ending.
    """
    for conn in connections.all(initialized_only=True):
        if idle or conn.settings_dict["CONN_MAX_AGE"] != 0:
            conn.close_if_unusable_or_obsolete()
            continue
        # So that CONN_HEALTH_CHECKS checks once per call, as it does once per request.
        conn.health_check_done = False  # type: ignore[attr-defined]
        if conn.connection is not None and conn.errors_occurred:
            if conn.is_usable():
                conn.errors_occurred = False
            else:
                conn.close()


#: How long a store thread keeps a CONN_MAX_AGE=0 connection while waiting for more work.
_IDLE_CLOSE_S = 1.0

_WorkItem = tuple["Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class _LedgerThreads(Executor):
    """The store's threads: up to ``max_workers``, so at most that many connections.

    Its own pool, not the loop's default one: sync handlers run there (``asyncio.to_thread``)
    and blocking tools must not starve the ledger of threads to record their outcome. Unlike
    ``ThreadPoolExecutor`` a thread notices when it goes idle, which is when it closes its
    connections (see ``_tidy_connections``); on shutdown every thread closes its connections.
    """

    def __init__(self, max_workers: int, *, idle_close_s: float = _IDLE_CLOSE_S) -> None:
        self._max_workers = max_workers
        self._idle_close_s = idle_close_s
        self._queue: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._pending = 0
        self._shut_down = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._shut_down:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queue.put((future, fn, args, kwargs))
            self._pending += 1
            if self._pending > self._idle and len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=self._work, name=f"agent-ledger-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut_down = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join()

    def _work(self) -> None:
        try:
            while True:
                with self._lock:
                    self._idle += 1
                try:
                    item = self._queue.get(timeout=self._idle_close_s)
                except queue.Empty:
                    _close_idle_connections()
                    item = self._queue.get()
                with self._lock:
                    self._idle -= 1
                    if item is not None:
                        self._pending -= 1
                if item is None:
                    return
                future, fn, args, kwargs = item
                del item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                del future, fn, args, kwargs
        finally:
            connections.close_all()


def _close_idle_connections() -> None:
    try:
        _tidy_connections(idle=True)
    except Exception:
        # Checking needs the database (autocommit, is_usable); if that fails, just close.
        logger.debug("closing idle ledger connections without checking them", exc_info=True)
        for conn in connections.all(initialized_only=True):
            conn.close()


def close_connections() -> None:
    """Close every connection the store holds (its threads', and the LISTEN connection), now
    instead of when they go idle.

    For tests (before the test database is flushed or dropped) and shutdown hooks; call it
    when no async ledger call is in flight. New threads are started by the next call.
    """
    global _executor
    _stop_listening()
    _aio.close_all()
    if any(_replay_counts.values()):
        # On a store thread: never inside the caller's transaction. A failure is logged and
        # the counts are kept for a later try; closing goes on.
        _get_executor().submit(functools.partial(_in_worker, _write_all_counts_quietly)).result()
    with _executor_lock:
        executor, _executor = _executor, None
    if executor is not None:
        executor.shutdown(wait=True)


def _get_executor() -> _LedgerThreads:
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = _LedgerThreads(ledger_settings.ASYNC_THREADS)
    return _executor


@contextmanager
def _store_errors(operation: str) -> Iterator[None]:
    """Turn the driver's failures into ``EffectStoreError`` with the original chained."""
    try:
        yield
    except EffectStoreError:
        raise
    except Error as exc:
        raise EffectStoreError(f"{type(exc).__name__}: {exc}", operation=operation) from exc


# -- rows <-> values ---------------------------------------------------------------------------


def _effect(row: EffectRow) -> Effect:
    return Effect(
        id=str(row.id),
        idem_key=row.idem_key,
        workflow_id=row.workflow_id,
        call_id=row.call_id,
        tool=row.tool,
        status=EffectStatus(row.status),
        args_canonical=row.args_canonical,
        resource_id_canonical=row.resource_id_canonical,
        dedup_count=row.dedup_count,
        created_at=row.created_at,
        updated_at=row.updated_at,
        result=row.result,
        error=EffectError.from_dict(row.error),
        completed_at=row.completed_at,
        fence=row.fence,
    )


def _record(
    using: str,
    effect: Effect,
    from_status: EffectStatus | None,
    actor: Actor,
    user_id: Any,
    reason: str | None,
) -> None:
    """Append the history row (inside the caller's transaction) and, once that transaction
    commits, wake this process's waiters and send the status's signal."""
    EffectTransition.objects.using(using).create(
        effect_id=uuid.UUID(effect.id),
        from_status=from_status.value if from_status is not None else None,
        to_status=effect.status.value,
        actor_label=actor.label,
        actor_user_id=user_id,
        actor_name=actor.name or "",
        reason=reason,
    )
    _announce(using, effect, from_status, actor)


def _announce(using: str, effect: Effect, from_status: EffectStatus | None, actor: Actor) -> None:
    """Once the change commits: wake this process's waiters and send the status's signal."""
    transaction.on_commit(lambda: _notifier.notify(effect.id, effect), using=using)
    signal = _signal_for(effect, from_status)
    if signal is not None:
        transaction.on_commit(lambda: _send(signal, effect, actor), using=using)


def _signal_for(effect: Effect, from_status: EffectStatus | None) -> Signal | None:
    return _SIGNALS.get(effect.status) if from_status is not effect.status else None


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


# -- PostgreSQL: the same single statements as PostgresStore ------------------------------------


_listeners: dict[str, Listener] = {}
_listeners_lock = threading.Lock()


def _begin_params(new: NewEffect, user_id: Any) -> dict[str, Any]:
    return {
        "id": uuid.UUID(new.id),
        "idem_key": new.idem_key,
        "workflow_id": new.workflow_id,
        "call_id": new.call_id,
        "tool": new.tool,
        "status": new.status.value,
        "args_canonical": new.args_canonical,
        "resource_id_canonical": new.resource_id_canonical,
        "from_status": None,
        "reason": None,
        "replay_commit": "off",
        "defer_count": ledger_settings.REPLAY_COUNT_DELAY_SECONDS > 0,
        **_actor_params(new.actor, user_id),
    }


def _begin_record(using: str, new: NewEffect, found: dict[str, Any]) -> BeginRecord:
    """The outcome of ``pgsql.BEGIN``; a replay of a finished effect is counted later."""
    if found["created"]:
        return BeginRecord(pgsql.effect_created(new, found), created=True)
    unwritten = 0 if found["counted"] else _count_later(using, str(found["id"]), new.idem_key)
    effect = pgsql.effect_from_row(found, json_as_text=True, unwritten_replays=unwritten)
    return BeginRecord(effect, created=found["created"])


def _committed(owned: Effect | None, outcome: CommitOutcome, row: dict[str, Any]) -> Effect:
    if owned is not None:
        return pgsql.effect_committed(owned, outcome, row)
    return pgsql.effect_from_row(row, json_as_text=True)


async def _fetch_async(
    conn: Any, query: str, params: dict[str, Any] | tuple[Any, ...]
) -> dict[str, Any] | None:
    from psycopg.rows import dict_row

    cursor = conn.cursor(row_factory=dict_row)
    await cursor.execute(query, params)
    row: dict[str, Any] | None = await cursor.fetchone()
    return row


def _fast_path(using: str) -> bool:
    """On PostgreSQL, outside the caller's transaction, ``begin`` and ``commit`` run the shared
    single statements (``_pgsql``): one round trip each, history row included, where the ORM
    needs a transaction, a savepoint and several statements. Inside an ``atomic()`` block the
    ORM path keeps the caller's transaction semantics (and the server's commit durability)."""
    conn = connections[using]
    return conn.vendor == "postgresql" and not conn.in_atomic_block


def _fetch(using: str, query: str, params: dict[str, Any]) -> dict[str, Any] | None:
    with _statement_cursor(using) as cursor:
        cursor.execute(query, params)
        row: dict[str, Any] | None = cursor.fetchone()
        return row


def _statement_cursor(using: str) -> Any:
    """A cursor for the shared statements, still wrapped by Django (its error classes,
    ``execute_wrapper`` and query logging) but binding parameters on the server, returning
    dicts and, unless ``AGENT_LEDGER["PREPARE_STATEMENTS"]`` is off, preparing the statement.

    Django's own cursors bind on the client, so PostgreSQL parses and plans each statement
    anew: for these CTEs planning costs about as much as running them. A prepared statement is
    planned once per connection (pooled and persistent connections keep it)."""
    db = connections[using]
    db.close_if_health_check_failed()
    db.ensure_connection()
    with db.wrap_database_errors:
        cursor = _cursor_class(ledger_settings.PREPARE_STATEMENTS)(db.connection)
        return db.make_debug_cursor(cursor) if db.queries_logged else db.make_cursor(cursor)


@functools.cache
def _cursor_class(prepare: bool) -> type[Any]:
    # Imported here: SQLite projects need not have psycopg.
    import psycopg
    from psycopg.rows import dict_row

    class StatementCursor(psycopg.Cursor[Any]):
        def __init__(self, connection: Any) -> None:
            super().__init__(connection, row_factory=dict_row)

        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
            if not prepare:
                return super().execute(query, params)
            # Django turns preparing off on its connections (``prepare_threshold`` None, for
            # PgBouncer's sake) and psycopg then ignores ``prepare=True``: lift that for this
            # call only, so the project's own queries keep Django's setting.
            conn = self.connection
            threshold = conn.prepare_threshold
            conn.prepare_threshold = 0 if threshold is None else threshold
            try:
                return super().execute(query, params, prepare=True)
            finally:
                conn.prepare_threshold = threshold

    return StatementCursor


def _actor_params(actor: Actor, user_id: Any) -> dict[str, Any]:
    return {"actor_label": actor.label, "actor_user_id": user_id, "actor_name": actor.name or ""}


def _listen(using: str) -> None:
    """Hear other processes' commits on PostgreSQL (one LISTEN connection per alias)."""
    listener = _listeners.get(using)
    if listener is None:
        conn = connections[using]
        if conn.vendor != "postgresql":
            return
        with _listeners_lock:
            listener = _listeners.get(using)
            if listener is None:
                params = conn.get_connection_params()

                def connect() -> psycopg.Connection[Any]:
                    import psycopg

                    return psycopg.connect(**{**params, "autocommit": True})

                listener = _listeners[using] = Listener(connect, _notifier)
    listener.start()


# -- replay counts of finished effects (see ``_pgsql``) -----------------------------------------

_replay_counts: dict[str, pgsql.ReplayCounts] = {}


def _shared_begins(native: _aio.LoopConnections, using: str) -> pgsql.SharedBegins:
    """The loop's shared begins (``pgsql.SharedBegins``), kept with its connections."""
    begins = native.extra
    if begins is None:
        begins = native.extra = pgsql.SharedBegins(
            functools.partial(_count_later, using),
            lambda effect_id, count: _count_on_loop(native, {effect_id: (count, "")}),
        )
    return begins  # type: ignore[no-any-return]


async def _count_on_loop(
    native: _aio.LoopConnections, counts: Mapping[str, tuple[int, str]]
) -> None:
    async with native.connection("count replays") as conn:
        await conn.execute(pgsql.COUNT_REPLAYS, pgsql.count_params(counts, "off"))


_count_locks: dict[str, threading.Lock] = {}
_counts_lock = threading.Lock()


def _counts(using: str) -> tuple[pgsql.ReplayCounts, threading.Lock]:
    counts = _replay_counts.get(using)
    if counts is None:
        with _counts_lock:
            counts = _replay_counts.setdefault(using, pgsql.ReplayCounts())
            _count_locks.setdefault(using, threading.Lock())
    return counts, _count_locks[using]


def _count_later(using: str, effect_id: str, idem_key: str) -> int:
    """Hold the replay count of a finished effect (a timer has a store thread write it);
    return the effect's count not written yet."""
    counts, _ = _counts(using)
    unwritten, schedule = counts.add(effect_id, idem_key)
    if schedule:
        timer = threading.Timer(
            ledger_settings.REPLAY_COUNT_DELAY_SECONDS, _counts_due, args=(using,)
        )
        timer.daemon = True
        timer.start()
    return unwritten


def _counts_due(using: str) -> None:
    # RuntimeError: shutting down, and close_connections() writes them.
    with contextlib.suppress(RuntimeError):
        _get_executor().submit(functools.partial(_in_worker, _write_counts_quietly, using))


def _write_counts_quietly(using: str) -> None:
    try:
        _write_counts(using)
    except Exception:
        # Kept, not lost: the next replay, read or close_connections() tries again.
        logger.warning("agent_ledger: could not write replay counts yet", exc_info=True)


def _write_counts_owed(
    using: str, *, effect_id: str | None = None, idem_key: str | None = None
) -> None:
    """Before a read: write the counts this process still holds for the effect, so the read
    is exact. Not inside the caller's transaction (it would take the write with it)."""
    counts = _replay_counts.get(using)
    owed = counts is not None and counts.owes(effect_id=effect_id, idem_key=idem_key)
    if owed and _fast_path(using):
        _write_counts(using)


async def _write_counts_owed_async(
    using: str,
    native: _aio.LoopConnections,
    *,
    effect_id: str | None = None,
    idem_key: str | None = None,
) -> None:
    """``_write_counts_owed`` on the loop: write what is pending here, and wait for a write a
    store thread has under way (it holds counts this read must see)."""
    counts = _replay_counts.get(using)
    while counts is not None and counts.owes(effect_id=effect_id, idem_key=idem_key):
        taken = counts.take()
        if not taken:
            await asyncio.sleep(0.002)  # a thread is writing them
            continue
        try:
            await _count_on_loop(native, taken)
        except BaseException:
            counts.back(taken)
            raise
        counts.written(taken)


def _write_counts(using: str) -> None:
    counts, lock = _counts(using)
    with lock:
        taken = counts.take()
        if not taken:
            return
        try:
            with _store_errors("count replays"), _statement_cursor(using) as cursor:
                cursor.execute(pgsql.COUNT_REPLAYS, pgsql.count_params(taken, "off"))
        except BaseException:
            counts.back(taken)
            raise
        counts.written(taken)


def _write_all_counts_quietly() -> None:
    for using, counts in list(_replay_counts.items()):
        if counts:
            try:
                _write_counts(using)
            except Exception:
                logger.warning(
                    "agent_ledger: could not write replay counts of %r yet", using, exc_info=True
                )


def _stop_listening() -> None:
    with _listeners_lock:
        listeners = list(_listeners.values())
        _listeners.clear()
    for listener in listeners:
        listener.stop()


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
