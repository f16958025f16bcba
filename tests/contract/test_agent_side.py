"""The agent-side core on every store: propose, pass-through and retryable errors, attempts,
codecs, keys per call, the pending handle, the approval policy and hooks."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from agent_ledger import (
    Actor,
    ApprovalPendingError,
    ConcurrencyOptions,
    Effect,
    EffectDeniedError,
    EffectFailedError,
    EffectLedger,
    EffectLedgerOptions,
    EffectLedgerValidationError,
    EffectStatus,
    LedgerHooks,
    RunOptions,
    ToolCall,
)
from agent_ledger.stores.base import EffectStore

from .helpers import Calls, checked_history, make_call, never_called, options, wait_for_status


class GraphInterrupt(Exception):
    """Stands for LangGraph's: raised by the tool on purpose, before it acts."""


class RateLimited(Exception):
    code = "429"


def no_wait(**kwargs: Any) -> RunOptions:
    return RunOptions(concurrency=ConcurrencyOptions(wait_timeout_ms=0), **kwargs)


# -- propose -----------------------------------------------------------------------------------


async def test_propose_creates_a_waiting_effect_and_runs_nothing(ledger: EffectLedger) -> None:
    call = make_call(tool="k8s.deploy")
    effect = await ledger.propose(call)
    assert effect.status is EffectStatus.REQUIRES_APPROVAL
    assert effect.attempts == 0
    again = await ledger.propose(call)
    assert again.id == effect.id  # proposing again returns the same effect
    assert (await ledger.find_by_idem_key(effect.idem_key)) is not None


async def test_an_approval_between_propose_and_run_runs_the_real_tool(
    ledger: EffectLedger,
) -> None:
    """The prototypes parked a call with a dummy handler; an approval landing in between made
    the dummy "succeed" with None and the real tool never ran."""
    call = make_call(tool="k8s.deploy")
    effect = await ledger.propose(call)
    assert await ledger.approve(effect.idem_key, actor="admin")
    deploy = Calls({"deployed": "v2"})
    assert await ledger.run(call, deploy.async_handler, options()) == {"deployed": "v2"}
    assert deploy.count == 1
    stored = await ledger.get_effect(effect.id)
    assert stored is not None and stored.attempts == 1


async def test_a_run_after_a_denied_proposal_raises(ledger: EffectLedger) -> None:
    call = make_call()
    effect = await ledger.propose(call)
    await ledger.deny(effect.idem_key, "no")
    with pytest.raises(EffectDeniedError):
        await ledger.run(call, never_called, options())


async def test_propose_without_approval_is_ready_for_the_next_run(ledger: EffectLedger) -> None:
    call = make_call()
    effect = await ledger.propose(call, requires_approval=False)
    assert effect.status is EffectStatus.READY
    assert await ledger.run(call, Calls("ran").async_handler, options()) == "ran"


@pytest.mark.parametrize(
    ("continuation", "field"),
    [
        ("resume-me", "continuation"),
        ({"thread": "t1"}, "continuation"),
        ({"resumer": ""}, "continuation.resumer"),
        ({"resumer": "r", "when": object()}, "continuation.when"),
    ],
)
async def test_a_bad_continuation_is_refused_before_anything_is_written(
    ledger: EffectLedger, continuation: Any, field: str
) -> None:
    call = make_call()
    with pytest.raises(EffectLedgerValidationError) as caught:
        await ledger.propose(call, continuation=continuation)
    assert caught.value.field == field
    assert await ledger.find_by_idem_key(ledger.idem_key(call)) is None


async def test_the_continuation_is_stored_with_the_effect(ledger: EffectLedger) -> None:
    continuation = {"resumer": "graph.resume", "thread_id": "t-1"}
    effect = await ledger.propose(make_call(), continuation=continuation)
    stored = await ledger.get_effect(effect.id)
    assert stored is not None and stored.continuation == continuation


async def test_propose_refuses_a_requires_approval_that_is_not_a_bool(
    ledger: EffectLedger,
) -> None:
    with pytest.raises(EffectLedgerValidationError) as caught:
        await ledger.propose(make_call(), requires_approval="yes")  # type: ignore[arg-type]
    assert caught.value.field == "requires_approval"


# -- pass-through, retryable and cancelled -----------------------------------------------------


async def test_a_control_flow_exception_propagates_and_releases_the_effect(
    ledger: EffectLedger,
) -> None:
    """A LangGraph tool calling interrupt() inside run left the effect failed for good."""
    call = make_call()
    attempts = 0

    async def tool(effect: Effect) -> Any:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise GraphInterrupt("waiting for the human")
        return {"sent": True}

    with pytest.raises(GraphInterrupt):
        await ledger.run(call, tool, RunOptions(passthrough=GraphInterrupt))
    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    assert effect is not None and effect.status is EffectStatus.READY  # claimable at once
    assert await ledger.run(call, tool, RunOptions(passthrough=(GraphInterrupt,))) == {"sent": True}
    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    assert effect is not None and effect.attempts == 2
    steps = await checked_history(ledger, effect)
    assert steps[1] == ("processing", "ready", "system", "passed through: GraphInterrupt")


