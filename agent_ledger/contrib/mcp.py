"""MCP servers (the ``mcp`` SDK 2.3): tool calls through the ledger, approval for destructive tools.

    from agent_ledger.contrib.mcp import LedgerExtension

    ledger_extension = LedgerExtension()
    server = MCPServer("shop", extensions=[ledger_extension])
    ledger_extension.bind(server)          # reads each tool's annotations from the server

For tools served without the SDK (django-mcpz style), ``ledgered_tool`` wraps the function.

The protocol has no idempotency key and clients retry writes, so the key comes from the client:
``_meta["agent-ledger/workflow_id"]`` (and optionally ``_meta["agent-ledger/call_id"]``, which
makes the key per call), else the authenticated principal (``mcp:<principal>``: the same write
with the same arguments by the same principal runs once). A call with neither is refused.

- read-only tools (``readOnlyHint``) pass straight through, untouched;
- destructive tools (``destructiveHint``, true by default in the spec) need a human's approval
  (``requires_approval=`` overrides: tool names, or ``fn(name, annotations) -> bool``): the call
  returns an error result whose ``_meta`` has the effect id, key and admin URL, and the same call
  sent again after Approve runs the tool once; arguments such as ``confirm: true`` are part of
  the key, never consent;
- other writes run at most once per key; a retry returns the stored result. A result with
  ``isError`` is not stored as final: the same call may try again.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from mcp.server.extension import Extension
from mcp.server.request_state import authenticated_principal
from mcp_types import CallToolResult, TextContent, ToolAnnotations

from .. import keys
from ..decorators import resolve_ledger
from ..errors import (
    ApprovalPendingError,
    EffectDeniedError,
    EffectLedgerValidationError,
    EffectTimeoutError,
)
from ..ledger import EffectLedger
from ..types import ConcurrencyOptions, Effect, EffectStatus, RunOptions, ToolCall

__all__ = [
    "CALL_META",
    "META_PREFIX",
    "WORKFLOW_META",
    "CallToolResultCodec",
    "LedgerExtension",
    "ledgered_tool",
]

META_PREFIX = "agent-ledger/"
#: The ``_meta`` keys a client sends to name its workflow and (optionally) the call.
WORKFLOW_META = META_PREFIX + "workflow_id"
CALL_META = META_PREFIX + "call_id"

#: ``requires_approval=``: tool names, or ``fn(tool_name, annotations) -> bool``.
ApprovalRule = Collection[str] | Callable[[str, ToolAnnotations | None], bool] | None


class CallToolResultCodec:
    """``CallToolResult`` to its wire JSON and back, so a replay returns the same result."""

    def encode(self, value: Any) -> Any:
        if not isinstance(value, CallToolResult):
            raise TypeError(f"expected a CallToolResult, got {type(value).__name__}")
        return value.model_dump(by_alias=True, mode="json", exclude_none=True)

    def decode(self, data: Any) -> Any:
        return CallToolResult.model_validate(data)


class _ToolReportedError(Exception):
    """The tool answered ``isError``: recorded as an attempt, the key stays runnable."""

    def __init__(self, result: Any) -> None:
        super().__init__("the tool reported an error")
        self.result = result


class _Gate:
    """What the extension and the decorator share: the key, the policy, the decision."""

    def __init__(
        self,
        ledger: EffectLedger | Callable[[], EffectLedger] | None,
        requires_approval: ApprovalRule,
        wait_timeout_ms: float,
    ) -> None:
        if ledger is not None and not (isinstance(ledger, EffectLedger) or callable(ledger)):
            raise EffectLedgerValidationError(
                f"must be an EffectLedger or a function returning one, got {type(ledger).__name__}",
                field="ledger",
            )
        if isinstance(requires_approval, str) or not (
            requires_approval is None
            or callable(requires_approval)
            or isinstance(requires_approval, Collection)
        ):
            raise EffectLedgerValidationError(
                "must be tool names or a function of (name, annotations)",
                field="requires_approval",
            )
        self.ledger_given = ledger
        self.rule = requires_approval
        self.options = RunOptions(
            concurrency=ConcurrencyOptions(wait_timeout_ms=wait_timeout_ms),
            retry_on=(_ToolReportedError,),
        )

    def ledger(self) -> EffectLedger:
        return resolve_ledger(self.ledger_given)

    def needs_approval(self, name: str, annotations: ToolAnnotations | None) -> bool:
        rule = self.rule
        if rule is None:
            return destructive(annotations)
        if callable(rule):
            decided = rule(name, annotations)
            if not isinstance(decided, bool):
                raise EffectLedgerValidationError(
                    f"must return a bool, returned {type(decided).__name__}",
                    field="requires_approval",
                )
            return decided
        return name in rule

    def tool_call(
        self, name: str, arguments: Any, meta: Mapping[str, Any] | None, principal: str | None
    ) -> ToolCall:
        if arguments is not None and not isinstance(arguments, Mapping):
            raise EffectLedgerValidationError(
                f"must be an object, got {type(arguments).__name__}", field="arguments"
            )
        meta = meta or {}
        workflow = meta.get(WORKFLOW_META)
        call_id = meta.get(CALL_META)
        if workflow is None:
            if not principal:
                raise EffectLedgerValidationError(
                    f'a write needs a workflow: send _meta["{WORKFLOW_META}"] with the call, '
                    "or authenticate the client (its principal keys the call)",
                    field=WORKFLOW_META,
                )
            workflow = principal_workflow(principal)
        if not isinstance(workflow, str) or (call_id is not None and not isinstance(call_id, str)):
            raise EffectLedgerValidationError(
                "workflow and call ids in _meta must be strings", field=WORKFLOW_META
            )
        call = ToolCall(
            workflow_id=workflow,
            tool=name,
            args=dict(arguments or {}),
            call_id=call_id,
            key_scope="call" if call_id is not None else "args",
        )
        keys.canonical_json(call.args, "args")  # non-JSON arguments are refused before running
        return call


def principal_workflow(principal: str) -> str:
    """``mcp:<principal>``, or its SHA-256 when it is long or holds the key's separator."""
    if "|" in principal or len(principal) > 200:
        return "mcp:sha256:" + hashlib.sha256(principal.encode()).hexdigest()
    return f"mcp:{principal}"


