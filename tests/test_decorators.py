"""``@ledgered`` and ``workflow()``: a decorated function runs at most once per key."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from agent_ledger import (
    ApprovalPendingError,
    ConcurrencyOptions,
    Effect,
    EffectLedger,
    EffectLedgerOptions,
    EffectLedgerValidationError,
    EffectStatus,
    MemoryStore,
    ResourceDescriptor,
    RunOptions,
    ledgered,
    workflow,
)


@pytest.fixture
def ledger() -> EffectLedger:
    no_wait = RunOptions(concurrency=ConcurrencyOptions(wait_timeout_ms=0))
    return EffectLedger(EffectLedgerOptions(store=MemoryStore(), defaults=no_wait))


def test_a_sync_function_runs_once_per_key_and_gets_its_effect(ledger: EffectLedger) -> None:
    sent: list[tuple[str, str, str]] = []

    @ledgered(tool="mail.send", ledger=ledger)
    def send(to: str, subject: str = "hello", *, effect: Effect) -> dict[str, str]:
        sent.append((to, subject, effect.idem_key))
        return {"sent_to": to}

    with workflow("ticket-123"):
        assert send("a@example.com") == {"sent_to": "a@example.com"}
        assert send("a@example.com", subject="hello") == {"sent_to": "a@example.com"}
        assert send("b@example.com") == {"sent_to": "b@example.com"}
        call = send.tool_call("a@example.com")
    assert [to for to, _, _ in sent] == ["a@example.com", "b@example.com"]
    # The effect is not part of the args; the key is the one the provider can reuse.
    assert dict(call.args) == {"to": "a@example.com", "subject": "hello"}
    assert (call.workflow_id, call.tool) == ("ticket-123", "mail.send")
    assert sent[0][2] == ledger.idem_key(call)


def test_an_async_function_runs_once_per_key(ledger: EffectLedger) -> None:
    charged: list[int] = []

    @ledgered(tool="stripe.charge", ledger=ledger, workflow_id=lambda order, amount: order)
    async def charge(order: str, amount: int) -> dict[str, Any]:
        charged.append(amount)
        return {"order": order, "amount": amount}

    async def agent() -> list[Any]:
        return list(await asyncio.gather(*(charge("order-7", 4500) for _ in range(5))))

    results = asyncio.run(agent())
    assert results == [{"order": "order-7", "amount": 4500}] * 5
    assert charged == [4500]
    assert charge.tool_call("order-7", 4500).workflow_id == "order-7"


def test_the_workflow_context_is_per_thread_and_task(ledger: EffectLedger) -> None:
    @ledgered(tool="t", ledger=ledger)
    def tool(n: int) -> int:
        return n

    seen: dict[str, str] = {}

    def in_thread(name: str) -> None:
        with workflow(name):
            seen[name] = tool.tool_call(1).workflow_id

    threads = [threading.Thread(target=in_thread, args=(f"wf-{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {f"wf-{i}": f"wf-{i}" for i in range(3)}


def test_args_bind_like_the_function_would(ledger: EffectLedger) -> None:
    @ledgered(tool="t", ledger=ledger, workflow_id="w")
    def tool(a: int, *rest: int, flag: bool = False, **extra: Any) -> None:
        return None

    call = tool.tool_call(1, 2, 3, flag=True, colour="red")
    assert dict(call.args) == {"a": 1, "rest": [2, 3], "flag": True, "colour": "red"}
    assert tool.tool_call(1).args == tool.tool_call(a=1).args


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda tool: tool.tool_call(), "args"),  # a required argument missing
        (lambda tool: tool.tool_call(1, 2, 3), "args"),  # too many
        (lambda tool: tool.tool_call(object()), "args.a"),  # not JSON
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(
    ledger: EffectLedger, make: Any, field: str
) -> None:
    ran: list[int] = []

    @ledgered(tool="t", ledger=ledger, workflow_id="w")
    def tool(a: Any) -> None:
        ran.append(1)

    with pytest.raises(EffectLedgerValidationError) as caught:
        call = make(tool)
        ledger.idem_key(call)
    assert caught.value.field == field
    assert ran == []


def test_without_a_workflow_the_call_is_refused(ledger: EffectLedger) -> None:
    @ledgered(tool="t", ledger=ledger)
    def tool() -> None:
        raise AssertionError("must not run")

    with pytest.raises(EffectLedgerValidationError, match=r"agent_ledger\.workflow") as caught:
        tool()
    assert caught.value.field == "workflow_id"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tool": ""}, "tool"),
        ({"tool": "a|b"}, "tool"),
        ({"tool": "t", "retry_on": "429"}, "retry_on"),
        ({"tool": "t", "passthrough": 3}, "passthrough"),
        ({"tool": "t", "requires_approval": "yes"}, "requires_approval"),
    ],
)
def test_bad_decorator_arguments_are_refused_at_decoration(
    kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(EffectLedgerValidationError) as caught:
        ledgered(**kwargs)
    assert caught.value.field == field


def test_workflow_needs_a_name() -> None:
    with pytest.raises(EffectLedgerValidationError), workflow(""):
        pass


def test_approval_retryable_errors_and_codecs_go_through_the_decorator(
    ledger: EffectLedger,
) -> None:
    class RateLimited(Exception):
        pass

    @dataclasses.dataclass
    class Deployed:
        version: str

    class DeployedCodec:
        def encode(self, value: Deployed) -> Any:
            return {"version": value.version}

        def decode(self, data: Any) -> Deployed:
            return Deployed(**data)

    attempts: list[str] = []

    @ledgered(
        tool="k8s.deploy",
        ledger=ledger,
        workflow_id="release-9",
        requires_approval=True,
        retry_on=RateLimited,
        codec=DeployedCodec(),
        resource=lambda image: ResourceDescriptor("k8s", "deployment", {"name": "app"}),
    )
    def deploy(image: str) -> Deployed:
        attempts.append(image)
        if len(attempts) == 1:
            raise RateLimited("try later")
        return Deployed(image)

    with pytest.raises(ApprovalPendingError) as pending:
        deploy("app:v2")
    assert attempts == []
    assert ledger.approve_sync(pending.value.idem_key, actor="admin")
    with pytest.raises(RateLimited):
        deploy("app:v2")
    effect = ledger.find_by_idem_key_sync(pending.value.idem_key)
    assert effect is not None and effect.status is EffectStatus.READY  # still approved
    assert deploy("app:v2") == Deployed("app:v2")
    # Keyed by the resource: the same deployment, whatever the image.
    assert deploy("app:v3") == Deployed("app:v2")
    assert attempts == ["app:v2", "app:v2"]


@pytest.fixture
def django_project_ledger(transactional_db: None) -> Iterator[None]:
    yield
    from agent_ledger.stores.django import close_connections

    close_connections()


def test_the_default_ledger_is_the_django_projects(django_project_ledger: None) -> None:
    from agent_ledger.services import get_ledger

    @ledgered(tool="t.default", workflow_id="w")
    def tool(n: int) -> int:
        return n * 2

    assert tool(21) == 42
    assert get_ledger().find_by_idem_key_sync(get_ledger().idem_key(tool.tool_call(21)))