async def test_an_approved_effect_stays_approved_when_its_run_passes_control_through(
    ledger: EffectLedger,
) -> None:
    call = make_call(tool="k8s.deploy")
    effect = await ledger.propose(call)
    await ledger.approve(effect.idem_key)

    async def interrupting(effect: Effect) -> Any:
        raise GraphInterrupt()

    with pytest.raises(GraphInterrupt):
        await ledger.run(call, interrupting, RunOptions(passthrough=GraphInterrupt))
    assert await ledger.run(call, Calls("deployed").async_handler, options()) == "deployed"


async def test_a_retryable_error_records_the_attempt_and_keeps_the_key_runnable(
    ledger: EffectLedger,
) -> None:
    call = make_call(tool="slack.send_message")
    limited = RunOptions(retry_on=RateLimited)

    async def rate_limited(effect: Effect) -> Any:
        raise RateLimited("429 Too Many Requests")

    with pytest.raises(RateLimited):
        await ledger.run(call, rate_limited, limited)
    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    assert effect is not None and effect.status is EffectStatus.READY
    assert effect.error is not None and effect.error.code == "429"
    assert await ledger.run(call, Calls({"ts": "1.2"}).async_handler, limited) == {"ts": "1.2"}
    effect = await ledger.get_effect(effect.id)
    assert effect is not None
    assert (effect.status, effect.attempts, effect.error) == (EffectStatus.SUCCEEDED, 2, None)
    steps = await checked_history(ledger, effect)
    assert steps[1] == ("processing", "ready", "system", "retryable: 429 Too Many Requests")


async def test_other_exceptions_still_fail_the_effect_for_good(ledger: EffectLedger) -> None:
    call = make_call()
    with pytest.raises(ValueError):
        await ledger.run(call, Calls(error=ValueError("bad")).async_handler, RunOptions(
            retry_on=RateLimited, passthrough=GraphInterrupt
        ))  # fmt: skip
    with pytest.raises(EffectFailedError):
        await ledger.run(call, never_called, options())


