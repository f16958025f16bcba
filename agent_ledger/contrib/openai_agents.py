"""OpenAI Agents SDK (``pip install django-agent-ledger[openai_agents]``): ``ledgered_tool``.

    charge = ledgered_tool(function_tool(charge_card), workflow_id=lambda ctx: ctx.order_id,
                           requires_approval=True)
    agent = Agent(name="billing", tools=[charge])

The tool's calls run through the ledger, keyed by the SDK's ``call_id`` within the workflow
(``workflow_id``: a string or ``fn(context)`` of the app's run context), so resuming one saved
``RunState`` twice (a retried resume, a double click) runs the tool once: the second replays.
With approval, the SDK's ``needs_approval`` asks the ledger: a new call is proposed (waiting in
the admin) and interrupts the run. Once a human decided, restore the saved state, let the
ledger answer its interruptions (``await apply_decisions(state, context)``: approved calls are
approved, denied ones rejected with the reason, undecided ones left pending) and run it again.
The ledger decides, not ``state.approve()``: a call the app approves in the state that nobody
approved in the ledger does not run (its output says it is waiting for approval).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from agents import FunctionTool, RunContextWrapper
from agents.run_state import RunState
from agents.tool_context import ToolContext

from ..decorators import resolve_ledger
from ..errors import ApprovalPendingError, EffectDeniedError, EffectLedgerValidationError
from ..ledger import EffectLedger
from ..types import ConcurrencyOptions, EffectStatus, RunOptions, ToolCall

__all__ = ["apply_decisions", "ledgered_tool"]

_CALL_OF = "_agent_ledger_call"


class _Jsonable:
    """Tool outputs as JSON for the ledger (the SDK sends the model their string form)."""

    def encode(self, value: Any) -> Any:
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            return str(value)
        return value

    def decode(self, data: Any) -> Any:
        return data


def ledgered_tool(
    tool: FunctionTool,
    *,
    workflow_id: str | Callable[[Any], str],
    requires_approval: bool = False,
    continuation: dict[str, Any] | None = None,
    ledger: Callable[[], EffectLedger] | None = None,
) -> FunctionTool:
    """A copy of ``tool`` whose calls run through the ledger (see the module docstring).

    ``continuation``: ``{"resumer": name, ...}`` stored on each effect waiting for approval, so
    its decision resumes the agent (``agent_ledger.resume``). ``ledger``: a function returning
    the ledger, Django's by default.
    """
    if not isinstance(tool, FunctionTool):
        raise EffectLedgerValidationError(
            f"must be a FunctionTool (from @function_tool), got {type(tool).__name__}",
            field="tool",
        )
    if not callable(workflow_id) and not (isinstance(workflow_id, str) and workflow_id.strip()):
        raise EffectLedgerValidationError(
            "must be a non-empty string or a function of the run context", field="workflow_id"
        )
    if not isinstance(requires_approval, bool):
        raise EffectLedgerValidationError("must be a bool", field="requires_approval")
    invoke = tool.on_invoke_tool
    options = RunOptions(
        requires_approval=requires_approval,
        concurrency=ConcurrencyOptions(wait_timeout_ms=0) if requires_approval else None,
        codec=_Jsonable(),
    )

    def the_ledger() -> EffectLedger:
        return resolve_ledger(ledger)

    def tool_call(context: Any, params: Any, call_id: str) -> ToolCall:
        workflow = workflow_id(context) if callable(workflow_id) else workflow_id
        return ToolCall(
            workflow_id=workflow,
            tool=tool.name,
            args=params if isinstance(params, dict) else {"input": params},
            call_id=call_id,
            key_scope="call",
        )

    async def needs_approval(
        ctx: RunContextWrapper[Any], params: dict[str, Any], call_id: str
    ) -> bool:
        effect = await the_ledger().propose(
            tool_call(ctx.context, params, call_id), continuation=continuation
        )
        return effect.status is EffectStatus.REQUIRES_APPROVAL

    async def on_invoke_tool(ctx: ToolContext[Any], arguments: str) -> Any:
        call = tool_call(ctx.context, json.loads(arguments or "{}"), ctx.tool_call_id)
        try:
            return await the_ledger().run(call, lambda effect: invoke(ctx, arguments), options)
        except EffectDeniedError as exc:
            return f"The tool call was denied: {exc.reason}" if exc.reason else str(exc)
        except ApprovalPendingError as exc:
            return f"The tool call is waiting for approval (effect {exc.effect_id})."

    ledgered = dataclasses.replace(
        tool,
        on_invoke_tool=on_invoke_tool,
        needs_approval=needs_approval if requires_approval else False,
    )
    # For apply_decisions: how this tool names its calls in the ledger.
    ledgered.__dict__[_CALL_OF] = (tool_call, the_ledger)
    return ledgered


async def apply_decisions(state: RunState[Any, Any], context: Any = None) -> list[Any]:
    """Approve or reject each interruption of ``state`` as the ledger says; return those
    nobody has decided yet (resuming with them pending interrupts the run again).

    ``context``: the app's run context, as the tools' ``workflow_id`` functions receive it.
    """
    if not isinstance(state, RunState):
        raise EffectLedgerValidationError(
            f"must be a RunState, got {type(state).__name__}", field="state"
        )
    pending = []
    for item in state.get_interruptions():
        tools = getattr(item.agent, "tools", None) or []
        found = next((t for t in tools if getattr(t, "name", None) == item.tool_name), None)
        made = found.__dict__.get(_CALL_OF) if found is not None else None
        if made is None:
            pending.append(item)  # not a ledgered tool: the app decides
            continue
        tool_call, the_ledger = made
        raw = item.raw_item
        call_id = getattr(raw, "call_id", None) or (
            raw.get("call_id") if isinstance(raw, dict) else None
        )
        arguments = getattr(raw, "arguments", None) or (
            raw.get("arguments") if isinstance(raw, dict) else None
        )
        ledger = the_ledger()
        effect = await ledger.find_by_idem_key(
            ledger.idem_key(tool_call(context, json.loads(arguments or "{}"), call_id))
        )
        if effect is None or effect.status is EffectStatus.REQUIRES_APPROVAL:
            pending.append(item)
        elif effect.status in (EffectStatus.DENIED, EffectStatus.CANCELED):
            reason = effect.error.message if effect.error else None
            state.reject(
                item,
                rejection_message=f"The tool call was {effect.status.value}"
                + (f": {reason}" if reason else ""),
            )
        else:
            state.approve(item)
    return pending
