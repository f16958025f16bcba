"""pydantic-ai (``pip install django-agent-ledger[pydantic_ai]``): ``LedgerCapability``.

    agent = Agent(model, output_type=[str, DeferredToolRequests],
                  capabilities=[LedgerCapability()])

    @agent.tool_plain(requires_approval=True)
    def refund(order: int) -> dict: ...

Every tool call of the agent runs through the ledger, keyed by its ``tool_call_id`` within the
conversation, so a resumed or repeated run replays a finished call instead of running it again.
A tool's own ``requires_approval=True`` (pydantic-ai's deferred approval) becomes a proposed
effect waiting in the admin; the run ends with ``DeferredToolRequests`` as usual, each with the
effect's id and key in its metadata when the ledger asked. To resume (after the decision, or
from a resumer), run the agent again on the saved ``message_history`` with
``deferred_tool_results=resume_results(requests)``: it lets the ledger answer every call, so an
approved call runs, a denied one returns the reason to the model, and one nobody decided yet is
deferred again, whatever the app passes (an approval the ledger has not made never runs a tool).
Resuming the same saved run twice runs the tool once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pydantic_ai import (
    DeferredToolRequests,
    DeferredToolResults,
    RunContext,
    ToolApproved,
    ToolDenied,
)
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.exceptions import ApprovalRequired, CallDeferred, ModelRetry
from pydantic_ai.messages import ToolCallPart
from pydantic_ai.tools import ToolDefinition
from pydantic_core import to_jsonable_python

from ..decorators import resolve_ledger
from ..errors import EffectDeniedError, EffectLedgerValidationError
from ..ledger import EffectLedger
from ..types import ConcurrencyOptions, Effect, EffectStatus, RunOptions, ToolCall

__all__ = ["LedgerCapability", "resume_results"]

_APPROVED = (EffectStatus.READY, EffectStatus.PROCESSING, EffectStatus.SUCCEEDED,
             EffectStatus.FAILED)  # fmt: skip
_REFUSED = (EffectStatus.DENIED, EffectStatus.CANCELED)


class _Jsonable:
    """Tool results as JSON (pydantic models, dataclasses...): what the model is sent anyway."""

    def encode(self, value: Any) -> Any:
        return to_jsonable_python(value)

    def decode(self, data: Any) -> Any:
        return data


@dataclasses.dataclass
class LedgerCapability(AbstractCapability[Any]):
    """Runs the agent's tool calls through the ledger (see the module docstring).

    ``workflow_id``: a string or ``fn(ctx) -> str``; the run's ``conversation_id`` (kept in the
    message history, so a resume has the same) by default. ``tools``: the tool names to
    ledger, all by default. ``continuation``: ``{"resumer": name, ...}`` stored on each effect
    waiting for approval, so its decision resumes the agent (``agent_ledger.resume``).
    ``ledger``: a function returning the ledger, Django's by default.
    """

    workflow_id: str | Callable[[RunContext[Any]], str] | None = None
    tools: frozenset[str] | None = None
    continuation: dict[str, Any] | None = None
    ledger: Callable[[], EffectLedger] | None = None

    def __post_init__(self) -> None:
        given = self.workflow_id
        if (
            given is not None
            and not callable(given)
            and not (isinstance(given, str) and given.strip())
        ):
            raise EffectLedgerValidationError(
                "must be a non-empty string or a function of the run context", field="workflow_id"
            )
        if self.tools is not None:
            if isinstance(self.tools, str) or not all(isinstance(t, str) for t in self.tools):
                raise EffectLedgerValidationError("must be a set of tool names", field="tools")
            self.tools = frozenset(self.tools)

    async def wrap_tool_execute(
        self,
        ctx: RunContext[Any],
        *,
        call: ToolCallPart,
        tool_def: ToolDefinition,
        args: Any,
        handler: Any,
    ) -> Any:
        if not self._ledgered(call.tool_name):
            return await handler(args)
        tool_call = self._tool_call(ctx, call, args)
        ledger = self._ledger()
        gated = tool_def.kind == "unapproved"
        if gated:
            # The ledger decides, not the bool the app passed back (it checks nobody).
            effect = await ledger.propose(tool_call, continuation=self.continuation)
            if effect.status is EffectStatus.REQUIRES_APPROVAL:
                raise ApprovalRequired(metadata=_handle(effect))
        options = RunOptions(
            requires_approval=gated,
            concurrency=ConcurrencyOptions(wait_timeout_ms=0) if gated else None,
            # Raised on purpose before the tool acts: hand the effect back.
            passthrough=(ApprovalRequired, CallDeferred, ModelRetry),
            codec=_Jsonable(),
        )
        try:
            return await ledger.run(tool_call, lambda effect: handler(args), options)
        except EffectDeniedError as exc:
            return f"The tool call was denied: {exc.reason}" if exc.reason else str(exc)

    async def handle_deferred_tool_calls(
        self, ctx: RunContext[Any], *, requests: DeferredToolRequests
    ) -> DeferredToolResults | None:
        """Put each approval request in the ledger, and answer those a human has decided."""
        approvals: dict[str, bool | ToolApproved | ToolDenied] = {}
        ledger = self._ledger()
        for call in requests.approvals:
            if not self._ledgered(call.tool_name):
                continue
            tool_call = self._tool_call(ctx, call, call.args_as_dict())
            effect = await ledger.propose(tool_call, continuation=self.continuation)
            if effect.status in _APPROVED:
                approvals[call.tool_call_id] = True
            elif effect.status in _REFUSED:
                reason = effect.error.message if effect.error else None
                approvals[call.tool_call_id] = ToolDenied(
                    f"The tool call was {effect.status.value}" + (f": {reason}" if reason else "")
                )
        return DeferredToolResults(approvals=approvals) if approvals else None

    def _ledgered(self, tool: str) -> bool:
        return self.tools is None or tool in self.tools

    def _tool_call(self, ctx: RunContext[Any], call: ToolCallPart, args: Any) -> ToolCall:
        given = self.workflow_id
        workflow = given(ctx) if callable(given) else given or ctx.conversation_id or ctx.run_id
        if not isinstance(args, dict):
            args = to_jsonable_python(args)
        return ToolCall(
            workflow_id=str(workflow),
            tool=call.tool_name,
            args=args,
            call_id=call.tool_call_id,
            key_scope="call",
        )

    def _ledger(self) -> EffectLedger:
        return resolve_ledger(self.ledger)


def resume_results(requests: DeferredToolRequests) -> DeferredToolResults:
    """The ``deferred_tool_results`` that resume a deferred run: every approval request is
    handed to the tool, where ``LedgerCapability`` asks the ledger whether it was approved."""
    if not isinstance(requests, DeferredToolRequests):
        raise EffectLedgerValidationError(
            f"must be DeferredToolRequests, got {type(requests).__name__}", field="requests"
        )
    return DeferredToolResults(approvals={call.tool_call_id: True for call in requests.approvals})


def _handle(effect: Effect) -> dict[str, Any]:
    """What to show a person (or the model) about a pending effect."""
    handle: dict[str, Any] = {"effect_id": effect.id, "idem_key": effect.idem_key}
    try:
        from ..links import urls_for

        handle.update(urls_for(effect))
    except Exception:  # no Django URLconf (a worker outside Django): ids only
        pass
    return handle