def destructive(annotations: ToolAnnotations | None) -> bool:
    """The spec's defaults: a tool is destructive unless it says it is read-only or not."""
    if annotations is None:
        return True
    if annotations.read_only_hint:
        return False
    return annotations.destructive_hint is not False


def read_only(annotations: ToolAnnotations | None) -> bool:
    return bool(annotations is not None and annotations.read_only_hint)


def refused(effect: Effect | None, status: str, text: str) -> CallToolResult:
    """An error result for the model, with the ledger's handle in ``_meta``."""
    meta: dict[str, Any] = {META_PREFIX + "status": status}
    if effect is not None:
        meta.update(
            {
                META_PREFIX + "effect_id": effect.id,
                META_PREFIX + "idem_key": effect.idem_key,
                META_PREFIX + "urls": _urls(effect),
            }
        )
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True, _meta=meta)


def pending(effect: Effect) -> CallToolResult:
    admin = _urls(effect).get("admin", "the admin")
    return refused(
        effect,
        "requires_approval",
        f"{effect.tool} waits for a human's approval ({admin}); call it again with the same "
        f"arguments and _meta once approved. Key: {effect.idem_key}",
    )


async def run_gated(
    gate: _Gate,
    call: ToolCall,
    gated: bool,
    handler: Callable[[Effect], Awaitable[Any]],
) -> CallToolResult:
    """Propose (if gated), then run once per key; every ledger outcome as a ``CallToolResult``."""
    ledger = gate.ledger()
    effect: Effect | None
    if gated:
        proposed = await ledger.propose(call)
        if proposed.status is EffectStatus.REQUIRES_APPROVAL:
            return pending(proposed)
    try:
        result: CallToolResult = await ledger.run(call, handler, _with_codec(gate.options))
        return result
    except _ToolReportedError as exc:
        reported: CallToolResult = exc.result
        return reported
    except EffectDeniedError as exc:
        effect = await ledger.find_by_idem_key(exc.idem_key)
        verb = "canceled" if exc.status is EffectStatus.CANCELED else "denied"
        return refused(effect, verb, f"{call.tool} was {verb}: {exc.reason or 'no reason'}")
    except ApprovalPendingError as exc:  # the ledger's own policy parked it
        effect = await ledger.find_by_idem_key(exc.idem_key)
        return pending(effect) if effect else refused(None, "requires_approval", str(exc))
    except EffectTimeoutError as exc:
        effect = await ledger.find_by_idem_key(exc.idem_key)
        return refused(effect, "processing", f"{call.tool} is still running; call again later")


def _with_codec(options: RunOptions) -> RunOptions:
    return RunOptions(
        concurrency=options.concurrency, retry_on=options.retry_on, codec=CallToolResultCodec()
    )


