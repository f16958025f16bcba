"""The LangGraph / LangChain adapter, against the real libraries with scripted models.

Each scenario first shows the duplicate (or lost approval) with the stock ``ToolNode`` or agent,
then its absence with the ledger. Every graph invocation runs in ``asyncio.run`` of its own, as
a Celery task or a sync view would run it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from django.test import override_settings
from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command, interrupt

from agent_ledger import EffectLedgerValidationError, EffectStatus
from agent_ledger.contrib.langgraph import (
    LedgerMiddleware,
    LedgerToolCalls,
    ToolResultCodec,
    resume_command,
    tool_node,
)
from agent_ledger.models import Effect
from agent_ledger.services import get_ledger

pytestmark = pytest.mark.django_db(transaction=True)


class Runs:
    """Which tool bodies started and finished, from any thread."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.finished: list[str] = []
        self._lock = threading.Lock()

    def start(self, name: str) -> None:
        with self._lock:
            self.started.append(name)

    def finish(self, name: str) -> None:
        with self._lock:
            self.finished.append(name)


def tools_for(
    runs: Runs, *, deploy_interrupts: bool = False, slow_s: float = 0.0, deploy_s: float = 0.2
) -> list[Any]:
    @tool
    async def send_email(to: str) -> str:
        """Send an email."""
        runs.start("send_email")
        await asyncio.sleep(slow_s)  # the tool's own duration (an SMTP round trip)
        runs.finish("send_email")
        return f"sent to {to}"

    @tool
    async def deploy(env: str) -> str:
        """Deploy."""
        if deploy_interrupts:  # the stock human-in-the-loop pattern: interrupt inside the tool
            interrupt({"approve": env})
        runs.start("deploy")
        await asyncio.sleep(deploy_s)  # long enough for two resumes to overlap
        runs.finish("deploy")
        return f"deployed {env}"

    return [send_email, deploy]


CALLS = [
    {"name": "send_email", "args": {"to": "ops@example.com"}, "id": "call_email"},
    {"name": "deploy", "args": {"env": "prod"}, "id": "call_deploy"},
]


def graph(tools_node: ToolNode, checkpointer: Any = None) -> Any:
    """model -> tools -> model: a scripted model asks for both tools at once, then stops."""

    def model(state: MessagesState) -> dict[str, Any]:
        if not any(isinstance(m, ToolMessage) for m in state["messages"]):
            return {"messages": [AIMessage("", tool_calls=CALLS)]}
        return {"messages": [AIMessage("done")]}

    builder = StateGraph(MessagesState)
    builder.add_node("model", model)
    builder.add_node("tools", tools_node)
    builder.add_edge(START, "model")
    builder.add_conditional_edges(
        "model", lambda s: "tools" if s["messages"][-1].tool_calls else END
    )
    builder.add_edge("tools", "model")
    return builder.compile(checkpointer=checkpointer or InMemorySaver())


def invoke(app: Any, value: Any, thread: str) -> dict[str, Any]:
    """One invocation in an event loop of its own (``asyncio.run``), in a thread of its own."""
    config = {"configurable": {"thread_id": thread}}
    with ThreadPoolExecutor(1) as pool:
        result: dict[str, Any] = pool.submit(asyncio.run, app.ainvoke(value, config)).result()
    return result


def start(thread: str) -> dict[str, Any]:
    return {"messages": [("user", f"ship it ({thread})")]}


def ledgered_node(runs: Runs, **options: Any) -> ToolNode:
    options.setdefault("requires_approval", {"deploy"})
    return tool_node(tools_for(runs, **options.pop("tool_options", {})), **options)


# -- 1. a finished parallel sibling is not run again on resume --------------------------------


def test_stock_toolnode_runs_a_finished_sibling_again_on_resume() -> None:
    runs = Runs()
    app = graph(ToolNode(tools_for(runs, deploy_interrupts=True)))
    first = invoke(app, start("t1"), "t1")
    assert first["__interrupt__"]
    invoke(app, Command(resume=True), "t1")
    assert runs.finished.count("send_email") == 2  # the duplicate email


