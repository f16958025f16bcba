"""The manual flow: ``begin`` then ``commit``, and commit's refusals."""

from __future__ import annotations

import uuid

import pytest

from agent_ledger import (
    Actor,
    ApprovalPendingError,
    CommitFailed,
    CommitSucceeded,
    EffectError,
    EffectFailedError,
    EffectLedger,
    EffectLedgerOptions,
    EffectLedgerValidationError,
    EffectStatus,
)

from .helpers import checked_history, make_call, never_called, options


async def test_begin_fresh_then_commit_success(ledger: EffectLedger) -> None:
    call = make_call()

    begun = await ledger.begin(call)

    assert (begun.cached, begun.claimed, begun.idempotency_status) == (False, True, "fresh")
    assert begun.cached_result is None
    assert begun.effect.status is EffectStatus.PROCESSING
    assert begun.effect.idem_key == ledger.idem_key(call)
    assert begun.effect.dedup_count == 0
    assert begun.effect.completed_at is None

    assert await ledger.commit(begun.effect.id, CommitSucceeded({"ok": True})) is True

    effect = await ledger.get_effect(begun.effect.id)
    assert effect is not None
    assert effect.status is EffectStatus.SUCCEEDED
    assert effect.result == {"ok": True}
    assert effect.completed_at is not None

    again = await ledger.begin(call)
    assert (again.cached, again.claimed, again.idempotency_status) == (True, False, "replayed")
    assert again.cached_result == {"ok": True}
    assert again.effect.id == begun.effect.id
    assert again.effect.dedup_count == 1
    assert await ledger.run(call, never_called) == {"ok": True}


async def test_begin_then_commit_failure(ledger: EffectLedger) -> None:
    call = make_call()
    begun = await ledger.begin(call)

    failed = CommitFailed(EffectError(message="quota exceeded", code="quota"))
    assert await ledger.commit(begun.effect.id, failed) is True

    again = await ledger.begin(call)
    assert (again.cached, again.claimed, again.cached_result) == (True, False, None)
    assert again.effect.status is EffectStatus.FAILED
    assert again.effect.error == EffectError("quota exceeded", "quota")
    with pytest.raises(EffectFailedError) as raised:
        await ledger.run(call, never_called)
    assert raised.value.code == "quota"


async def test_begin_while_another_caller_processes(ledger: EffectLedger) -> None:
    call = make_call()
    first = await ledger.begin(call)

    second = await ledger.begin(call)

    assert (second.cached, second.claimed, second.idempotency_status) == (
        False,
        False,
        "replayed",
    )
    assert second.effect.id == first.effect.id
    assert second.effect.status is EffectStatus.PROCESSING
    assert second.effect.dedup_count == 1


async def test_begin_on_an_approved_effect_claims_it(ledger: EffectLedger) -> None:
    call = make_call()
    key = ledger.idem_key(call)
    with pytest.raises(ApprovalPendingError):
        await ledger.run(call, never_called, options(0, requires_approval=True))
    pending = await ledger.begin(call)
    assert (pending.cached, pending.claimed) == (False, False)
    assert pending.effect.status is EffectStatus.REQUIRES_APPROVAL

    assert await ledger.approve(key) is True
    begun = await ledger.begin(call)

    assert begun.claimed is True
    assert begun.cached is False
    assert begun.effect.status is EffectStatus.PROCESSING
    assert begun.effect.fence > pending.effect.fence
    # A second begin finds it processing: claimed by the first one only.
    assert (await ledger.begin(call)).claimed is False
    assert await ledger.commit(begun.effect.id, CommitSucceeded("deployed")) is True
    assert await ledger.run(call, never_called) == "deployed"


async def test_second_commit_returns_false_and_changes_nothing(ledger: EffectLedger) -> None:
    begun = await ledger.begin(make_call())
    assert await ledger.commit(begun.effect.id, CommitSucceeded("first")) is True
    before = await ledger.get_effect(begun.effect.id)
    history = await ledger.store.history(begun.effect.id)

    assert await ledger.commit(begun.effect.id, CommitSucceeded("second")) is False
    assert await ledger.commit(begun.effect.id, CommitFailed(EffectError("late"))) is False
    assert await ledger.commit(begun.effect.id, CommitSucceeded("x"), fence=begun.effect.fence) is (
        False
    )

    assert await ledger.get_effect(begun.effect.id) == before
    assert await ledger.store.history(begun.effect.id) == history


