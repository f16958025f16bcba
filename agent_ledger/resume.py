"""Resume on decision: when a human approves or denies an effect, bring its agent back.

An effect proposed with ``continuation={"resumer": "name", ...}`` names a function registered
here. Its decision (approve or deny; a cancel stops the work and resumes nothing) writes one
``Resumption`` row in the decision's own transaction; once that commits, the row is handed to
the task engine in ``AGENT_LEDGER["RESUME_BACKEND"]``, which calls ``resume_now``: it claims the
row under a lock, calls ``fn(effect, decision)`` exactly once per claim, and records the outcome.

    from agent_ledger import resume

    @resume.register("support-agent")
    def wake_agent(effect, decision):        # decision: "approve" or "deny"
        run_agent.delay(effect.continuation["thread_id"])   # whose ledger.run claims the effect

A resumer that raises leaves the approval standing (the effect stays ``ready``): the row goes
back to ``pending`` with the error, to be tried again after a backoff, and after
``RESUME_MAX_ATTEMPTS`` it is ``failed``, retryable from the admin. ``sweep()`` (the
``agent_ledger_resume`` command, or the ``resume_due`` task on a schedule) hands due rows to the
engine again: a retry the engine could not schedule, an enqueue lost to a crash after the commit,
a worker that died mid-run, and decisions made by ``PostgresStore`` workers outside Django.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar, overload

from asgiref.sync import async_to_sync
from django.db import connections, transaction
from django.db.models import Case, DateTimeField, DurationField, ExpressionWrapper, F, Value, When
from django.db.models.functions import Now
from django.dispatch import Signal

from . import signals
from .conf import ledger_settings
from .errors import EffectLedgerValidationError
from .stores.base import effect_from_columns
from .types import MAX_NAME_LENGTH, Effect, EffectStatus

if TYPE_CHECKING:
    from .models import Resumption

# The models are imported where used, so ``from agent_ledger import resume`` and ``register``
# work in any module, imported before Django's apps are ready (a Celery app module) or not.

__all__ = [
    "Resumer",
    "UnknownResumerError",
    "backoff",
    "enqueue",
    "get_resumer",
    "register",
    "resume_now",
    "retry",
    "sweep",
    "unregister",
]

logger = logging.getLogger(__name__)

#: ``fn(effect, decision)``: the effect as it is when the resumer runs, and "approve" or "deny".
Resumer = Callable[[Effect, str], Any]
_R = TypeVar("_R", bound=Resumer)

#: Longest ``last_error`` kept (the start of the message, the exception type first).
MAX_ERROR_LENGTH = 2000

# The registry, filled at import time by ``register`` like Django's admin site or Celery's task
# registry; nothing else in this module keeps state between calls.
_resumers: dict[str, Resumer] = {}


class UnknownResumerError(LookupError):
    """The continuation names a resumer nobody registered (in this process)."""


# -- the registry --------------------------------------------------------------------------------


@overload
def register(name: str) -> Callable[[_R], _R]: ...
@overload
def register(name: str, fn: _R) -> _R: ...
def register(name: str, fn: Any = None) -> Any:
    """Register ``fn`` as the resumer ``name`` (``register("name", fn)`` or as a decorator).

    Registering a name again replaces its function (an autoreloaded module registers again).
    """
    if not isinstance(name, str) or not name.strip():
        raise EffectLedgerValidationError("must be a non-empty string", field="name")
    if len(name) > MAX_NAME_LENGTH:
        raise EffectLedgerValidationError(
            f"must be at most {MAX_NAME_LENGTH} characters", field="name"
        )
    if fn is None:

        def decorator(function: _R) -> _R:
            return register(name, function)

        return decorator
    if not callable(fn):
        raise EffectLedgerValidationError(f"must be callable, got {type(fn).__name__}", field="fn")
    _resumers[name] = fn
    return fn


def unregister(name: str) -> None:
    """Forget ``name`` (tests, mostly); unknown names are ignored."""
    _resumers.pop(name, None)


def get_resumer(name: str) -> Resumer:
    try:
        return _resumers[name]
    except KeyError:
        raise UnknownResumerError(
            f"no resumer is registered as {name!r}: call agent_ledger.resume.register({name!r}, "
            "fn) in a module the worker imports (an app's ready(), or its tasks.py)"
        ) from None


# -- a decision's row, and handing it over ----------------------------------------------------


def decided(using: str, effect: Effect, from_status: EffectStatus, transition_id: int) -> None:
    """Inside the decision's transaction (``DjangoStore.transition_sync``): the resumption row
    of an approve or deny whose effect names a resumer, handed to the engine once it commits."""
    from .models import DECISION_OF_STATUS, Resumption

    decision = DECISION_OF_STATUS.get(effect.status.value)
    continuation = effect.continuation
    if decision is None or from_status is not EffectStatus.REQUIRES_APPROVAL:
        return
    if not isinstance(continuation, dict) or not isinstance(continuation.get("resumer"), str):
        return
    row = Resumption.objects.using(using).create(
        effect_id=effect.id,
        transition_id=transition_id,
        decision=decision.value,
        # Cut to the column (propose refuses longer names; a row stored otherwise then fails
        # visibly as an unknown resumer instead of failing the decision).
        resumer=continuation["resumer"][:MAX_NAME_LENGTH],
    )
    transaction.on_commit(lambda: enqueue(row.pk, using=using), using=using)


def enqueue(resumption_id: int, *, using: str | None = None, delay_s: float = 0) -> None:
    """Hand a resumption to ``RESUME_BACKEND`` (after ``delay_s`` where the engine can defer).

    Never raises: a broker that is down leaves the row pending, for the sweep to hand over
    again; the decision it follows is committed either way.
    """
    using = using or ledger_settings.DATABASE
    backend = ledger_settings.RESUME_BACKEND
    try:
        if backend == "inline":
            if delay_s <= 0:
                resume_now(resumption_id, using=using)
        elif backend == "django_tasks":
            from .tasks import enqueue_django_task

            enqueue_django_task(resumption_id, using, delay_s)
        elif backend == "celery":
            from .tasks import enqueue_celery_task

            enqueue_celery_task(resumption_id, using, delay_s)
        else:
            raise ValueError(f"unknown RESUME_BACKEND {backend!r} (see check agent_ledger.E020)")
    except Exception:
        logger.exception(
            "agent_ledger could not hand resumption %s to %r; the sweep will",
            resumption_id,
            backend,
        )


# -- running one ---------------------------------------------------------------------------------


def resume_now(resumption_id: int, *, using: str | None = None) -> str | None:
    """Claim the resumption if it is pending and due, run its resumer, record what happened.

    Returns the row's new status ("done", "pending" to be retried, "failed"), or None when it
    was not claimed here: another worker has it or had it, it is not due, or it is gone.
    """
    from .models import Effect as EffectRow
    from .models import Resumption, ResumptionStatus

    using = using or ledger_settings.DATABASE
    row = _claim(resumption_id, using)
    if row is None:
        return None
    # The effect as it is now (a decision's resumer may run long after the decision).
    effect = effect_from_columns(EffectRow.objects.using(using).get(pk=row.effect_id).__dict__)
    try:
        fn = get_resumer(row.resumer)
        if inspect.iscoroutinefunction(fn):
            async_to_sync(fn)(effect, row.decision)
        else:
            fn(effect, row.decision)
    except Exception as exc:
        return _failed(row, effect, exc, using)
    # Fenced by the attempt: if the sweep gave this run up for lost and another took it over,
    # that one records its own outcome.
    Resumption.objects.using(using).filter(
        pk=row.pk, status=ResumptionStatus.RUNNING, attempts=row.attempts
    ).update(status=ResumptionStatus.DONE, last_error="", updated_at=Now())
    _send(signals.resume_done, row, effect)
    return ResumptionStatus.DONE.value


def _claim(resumption_id: int, using: str) -> Resumption | None:
    """pending and due -> running, under the row's lock; committed before the resumer runs, so
    the admin shows it running and no other worker can take it meanwhile."""
    from .models import Resumption, ResumptionStatus

    skip = connections[using].features.has_select_for_update_skip_locked
    with transaction.atomic(using=using):
        # skip_locked: a row another worker is claiming is that worker's; waiting for its lock
        # would only find it running.
        row = (
            Resumption.objects.using(using)
            .select_for_update(skip_locked=skip)
            .filter(pk=resumption_id)
            .due()
            .first()
        )
        if row is None:
            return None
        # Conditional too, for databases without row locks (SQLite serialises the writers).
        claimed = (
            Resumption.objects.using(using)
            .filter(pk=row.pk, status=ResumptionStatus.PENDING)
            .update(status=ResumptionStatus.RUNNING, attempts=F("attempts") + 1, updated_at=Now())
        )
        if not claimed:
            return None
    row.status = ResumptionStatus.RUNNING
    row.attempts += 1
    return row


def _failed(row: Resumption, effect: Effect, exc: Exception, using: str) -> str:
    """Back to pending after the backoff, or failed for good; the effect is left as it is."""
    from .models import Resumption, ResumptionStatus

    final = row.attempts >= ledger_settings.RESUME_MAX_ATTEMPTS
    delay = backoff(row.attempts)
    error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_LENGTH]
    status = ResumptionStatus.FAILED if final else ResumptionStatus.PENDING
    logger.warning(
        "agent_ledger resumer %r failed for effect %s (attempt %d): %s",
        row.resumer,
        effect.id,
        row.attempts,
        error,
        exc_info=exc,
    )
    updated = (
        Resumption.objects.using(using)
        .filter(pk=row.pk, status=ResumptionStatus.RUNNING, attempts=row.attempts)
        .update(status=status, last_error=error, run_after=_later(delay), updated_at=Now())
    )
    if updated and not final:
        enqueue(row.pk, using=using, delay_s=delay.total_seconds())
    _send(signals.resume_failed, row, effect, error=error, final=final)
    return status.value


def backoff(attempts: int) -> timedelta:
    """The wait after the ``attempts``-th failure: doubling from ``RESUME_RETRY_DELAY_SECONDS``,
    capped at ``RESUME_RETRY_MAX_DELAY_SECONDS``."""
    base = float(ledger_settings.RESUME_RETRY_DELAY_SECONDS)
    cap = float(ledger_settings.RESUME_RETRY_MAX_DELAY_SECONDS)
    exponent = min(max(attempts - 1, 0), 62)  # 2**62 seconds is past any cap
    return timedelta(seconds=min(base * 2**exponent, cap))


def _later(delay: timedelta) -> ExpressionWrapper[Any]:
    """The database clock plus ``delay``: app servers' clocks never decide when a row is due."""
    return ExpressionWrapper(
        Now() + Value(delay, output_field=DurationField()), output_field=DateTimeField()
    )


