"""agent_ledger.contrib.pydantic_ai against pydantic-ai 2.x, offline (FunctionModel).

Without the ledger, one saved run resumed twice with its approval runs the tool twice; with
``LedgerCapability`` the ledger holds the approval, and the tool runs once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic_ai import Agent, DeferredToolRequests, DeferredToolResults
from pydantic_ai.messages import (
    ModelMessage,
    ModelMessagesTypeAdapter,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from agent_ledger import Actor, EffectLedgerValidationError, EffectStatus, services
from agent_ledger.contrib.pydantic_ai import LedgerCapability, resume_results
from agent_ledger.models import Effect
from agent_ledger.stores.django import close_connections
from tests.contrib.support import orm

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def close_store_connections() -> Iterator[None]:
    """The store's threads keep connections briefly; close them before the database goes."""
    yield
    close_connections()


def scripted(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Asks for two refunds, then reports what the tools returned."""
    returns = [p for p in messages[-1].parts if isinstance(p, ToolReturnPart)]
    if returns:
        return ModelResponse(parts=[TextPart(" | ".join(str(p.content) for p in returns))])
    return ModelResponse(
        parts=[
            ToolCallPart("refund", {"order": 7}, tool_call_id="call-7"),
            ToolCallPart("lookup", {"order": 7}, tool_call_id="call-look"),
        ]
    )


def make_agent(runs: list[str], *capabilities: Any) -> Agent[None, Any]:
    agent: Agent[None, Any] = Agent(
        FunctionModel(scripted),
        output_type=[str, DeferredToolRequests],
        capabilities=list(capabilities),
    )

    @agent.tool_plain(requires_approval=True)
    def refund(order: int) -> dict[str, int]:
        runs.append(f"refund {order}")
        return {"refunded": order}

    @agent.tool_plain
    def lookup(order: int) -> str:
        runs.append(f"lookup {order}")
        return f"order {order}: paid"

    return agent


def saved(result: Any) -> bytes:
    return ModelMessagesTypeAdapter.dump_json(result.all_messages())


def restored(snapshot: bytes) -> list[ModelMessage]:
    return ModelMessagesTypeAdapter.validate_json(snapshot)


async def test_resuming_a_saved_run_twice_refunds_twice_without_the_ledger() -> None:
    runs: list[str] = []
    agent = make_agent(runs)
    first = await agent.run("refund order 7")
    assert isinstance(first.output, DeferredToolRequests)
    snapshot = saved(first)
    approved = DeferredToolResults(approvals={"call-7": True})
    for _ in range(2):  # a retried resume, a double click
        await agent.run(message_history=restored(snapshot), deferred_tool_results=approved)
    assert runs == ["lookup 7", "refund 7", "refund 7"]


async def test_with_the_ledger_the_approval_is_the_ledgers_and_the_tool_runs_once() -> None:
    runs: list[str] = []
    agent = make_agent(runs, LedgerCapability())
    first = await agent.run("refund order 7")
    assert isinstance(first.output, DeferredToolRequests)
    assert [c.tool_call_id for c in first.output.approvals] == ["call-7"]
    snapshot = saved(first)
    effect = await orm(lambda: Effect.objects.get(call_id="call-7"))
    assert effect.status == EffectStatus.REQUIRES_APPROVAL
    assert effect.workflow_id == first.conversation_id and effect.tool == "refund"

    resume = resume_results(first.output)

    # Resumed before anyone decided (the app's own "approved" is not the ledger's): deferred.
    early = await agent.run(message_history=restored(snapshot), deferred_tool_results=resume)
    assert isinstance(early.output, DeferredToolRequests)
    assert early.output.metadata["call-7"]["idem_key"] == effect.idem_key
    assert early.output.metadata["call-7"]["admin"].endswith(f"/{effect.id}/change/")
    assert runs == ["lookup 7"]

    await orm(lambda: services.approve(effect.idem_key, actor=Actor("admin", 1, "alice")))
    outputs = [
        (await agent.run(message_history=restored(snapshot), deferred_tool_results=resume)).output
        for _ in range(2)  # a retried resume, a double click
    ]
    assert outputs[0] == outputs[1] == "{'refunded': 7} | order 7: paid"
    assert runs == ["lookup 7", "refund 7"]
    await orm(effect.refresh_from_db)
    assert (effect.status, effect.result, effect.attempts) == ("succeeded", {"refunded": 7}, 1)


async def test_a_denial_reaches_the_model_with_its_reason() -> None:
    runs: list[str] = []
    agent = make_agent(runs, LedgerCapability(tools=frozenset({"refund"})))
    first = await agent.run("refund order 7")
    effect = await orm(lambda: Effect.objects.get(call_id="call-7"))
    await orm(
        lambda: services.deny(
            effect.idem_key, actor=Actor("admin", 1, "alice"), reason="not eligible"
        )
    )
    result = await agent.run(
        message_history=restored(saved(first)), deferred_tool_results=resume_results(first.output)
    )
    assert result.output == "The tool call was denied: not eligible | order 7: paid"
    assert runs == ["lookup 7"]
    assert not await orm(Effect.objects.filter(tool="lookup").exists)  # not in tools=


def test_bad_input_is_refused_with_clear_errors() -> None:
    with pytest.raises(EffectLedgerValidationError, match="workflow_id: must be a non-empty"):
        LedgerCapability(workflow_id="")
    with pytest.raises(EffectLedgerValidationError, match="tools: must be a set of tool names"):
        LedgerCapability(tools="refund")  # type: ignore[arg-type]
    with pytest.raises(EffectLedgerValidationError, match="requests: must be DeferredToolRequests"):
        resume_results("call-7")  # type: ignore[arg-type]
