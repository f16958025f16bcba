"""``run`` on a fresh key: the handler runs once and its outcome is stored."""

from __future__ import annotations

import functools
import math
import types
import uuid
from typing import Any

import pytest

from agent_ledger import (
    Effect,
    EffectError,
    EffectFailedError,
    EffectLedger,
    EffectStatus,
    ToolCall,
)

from .helpers import Calls, checked_history, make_call, never_called

RESULT = {"sent": True, "id": "msg-1", "parts": [1, 2.5, None, "x", {"nested": False}]}


def _handlers(calls: Calls) -> dict[str, Any]:
    async def coroutine(effect: Effect) -> Any:
        return await calls.async_handler(effect)

    return {
        "async def": calls.async_handler,
        "sync def": calls.sync_handler,
        "lambda returning a coroutine": lambda effect: coroutine(effect),
        "partial of async def": functools.partial(coroutine),
    }


@pytest.mark.parametrize(
    "kind", ["async def", "sync def", "lambda returning a coroutine", "partial of async def"]
)
async def test_fresh_call_runs_handler_once_and_stores_result(
    ledger: EffectLedger, kind: str
) -> None:
    calls = Calls(result=RESULT)
    call = make_call(channel="#support", text="Ticket resolved")

    result = await ledger.run(call, _handlers(calls)[kind])

    assert result == RESULT
    assert calls.count == 1
    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    assert effect is not None
    assert effect.status is EffectStatus.SUCCEEDED
    assert effect.result == RESULT
    assert effect.error is None
    assert effect.completed_at is not None
    assert effect.created_at <= effect.completed_at
    assert effect.dedup_count == 0
    assert effect.idem_key == ledger.idem_key(call)
    assert (effect.workflow_id, effect.tool) == ("wf-1", "mail.send")
    assert effect.args == {"channel": "#support", "text": "Ticket resolved"}
    # The handler is given the effect it runs for, while it is processing.
    (seen,) = calls.effects
    assert seen.id == effect.id
    assert seen.status is EffectStatus.PROCESSING
    assert await checked_history(ledger, effect) == [
        (None, "processing", "system", None),
        ("processing", "succeeded", "system", None),
    ]


async def test_get_effect_and_find_by_idem_key_return_the_same_effect(
    ledger: EffectLedger,
) -> None:
    call = make_call()
    await ledger.run(call, Calls(result=1).async_handler)

    by_key = await ledger.find_by_idem_key(ledger.idem_key(call))
    assert by_key is not None
    assert await ledger.get_effect(by_key.id) == by_key


async def test_unknown_id_and_key_return_none(ledger: EffectLedger) -> None:
    await ledger.run(make_call(), Calls(result=1).async_handler)

    assert await ledger.get_effect(str(uuid.uuid4())) is None
    assert await ledger.find_by_idem_key("0" * 64) is None
    assert await ledger.find_by_idem_key(ledger.idem_key(make_call(to="other"))) is None


async def test_none_result_is_stored_as_success(ledger: EffectLedger) -> None:
    call = make_call()
    assert await ledger.run(call, Calls(result=None).async_handler) is None

    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    assert effect is not None
    assert effect.status is EffectStatus.SUCCEEDED
    assert await ledger.run(call, never_called) is None


async def test_fresh_result_equals_what_a_replay_returns(ledger: EffectLedger) -> None:
    """Tuples come back as lists on the first run too, not only on replays."""
    call = make_call()
    fresh = await ledger.run(call, Calls(result={"pair": (1, 2), "n": 1.5}).async_handler)
    replay = await ledger.run(call, never_called)

    assert fresh == replay == {"pair": [1, 2], "n": 1.5}
    assert type(fresh["pair"]) is list


class RateLimited(Exception):
    code = "rate_limited"


class NumericCode(Exception):
    code = 429


class PlainError(Exception):
    pass