def test_with_the_ledger_approval_early_and_duplicate_resumes_run_each_tool_once() -> None:
    runs = Runs()
    app = graph(ledgered_node(runs))
    first = invoke(app, start("t2"), "t2")
    (pending,) = first["__interrupt__"]
    payload = pending.value
    assert payload["status"] == "requires_approval"
    assert payload["tool"] == "deploy"
    assert payload["args"] == {"env": "prod"}
    assert payload["call_id"] == "call_deploy"
    assert payload["urls"]["admin"].endswith(f"/{payload['effect_id']}/change/")
    effect = get_ledger().get_effect_sync(payload["effect_id"])
    assert effect is not None
    assert effect.status is EffectStatus.REQUIRES_APPROVAL
    assert effect.workflow_id == "t2"
    assert runs.finished == ["send_email"]

    # An early resume (nobody decided yet) only pauses again: nothing runs.
    early = invoke(app, resume_command(app.get_state(cfg("t2"))), "t2")
    assert early["__interrupt__"][0].value["effect_id"] == payload["effect_id"]
    assert runs.finished == ["send_email"]

    assert get_ledger().approve_sync(payload["idem_key"], actor="admin")
    done = invoke(app, resume_command(app.get_state(cfg("t2"))), "t2")
    assert done["messages"][-1].content == "done"
    assert [m.content for m in done["messages"] if isinstance(m, ToolMessage)] == [
        "sent to ops@example.com",
        "deployed prod",
    ]
    # A duplicate resume (a second click, a retried task) runs nothing.
    invoke(app, Command(resume=True), "t2")
    assert sorted(runs.finished) == ["deploy", "send_email"]


def cfg(thread: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread}}


def test_a_denial_becomes_an_error_tool_message_with_the_reason() -> None:
    runs = Runs()
    app = graph(ledgered_node(runs))
    payload = invoke(app, start("t3"), "t3")["__interrupt__"][0].value
    assert get_ledger().deny_sync(payload["idem_key"], "not on a Friday", actor="admin")
    done = invoke(app, resume_command(app.get_state(cfg("t3"))), "t3")
    (denied,) = [m for m in done["messages"] if isinstance(m, ToolMessage) and m.name == "deploy"]
    assert denied.status == "error"
    assert "not on a Friday" in denied.content
    assert "deploy" not in runs.started


def test_the_ledgers_own_policy_gates_a_call_the_adapter_does_not_name() -> None:
    """Without ``requires_approval=`` on the adapter, the ledger's TOOLS policy decides."""
    runs = Runs()
    with override_settings(AGENT_LEDGER={"TOOLS": {"deploy": {"requires_approval": True}}}):
        app = graph(ledgered_node(runs, requires_approval=()))
        payload = invoke(app, start("t-policy"), "t-policy")["__interrupt__"][0].value
    assert payload["tool"] == "deploy"
    assert "deploy" not in runs.started
    assert runs.finished == ["send_email"]


# -- 2. a sibling still running when another call interrupts -----------------------------------


def test_stock_toolnode_cuts_off_a_running_sibling_and_runs_it_again() -> None:
    runs = Runs()
    app = graph(ToolNode(tools_for(runs, deploy_interrupts=True, slow_s=0.3)))
    invoke(app, start("t4"), "t4")  # deploy interrupts while send_email is mid-call
    assert runs.started == ["send_email"]
    assert runs.finished == []  # cancelled when the invocation's loop closed
    invoke(app, Command(resume=True), "t4")
    assert runs.started.count("send_email") == 2


def test_with_the_ledger_an_interrupt_waits_for_its_running_siblings() -> None:
    runs = Runs()
    app = graph(ledgered_node(runs, tool_options={"slow_s": 0.3}))
    payload = invoke(app, start("t5"), "t5")["__interrupt__"][0].value
    assert runs.finished == ["send_email"]  # finished and recorded before the pause
    get_ledger().approve_sync(payload["idem_key"], actor="admin")
    invoke(app, resume_command(app.get_state(cfg("t5"))), "t5")
    assert runs.started.count("send_email") == 1
    assert runs.finished.count("deploy") == 1


