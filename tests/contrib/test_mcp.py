"""The MCP adapter, with the SDK's in-memory client and server (mcp 2.3).

Each scenario first shows the duplicate (a client retry runs a write twice) or the missing
consent (a model-set ``confirm: true``) on a stock server, then its absence with the ledger.
"""

from __future__ import annotations

from typing import Any

import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer
from mcp_types import ToolAnnotations

from agent_ledger import EffectLedgerValidationError, EffectStatus
from agent_ledger.contrib.mcp import (
    CALL_META,
    WORKFLOW_META,
    LedgerExtension,
    ledgered_tool,
)
from agent_ledger.services import get_ledger

pytestmark = pytest.mark.django_db(transaction=True)

DESTRUCTIVE = ToolAnnotations(destructive_hint=True)
WRITE = ToolAnnotations(read_only_hint=False, destructive_hint=False)
READ = ToolAnnotations(read_only_hint=True)


def shop(extension: LedgerExtension | None, runs: list[str]) -> MCPServer:
    server = MCPServer("shop", extensions=[extension] if extension else [])

    @server.tool(annotations=WRITE)
    def refund(order: str, amount: int) -> str:
        """Refund an order."""
        runs.append(f"refund {order} {amount}")
        return f"refunded {amount} on {order}"

    @server.tool(annotations=DESTRUCTIVE)
    def delete_account(user: str, confirm: bool = False) -> str:
        """Delete an account (asks for confirm: true first)."""
        if not confirm:
            return "Are you sure? Call again with confirm: true."
        runs.append(f"delete {user}")
        return f"deleted {user}"

    @server.tool(annotations=READ)
    def balance(user: str) -> int:
        """Read a balance."""
        runs.append(f"balance {user}")
        return 42

    if extension is not None:
        extension.bind(server)
    return server


META = {WORKFLOW_META: "chat-17"}


def text(result: Any) -> str:
    return str(result.content[0].text)


async def test_stock_server_runs_a_retried_write_twice() -> None:
    runs: list[str] = []
    async with Client(shop(None, runs)) as client:
        for _ in range(2):  # the reply was lost; the client retries
            await client.call_tool("refund", {"order": "o-1", "amount": 30}, meta=META)
    assert runs == ["refund o-1 30", "refund o-1 30"]


async def test_with_the_ledger_a_retried_write_runs_once_and_replays() -> None:
    runs: list[str] = []
    async with Client(shop(LedgerExtension(), runs)) as client:
        first = await client.call_tool("refund", {"order": "o-1", "amount": 30}, meta=META)
        again = await client.call_tool("refund", {"order": "o-1", "amount": 30}, meta=META)
        other = await client.call_tool(
            "refund", {"order": "o-1", "amount": 30}, meta={**META, CALL_META: "second-refund"}
        )
    assert runs == ["refund o-1 30", "refund o-1 30"]  # the retry replayed; a new call id ran
    assert text(first) == text(again) == "refunded 30 on o-1"
    assert not other.is_error


async def test_stock_server_lets_the_model_confirm_a_destructive_call_itself() -> None:
    runs: list[str] = []
    async with Client(shop(None, runs)) as client:
        await client.call_tool("delete_account", {"user": "bob", "confirm": True}, meta=META)
    assert runs == ["delete bob"]  # no human ever said yes


async def test_with_the_ledger_confirm_true_still_waits_for_a_human() -> None:
    runs: list[str] = []
    async with Client(shop(LedgerExtension(), runs)) as client:
        args = {"user": "bob", "confirm": True}
        parked = await client.call_tool("delete_account", args, meta=META)
        assert parked.is_error
        meta = parked.meta or {}
        assert meta["agent-ledger/status"] == "requires_approval"
        assert meta["agent-ledger/urls"]["admin"].endswith(
            f"/{meta['agent-ledger/effect_id']}/change/"
        )
        assert meta["agent-ledger/idem_key"] in text(parked)
        again = await client.call_tool("delete_account", args, meta=META)  # retry: still parked
        assert again.is_error
        assert runs == []
        await get_ledger().approve(meta["agent-ledger/idem_key"], actor="admin")
        done = await client.call_tool("delete_account", args, meta=META)
        replay = await client.call_tool("delete_account", args, meta=META)
    assert text(done) == text(replay) == "deleted bob"
    assert runs == ["delete bob"]


async def test_a_denied_destructive_call_returns_the_reason() -> None:
    runs: list[str] = []
    async with Client(shop(LedgerExtension(), runs)) as client:
        parked = await client.call_tool("delete_account", {"user": "eve"}, meta=META)
        key = (parked.meta or {})["agent-ledger/idem_key"]
        await get_ledger().deny(key, "customer asked to keep it", actor="admin")
        denied = await client.call_tool("delete_account", {"user": "eve"}, meta=META)
    assert denied.is_error and "customer asked to keep it" in text(denied)
    assert (denied.meta or {})["agent-ledger/status"] == "denied"
    assert runs == []


async def test_read_only_tools_pass_through_and_need_no_workflow() -> None:
    runs: list[str] = []
    async with Client(shop(LedgerExtension(), runs)) as client:
        for _ in range(2):
            result = await client.call_tool("balance", {"user": "bob"})
    assert not result.is_error
    assert runs == ["balance bob", "balance bob"]


