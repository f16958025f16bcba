"""``@ledgered``: a function that runs at most once per idempotency key, sync or async.

The function's bound arguments are the tool call's args; its workflow comes from
``workflow_id=`` (a string, or a callable taking the function's own arguments) or from the
``with agent_ledger.workflow("order-7"):`` around the call. A parameter named ``effect`` receives
the ``Effect`` (so the body can pass ``effect.idem_key`` on as a provider's own idempotency key,
as Stripe accepts) and is not part of the args.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from .errors import EffectLedgerValidationError
from .types import Codec, Effect, ResourceDescriptor, RunOptions, ToolCall, exception_types

if TYPE_CHECKING:
    from .ledger import EffectLedger

__all__ = ["ledgered", "resolve_ledger", "workflow"]

_workflow: ContextVar[str | None] = ContextVar("agent_ledger_workflow", default=None)


@contextmanager
def workflow(workflow_id: str) -> Iterator[str]:
    """Calls of ``@ledgered`` functions inside this block belong to ``workflow_id``."""
    if not isinstance(workflow_id, str) or not workflow_id.strip():
        raise EffectLedgerValidationError("must be a non-empty string", field="workflow_id")
    token = _workflow.set(workflow_id)
    try:
        yield workflow_id
    finally:
        _workflow.reset(token)


def ledgered(
    *,
    tool: str,
    workflow_id: str | Callable[..., str] | None = None,
    requires_approval: bool | None = None,
    idempotency_keys: Sequence[str] | None = None,
    resource: ResourceDescriptor | Callable[..., ResourceDescriptor] | None = None,
    codec: Codec | None = None,
    passthrough: type[BaseException] | tuple[type[BaseException], ...] = (),
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = (),
    ledger: EffectLedger | Callable[[], EffectLedger] | None = None,
) -> Callable[[Callable[..., Any]], Any]:
    """Decorate a tool function. ``requires_approval=None`` leaves it to the ledger's policy
    and defaults. ``ledger``: an ``EffectLedger`` or a function returning one; by default the
    Django project's (``agent_ledger.services.get_ledger``), looked up at call time."""
    given: dict[str, Any] = {
        "codec": codec,
        "passthrough": exception_types(passthrough, "passthrough"),
        "retry_on": exception_types(retry_on, "retry_on"),
    }
    if requires_approval is not None:
        given["requires_approval"] = requires_approval
    options = RunOptions(**given)
    ToolCall(workflow_id="check", tool=tool, args={})  # validates the tool name now

    def decorate(function: Callable[..., Any]) -> Any:
        signature = inspect.signature(function)
        wants_effect = "effect" in signature.parameters
        arguments = signature.replace(
            parameters=[p for name, p in signature.parameters.items() if name != "effect"]
        )

        def tool_call(*args: Any, **kwargs: Any) -> ToolCall:
            """The ``ToolCall`` these arguments make, without running anything."""
            try:
                bound = arguments.bind(*args, **kwargs)
            except TypeError as exc:
                raise EffectLedgerValidationError(str(exc), field="args") from exc
            bound.apply_defaults()
            return ToolCall(
                workflow_id=_workflow_of(workflow_id, args, kwargs),
                tool=tool,
                args=_args_of(bound.arguments, arguments),
                resource=resource(*args, **kwargs) if callable(resource) else resource,
                idempotency_keys=idempotency_keys,
            )

        def body(args: tuple[Any, ...], kwargs: dict[str, Any], effect: Effect) -> Any:
            extra = {"effect": effect} if wants_effect else {}
            if _edited(effect, args, kwargs):
                # An approver edited the arguments (a policy's allow_edit): run with theirs.
                return function(**effect.args, **extra)
            return function(*args, **kwargs, **extra)

        def _edited(effect: Effect, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
            from .keys import canonical_json

            given = tool_call(*args, **kwargs).args
            return canonical_json(given, "args") != effect.args_canonical

        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                call = tool_call(*args, **kwargs)
                return await resolve_ledger(ledger).run(
                    call, _async_handler(body, args, kwargs), options
                )

            wrapper: Any = run_async
        else:

            @functools.wraps(function)
            def run_sync(*args: Any, **kwargs: Any) -> Any:
                call = tool_call(*args, **kwargs)
                return resolve_ledger(ledger).run_sync(
                    call, functools.partial(body, args, kwargs), options
                )

            wrapper = run_sync
        wrapper.tool_call = tool_call
        return wrapper

    return decorate


def _async_handler(
    body: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[[Effect], Any]:
    async def handler(effect: Effect) -> Any:
        return await body(args, kwargs, effect)

    return handler


def _workflow_of(
    given: str | Callable[..., str] | None, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> str:
    if callable(given):
        return given(*args, **kwargs)
    if given is not None:
        return given
    current = _workflow.get()
    if current is None:
        raise EffectLedgerValidationError(
            "no workflow: pass workflow_id= to @ledgered or call inside "
            'agent_ledger.workflow("...")',
            field="workflow_id",
        )
    return current


def _args_of(bound: Mapping[str, Any], signature: inspect.Signature) -> dict[str, Any]:
    """The bound arguments as the call's args: ``**kwargs`` spread in, ``*args`` a list."""
    args: dict[str, Any] = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            args.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            args[name] = list(value)
        else:
            args[name] = value
    return args


def resolve_ledger(given: EffectLedger | Callable[[], EffectLedger] | None) -> EffectLedger:
    """The ledger an integration was given (a ledger, or a function returning one), else the
    Django project's (``agent_ledger.services.get_ledger``), looked up at call time."""
    from .ledger import EffectLedger

    if isinstance(given, EffectLedger):
        return given
    if given is not None:
        return given()
    from .services import get_ledger

    return get_ledger()
