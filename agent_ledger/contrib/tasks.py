"""``django.tasks`` (Django 6; on 5.2 the ``django-tasks`` backport): ``@ledgered_task``.

``pip install django-agent-ledger[tasks]`` (the backport on Python < 3.12, and django-tasks-db,
whose ``db_worker`` runs tasks from the database). ``@ledgered_task(...)`` is ``@task(...)``
whose body runs through the ledger: once per key, the key being the workflow, the tool and the
task's arguments. A re-enqueue mints a new task result id, so only the arguments can say it is
the same call: a re-enqueued copy (an operator re-running a failed task, a second enqueue)
replays the stored result, and a worker killed mid-task leaves the effect ``processing`` until
its stale window passes, when exactly one later run takes it over.

With ``requires_approval=True`` a run proposes the effect and ends with
``ApprovalPendingError`` (the task result fails with it; no worker waits for a human); the
decision enqueues the task again through ``agent_ledger.resume`` (any ``RESUME_BACKEND``), and
that run executes the body (approve) or fails with ``EffectDeniedError`` (deny).

    @ledgered_task(workflow_id=lambda order_id: f"order-{order_id}", requires_approval=True)
    def refund(order_id: int, amount: int) -> dict: ...
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from django.utils.module_loading import import_string

from .. import resume
from ..decorators import resolve_ledger
from ..errors import ApprovalPendingError, EffectLedgerValidationError
from ..ledger import EffectLedger
from ..types import (
    ConcurrencyOptions,
    Effect,
    EffectStatus,
    RunOptions,
    StaleOptions,
    ToolCall,
    require_number,
)

try:
    from django.tasks import task
except ImportError:  # Django 5.2: the backport
    from django_tasks import task  # type: ignore[no-redef,import-not-found,unused-ignore]

__all__ = ["RESUMER", "ledgered_task"]

#: The resumer that enqueues a task again after its approval was decided.
RESUMER = "agent_ledger.contrib.tasks"


def ledgered_task(
    function: Callable[..., Any] | None = None,
    *,
    workflow_id: str | Callable[..., str],
    tool: str | None = None,
    requires_approval: bool = False,
    wait_timeout_ms: float = 60_000,
    stale_after_ms: float = 600_000,
    ledger: Callable[[], EffectLedger] | None = None,
    **task_options: Any,
) -> Any:
    """``@task(**task_options)`` whose body runs at most once per key.

    ``workflow_id``: a string or ``fn(*args, **kwargs)`` of the task's arguments. ``tool``: the
    task's module path by default. ``wait_timeout_ms``: how long a second run of the key waits
    for the one running. ``stale_after_ms``: a run older than this is taken to be lost (its
    worker died) and is taken over by the next run; make it longer than the task ever runs.
    ``ledger``: a function returning the ledger (Django's by default).
    """
    if not (isinstance(workflow_id, str) and workflow_id.strip()) and not callable(workflow_id):
        raise EffectLedgerValidationError(
            "must be a non-empty string or a function of the task's arguments",
            field="workflow_id",
        )
    if not isinstance(requires_approval, bool):
        raise EffectLedgerValidationError("must be a bool", field="requires_approval")
    if tool is not None:
        ToolCall(workflow_id="check", tool=tool, args={})  # validates the name now
    require_number(wait_timeout_ms, "wait_timeout_ms", minimum=0)
    require_number(stale_after_ms, "stale_after_ms", minimum=0)
    options = RunOptions(
        requires_approval=requires_approval,
        concurrency=ConcurrencyOptions(wait_timeout_ms=wait_timeout_ms),
        stale=StaleOptions(after_ms=stale_after_ms),
    )
    takes_context = bool(task_options.get("takes_context", False))

    def decorate(fn: Callable[..., Any]) -> Any:
        if inspect.iscoroutinefunction(fn):
            raise EffectLedgerValidationError(
                "must be a sync function (the ledger runs it in the worker's thread)",
                field="function",
            )
        parameters = list(inspect.signature(fn).parameters.values())
        signature = inspect.Signature(parameters[1:] if takes_context else parameters)
        made: Any = None

        @functools.wraps(fn)
        def body(*args: Any, **kwargs: Any) -> Any:
            own = args[1:] if takes_context else args  # without the TaskContext
            call = _tool_call(signature, own, kwargs, workflow_id, tool or made.module_path)
            the_ledger = resolve_ledger(ledger)
            if requires_approval:
                continuation = {"resumer": RESUMER, "task": made.module_path,
                                "args": list(own), "kwargs": kwargs}  # fmt: skip
                effect = the_ledger.propose_sync(call, continuation=continuation)
                if effect.status is EffectStatus.REQUIRES_APPROVAL:
                    # Parked; the decision enqueues the task again (agent_ledger.resume).
                    raise ApprovalPendingError(effect.idem_key, 0, effect_id=effect.id)
            return the_ledger.run_sync(call, lambda effect: fn(*args, **kwargs), options)

        made = task(**task_options)(body)
        return made

    return decorate(function) if function is not None else decorate


def _tool_call(
    signature: inspect.Signature,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    workflow_id: str | Callable[..., str],
    tool: str,
) -> ToolCall:
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise EffectLedgerValidationError(str(exc), field="args") from exc
    bound.apply_defaults()
    workflow = workflow_id(*args, **kwargs) if callable(workflow_id) else workflow_id
    return ToolCall(workflow_id=workflow, tool=tool, args=dict(bound.arguments))


@resume.register(RESUMER)
def enqueue_again(effect: Effect, decision: str) -> None:
    """Enqueue the parked task again with its arguments: approved, the run executes the body;
    denied, it fails with ``EffectDeniedError``."""
    continuation: Any = effect.continuation
    import_string(continuation["task"]).enqueue(*continuation["args"], **continuation["kwargs"])
