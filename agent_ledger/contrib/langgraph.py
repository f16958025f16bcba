"""LangGraph and LangChain: every tool call of a ``ToolNode`` or a ``create_agent`` agent through
the ledger, keyed by the tool-call id within the thread.

    from agent_ledger.contrib.langgraph import LedgerToolCalls, LedgerMiddleware

    calls = LedgerToolCalls(requires_approval={"deploy"}, resumer="support-agent")
    ToolNode(tools, wrap_tool_call=calls.wrap_tool_call, awrap_tool_call=calls.awrap_tool_call)
    create_agent(model, tools, middleware=[LedgerMiddleware(requires_approval={"deploy"})])

What it does, per tool call (``workflow_id`` = the thread id, plus the subgraph path;
``call_id`` = ``tool_call["id"]``; ``key_scope="call"``):

- a call that needs approval is *proposed* first, so the approval exists in the admin (with the
  continuation that resumes the agent), then the graph pauses with ``interrupt({...})`` carrying
  the effect id, key, tool, args and admin URL. Resuming only wakes the graph: the ledger
  decides. A resume before the decision pauses again; a denial becomes an error ``ToolMessage``
  with the reason; an approval runs the tool once.
- every call runs through ``ledger.run``: a resume, a duplicate resume, or a re-run of the whole
  tool node replays the stored ``ToolMessage`` instead of running the tool again.
- an interrupting call waits for the siblings still running in its tool node before it raises,
  so they finish and are recorded instead of being cancelled when the invocation's event loop
  closes (``asyncio.run`` per invocation, as in a Celery task or a sync view).
- a call found still running (another invocation holds it, or it was cut off mid-call) is waited
  for up to ``wait_timeout_ms``, then the graph pauses with an interrupt saying so: no hang and
  no second run. A later resume replays its outcome, or takes it over after the ledger's stale
  window (``stale=StaleOptions(after_ms=0)`` leaves that to an operator's cancel).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from typing import Any, TypeAlias

from langchain.agents.middleware import AgentMiddleware
from langchain_core.load import dumpd, load
from langchain_core.messages import BaseMessage, ToolMessage, message_to_dict, messages_from_dict
from langgraph.errors import GraphBubbleUp
from langgraph.prebuilt import ToolNode
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command, Interrupt, StateSnapshot, interrupt

from .. import keys
from ..decorators import resolve_ledger
from ..errors import EffectDeniedError, EffectLedgerValidationError, EffectTimeoutError
from ..ledger import EffectLedger
from ..types import (
    ConcurrencyOptions,
    Effect,
    EffectStatus,
    RunOptions,
    StaleOptions,
    ToolCall,
    exception_types,
)

__all__ = [
    "LedgerMiddleware",
    "LedgerToolCalls",
    "ToolResultCodec",
    "resume_command",
    "tool_node",
]

#: A ``ToolMessage`` or a ``Command`` (the frameworks are typed as Any here; see pyproject).
ToolResult: TypeAlias = Any
#: ``requires_approval=``: tool names, a predicate of the ``ToolCall``, or True/False for all.
ApprovalRule = bool | Collection[str] | Callable[[ToolCall], bool]


class ToolResultCodec:
    """``ToolMessage`` (and ``Command`` with ``update``/``goto``) to JSON and back, so a replay
    hands LangGraph the same message a fresh run did."""

    def encode(self, value: Any) -> Any:
        if isinstance(value, BaseMessage):
            return {"message": message_to_dict(value)}
        if isinstance(value, Command):
            goto = value.goto
            if not isinstance(goto, (str, list, tuple)) or not all(
                isinstance(node, str) for node in ([goto] if isinstance(goto, str) else goto)
            ):
                raise TypeError("only a Command whose goto names nodes can be stored")
            return {
                "command": {
                    "graph": value.graph,
                    "update": dumpd(value.update),
                    "goto": goto if isinstance(goto, str) else list(goto),
                }
            }
        raise TypeError(
            f"a tool call's result must be a ToolMessage or a Command, got {type(value).__name__}"
        )

    def decode(self, data: Any) -> Any:
        if isinstance(data, Mapping) and "message" in data:
            return messages_from_dict([data["message"]])[0]
        if isinstance(data, Mapping) and "command" in data:
            command = data["command"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # langchain_core marks load() as beta
                update = load(command["update"], allowed_objects="messages")
            return Command(graph=command["graph"], update=update, goto=command["goto"])
        raise ValueError(f"not a stored tool result: {data!r}")


class LedgerToolCalls:
    """The ``wrap_tool_call`` / ``awrap_tool_call`` pair for ``ToolNode`` (and the body of
    ``LedgerMiddleware``). One instance may serve many graphs and threads.

    - ``ledger``: an ``EffectLedger`` or a function returning one; by default the Django
      project's (``agent_ledger.services.get_ledger``), looked up per call.
    - ``requires_approval``: tool names, a predicate ``fn(ToolCall) -> bool``, or a bool; a tool
      whose ``metadata`` has ``{"requires_approval": True}`` needs approval too.
    - ``resumer``: the name of an ``agent_ledger.resume`` resumer; a proposed call then carries
      ``continuation={"resumer": name, "thread_id": ..., "checkpoint_ns": ...}``.
      ``continuation=fn(request) -> dict`` builds your own instead.
    - ``wait_timeout_ms``: how long a call waits for another run of the same call before the
      graph pauses instead (see the module docstring).
    - ``passthrough`` / ``retry_on`` / ``stale``: as on ``RunOptions``; ``GraphBubbleUp``
      (``interrupt()`` inside a tool, ``Command.PARENT``) always passes through.
    """

    def __init__(
        self,
        *,
        ledger: EffectLedger | Callable[[], EffectLedger] | None = None,
        requires_approval: ApprovalRule = (),
        resumer: str | None = None,
        continuation: Callable[[ToolCallRequest], Mapping[str, Any]] | None = None,
        wait_timeout_ms: float = 5_000,
        stale: StaleOptions | None = None,
        passthrough: type[BaseException] | tuple[type[BaseException], ...] = (),
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (),
    ) -> None:
        if ledger is not None and not (isinstance(ledger, EffectLedger) or callable(ledger)):
            raise EffectLedgerValidationError(
                f"must be an EffectLedger or a function returning one, got {type(ledger).__name__}",
                field="ledger",
            )
        if isinstance(requires_approval, str) or not (
            isinstance(requires_approval, (bool, Collection)) or callable(requires_approval)
        ):
            raise EffectLedgerValidationError(
                "must be a bool, a collection of tool names or a function of the ToolCall",
                field="requires_approval",
            )
        if resumer is not None and (not isinstance(resumer, str) or not resumer.strip()):
            raise EffectLedgerValidationError("must be a resumer's name", field="resumer")
        if continuation is not None and not callable(continuation):
            raise EffectLedgerValidationError("must be callable", field="continuation")
        self._ledger = ledger
        self._approval = requires_approval
        self._resumer = resumer
        self._continuation = continuation
        self._options = RunOptions(
            concurrency=ConcurrencyOptions(wait_timeout_ms=wait_timeout_ms),
            stale=stale,
            passthrough=(GraphBubbleUp, *exception_types(passthrough, "passthrough")),
            retry_on=exception_types(retry_on, "retry_on"),
            codec=ToolResultCodec(),
        )
        # Calls in flight per (event loop, workflow): an interrupting call waits for these.
        self._inflight: dict[tuple[int, str], set[asyncio.Event]] = {}
        self._lock = threading.Lock()

    # -- what a request is, for the ledger ---------------------------------------------------

    def tool_call(self, request: ToolCallRequest) -> ToolCall:
        """The ``ToolCall`` of a LangGraph tool-call request (nothing runs)."""
        if not isinstance(request, ToolCallRequest):
            raise EffectLedgerValidationError(
                f"must be a ToolCallRequest, got {type(request).__name__}", field="request"
            )
        call = request.tool_call
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise EffectLedgerValidationError(
                "the model's tool call has no id; the ledger keys each call by it",
                field="tool_call.id",
            )
        tool_call = ToolCall(
            workflow_id=workflow_of(request),
            tool=call["name"],
            args=call.get("args") or {},
            call_id=call_id,
            key_scope="call",
        )
        keys.canonical_json(tool_call.args, "args")  # refuse non-JSON args before anything runs
        return tool_call

    def needs_approval(self, request: ToolCallRequest, call: ToolCall) -> bool:
        rule = self._approval
        metadata = getattr(request.tool, "metadata", None) or {}
        if metadata.get("requires_approval") is True:
            return True
        if isinstance(rule, bool):
            return rule
        if callable(rule):
            decided = rule(call)
            if not isinstance(decided, bool):
                raise EffectLedgerValidationError(
                    f"must return a bool, returned {type(decided).__name__}",
                    field="requires_approval",
                )
            return decided
        # Not named here: the ledger's own policy (TOOLS, approval_policy, defaults) decides.
        return call.tool in rule or self._get_ledger().requires_approval(call)

    # -- the wrappers --------------------------------------------------------------------------

    async def awrap_tool_call(
        self, request: ToolCallRequest, execute: Callable[[ToolCallRequest], Awaitable[Any]]
    ) -> ToolResult:
        call = self.tool_call(request)
        ledger = self._get_ledger()

        async def handler(effect: Effect) -> Any:
            return await execute(request)

        async with self._running(call.workflow_id) as settle:
            if self.needs_approval(request, call):
                effect = await ledger.propose(call, continuation=self._continuation_of(request))
                while effect.status is EffectStatus.REQUIRES_APPROVAL:
                    await settle()
                    interrupt(self._pending(effect, "requires_approval"))
                    effect = await ledger.get_effect(effect.id) or effect
                if effect.status in (EffectStatus.DENIED, EffectStatus.CANCELED):
                    return _refused(request, effect.status, _reason(effect))
            while True:
                try:
                    result: ToolResult = await ledger.run(call, handler, self._run_options(call))
                    return result
                except EffectDeniedError as exc:
                    return _refused(request, exc.status, exc.reason)
                except EffectTimeoutError as exc:
                    held = await ledger.find_by_idem_key(exc.idem_key)
                    await settle()
                    interrupt(self._pending(held, "running"))

    def wrap_tool_call(
        self, request: ToolCallRequest, execute: Callable[[ToolCallRequest], Any]
    ) -> ToolResult:
        """The sync form (``graph.invoke``): ToolNode runs parallel calls in threads and joins
        them before an interrupt leaves the node, so no sibling is cut off here."""
        call = self.tool_call(request)
        ledger = self._get_ledger()

        def handler(effect: Effect) -> Any:
            return execute(request)

        if self.needs_approval(request, call):
            effect = ledger.propose_sync(call, continuation=self._continuation_of(request))
            while effect.status is EffectStatus.REQUIRES_APPROVAL:
                interrupt(self._pending(effect, "requires_approval"))
                effect = ledger.get_effect_sync(effect.id) or effect
            if effect.status in (EffectStatus.DENIED, EffectStatus.CANCELED):
                return _refused(request, effect.status, _reason(effect))
        while True:
            try:
                result: ToolResult = ledger.run_sync(call, handler, self._run_options(call))
                return result
            except EffectDeniedError as exc:
                return _refused(request, exc.status, exc.reason)
            except EffectTimeoutError as exc:
                interrupt(self._pending(ledger.find_by_idem_key_sync(exc.idem_key), "running"))

    # -- internals -----------------------------------------------------------------------------

    def _get_ledger(self) -> EffectLedger:
        return resolve_ledger(self._ledger)

    def _run_options(self, call: ToolCall) -> RunOptions:
        # Approval was settled above (propose); the run itself must not park a new effect.
        return self._options

    def _continuation_of(self, request: ToolCallRequest) -> dict[str, Any] | None:
        if self._continuation is not None:
            return dict(self._continuation(request))
        if self._resumer is None:
            return None
        configurable = _configurable(request)
        return {
            "resumer": self._resumer,
            "thread_id": str(configurable["thread_id"]),
            "checkpoint_ns": str(configurable.get("checkpoint_ns", "")),
        }

    def _pending(self, effect: Effect | None, status: str) -> dict[str, Any]:
        """What the interrupt shows a person, a UI or a supervising model."""
        if effect is None:
            return {"agent_ledger": True, "status": status}
        waiting = (
            "waits for a human's decision in the admin; resuming before it pauses again"
            if status == "requires_approval"
            else "is still running elsewhere or was cut off mid-call; the ledger will not start "
            "it twice: resume once it finishes, or an operator resolves it"
        )
        return {
            "agent_ledger": True,
            "status": status,
            "effect_id": effect.id,
            "idem_key": effect.idem_key,
            "tool": effect.tool,
            "args": effect.args,
            "call_id": effect.call_id,
            "urls": _urls(effect),
            "message": f"{effect.tool} {waiting}",
        }

    @contextlib.asynccontextmanager
    async def _running(self, workflow: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        """Register this call as in flight; yields ``settle()``, which takes it off the list and
        waits until its siblings in the same loop and workflow are done (never each other: a
        call stops counting as in flight before it waits)."""
        key = (id(asyncio.get_running_loop()), workflow)
        done = asyncio.Event()
        with self._lock:
            self._inflight.setdefault(key, set()).add(done)

        def leave() -> list[asyncio.Event]:
            done.set()
            with self._lock:
                others = self._inflight.get(key, set())
                others.discard(done)
                if not others:
                    self._inflight.pop(key, None)
                return list(others)

        async def settle() -> None:
            others = leave()
            if others:
                await asyncio.wait([asyncio.ensure_future(event.wait()) for event in others])

        try:
            yield settle
        finally:
            leave()


class LedgerMiddleware(AgentMiddleware):
    """``create_agent(..., middleware=[LedgerMiddleware(...)])``: the same as
    ``LedgerToolCalls`` (same arguments) for LangChain agents. List it after retry middleware
    so that every retry of a call is one ledger call."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.calls = LedgerToolCalls(**options)

    def wrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Any]
    ) -> ToolResult:
        return self.calls.wrap_tool_call(request, handler)

    async def awrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Awaitable[Any]]
    ) -> ToolResult:
        return await self.calls.awrap_tool_call(request, handler)


