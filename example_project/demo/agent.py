"""The demo agent: a LangGraph graph with a scripted model (no API key) that handles a refund
request. Looking the order up runs at once; the refund waits for a human in the admin, and the
agent resumes by itself after Approve (or Deny) through the resumer registered below.

The checkpointer is in memory, so a resume in another process (the web server, after Approve)
starts the thread's graph again: the scripted model asks for the same tool calls with the same
ids, the ledger replays the finished lookup and runs the now-approved refund once. With a shared
checkpointer (``langgraph-checkpoint-postgres``) the graph would continue from its checkpoint.
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph

from agent_ledger import Effect, resume
from agent_ledger.contrib.langgraph import resume_command, tool_node

RESUMER = "demo.refund_agent"
THREAD = "refund-agent-ticket-2001"


@tool
def lookup_order(order: str) -> str:
    """Look an order up."""
    return f"{order}: 2 x espresso machine, paid 480.00 EUR"


@tool
def refund_order(order: str, amount: float) -> str:
    """Refund an order (a risky, irreversible call)."""
    return f"refunded {amount:.2f} EUR on {order}"


@tool
def post_reply(text: str) -> str:
    """Answer the customer."""
    return "reply posted"


def model(state: MessagesState) -> dict[str, Any]:
    """A scripted model: the same thread asks for the same calls with the same ids."""
    thread = "t2001"
    results = {m.name: m for m in state["messages"] if isinstance(m, ToolMessage)}
    if "refund_order" not in results:
        calls = [
            {"name": "lookup_order", "args": {"order": "A-2001"}, "id": f"{thread}-lookup"},
            {
                "name": "refund_order",
                "args": {"order": "A-2001", "amount": 480.0},
                "id": f"{thread}-refund",
            },
        ]
        return {"messages": [AIMessage("", tool_calls=calls)]}
    if "post_reply" not in results:
        refund = results["refund_order"]
        text = (
            "Your refund of 480.00 EUR is on its way."
            if refund.status != "error"
            else f"We could not refund this order: {refund.content}"
        )
        call = {"name": "post_reply", "args": {"text": text}, "id": f"{thread}-reply"}
        return {"messages": [AIMessage("", tool_calls=[call])]}
    return {"messages": [AIMessage("Done: the customer has an answer.")]}


def build() -> Any:
    builder = StateGraph(MessagesState)
    builder.add_node("model", model)
    builder.add_node(
        "tools",
        tool_node(
            [lookup_order, refund_order, post_reply],
            requires_approval={"refund_order"},
            resumer=RESUMER,
        ),
    )
    builder.add_edge(START, "model")
    builder.add_conditional_edges(
        "model", lambda s: "tools" if s["messages"][-1].tool_calls else END
    )
    builder.add_edge("tools", "model")
    return builder.compile(checkpointer=InMemorySaver())


def run(thread_id: str = THREAD) -> dict[str, Any]:
    """Start (or, in this process, resume) the agent on a thread; sync, as a view or task."""
    graph = build()
    config = {"configurable": {"thread_id": thread_id}}
    snapshot = graph.get_state(config)
    if snapshot.interrupts:
        result: dict[str, Any] = graph.invoke(resume_command(snapshot), config)
    else:
        request = {"messages": [("user", "Please refund order A-2001, it arrived broken.")]}
        result = graph.invoke(request, config)
    return result


@resume.register(RESUMER)
def resume_agent(effect: Effect, decision: str) -> None:
    """Called once per decision (after it commits): wake the agent on the effect's thread."""
    run(effect.continuation["thread_id"])


def finished(thread_id: str = THREAD) -> bool:
    """Whether the agent answered the customer (its post_reply call succeeded)."""
    from agent_ledger.models import Effect as EffectRow

    return EffectRow.objects.filter(
        workflow_id=thread_id, tool="post_reply", status="succeeded"
    ).exists()


__all__ = ["build", "finished", "resume_agent", "run"]