async def test_commit_of_an_effect_awaiting_approval_returns_false(ledger: EffectLedger) -> None:
    call = make_call()
    key = ledger.idem_key(call)
    with pytest.raises(ApprovalPendingError):
        await ledger.run(call, never_called, options(0, requires_approval=True))
    pending = await ledger.find_by_idem_key(key)
    assert pending is not None

    assert await ledger.commit(pending.id, CommitSucceeded("sneaky")) is False
    assert await ledger.find_by_idem_key(key) == pending

    assert await ledger.approve(key) is True
    ready = await ledger.find_by_idem_key(key)
    assert ready is not None
    assert await ledger.commit(pending.id, CommitSucceeded("sneaky")) is False
    assert await ledger.find_by_idem_key(key) == ready


async def test_commit_of_an_unknown_effect_returns_false(ledger: EffectLedger) -> None:
    assert await ledger.commit(str(uuid.uuid4()), CommitSucceeded("x")) is False


async def test_commit_with_explicit_fence(ledger: EffectLedger) -> None:
    begun = await ledger.begin(make_call())

    wrong = await ledger.commit(begun.effect.id, CommitSucceeded("x"), fence=begun.effect.fence + 1)
    assert wrong is False
    current = await ledger.get_effect(begun.effect.id)
    assert current is not None
    assert current.status is EffectStatus.PROCESSING

    assert await ledger.commit(begun.effect.id, CommitSucceeded("y"), fence=begun.effect.fence)
    done = await ledger.get_effect(begun.effect.id)
    assert done is not None
    assert done.result == "y"


async def test_commit_from_another_ledger_on_the_same_store(ledger: EffectLedger) -> None:
    """A ledger that did not begin the effect (another process) commits it unfenced."""
    other = EffectLedger(EffectLedgerOptions(store=ledger.store))
    begun = await ledger.begin(make_call())

    assert await other.commit(begun.effect.id, CommitSucceeded("from elsewhere")) is True
    assert await ledger.commit(begun.effect.id, CommitSucceeded("mine")) is False
    effect = await ledger.get_effect(begun.effect.id)
    assert effect is not None
    assert effect.result == "from elsewhere"


async def test_commit_of_a_non_json_result_fails_the_effect(ledger: EffectLedger) -> None:
    call = make_call()
    begun = await ledger.begin(call)

    with pytest.raises(EffectLedgerValidationError) as raised:
        await ledger.commit(begun.effect.id, CommitSucceeded({"when": {1, 2}}))

    assert raised.value.field == "result.when"
    effect = await ledger.get_effect(begun.effect.id)
    assert effect is not None
    assert effect.status is EffectStatus.FAILED  # never left processing
    assert effect.error is not None
    assert effect.error.code == "result_not_json"
    with pytest.raises(EffectFailedError) as replayed:
        await ledger.run(call, never_called)
    assert replayed.value.code == "result_not_json"


async def test_commit_actor_is_recorded(ledger: EffectLedger) -> None:
    begun = await ledger.begin(make_call())

    assert await ledger.commit(begun.effect.id, CommitSucceeded(1), actor="worker-3") is True

    effect = await ledger.get_effect(begun.effect.id)
    assert effect is not None
    assert await checked_history(ledger, effect) == [
        (None, "processing", "system", None),
        ("processing", "succeeded", "worker-3", None),
    ]


@pytest.mark.parametrize(
    "outcome",
    [
        CommitSucceeded({"id": 2**60, "items": [1.5, "é", None, {"b": True, "a": []}]}),
        CommitSucceeded(None),
        CommitFailed(EffectError("card declined", code="card_declined")),
    ],
    ids=["nested result", "null result", "failure"],
)
async def test_what_the_store_hands_back_is_what_it_stored(
    ledger: EffectLedger, outcome: CommitSucceeded | CommitFailed
) -> None:
    """Stores may build the effects they return from what they already know instead of
    reading every column back; what they hand out must still equal the stored row."""
    store = ledger.store
    call = make_call(n=str(uuid.uuid4()))
    begun = await ledger.begin(call)
    assert begun.effect == await store.get(begun.effect.id)
    committed = await store.commit(
        begun.effect.id, outcome, fence=begun.effect.fence, actor=Actor("system")
    )
    assert committed is not None
    assert committed == await store.get(begun.effect.id)
    # The same after a claim (an approved effect, taken by its runner).
    gated = await ledger.begin(make_call(n=str(uuid.uuid4())))
    assert await ledger.request_approval(gated.effect.idem_key)
    assert await ledger.approve(gated.effect.idem_key)
    claimed = await store.claim(gated.effect.id, stale_after_ms=0, actor=Actor("system"))
    assert claimed is not None and claimed == await store.get(gated.effect.id)
    finished = await store.commit(claimed.id, outcome, fence=claimed.fence, actor=Actor("system"))
    assert finished is not None and finished == await store.get(claimed.id)