async def test_a_cancelled_run_holds_the_effect_for_a_takeover_not_a_release(
    ledger: EffectLedger,
) -> None:
    call = make_call()
    started = asyncio.Event()

    async def slow(effect: Effect) -> Any:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.ensure_future(ledger.run(call, slow, options()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    # The tool may have acted: nobody may run it again before the stale window.
    assert effect is not None and effect.status is EffectStatus.PROCESSING
    with pytest.raises(Exception) as caught:
        await ledger.run(call, never_called, no_wait())
    assert type(caught.value).__name__ == "EffectTimeoutError"


@pytest.mark.parametrize("value", ["GraphInterrupt", (ValueError, "x"), 42, [object]])
def test_passthrough_and_retry_on_take_exception_classes_only(value: Any) -> None:
    for field in ("passthrough", "retry_on"):
        with pytest.raises(EffectLedgerValidationError) as caught:
            RunOptions(**{field: value})
        assert caught.value.field == field


# -- attempts ----------------------------------------------------------------------------------


async def test_attempts_count_the_claims(ledger: EffectLedger) -> None:
    fresh = await ledger.run(make_call(n=1), Calls("a").async_handler, options())
    assert fresh == "a"
    effect = await ledger.find_by_idem_key(ledger.idem_key(make_call(n=1)))
    assert effect is not None and effect.attempts == 1
    gated = await ledger.propose(make_call(n=2))
    assert gated.attempts == 0


# -- codecs ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Receipt:
    charge_id: str
    amount: int


class ReceiptCodec:
    def encode(self, value: Receipt) -> Any:
        return {"charge_id": value.charge_id, "amount": value.amount}

    def decode(self, data: Any) -> Receipt:
        return Receipt(**data)


async def test_a_codec_gives_fresh_runs_and_replays_the_same_type(ledger: EffectLedger) -> None:
    call = make_call(tool="stripe.charge")
    with_codec = RunOptions(codec=ReceiptCodec())
    calls = Calls(Receipt("ch_1", 4500))
    fresh = await ledger.run(call, calls.async_handler, with_codec)
    replay = await ledger.run(call, never_called, with_codec)
    assert fresh == replay == Receipt("ch_1", 4500)
    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    assert effect is not None and effect.result == {"charge_id": "ch_1", "amount": 4500}


async def test_without_a_codec_a_result_that_is_not_json_fails_clearly(
    ledger: EffectLedger,
) -> None:
    with pytest.raises(EffectFailedError) as caught:
        await ledger.run(make_call(), Calls(Receipt("ch_1", 1)).async_handler, options())
    assert caught.value.code == "result_not_json"


def test_a_codec_needs_encode_and_decode() -> None:
    with pytest.raises(EffectLedgerValidationError) as caught:
        RunOptions(codec=object())  # type: ignore[arg-type]
    assert caught.value.field == "codec"


# -- keys per call -----------------------------------------------------------------------------


async def test_key_scope_call_dedupes_one_call_but_not_the_same_args_asked_again(
    ledger: EffectLedger,
) -> None:
    args = {"to": "#ops", "text": "deployed"}
    first = ToolCall(workflow_id="t1", tool="slack", args=args, call_id="c1", key_scope="call")
    retry = ToolCall(workflow_id="t1", tool="slack", args=args, call_id="c1", key_scope="call")
    later = ToolCall(workflow_id="t1", tool="slack", args=args, call_id="c2", key_scope="call")
    calls = Calls("ok")
    for call in (first, retry, later):
        await ledger.run(call, calls.async_handler, options())
    assert calls.count == 2
    plain = ToolCall(workflow_id="t1", tool="slack", args=args, call_id="c1")
    assert ledger.idem_key(plain) != ledger.idem_key(first)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"key_scope": "call"}, "call_id"), ({"key_scope": "thread", "call_id": "c"}, "key_scope")],
)
def test_key_scope_is_validated(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(EffectLedgerValidationError) as caught:
        ToolCall(workflow_id="w", tool="t", args={}, **kwargs)
    assert caught.value.field == field


# -- the pending handle ------------------------------------------------------------------------


async def test_approval_pending_carries_the_effect_id_and_key(ledger: EffectLedger) -> None:
    call = make_call()
    with pytest.raises(ApprovalPendingError) as caught:
        await ledger.run(call, never_called, no_wait(requires_approval=True))
    effect = await ledger.find_by_idem_key(ledger.idem_key(call))
    assert effect is not None
    assert (caught.value.effect_id, caught.value.idem_key) == (effect.id, effect.idem_key)


# -- the approval policy and hooks -------------------------------------------------------------


async def test_the_approval_policy_decides_when_the_call_does_not_say(
    store: EffectStore,
) -> None:
    def policy(call: ToolCall) -> bool:
        return call.tool.startswith("stripe.") and call.args.get("amount", 0) > 1_000

    ledger = EffectLedger(EffectLedgerOptions(store=store, approval_policy=policy))
    small = ToolCall(workflow_id="w", tool="stripe.refund", args={"amount": 2599})
    with pytest.raises(ApprovalPendingError):
        await ledger.run(small, never_called, no_wait())
    cheap = ToolCall(workflow_id="w", tool="stripe.refund", args={"amount": 500})
    assert await ledger.run(cheap, Calls("refunded").async_handler, no_wait()) == "refunded"
    # A call's explicit say wins over the policy.
    forced = ToolCall(workflow_id="w", tool="stripe.refund", args={"amount": 9000})
    assert await ledger.run(forced, Calls("ok").async_handler, no_wait(requires_approval=False))


async def test_a_policy_that_does_not_return_a_bool_is_an_error(store: EffectStore) -> None:
    ledger = EffectLedger(EffectLedgerOptions(store=store, approval_policy=lambda call: "yes"))
    with pytest.raises(EffectLedgerValidationError) as caught:
        await ledger.run(make_call(), never_called, no_wait())
    assert caught.value.field == "approval_policy"


async def test_hooks_hear_requests_decisions_and_outcomes_on_every_store(
    store: EffectStore,
) -> None:
    heard: list[tuple[str, ...]] = []

    async def requested(effect: Effect) -> None:
        heard.append(("requested", effect.status.value))

    def decided(effect: Effect, decision: str, actor: Actor) -> None:
        heard.append(("decided", decision, actor.label, effect.status.value))

    def finished(effect: Effect) -> None:
        heard.append(("finished", effect.status.value))

    def broken(effect: Effect) -> None:
        raise RuntimeError("a hook's own failure changes nothing")

    hooks = LedgerHooks(approval_requested=requested, decided=decided, finished=finished)
    ledger = EffectLedger(EffectLedgerOptions(store=store, hooks=hooks))
    call = make_call(tool="k8s.deploy")
    effect = await ledger.propose(call)
    await ledger.approve(effect.idem_key, actor="slack")
    await ledger.run(call, Calls("ok").async_handler, options())
    assert heard == [
        ("requested", "requires_approval"),
        ("decided", "approve", "slack", "ready"),
        ("finished", "succeeded"),
    ]
    failing = EffectLedger(EffectLedgerOptions(store=store, hooks=LedgerHooks(finished=broken)))
    assert await failing.run(make_call(n=2), Calls("fine").async_handler, options()) == "fine"


def test_hooks_must_be_callable() -> None:
    with pytest.raises(EffectLedgerValidationError) as caught:
        LedgerHooks(decided="print")  # type: ignore[arg-type]
    assert caught.value.field == "decided"


async def test_a_waiter_wakes_when_a_proposal_is_approved(ledger: EffectLedger) -> None:
    call = make_call()
    waiting = asyncio.ensure_future(
        ledger.run(call, Calls("ran").async_handler, options(10_000, requires_approval=True))
    )
    effect = await wait_for_status(ledger, ledger.idem_key(call), EffectStatus.REQUIRES_APPROVAL)
    await ledger.approve(effect.idem_key)
    assert await waiting == "ran"
