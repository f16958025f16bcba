"""The spec README's examples, run as written against ``MemoryStore``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent_ledger import (
    CommitFailed,
    CommitSucceeded,
    Effect,
    EffectDeniedError,
    EffectError,
    EffectLedger,
    EffectLedgerOptions,
    EffectStatus,
    MemoryStore,
    ResourceDescriptor,
    RunOptions,
    ToolCall,
)

# Verbatim from the spec's "Quick Start" (only ``send_slack_message`` is left to the reader).
QUICK_START = """\
import asyncio
from agent_ledger import EffectLedger, EffectLedgerOptions, MemoryStore, ToolCall

async def main():
    store = MemoryStore()
    ledger = EffectLedger(EffectLedgerOptions(store=store))

    # Idempotent tool execution
    result = await ledger.run(
        ToolCall(
            workflow_id="support-ticket-123",
            tool="slack.send_message",
            args={"channel": "#support", "text": "Ticket resolved"},
        ),
        handler=lambda effect: send_slack_message("#support", "Ticket resolved"),
    )

    # If replayed: returns cached result, no duplicate message sent
    result2 = await ledger.run(
        ToolCall(
            workflow_id="support-ticket-123",
            tool="slack.send_message",
            args={"channel": "#support", "text": "Ticket resolved"},
        ),
        handler=lambda effect: send_slack_message("#support", "Ticket resolved"),
    )

    assert result == result2  # Same cached result

asyncio.run(main())
"""

SLACK = """\
import uuid

SENT = []


def send_slack_message(channel, text):
    SENT.append((channel, text))
    # A new timestamp per message: a second real send would not compare equal.
    return {"ok": True, "channel": channel, "ts": str(uuid.uuid4())}


"""

CHECK = """
assert SENT == [("#support", "Ticket resolved")], SENT
print("sent", len(SENT))
"""


def test_quick_start_runs_as_a_script(tmp_path: Path) -> None:
    script = tmp_path / "quick_start.py"
    script.write_text(SLACK + QUICK_START + CHECK)
    # Importable without Django settings: the quick start never configures Django.
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}

    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "sent 1"


@pytest.fixture
def ledger() -> EffectLedger:
    store = MemoryStore()
    return EffectLedger(EffectLedgerOptions(store=store))


async def test_basic_idempotent_execution(ledger: EffectLedger) -> None:
    charges: list[dict[str, Any]] = []

    async def async_stripe_charge(effect: Effect) -> dict[str, Any]:
        charge = {"id": f"ch_{uuid.uuid4().hex[:8]}", **effect.args}
        charges.append(charge)
        return charge

    async def example() -> Any:
        result = await ledger.run(
            ToolCall(
                workflow_id="order-123",
                tool="stripe.charge",
                args={"amount": 1000, "currency": "usd"},
            ),
            handler=async_stripe_charge,
        )
        return result

    first = await example()
    second = await example()

    assert first == second == charges[0]
    assert len(charges) == 1
    assert first["amount"] == 1000


async def test_with_resource_descriptor(ledger: EffectLedger) -> None:
    issues: list[str] = []

    def create_github_issue(effect: Effect) -> dict[str, Any]:
        issues.append(effect.args["title"])
        return {"number": len(issues), "title": effect.args["title"]}

    async def example(title: str, body: str) -> Any:
        result = await ledger.run(
            ToolCall(
                workflow_id="order-123",
                tool="github.create_issue",
                args={"title": title, "body": body},
                resource=ResourceDescriptor(
                    namespace="github",
                    type="issue",
                    id={"owner": "acme", "repo": "app"},
                ),
            ),
            handler=create_github_issue,
        )
        return result

    first = await example("Bug report", "Details...")
    # A retry that rewords the args still names the same resource: no second issue.
    retry = await example("Bug report (retry)", "More details...")

    assert first == retry == {"number": 1, "title": "Bug report"}
    assert issues == ["Bug report"]


def approval_call() -> ToolCall:
    return ToolCall(
        workflow_id="deploy-prod",
        tool="k8s.deploy",
        args={"image": "app:v2"},
    )


async def wait_until_pending(ledger: EffectLedger, idem_key: str) -> None:
    for _ in range(1_000):
        effect = await ledger.find_by_idem_key(idem_key)
        if effect is not None and effect.status is EffectStatus.REQUIRES_APPROVAL:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the run never asked for approval")


async def test_with_approval_flow_approve(ledger: EffectLedger) -> None:
    deployed: list[str] = []

    async def deploy_to_k8s(effect: Effect) -> dict[str, Any]:
        deployed.append(effect.args["image"])
        return {"rollout": "complete"}

    async def agent() -> Any:
        result = await ledger.run(
            ToolCall(
                workflow_id="deploy-prod",
                tool="k8s.deploy",
                args={"image": "app:v2"},
            ),
            handler=deploy_to_k8s,
            run_options=RunOptions(requires_approval=True),
        )
        return result

    running = asyncio.create_task(agent())
    idem_key = ledger.idem_key(approval_call())
    await wait_until_pending(ledger, idem_key)
    assert deployed == []

    # Elsewhere (admin panel, CLI, webhook):
    await ledger.approve(idem_key)

    assert await asyncio.wait_for(running, 10) == {"rollout": "complete"}
    assert deployed == ["app:v2"]


async def test_with_approval_flow_deny(ledger: EffectLedger) -> None:
    async def deploy_to_k8s(effect: Effect) -> Any:
        raise AssertionError("a denied deploy must not run")

    async def agent() -> Any:
        result = await ledger.run(
            ToolCall(
                workflow_id="deploy-prod",
                tool="k8s.deploy",
                args={"image": "app:v2"},
            ),
            handler=deploy_to_k8s,
            run_options=RunOptions(requires_approval=True),
        )
        return result

    running = asyncio.create_task(agent())
    idem_key = ledger.idem_key(approval_call())
    await wait_until_pending(ledger, idem_key)

    # or
    await ledger.deny(idem_key, reason="Not authorized")

    with pytest.raises(EffectDeniedError) as raised:
        await asyncio.wait_for(running, 10)
    assert raised.value.reason == "Not authorized"


class ToolBroke(Exception):
    pass


async def test_manual_begin_commit(ledger: EffectLedger) -> None:
    executed: list[dict[str, Any]] = []

    async def execute_tool(args: Any) -> Any:
        if args.get("fail"):
            raise ToolBroke("remote said no")
        executed.append(dict(args))
        return {"done": True}

    async def manual(call: ToolCall) -> Any:
        # Fine-grained control
        begin_result = await ledger.begin(call)

        if begin_result.cached:
            return begin_result.cached_result

        try:
            result = await execute_tool(call.args)
            await ledger.commit(begin_result.effect.id, CommitSucceeded(result=result))
            return result
        except Exception as e:
            await ledger.commit(
                begin_result.effect.id,
                CommitFailed(error=EffectError(message=str(e))),
            )
            raise

    call = ToolCall(workflow_id="wf", tool="t", args={"n": 1})
    assert await manual(call) == {"done": True}
    assert await manual(call) == {"done": True}  # cached
    assert executed == [{"n": 1}]

    failing = ToolCall(workflow_id="wf", tool="t", args={"n": 2, "fail": True})
    with pytest.raises(ToolBroke):
        await manual(failing)
    effect = await ledger.find_by_idem_key(ledger.idem_key(failing))
    assert effect is not None
    assert effect.status is EffectStatus.FAILED
    assert effect.error == EffectError(message="remote said no")
    # As written, a replay of a failed call returns the (empty) cached result.
    assert await manual(failing) is None