def tool_node(tools: Any, **options: Any) -> ToolNode:
    """``ToolNode(tools)`` with every call through the ledger (``options``: ``LedgerToolCalls``)."""
    calls = LedgerToolCalls(**options)
    return ToolNode(
        tools, wrap_tool_call=calls.wrap_tool_call, awrap_tool_call=calls.awrap_tool_call
    )


def resume_command(pending: StateSnapshot | Any) -> Command[Any]:
    """A ``Command`` that wakes every pending interrupt of a thread (``graph.get_state(config)``
    or its ``interrupts``). The value is ignored: the ledger decides what runs."""
    interrupts = pending.interrupts if isinstance(pending, StateSnapshot) else pending
    if not all(isinstance(item, Interrupt) for item in interrupts):
        raise EffectLedgerValidationError(
            "must be a StateSnapshot or a list of Interrupt", field="pending"
        )
    return Command(resume={item.id: {"agent_ledger": "wake"} for item in interrupts})


def workflow_of(request: ToolCallRequest) -> str:
    """The thread id, followed by the path of subgraphs the tool node runs in (task ids and the
    node's own name left out, so a resume from the same checkpoint has the same workflow)."""
    configurable = _configurable(request)
    thread_id = configurable.get("thread_id")
    if thread_id is None or thread_id == "":
        raise EffectLedgerValidationError(
            "the graph runs without a thread: compile it with a checkpointer and invoke it with "
            'config={"configurable": {"thread_id": ...}}; the ledger keys calls by thread',
            field="thread_id",
        )
    namespace = str(configurable.get("checkpoint_ns") or "")
    parents = [part.split(":", 1)[0] for part in namespace.split("|")[:-1] if part]
    return "/".join([str(thread_id), *parents])


def _configurable(request: ToolCallRequest) -> Mapping[str, Any]:
    runtime = request.runtime
    config = getattr(runtime, "config", None) or {}
    configurable = config.get("configurable") or {}
    if not isinstance(configurable, Mapping):
        raise EffectLedgerValidationError("must be a dict", field="configurable")
    return configurable


def _refused(
    request: ToolCallRequest, status: EffectStatus | None, reason: str | None
) -> ToolMessage:
    """A denial or cancel as the model sees it: an error tool message with the reason."""
    verb = "canceled" if status is EffectStatus.CANCELED else "denied"
    call = request.tool_call
    return ToolMessage(
        content=f"{call['name']} was {verb} by a human: {reason or 'no reason given'}",
        name=call["name"],
        tool_call_id=call["id"],
        status="error",
    )


def _reason(effect: Effect) -> str | None:
    return effect.error.message if effect.error else None


def _urls(effect: Effect) -> dict[str, str]:
    """Admin and API URLs when Django is set up with them; nothing otherwise (a worker)."""
    try:
        from ..links import urls_for

        return urls_for(effect)
    except Exception:
        return {}