def test_a_call_cut_off_mid_run_is_held_not_run_again_and_the_resume_does_not_hang() -> None:
    runs = Runs()
    app = graph(ledgered_node(runs, wait_timeout_ms=300, tool_options={"slow_s": 5}))

    async def cut_off() -> None:  # a worker timeout ends the invocation mid-call
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(app.ainvoke(start("t6"), cfg("t6")), 0.5)

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, cut_off()).result()
    assert runs.started == ["send_email"]
    assert runs.finished == []

    began = time.monotonic()
    again = invoke(app, None, "t6")  # run the pending tool node again
    assert time.monotonic() - began < 4  # the wait is wait_timeout_ms, not the tool or forever
    statuses = {i.value["tool"]: i.value["status"] for i in again["__interrupt__"]}
    assert statuses["send_email"] == "running"
    assert runs.started == ["send_email"]  # held for takeover: not started again

    held = next(i.value for i in again["__interrupt__"] if i.value["tool"] == "send_email")
    assert get_ledger().cancel_sync(held["idem_key"], "checked by hand: not sent", actor="ops")
    # Only one interrupt of a tool node surfaces (langgraph #6624), but deploy was proposed.
    deploy = Effect.objects.get(workflow_id="t6", tool="deploy")
    get_ledger().approve_sync(deploy.idem_key, actor="admin")
    later = invoke(app, resume_command(app.get_state(cfg("t6"))), "t6")
    email = [m for m in later.get("messages", []) if getattr(m, "name", "") == "send_email"]
    assert email and email[-1].status == "error" and "checked by hand" in email[-1].content
    assert runs.started.count("send_email") == 1


# -- 3. two resumes at once, each in its own event loop ----------------------------------------


def resume_twice_at_once(app: Any, thread: str) -> None:
    barrier = threading.Barrier(2)
    command = resume_command(app.get_state(cfg(thread)))

    def one() -> None:
        barrier.wait()
        asyncio.run(app.ainvoke(command, cfg(thread)))

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(one), pool.submit(one)]:
            future.result()


def test_stock_toolnode_runs_an_approved_tool_twice_on_two_resumes_at_once() -> None:
    runs = Runs()
    app = graph(ToolNode(tools_for(runs, deploy_interrupts=True)))
    invoke(app, start("t7"), "t7")
    resume_twice_at_once(app, "t7")
    assert runs.finished.count("deploy") == 2


def test_with_the_ledger_two_resumes_at_once_run_the_approved_tool_once() -> None:
    runs = Runs()
    app = graph(ledgered_node(runs))
    payload = invoke(app, start("t8"), "t8")["__interrupt__"][0].value
    get_ledger().approve_sync(payload["idem_key"], actor="admin")
    resume_twice_at_once(app, "t8")
    assert runs.finished.count("deploy") == 1
    assert runs.finished.count("send_email") == 1


# -- 4. the sync path (graph.invoke) -------------------------------------------------------------


def test_the_sync_wrapper_under_graph_invoke() -> None:
    runs = Runs()
    sync_tools = [t.func and t for t in tools_for(runs)]
    calls = LedgerToolCalls(requires_approval={"deploy"})

    @tool
    def send_email(to: str) -> str:
        """Send an email."""
        runs.start("send_email")
        runs.finish("send_email")
        return f"sent to {to}"

    @tool
    def deploy(env: str) -> str:
        """Deploy."""
        runs.start("deploy")
        runs.finish("deploy")
        return f"deployed {env}"

    del sync_tools
    app = graph(ToolNode([send_email, deploy], wrap_tool_call=calls.wrap_tool_call))
    first = app.invoke(start("t9"), cfg("t9"))
    payload = first["__interrupt__"][0].value
    app.invoke(resume_command(app.get_state(cfg("t9"))), cfg("t9"))  # early: pauses again
    get_ledger().approve_sync(payload["idem_key"], actor="admin")
    done = app.invoke(resume_command(app.get_state(cfg("t9"))), cfg("t9"))
    assert done["messages"][-1].content == "done"
    assert sorted(runs.finished) == ["deploy", "send_email"]


# -- 5. create_agent with the middleware ----------------------------------------------------------