class LedgerExtension(Extension):
    """An MCP server extension (``MCPServer(extensions=[...])``) wrapping ``tools/call``.

    ``principal=fn(ctx) -> str | None`` says who the client is (default: the SDK's
    ``authenticated_principal``). ``annotations`` maps tool names to ``ToolAnnotations`` for a
    server not ``bind``-ed (or to override what the server declares).
    """

    identifier = "io.github.django-agent-ledger/ledger"

    def __init__(
        self,
        *,
        ledger: EffectLedger | Callable[[], EffectLedger] | None = None,
        requires_approval: ApprovalRule = None,
        annotations: Mapping[str, ToolAnnotations] | None = None,
        principal: Callable[[Any], str | None] = authenticated_principal,
        wait_timeout_ms: float = 5_000,
    ) -> None:
        self._gate = _Gate(ledger, requires_approval, wait_timeout_ms)
        if not callable(principal):
            raise EffectLedgerValidationError("must be callable", field="principal")
        self._annotations = dict(annotations or {})
        self._principal = principal
        self._server: Any = None

    def bind(self, server: Any) -> Any:
        """Read tool annotations from ``server`` (an ``MCPServer``) at call time."""
        if not hasattr(server, "list_tools"):
            raise EffectLedgerValidationError("must be an MCPServer", field="server")
        self._server = server
        return server

    def settings(self) -> dict[str, Any]:
        return {"workflowMeta": WORKFLOW_META, "callMeta": CALL_META}

    async def annotations_of(self, name: str) -> ToolAnnotations | None:
        if name in self._annotations:
            return self._annotations[name]
        if self._server is not None:
            for tool in await self._server.list_tools():
                if tool.name == name:
                    return tool.annotations
        return None

    async def intercept_tool_call(self, params: Any, ctx: Any, call_next: Any) -> Any:
        annotations = await self.annotations_of(params.name)
        if read_only(annotations):
            return await call_next(ctx)
        try:
            call = self._gate.tool_call(
                params.name, params.arguments, params.meta, self._principal(ctx)
            )
        except EffectLedgerValidationError as exc:
            return refused(None, "refused", f"{params.name} was not run: {exc}")

        async def handler(effect: Effect) -> Any:
            result = await call_next(ctx)
            if isinstance(result, CallToolResult) and result.is_error:
                raise _ToolReportedError(result)
            return result

        return await run_gated(
            self._gate, call, self._gate.needs_approval(params.name, annotations), handler
        )


def ledgered_tool(
    *,
    name: str | None = None,
    annotations: ToolAnnotations | None = None,
    requires_approval: ApprovalRule = None,
    ledger: EffectLedger | Callable[[], EffectLedger] | None = None,
    wait_timeout_ms: float = 5_000,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """For tools served without the SDK's server (django-mcpz style): the decorated function is
    called as ``tool(arguments, meta=..., principal=...)`` and returns the ``tools/call``
    result as wire JSON (``content``, ``structuredContent``, ``isError``, ``_meta``). The
    function's own return value must be JSON. Sync functions stay sync (a sync view)."""
    gate = _Gate(ledger, requires_approval, wait_timeout_ms)
    if annotations is not None and not isinstance(annotations, ToolAnnotations):
        raise EffectLedgerValidationError("must be ToolAnnotations", field="annotations")

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        tool = name or function.__name__

        async def answer(
            arguments: Any, meta: Mapping[str, Any] | None, principal: str | None
        ) -> dict[str, Any]:
            if read_only(annotations):
                return _wire(await _call(function, dict(arguments or {})))
            try:
                call = gate.tool_call(tool, arguments, meta, principal)
            except EffectLedgerValidationError as exc:
                result = refused(None, "refused", f"{tool} was not run: {exc}")
                return CallToolResultCodec().encode(result)  # type: ignore[no-any-return]

            async def handler(effect: Effect) -> Any:
                return CallToolResult.model_validate(_wire(await _call(function, dict(call.args))))

            result = await run_gated(gate, call, gate.needs_approval(tool, annotations), handler)
            return CallToolResultCodec().encode(result)  # type: ignore[no-any-return]

        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def tool_async(
                arguments: Any,
                *,
                meta: Mapping[str, Any] | None = None,
                principal: str | None = None,
            ) -> dict[str, Any]:
                return await answer(arguments, meta, principal)

            return tool_async

        from asgiref.sync import async_to_sync

        @functools.wraps(function)
        def tool_sync(
            arguments: Any, *, meta: Mapping[str, Any] | None = None, principal: str | None = None
        ) -> dict[str, Any]:
            return async_to_sync(answer)(arguments, meta, principal)

        return tool_sync

    return decorate


async def _call(function: Callable[..., Any], arguments: dict[str, Any]) -> Any:
    if inspect.iscoroutinefunction(function):
        return await function(**arguments)
    from asgiref.sync import sync_to_async

    return await sync_to_async(function, thread_sensitive=True)(**arguments)


def _wire(value: Any) -> dict[str, Any]:
    """A function's JSON return value as a ``tools/call`` result."""
    text = value if isinstance(value, str) else json.dumps(value)
    return {
        "content": [{"type": "text", "text": text}],
        "structuredContent": {"result": value},
        "isError": False,
    }


def _urls(effect: Effect) -> dict[str, str]:
    try:
        from ..links import urls_for

        return urls_for(effect)
    except Exception:
        return {}