@pytest.mark.parametrize(
    ("error", "message", "code"),
    [
        (RateLimited("slow down"), "slow down", "rate_limited"),
        (NumericCode("too many"), "too many", "NumericCode"),
        (PlainError("disk full"), "disk full", "PlainError"),
        (ValueError("bad value"), "bad value", "ValueError"),
    ],
    ids=["str code", "non-str code", "no code", "builtin"],
)
@pytest.mark.parametrize("kind", ["async def", "sync def"])
async def test_handler_exception_is_stored_and_reraised(
    ledger: EffectLedger, error: Exception, message: str, code: str, kind: str
) -> None:
    calls = Calls(error=error)
    call = make_call()

    with pytest.raises(type(error)) as raised:
        await ledger.run(call, _handlers(calls)[kind])

    assert raised.value is error  # the original exception, not a wrapper
    assert calls.count == 1
    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    assert effect is not None
    assert effect.status is EffectStatus.FAILED
    assert effect.error == EffectError(message=message, code=code)
    assert effect.result is None
    assert effect.completed_at is not None
    assert await checked_history(ledger, effect) == [
        (None, "processing", "system", None),
        ("processing", "failed", "system", None),
    ]


class Unserialisable:
    pass


def _circular() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return loop


def _deep(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    "result",
    [
        {1, 2},
        Unserialisable(),
        math.nan,
        {"total": math.inf},
        {"raw": b"bytes"},
        {1: "int key"},
        {"text": "lone \ud800 surrogate"},
        _circular(),
        _deep(5_000),
    ],
    ids=["set", "object", "nan", "inf", "bytes", "int key", "surrogate", "circular", "deep"],
)
async def test_non_json_result_fails_the_effect(ledger: EffectLedger, result: Any) -> None:
    calls = Calls(result=result)
    call = make_call()

    with pytest.raises(EffectFailedError) as raised:
        await ledger.run(call, calls.async_handler)

    assert raised.value.code == "result_not_json"
    assert calls.count == 1
    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    assert effect is not None
    assert effect.status is EffectStatus.FAILED  # never left processing
    assert effect.error is not None
    assert effect.error.code == "result_not_json"
    assert effect.error == raised.value.error

    with pytest.raises(EffectFailedError) as replayed:
        await ledger.run(call, never_called)
    assert replayed.value.error == effect.error
    assert replayed.value.code == "result_not_json"


async def test_json_compatible_mapping_result_is_stored_as_a_dict(ledger: EffectLedger) -> None:
    """Any Mapping of plain JSON is JSON; it must not crash the commit or stick in processing."""
    call = make_call()
    result = await ledger.run(
        call, Calls(result=types.MappingProxyType({"ok": True})).async_handler
    )

    assert result == {"ok": True}
    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    assert effect is not None
    assert effect.status is EffectStatus.SUCCEEDED
    assert effect.result == {"ok": True}


async def test_different_args_are_different_effects(ledger: EffectLedger) -> None:
    calls = Calls(result="done")
    first, second = make_call(to="a@example.com"), make_call(to="b@example.com")

    await ledger.run(first, calls.async_handler)
    await ledger.run(second, calls.async_handler)

    assert calls.count == 2
    one = await ledger.find_by_idem_key(ledger.idem_key(first))
    two = await ledger.find_by_idem_key(ledger.idem_key(second))
    assert one is not None and two is not None
    assert one.id != two.id
    assert (one.dedup_count, two.dedup_count) == (0, 0)


async def test_same_args_in_another_workflow_or_tool_run_again(ledger: EffectLedger) -> None:
    calls = Calls(result="done")

    await ledger.run(make_call(workflow_id="wf-1", tool="mail.send"), calls.async_handler)
    await ledger.run(make_call(workflow_id="wf-2", tool="mail.send"), calls.async_handler)
    await ledger.run(make_call(workflow_id="wf-1", tool="mail.draft"), calls.async_handler)

    assert calls.count == 3


async def test_results_may_hold_integers_beyond_double_precision(ledger: EffectLedger) -> None:
    """Only hashed args need JCS-exact numbers; a stored result keeps a 64-bit id intact."""
    big = 2**63 - 1
    call = ToolCall(workflow_id="wf-bigint", tool="chat.post", args={"text": "hi"})
    first = await ledger.run(call, lambda effect: {"message_id": big})
    again = await ledger.run(call, lambda effect: {"message_id": 0})
    assert first == again == {"message_id": big}
