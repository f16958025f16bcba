"""agent_ledger.contrib.openai_agents against the OpenAI Agents SDK 0.24, offline
(``agents.testing.ScriptedModel``; no API key, tracing off).

Without the ledger, one saved ``RunState`` restored and approved twice charges twice; with
``ledgered_tool`` the ledger holds the approval, and the tool runs once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from agents import Agent, FunctionTool, Runner, function_tool, set_tracing_disabled
from agents.run_state import RunState
from agents.testing import ScriptedModel, assistant_message, function_call

from agent_ledger import Actor, EffectLedgerValidationError, EffectStatus, services
from agent_ledger.contrib.openai_agents import apply_decisions, ledgered_tool
from agent_ledger.models import Effect
from agent_ledger.stores.django import close_connections
from tests.contrib.support import orm

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def close_store_connections() -> Iterator[None]:
    """The store's threads keep connections briefly; close them before the database goes."""
    yield
    close_connections()


set_tracing_disabled(True)


@dataclass
class Order:
    """The app's run context; the workflow is the order."""

    order_id: str


def charge_tool(runs: list[str]) -> FunctionTool:
    @function_tool(needs_approval=True)
    def charge(customer: str, amount: int) -> str:
        """Charge a customer."""
        runs.append(f"charge {amount}")
        return f"charged {amount}"

    return charge


def agent_with(tool: FunctionTool, *turns: Any) -> Agent[Any]:
    return Agent(name="billing", model=ScriptedModel(list(turns)), tools=[tool])


CALL = [function_call("charge", {"customer": "c1", "amount": 45}, call_id="call_1")]
DONE = [assistant_message("done")]


async def resume(tool: FunctionTool, snapshot: str, *, approve: bool) -> Any:
    """Restore the saved state; the app approves every call itself, or asks the ledger."""
    agent = agent_with(tool, DONE)
    state = await RunState.from_string(agent, snapshot)
    if approve:
        for item in state.get_interruptions():
            state.approve(item)
    else:
        await apply_decisions(state, Order("order-7"))
    return await Runner.run(agent, state, context=Order("order-7"))


async def test_resuming_one_saved_state_twice_charges_twice_without_the_ledger() -> None:
    runs: list[str] = []
    tool = charge_tool(runs)
    first = await Runner.run(agent_with(tool, CALL, DONE), "charge c1", context=Order("order-7"))
    assert [item.raw_item.call_id for item in first.interruptions] == ["call_1"]
    snapshot = first.to_state().to_string()
    for _ in range(2):  # a retried resume, a double click
        await resume(tool, snapshot, approve=True)
    assert runs == ["charge 45", "charge 45"]


async def test_with_the_ledger_the_approval_is_the_ledgers_and_the_tool_runs_once() -> None:
    runs: list[str] = []
    tool = ledgered_tool(
        charge_tool(runs), workflow_id=lambda order: order.order_id, requires_approval=True
    )
    first = await Runner.run(agent_with(tool, CALL, DONE), "charge c1", context=Order("order-7"))
    assert [item.raw_item.call_id for item in first.interruptions] == ["call_1"]
    snapshot = first.to_state().to_string()
    effect = await orm(lambda: Effect.objects.get(call_id="call_1"))
    assert (effect.status, effect.workflow_id, effect.tool) == (
        EffectStatus.REQUIRES_APPROVAL, "order-7", "charge"
    )  # fmt: skip

    # The app approving in the state is not an approval: the tool does not run.
    early = await resume(tool, snapshot, approve=True)
    assert early.final_output == "done" and runs == []

    await orm(lambda: services.approve(effect.idem_key, actor=Actor("admin", 1, "alice")))
    for _ in range(2):  # the same snapshot resumed twice, as it is
        result = await resume(tool, snapshot, approve=False)
        assert result.final_output == "done"
    assert runs == ["charge 45"]
    await orm(effect.refresh_from_db)
    assert (effect.status, effect.result, effect.attempts) == ("succeeded", "charged 45", 1)
    assert effect.dedup_count >= 1


async def test_a_denial_reaches_the_model_with_its_reason() -> None:
    runs: list[str] = []
    tool = ledgered_tool(charge_tool(runs), workflow_id="billing", requires_approval=True)
    first = await Runner.run(agent_with(tool, CALL, DONE), "charge c1", context=Order("o"))
    effect = await orm(lambda: Effect.objects.get(call_id="call_1"))
    await orm(
        lambda: services.deny(
            effect.idem_key, actor=Actor("admin", 1, "alice"), reason="over the limit"
        )
    )
    result = await resume(tool, first.to_state().to_string(), approve=False)
    outputs = [item.output for item in result.new_items if item.type == "tool_call_output_item"]
    assert outputs == ["The tool call was denied: over the limit"]
    assert runs == []


async def test_without_approval_a_repeated_call_id_replays() -> None:
    runs: list[str] = []
    tool = ledgered_tool(charge_tool(runs), workflow_id="billing")
    for _ in range(2):
        result = await Runner.run(agent_with(tool, CALL, DONE), "charge c1", context=Order("o"))
        assert result.final_output == "done"
    assert runs == ["charge 45"]


def test_bad_input_is_refused_with_clear_errors() -> None:
    tool = charge_tool([])
    with pytest.raises(EffectLedgerValidationError, match="tool: must be a FunctionTool"):
        ledgered_tool(lambda: None, workflow_id="w")  # type: ignore[arg-type]
    with pytest.raises(EffectLedgerValidationError, match="workflow_id: must be a non-empty"):
        ledgered_tool(tool, workflow_id="")
    with pytest.raises(EffectLedgerValidationError, match="requires_approval: must be a bool"):
        ledgered_tool(tool, workflow_id="w", requires_approval="yes")  # type: ignore[arg-type]


async def test_apply_decisions_refuses_what_is_not_a_run_state() -> None:
    with pytest.raises(EffectLedgerValidationError, match="state: must be a RunState"):
        await apply_decisions("state")  # type: ignore[arg-type]