async def test_a_write_without_workflow_or_principal_is_refused_clearly() -> None:
    runs: list[str] = []
    async with Client(shop(LedgerExtension(), runs)) as client:
        result = await client.call_tool("refund", {"order": "o-2", "amount": 5})
    assert result.is_error and WORKFLOW_META in text(result)
    assert runs == []


async def test_the_principal_keys_calls_when_the_client_sends_no_workflow() -> None:
    runs: list[str] = []
    extension = LedgerExtension(principal=lambda ctx: "client-a|user-9")
    async with Client(shop(extension, runs)) as client:
        for _ in range(2):
            await client.call_tool("refund", {"order": "o-3", "amount": 7})
    assert runs == ["refund o-3 7"]


async def test_the_policy_is_overridable() -> None:
    runs: list[str] = []
    extension = LedgerExtension(requires_approval={"refund"})
    async with Client(shop(extension, runs)) as client:
        parked = await client.call_tool("refund", {"order": "o-4", "amount": 1}, meta=META)
        deleted = await client.call_tool(
            "delete_account", {"user": "x", "confirm": True}, meta=META
        )
    assert parked.is_error and not deleted.is_error
    assert runs == ["delete x"]


async def test_a_tool_error_does_not_use_up_the_key() -> None:
    runs: list[str] = []
    server = MCPServer("flaky", extensions=[extension := LedgerExtension()])
    extension.bind(server)

    @server.tool(annotations=WRITE)
    def charge(amount: int) -> str:
        """Charge."""
        runs.append("charge")
        if len(runs) == 1:
            raise RuntimeError("card network down")
        return "charged"

    async with Client(server) as client:
        failed = await client.call_tool("charge", {"amount": 3}, meta=META)
        done = await client.call_tool("charge", {"amount": 3}, meta=META)
    assert failed.is_error and text(done) == "charged"
    assert runs == ["charge", "charge"]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"ledger": 3}, "ledger"),
        ({"requires_approval": "delete_account"}, "requires_approval"),
        ({"principal": "me"}, "principal"),
        ({"wait_timeout_ms": "soon"}, "wait_timeout_ms"),
    ],
)
def test_wrong_option_types_are_refused(options: dict[str, Any], field: str) -> None:
    with pytest.raises(EffectLedgerValidationError) as error:
        LedgerExtension(**options)
    assert error.value.field == field


def test_bind_needs_a_server() -> None:
    with pytest.raises(EffectLedgerValidationError):
        LedgerExtension().bind(object())


async def test_non_json_or_non_object_arguments_are_refused() -> None:
    runs: list[str] = []

    @ledgered_tool(annotations=WRITE)
    async def tag(labels: Any) -> str:
        runs.append("tag")
        return "ok"

    odd = await tag({"labels": float("nan")}, meta=META)
    assert odd["isError"] and "args" in odd["content"][0]["text"]
    not_object = await tag(["a"], meta=META)
    assert not_object["isError"] and "arguments" in not_object["content"][0]["text"]
    assert runs == []


# -- the decorator, for servers without the SDK (django-mcpz style) ---------------------------


def test_the_decorator_on_a_sync_tool_runs_a_retried_write_once() -> None:
    runs: list[str] = []

    def plain_refund(order: str) -> str:  # as served without the ledger
        runs.append(order)
        return "refunded"

    plain_refund("o-9")
    plain_refund("o-9")
    assert runs == ["o-9", "o-9"]

    runs.clear()
    refund = ledgered_tool(name="refund", annotations=WRITE)(plain_refund)
    first = refund({"order": "o-9"}, meta=META)
    again = refund({"order": "o-9"}, meta=META)
    assert first == again
    assert first["structuredContent"] == {"result": "refunded"}
    assert runs == ["o-9"]


def test_the_decorator_parks_destructive_tools_until_approved() -> None:
    runs: list[str] = []

    @ledgered_tool()  # no annotations: destructive by the spec's defaults
    def wipe(disk: str, confirm: bool = False) -> str:
        runs.append(disk)
        return "wiped"

    parked = wipe({"disk": "sda", "confirm": True}, principal="ops-bot")
    assert parked["isError"] and parked["_meta"]["agent-ledger/status"] == "requires_approval"
    key = parked["_meta"]["agent-ledger/idem_key"]
    effect = get_ledger().find_by_idem_key_sync(key)
    assert effect is not None and effect.status is EffectStatus.REQUIRES_APPROVAL
    assert effect.workflow_id == "mcp:ops-bot"
    get_ledger().approve_sync(key, actor="admin")
    assert wipe({"disk": "sda", "confirm": True}, principal="ops-bot")["isError"] is False
    assert wipe({"disk": "sda", "confirm": True}, principal="ops-bot")["isError"] is False
    assert runs == ["sda"]


def test_the_decorator_refuses_bad_annotations() -> None:
    with pytest.raises(EffectLedgerValidationError) as error:
        ledgered_tool(annotations={"readOnlyHint": True})  # type: ignore[arg-type]
    assert error.value.field == "annotations"