class ScriptedModel(GenericFakeChatModel):
    """A fake chat model that create_agent can bind tools to."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self


def agent(runs: Runs, middleware: list[Any], *, deploy_interrupts: bool = False) -> Any:
    model = ScriptedModel(
        messages=iter(
            [
                AIMessage("", tool_calls=[CALLS[1]]),
                AIMessage("done"),
                AIMessage("done"),
            ]
        )
    )
    return create_agent(
        model,
        tools_for(runs, deploy_interrupts=deploy_interrupts),
        middleware=middleware,
        checkpointer=InMemorySaver(),
    )


def test_stock_agent_runs_an_approved_tool_twice_on_two_resumes_at_once() -> None:
    runs = Runs()
    app = agent(runs, [], deploy_interrupts=True)
    invoke(app, start("a1"), "a1")
    resume_twice_at_once(app, "a1")
    assert runs.finished.count("deploy") == 2


def test_the_agent_middleware_waits_for_approval_and_runs_once() -> None:
    runs = Runs()
    app = agent(runs, [LedgerMiddleware(requires_approval={"deploy"})])
    payload = invoke(app, start("a2"), "a2")["__interrupt__"][0].value
    assert payload["tool"] == "deploy"
    invoke(app, resume_command(app.get_state(cfg("a2"))), "a2")  # early
    assert runs.started == []
    get_ledger().approve_sync(payload["idem_key"], actor="admin")
    resume_twice_at_once(app, "a2")
    assert runs.finished == ["deploy"]


# -- 6. bad input ------------------------------------------------------------------------------


def test_a_graph_without_a_thread_id_is_refused_clearly() -> None:
    runs = Runs()
    builder_app = graph(ledgered_node(runs))
    with pytest.raises(EffectLedgerValidationError) as error:
        asyncio.run(builder_app.ainvoke(start("x"), {"configurable": {"thread_id": ""}}))
    assert error.value.field == "thread_id"


def request_for(call: dict[str, Any], thread: Any = "t") -> ToolCallRequest:
    class Runtime:
        config = {"configurable": {"thread_id": thread, "checkpoint_ns": "sub:1|tools:2"}}

    return ToolCallRequest(tool_call=call, tool=None, state={}, runtime=Runtime())  # type: ignore[arg-type]


def test_keys_come_from_the_thread_the_subgraph_path_and_the_call_id() -> None:
    call = LedgerToolCalls().tool_call(request_for(CALLS[1], thread=7))
    assert (call.workflow_id, call.call_id, call.key_scope) == ("7/sub", "call_deploy", "call")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"ledger": "default"}, "ledger"),
        ({"requires_approval": "deploy"}, "requires_approval"),
        ({"resumer": ""}, "resumer"),
        ({"continuation": {"resumer": "x"}}, "continuation"),
        ({"wait_timeout_ms": -1}, "wait_timeout_ms"),
        ({"passthrough": "GraphInterrupt"}, "passthrough"),
    ],
)
def test_wrong_option_types_are_refused(options: dict[str, Any], field: str) -> None:
    with pytest.raises(EffectLedgerValidationError) as error:
        LedgerToolCalls(**options)
    assert error.value.field == field


def test_a_tool_call_without_an_id_or_with_non_json_args_is_refused() -> None:
    calls = LedgerToolCalls()
    with pytest.raises(EffectLedgerValidationError) as error:
        calls.tool_call(request_for({"name": "deploy", "args": {}, "id": None}))
    assert error.value.field == "tool_call.id"
    with pytest.raises(EffectLedgerValidationError) as error:
        calls.tool_call(request_for({"name": "deploy", "args": {"when": {1, 2}}, "id": "c"}))
    assert error.value.field.startswith("args")
    with pytest.raises(EffectLedgerValidationError) as error:
        calls.tool_call("not a request")  # type: ignore[arg-type]
    assert error.value.field == "request"


def test_a_predicate_must_return_a_bool() -> None:
    calls = LedgerToolCalls(requires_approval=lambda call: "yes")  # type: ignore[arg-type,return-value]
    request = request_for(CALLS[1])
    with pytest.raises(EffectLedgerValidationError) as error:
        calls.needs_approval(request, calls.tool_call(request))
    assert error.value.field == "requires_approval"


def test_resume_command_refuses_what_is_not_an_interrupt() -> None:
    with pytest.raises(EffectLedgerValidationError):
        resume_command(["not an interrupt"])


def test_the_codec_round_trips_messages_and_commands_and_refuses_the_rest() -> None:
    codec = ToolResultCodec()
    message = ToolMessage("ok", tool_call_id="c1", name="deploy", status="error")
    assert codec.decode(codec.encode(message)) == message
    command = Command(update={"messages": [message]}, goto="model")
    back = codec.decode(codec.encode(command))
    assert back.goto == "model" and back.update["messages"][0] == message
    with pytest.raises(TypeError):
        codec.encode({"not": "a message"})
    with pytest.raises(ValueError):
        codec.decode({"neither": 1})