# -- the operator's retry, and the sweep -------------------------------------------------------


def retry(resumption_id: int, *, using: str | None = None) -> bool:
    """Make a pending or failed resumption due now and hand it over (the admin's "Retry
    resume"); False for one running or done. A failed one gets one more attempt."""
    from .models import Resumption, ResumptionStatus

    using = using or ledger_settings.DATABASE
    with transaction.atomic(using=using):
        changed = (
            Resumption.objects.using(using)
            .filter(
                pk=resumption_id, status__in=[ResumptionStatus.PENDING, ResumptionStatus.FAILED]
            )
            .update(status=ResumptionStatus.PENDING, run_after=Now(), updated_at=Now())
        )
        if changed:
            transaction.on_commit(lambda: enqueue(resumption_id, using=using), using=using)
    return bool(changed)


def sweep(*, using: str | None = None, limit: int = 100) -> int:
    """Hand every due pending resumption (up to ``limit``, oldest first) to the engine again,
    after making those left ``running`` longer than ``RESUME_STALE_SECONDS`` pending (their
    worker died: the resumer may run a second time). Returns how many were handed over.

    Safe to run at any time, from many places at once: ``resume_now`` claims each row once.
    """
    from .models import Resumption, ResumptionStatus

    using = using or ledger_settings.DATABASE
    stale = timedelta(seconds=float(ledger_settings.RESUME_STALE_SECONDS))
    cutoff = ExpressionWrapper(
        Now() - Value(stale, output_field=DurationField()), output_field=DateTimeField()
    )
    used_up = ledger_settings.RESUME_MAX_ATTEMPTS
    Resumption.objects.using(using).filter(
        status=ResumptionStatus.RUNNING, updated_at__lte=cutoff
    ).update(
        status=Case(
            When(attempts__gte=used_up, then=Value(ResumptionStatus.FAILED.value)),
            default=Value(ResumptionStatus.PENDING.value),
        ),
        last_error=Value("the worker running the resumer was lost (still running after the "
                         "stale window)"),
        run_after=Now(),
        updated_at=Now(),
    )  # fmt: skip
    due = list(Resumption.objects.using(using).due().values_list("pk", flat=True)[:limit])
    for pk in due:
        enqueue(pk, using=using)
    return len(due)


def _send(signal: Signal, row: Resumption, effect: Effect, **extra: Any) -> None:
    for receiver, response in signal.send_robust(
        sender=type(row), resumption=row, effect=effect, **extra
    ):
        if isinstance(response, Exception):
            logger.error(
                "agent_ledger signal receiver %r failed for resumption %s",
                receiver,
                row.pk,
                exc_info=response,
            )
