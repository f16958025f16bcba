"""Bad input is refused with ``EffectLedgerValidationError`` naming the field, and nothing is
written for a refused call."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from agent_ledger import (
    Actor,
    ApprovalPendingError,
    CommitFailed,
    CommitSucceeded,
    ConcurrencyOptions,
    EffectError,
    EffectLedger,
    EffectLedgerOptions,
    EffectLedgerValidationError,
    EffectStatus,
    MemoryStore,
    ResourceDescriptor,
    RunOptions,
    StaleOptions,
    ToolCall,
)
from agent_ledger.types import MAX_NAME_LENGTH


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def ledger(store: MemoryStore) -> EffectLedger:
    return EffectLedger(EffectLedgerOptions(store=store))


def refused(field: str, build: Callable[[], Any]) -> EffectLedgerValidationError:
    with pytest.raises(EffectLedgerValidationError) as raised:
        build()
    assert raised.value.field == field, raised.value
    return raised.value


async def refused_async(field: str, coroutine: Any) -> EffectLedgerValidationError:
    with pytest.raises(EffectLedgerValidationError) as raised:
        await coroutine
    assert raised.value.field == field, raised.value
    return raised.value


def call(**overrides: Any) -> ToolCall:
    fields: dict[str, Any] = {"workflow_id": "wf-1", "tool": "mail.send", "args": {"id": 1}}
    fields.update(overrides)
    return ToolCall(**fields)


def not_called(effect: Any) -> Any:
    raise AssertionError("a refused call must not run its handler")


# -- ToolCall -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("workflow_id", ""),
        ("workflow_id", "   "),
        ("workflow_id", 123),
        ("workflow_id", None),
        ("workflow_id", "w" * (MAX_NAME_LENGTH + 1)),
        ("tool", ""),
        ("tool", " \t\n"),
        ("tool", b"mail.send"),
        ("tool", "t" * (MAX_NAME_LENGTH + 1)),
        ("call_id", ""),
        ("call_id", 5),
        ("call_id", "c" * (MAX_NAME_LENGTH + 1)),
    ],
    ids=[
        "empty workflow_id",
        "whitespace workflow_id",
        "int workflow_id",
        "None workflow_id",
        "long workflow_id",
        "empty tool",
        "whitespace tool",
        "bytes tool",
        "long tool",
        "empty call_id",
        "int call_id",
        "long call_id",
    ],
)
def test_bad_names(field: str, value: Any) -> None:
    refused(field, lambda: call(**{field: value}))


@pytest.mark.parametrize("field", ["workflow_id", "tool", "call_id"])
def test_names_of_max_length_pass(field: str) -> None:
    assert getattr(call(**{field: "x" * MAX_NAME_LENGTH}), field) == "x" * MAX_NAME_LENGTH


@pytest.mark.parametrize("args", [[1, 2], "a=1", None, 5, ("a", 1)], ids=repr)
def test_args_must_be_a_dict(args: Any) -> None:
    refused("args", lambda: call(args=args))


def test_unknown_tool_call_field() -> None:
    refused("extra", lambda: call(extra=1))


def test_resource_must_be_a_descriptor() -> None:
    refused("resource", lambda: call(resource={"namespace": "n", "type": "t", "id": {"a": 1}}))


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("resource.namespace", {"namespace": "", "type": "issue", "id": {"a": 1}}),
        ("resource.type", {"namespace": "github", "type": 3, "id": {"a": 1}}),
        ("resource.id", {"namespace": "github", "type": "issue", "id": {}}),
        ("resource.id", {"namespace": "github", "type": "issue", "id": "1"}),
        ("owner", {"namespace": "github", "type": "issue", "id": {"a": 1}, "owner": "x"}),
    ],
    ids=["empty namespace", "int type", "empty id", "str id", "unknown field"],
)
def test_bad_resource_descriptor(field: str, kwargs: dict[str, Any]) -> None:
    refused(field, lambda: ResourceDescriptor(**kwargs))


@pytest.mark.parametrize(
    "keys",
    [[], "id", ["missing"], ["id", "id"], [""], [1]],
    ids=["empty", "str", "missing name", "repeated", "empty name", "int name"],
)
def test_bad_idempotency_keys(keys: Any) -> None:
    refused("idempotency_keys", lambda: call(idempotency_keys=keys))


# -- args that are not JSON, through every entry point that takes a call -------------------------


class Opaque:
    pass


BAD_ARGS = [
    ("args.bad", math.nan),
    ("args.bad", math.inf),
    ("args.bad", -math.inf),
    ("args.bad", b"bytes"),
    ("args.bad", {1, 2}),
    ("args.bad", Opaque()),
    ("args.bad", {1: "int key"}),
    ("args.bad", 2**53),
    ("args.bad", -(2**53)),
    ("args.bad", 2**64),
    ("args.bad", "lone \ud800 surrogate"),
    ("args.bad", {"lone \udc00": "surrogate key"}),
    ("args.bad[1].x", [0, {"x": math.nan}]),
]
BAD_ARGS_IDS = [
    "nan",
    "inf",
    "-inf",
    "bytes",
    "set",
    "object",
    "int key",
    "2**53",
    "-2**53",
    "2**64",
    "surrogate",
    "surrogate key",
    "nested",
]


def sibling(bad: Any) -> tuple[ToolCall, ToolCall]:
    """A refused call and a valid one with the same key (the key uses only ``id``)."""
    refused_call = call(args={"id": 1, "bad": bad}, idempotency_keys=["id"])
    valid_call = call(args={"id": 1, "bad": 0}, idempotency_keys=["id"])
    return refused_call, valid_call


@pytest.mark.parametrize(("field", "bad"), BAD_ARGS, ids=BAD_ARGS_IDS)
@pytest.mark.parametrize("entry", ["run", "begin", "idem_key"])
async def test_args_that_are_not_json(
    ledger: EffectLedger, entry: str, field: str, bad: Any
) -> None:
    refused_call, valid_call = sibling(bad)

    if entry == "run":
        await refused_async(field, ledger.run(refused_call, not_called))
    elif entry == "begin":
        await refused_async(field, ledger.begin(refused_call))
    else:
        refused(field, lambda: ledger.idem_key(refused_call))

    assert await ledger.find_by_idem_key(ledger.idem_key(valid_call)) is None


def test_largest_safe_integers_pass(ledger: EffectLedger) -> None:
    ledger.idem_key(call(args={"a": 2**53 - 1, "b": -(2**53 - 1)}))


async def test_bad_resource_id_value(ledger: EffectLedger) -> None:
    resource = ResourceDescriptor(namespace="n", type="t", id={"x": math.nan})
    await refused_async("resource.id.x", ledger.run(call(resource=resource), not_called))


# -- max_args_size_bytes -------------------------------------------------------------------------

LIMIT = 40
# The canonical JSON is {"blob":"<text>","id":1}: 18 bytes around the text.
OVERHEAD = len(b'{"blob":"","id":1}')


def sized_call(text: str) -> ToolCall:
    return call(args={"id": 1, "blob": text}, idempotency_keys=["id"])


@pytest.fixture
def small_ledger(store: MemoryStore) -> EffectLedger:
    return EffectLedger(EffectLedgerOptions(store=store, max_args_size_bytes=LIMIT))


@pytest.mark.parametrize("entry", ["run", "begin", "idem_key"])
async def test_args_over_the_size_limit(small_ledger: EffectLedger, entry: str) -> None:
    too_big = sized_call("x" * (LIMIT - OVERHEAD + 1))
    # Bytes, not characters: two-byte characters reach the limit in half as many.
    too_big_utf8 = sized_call("\u00e9" * ((LIMIT - OVERHEAD) // 2 + 1))

    for bad in (too_big, too_big_utf8):
        if entry == "run":
            await refused_async("args", small_ledger.run(bad, not_called))
        elif entry == "begin":
            await refused_async("args", small_ledger.begin(bad))
        else:
            refused("args", lambda bad=bad: small_ledger.idem_key(bad))

    assert await small_ledger.find_by_idem_key(small_ledger.idem_key(sized_call(""))) is None


async def test_args_exactly_at_the_size_limit_pass(small_ledger: EffectLedger) -> None:
    exact = sized_call("x" * (LIMIT - OVERHEAD))
    assert len(exact.args["blob"]) + OVERHEAD == LIMIT

    assert await small_ledger.run(exact, lambda effect: "ok") == "ok"
    assert (await small_ledger.begin(sized_call("\u00e9" * ((LIMIT - OVERHEAD) // 2)))).cached


# -- option classes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "build"),
    [
        ("foo", lambda: RunOptions(foo=1)),
        ("bar", lambda: ConcurrencyOptions(bar=1)),
        ("x", lambda: StaleOptions(x=1)),
        ("nope", lambda: EffectLedgerOptions(store=MemoryStore(), nope=1)),
    ],
    ids=["RunOptions", "ConcurrencyOptions", "StaleOptions", "EffectLedgerOptions"],
)
def test_unknown_option_fields(field: str, build: Callable[[], Any]) -> None:
    error = refused(field, build)
    assert "unknown field" in str(error)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("wait_timeout_ms", {"wait_timeout_ms": -1}),
        ("wait_timeout_ms", {"wait_timeout_ms": math.nan}),
        ("wait_timeout_ms", {"wait_timeout_ms": math.inf}),
        ("wait_timeout_ms", {"wait_timeout_ms": "100"}),
        ("wait_timeout_ms", {"wait_timeout_ms": True}),
        ("wait_timeout_ms", {"wait_timeout_ms": None}),
        ("initial_interval_ms", {"initial_interval_ms": 0}),
        ("initial_interval_ms", {"initial_interval_ms": -5}),
        ("max_interval_ms", {"max_interval_ms": 0}),
        ("max_interval_ms", {"max_interval_ms": -5}),
        ("initial_interval_ms", {"initial_interval_ms": 500, "max_interval_ms": 100}),
        ("jitter_factor", {"jitter_factor": -0.1}),
        ("jitter_factor", {"jitter_factor": 1.5}),
        ("backoff_multiplier", {"backoff_multiplier": 0.5}),
        ("backoff_multiplier", {"backoff_multiplier": False}),
    ],
    ids=[
        "negative wait",
        "nan wait",
        "inf wait",
        "str wait",
        "bool wait",
        "None wait",
        "zero initial",
        "negative initial",
        "zero max",
        "negative max",
        "initial over max",
        "jitter below 0",
        "jitter above 1",
        "backoff below 1",
        "bool backoff",
    ],
)
def test_bad_concurrency_options(field: str, kwargs: dict[str, Any]) -> None:
    refused(field, lambda: ConcurrencyOptions(**kwargs))


def test_concurrency_option_edges_pass() -> None:
    options = ConcurrencyOptions(
        wait_timeout_ms=0,
        initial_interval_ms=100,
        max_interval_ms=100,
        backoff_multiplier=1,
        jitter_factor=1,
    )
    assert options.wait_timeout_ms == 0
    assert ConcurrencyOptions(jitter_factor=0).jitter_factor == 0


@pytest.mark.parametrize("value", [-1, -0.5, True, "60000", math.nan], ids=repr)
def test_bad_stale_after_ms(value: Any) -> None:
    refused("after_ms", lambda: StaleOptions(after_ms=value))


def test_stale_after_zero_passes() -> None:
    assert StaleOptions(after_ms=0).after_ms == 0


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("requires_approval", {"requires_approval": "yes"}),
        ("requires_approval", {"requires_approval": 1}),
        ("concurrency", {"concurrency": StaleOptions()}),
        ("concurrency", {"concurrency": {"wait_timeout_ms": 5}}),
        ("stale", {"stale": ConcurrencyOptions()}),
        ("stale", {"stale": 60_000}),
    ],
    ids=[
        "str approval",
        "int approval",
        "wrong concurrency",
        "dict concurrency",
        "wrong stale",
        "int stale",
    ],
)
def test_bad_run_options(field: str, kwargs: dict[str, Any]) -> None:
    refused(field, lambda: RunOptions(**kwargs))


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("store", {"store": object()}),
        ("store", {"store": None}),
        ("store", {"store": "memory"}),
        ("max_args_size_bytes", {"max_args_size_bytes": 0}),
        ("max_args_size_bytes", {"max_args_size_bytes": -1}),
        ("max_args_size_bytes", {"max_args_size_bytes": 1.5}),
        ("max_args_size_bytes", {"max_args_size_bytes": True}),
        ("defaults", {"defaults": ConcurrencyOptions()}),
    ],
    ids=[
        "object store",
        "None store",
        "str store",
        "zero size",
        "negative size",
        "float size",
        "bool size",
        "wrong defaults",
    ],
)
def test_bad_ledger_options(field: str, kwargs: dict[str, Any]) -> None:
    kwargs = {"store": MemoryStore(), **kwargs}
    refused(field, lambda: EffectLedgerOptions(**kwargs))


def test_ledger_needs_ledger_options() -> None:
    refused("options", lambda: EffectLedger(MemoryStore()))  # type: ignore[arg-type]


# -- ledger entry points ------------------------------------------------------------------------


async def test_run_options_of_wrong_type(ledger: EffectLedger) -> None:
    good = call()
    for bad in ({"requires_approval": True}, ConcurrencyOptions(), True):
        await refused_async("run_options", ledger.run(good, not_called, bad))  # type: ignore[arg-type]
    assert await ledger.find_by_idem_key(ledger.idem_key(good)) is None


@pytest.mark.parametrize("handler", [None, "send", 42, {"a": 1}], ids=repr)
async def test_handler_not_callable(ledger: EffectLedger, handler: Any) -> None:
    good = call()
    await refused_async("handler", ledger.run(good, handler))
    assert await ledger.find_by_idem_key(ledger.idem_key(good)) is None


@pytest.mark.parametrize(
    "bad", [{"workflow_id": "w", "tool": "t", "args": {}}, None, "call"], ids=repr
)
async def test_call_must_be_a_tool_call(ledger: EffectLedger, bad: Any) -> None:
    await refused_async("call", ledger.run(bad, not_called))
    await refused_async("call", ledger.begin(bad))
    refused("call", lambda: ledger.idem_key(bad))


@pytest.mark.parametrize("value", ["", "   ", None, 5], ids=repr)
async def test_empty_or_non_string_ids(ledger: EffectLedger, value: Any) -> None:
    await refused_async("effect_id", ledger.get_effect(value))
    await refused_async("effect_id", ledger.history(value))
    await refused_async("effect_id", ledger.commit(value, CommitSucceeded("x")))
    await refused_async("idem_key", ledger.find_by_idem_key(value))
    await refused_async("idem_key", ledger.approve(value))
    await refused_async("idem_key", ledger.deny(value))
    await refused_async("idem_key", ledger.cancel(value))
    await refused_async("idem_key", ledger.request_approval(value))


async def pending_effect(ledger: EffectLedger) -> str:
    with pytest.raises(ApprovalPendingError):
        await ledger.run(
            call(),
            not_called,
            RunOptions(requires_approval=True, concurrency=ConcurrencyOptions(wait_timeout_ms=0)),
        )
    return ledger.idem_key(call())


async def assert_unchanged(ledger: EffectLedger, key: str, status: EffectStatus) -> None:
    effect = await ledger.find_by_idem_key(key)
    assert effect is not None
    assert effect.status is status
    assert len(await ledger.history(effect.id)) == 1


@pytest.mark.parametrize(
    "reason", [5, b"no", ["no"], "x" * 2_001], ids=["int", "bytes", "list", "too long"]
)
@pytest.mark.parametrize("decision", ["approve", "deny", "cancel"])
async def test_bad_reason(ledger: EffectLedger, decision: str, reason: Any) -> None:
    key = await pending_effect(ledger)
    await refused_async("reason", getattr(ledger, decision)(key, reason=reason))
    await assert_unchanged(ledger, key, EffectStatus.REQUIRES_APPROVAL)


@pytest.mark.parametrize("actor", ["", "  ", 7, object()], ids=["empty", "blank", "int", "object"])
async def test_bad_actor(ledger: EffectLedger, actor: Any) -> None:
    key = await pending_effect(ledger)
    await refused_async("actor", ledger.approve(key, actor=actor))
    await assert_unchanged(ledger, key, EffectStatus.REQUIRES_APPROVAL)


async def test_reason_of_max_length_passes(ledger: EffectLedger) -> None:
    key = await pending_effect(ledger)
    assert await ledger.deny(key, reason="x" * 2_000, actor=Actor("admin")) is True


@pytest.mark.parametrize(
    "outcome",
    [{"status": "succeeded", "result": 1}, "succeeded", None, EffectError("boom")],
    ids=["dict", "str", "None", "EffectError"],
)
async def test_commit_outcome_of_wrong_type(ledger: EffectLedger, outcome: Any) -> None:
    begun = await ledger.begin(call())
    await refused_async("outcome", ledger.commit(begun.effect.id, outcome))
    await assert_unchanged(ledger, begun.effect.idem_key, EffectStatus.PROCESSING)


@pytest.mark.parametrize("fence", ["1", 1.0, True], ids=repr)
async def test_commit_fence_of_wrong_type(ledger: EffectLedger, fence: Any) -> None:
    begun = await ledger.begin(call())
    await refused_async("fence", ledger.commit(begun.effect.id, CommitSucceeded(1), fence=fence))
    await assert_unchanged(ledger, begun.effect.idem_key, EffectStatus.PROCESSING)


@pytest.mark.parametrize("error", ["boom", None, {"message": "boom"}], ids=repr)
def test_commit_failed_needs_an_effect_error(error: Any) -> None:
    refused("error", lambda: CommitFailed(error=error))


async def test_store_that_is_not_a_store() -> None:
    class NotAStore:
        async def get(self, effect_id: str) -> None:
            return None

    refused("store", lambda: EffectLedgerOptions(store=NotAStore()))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: ToolCall(workflow_id="a|b", tool="c", args={}), "workflow_id"),
        (lambda: ToolCall(workflow_id="a", tool="b|c", args={}), "tool"),
        (
            lambda: ResourceDescriptor(namespace="gh/x", type="issue", id={"n": 1}),
            "resource.namespace",
        ),
        (lambda: ResourceDescriptor(namespace="gh", type="is/sue", id={"n": 1}), "resource.type"),
    ],
)
def test_key_separators_are_refused_so_parts_cannot_collide(
    build: Callable[[], object], field: str
) -> None:
    with pytest.raises(EffectLedgerValidationError) as info:
        build()
    assert info.value.field == field
