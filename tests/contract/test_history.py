"""History: every status change leaves one transition, in order, with who and why."""

from __future__ import annotations

import itertools
import uuid

import pytest

from agent_ledger import (
    Actor,
    ApprovalPendingError,
    EffectLedger,
    Transition,
)

from .helpers import Calls, make_call, never_called, options


async def _pending_key(ledger: EffectLedger) -> str:
    call = make_call()
    with pytest.raises(ApprovalPendingError):
        await ledger.run(call, never_called, options(0, requires_approval=True))
    return ledger.idem_key(call)


async def _history(ledger: EffectLedger, key: str) -> list[Transition]:
    effect = await ledger.find_by_idem_key(key)
    assert effect is not None
    history = await ledger.store.history(effect.id)
    assert await ledger.history(effect.id) == history
    return history


async def test_approval_records_actor_with_user_and_reason(ledger: EffectLedger) -> None:
    key = await _pending_key(ledger)
    admin = Actor("admin", user_id=42, name="Grace Hopper")

    assert await ledger.approve(key, actor=admin, reason="looks fine") is True
    assert await ledger.run(make_call(), Calls(result="ok").async_handler) == "ok"

    history = await _history(ledger, key)
    assert [(t.from_status, t.to_status) for t in history] == [
        (None, "requires_approval"),
        ("requires_approval", "ready"),
        ("ready", "processing"),
        ("processing", "succeeded"),
    ]
    assert [t.actor for t in history] == [
        Actor("system"),
        Actor("admin", user_id=42, name="Grace Hopper"),
        Actor("system"),
        Actor("system"),
    ]
    assert [t.reason for t in history] == [None, "looks fine", None, None]


async def test_deny_records_actor_label_and_reason(ledger: EffectLedger) -> None:
    key = await _pending_key(ledger)

    assert await ledger.deny(key, reason="Not authorized", actor="admin") is True

    history = await _history(ledger, key)
    assert [(t.from_status, t.to_status, t.actor, t.reason) for t in history] == [
        (None, "requires_approval", Actor("system"), None),
        ("requires_approval", "denied", Actor("admin"), "Not authorized"),
    ]


async def test_deny_with_an_actor_object(ledger: EffectLedger) -> None:
    key = await _pending_key(ledger)
    reviewer = Actor("api", user_id=9, name="Reviewer")

    assert await ledger.deny(key, reason="risky", actor=reviewer) is True

    history = await _history(ledger, key)
    assert history[-1].actor == reviewer
    assert history[-1].reason == "risky"


async def test_decision_without_actor_is_recorded_as_system(ledger: EffectLedger) -> None:
    key = await _pending_key(ledger)

    assert await ledger.approve(key) is True

    history = await _history(ledger, key)
    assert history[-1].actor == Actor("system")
    assert history[-1].reason is None


async def test_refused_decisions_leave_no_history(ledger: EffectLedger) -> None:
    key = await _pending_key(ledger)
    assert await ledger.approve(key, actor="admin") is True
    before = await _history(ledger, key)

    assert await ledger.approve(key, actor="admin", reason="again") is False
    assert await ledger.deny(key, reason="late", actor="admin") is False

    assert await _history(ledger, key) == before


async def test_transitions_are_ordered_in_time(ledger: EffectLedger) -> None:
    key = await _pending_key(ledger)
    await ledger.approve(key)
    await ledger.run(make_call(), Calls(result=1).async_handler)

    history = await _history(ledger, key)
    assert len(history) == 4
    assert all(earlier.at <= later.at for earlier, later in itertools.pairwise(history))


async def test_history_of_unknown_effect_is_empty(ledger: EffectLedger) -> None:
    assert await ledger.history(str(uuid.uuid4())) == []
