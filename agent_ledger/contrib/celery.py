"""Celery (``pip install django-agent-ledger[celery]``): a task's side effect runs once.

``LedgeredTask`` (or ``@ledgered_task``) runs each execution of a task through the ledger, keyed
by the task id, which Celery keeps across a broker's redelivery (``acks_late`` with a visibility
timeout) and ``self.retry()``: a redelivered copy waits for the running one and returns its
stored result instead of running the body again. The body runs in the worker's own thread
(``run_sync``), so ``self.request`` is the task's.

A task that needs approval never holds a worker: its effect is proposed with a continuation and
the execution ends (``Ignore``); the human's decision re-sends the task with the same id through
``agent_ledger.resume`` (any ``RESUME_BACKEND``), and that execution runs the body (approve) or
fails with ``EffectDeniedError`` (deny).

    @ledgered_task(tool="payments.refund", requires_approval=True, bind=True)
    def refund(self, order_id: int, amount: int) -> dict: ...
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from celery import Task, current_app, shared_task
from celery.exceptions import Ignore, Reject, Retry

from .. import resume
from ..decorators import resolve_ledger
from ..errors import EffectLedgerValidationError
from ..ledger import EffectLedger
from ..types import ConcurrencyOptions, EffectStatus, RunOptions, StaleOptions, ToolCall

__all__ = ["RESUMER", "LedgeredTask", "ledgered_task"]

#: The resumer that re-sends a task after its approval was decided.
RESUMER = "agent_ledger.contrib.celery"


class LedgeredTask(Task):
    """A Celery task whose body runs at most once per task id (see the module docstring).

    Class attributes (or ``@ledgered_task(...)`` / ``@app.task(base=LedgeredTask, ...)``
    keyword arguments) tune it; every one is optional.
    """

    #: The tool name in the ledger; the task's name by default.
    ledger_tool: str | None = None
    #: Park each execution for a human's approval first (never holding a worker).
    ledger_requires_approval: bool = False
    #: The workflow: a string, or ``fn(task, *args, **kwargs) -> str``; by default the id of the
    #: task's root (a chain or a canvas shares one workflow).
    ledger_workflow_id: str | Callable[..., str] | None = None
    #: How long a redelivered copy waits for the copy that is running (then it fails with
    #: ``EffectTimeoutError``; the running copy still records the outcome).
    ledger_wait_timeout_ms: float = 60_000
    #: A copy that has run longer than this is taken to be lost (a worker killed mid-task) and
    #: is taken over by the next delivery: make it longer than the task ever runs.
    ledger_stale_after_ms: float = 600_000
    #: A function returning the ledger; Django's (``services.get_ledger``) by default.
    ledger: Callable[[], EffectLedger] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request is None or request.id is None or getattr(request, "called_directly", True):
            raise EffectLedgerValidationError(
                f"{self.name} has no task id to key its side effect on: call it with delay(), "
                "apply_async() or apply(), not directly",
                field="task_id",
            )
        call = self.ledger_call(*args, **kwargs)
        ledger = self._ledger()
        if self.ledger_requires_approval:
            effect = ledger.propose_sync(
                call, continuation=_continuation(self.name, request, args, kwargs)
            )
            if effect.status is EffectStatus.REQUIRES_APPROVAL:
                # Parked: this execution ends here and the worker moves on; the decision
                # re-sends the task (same id) through agent_ledger.resume.
                raise Ignore()
        options = RunOptions(
            requires_approval=self.ledger_requires_approval,
            concurrency=ConcurrencyOptions(wait_timeout_ms=self.ledger_wait_timeout_ms),
            stale=StaleOptions(after_ms=self.ledger_stale_after_ms),
            # retry() and autoretry_for raise Retry: the attempt is recorded and the key stays
            # runnable for the retried message. Ignore and Reject end it before it acted.
            retry_on=(Retry,),
            passthrough=(Ignore, Reject),
        )
        # Not super().__call__: it would push a new request (no id) outside the worker.
        return ledger.run_sync(call, lambda effect: self.run(*args, **kwargs), options)

    def ledger_call(self, *args: Any, **kwargs: Any) -> ToolCall:
        """The ``ToolCall`` of this execution: the bound arguments, keyed by the task id."""
        request = self.request
        try:
            bound = inspect.signature(self.run).bind(*args, **kwargs)
        except TypeError as exc:
            raise EffectLedgerValidationError(str(exc), field="args") from exc
        given = self.ledger_workflow_id
        if callable(given):
            workflow_id = given(self, *args, **kwargs)
        else:
            workflow_id = given or request.root_id or request.id
        return ToolCall(
            workflow_id=workflow_id,
            tool=self.ledger_tool or self.name,
            args=dict(bound.arguments),
            call_id=request.id,
            key_scope="call",
        )

    def _ledger(self) -> EffectLedger:
        # As stored on the class: a function assigned there would be bound to the task.
        factory = inspect.getattr_static(self, "ledger", None)
        if isinstance(factory, staticmethod):
            factory = factory.__func__
        return resolve_ledger(factory)


def ledgered_task(
    *args: Any,
    tool: str | None = None,
    requires_approval: bool = False,
    workflow_id: str | Callable[..., str] | None = None,
    app: Any = None,
    **options: Any,
) -> Any:
    """``@shared_task`` (or ``@app.task`` with ``app=``) with ``base=LedgeredTask``; the other
    keyword arguments are Celery's (``bind=True`` for ``self.request``)."""
    if not isinstance(requires_approval, bool):
        raise EffectLedgerValidationError("must be a bool", field="requires_approval")
    if tool is not None:
        ToolCall(workflow_id="check", tool=tool, args={})  # validates the name now
    options.setdefault("base", LedgeredTask)
    if not (isinstance(options["base"], type) and issubclass(options["base"], LedgeredTask)):
        raise EffectLedgerValidationError("must be LedgeredTask or a subclass", field="base")
    options.update(
        ledger_tool=tool,
        ledger_requires_approval=requires_approval,
        ledger_workflow_id=workflow_id,
    )
    decorator = functools.partial(app.task if app is not None else shared_task, **options)
    if len(args) == 1 and callable(args[0]):
        return decorator()(args[0])
    if args:
        raise TypeError("ledgered_task takes the function or keyword arguments only")
    return decorator()


def _continuation(name: str, request: Any, args: Any, kwargs: Any) -> dict[str, Any]:
    """What it takes to send the same message again: its id, root and parent (the default
    workflow is the root's id), its arguments."""
    return {"resumer": RESUMER, "task": name, "task_id": request.id, "root_id": request.root_id,
            "parent_id": request.parent_id, "args": list(args), "kwargs": dict(kwargs)}  # fmt: skip


@resume.register(RESUMER)
def resend(effect: Any, decision: str) -> None:
    """Send the parked task again with its own id: approved, it runs the body; denied, it fails
    with ``EffectDeniedError`` (so whoever waits on its result hears the decision)."""
    continuation = effect.continuation
    current_app.send_task(
        continuation["task"],
        args=continuation["args"],
        kwargs=continuation["kwargs"],
        task_id=continuation["task_id"],
        root_id=continuation.get("root_id"),
        parent_id=continuation.get("parent_id"),
    )
