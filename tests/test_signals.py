"""Signals go out after the change commits, once per change, and never for a rolled-back one."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import transaction as db_transaction
from django.dispatch import Signal

from agent_ledger import Actor, CommitFailed, CommitSucceeded, EffectError, EffectStatus
from agent_ledger import signals as ledger_signals
from agent_ledger.ledger import decision_request
from agent_ledger.models import Effect as EffectRow
from agent_ledger.stores.base import NewEffect
from agent_ledger.stores.django import DjangoStore, close_connections
from agent_ledger.types import SYSTEM
from tests.effects import new_effect

ALL = [
    "approval_requested",
    "effect_approved",
    "effect_denied",
    "effect_canceled",
    "effect_succeeded",
    "effect_failed",
]
ANN = Actor("admin", name="Ann")


@pytest.fixture(autouse=True)
def close_store_connections() -> Iterator[None]:
    """The store's threads keep connections briefly; close them before the test database goes."""
    yield
    close_connections()


def decide(name: str, idem_key: str, actor: Actor = ANN) -> Any:
    request = decision_request(name, idem_key, actor=actor, reason=None)
    return DjangoStore().transition_sync(idem_key, **request)


@pytest.fixture
def received() -> Iterator[list[tuple[str, Any, Any, Actor]]]:
    """Every signal sent, as (name, sender, effect, actor)."""
    log: list[tuple[str, Any, Any, Actor]] = []
    handlers: list[tuple[Signal, Callable[..., None]]] = []
    for name in ALL:

        def handler(sender: Any, effect: Any, actor: Actor, _name: str = name, **kw: Any) -> None:
            log.append((_name, sender, effect, actor))

        signal = getattr(ledger_signals, name)
        signal.connect(handler, weak=False)
        handlers.append((signal, handler))
    yield log
    for signal, handler in handlers:
        signal.disconnect(handler)


@pytest.mark.django_db
def test_each_moment_sends_its_signal_after_commit(
    received: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    store = DjangoStore()
    with django_capture_on_commit_callbacks(execute=True):
        asked = store.begin_sync(new_effect(EffectStatus.REQUIRES_APPROVAL)).effect
        approved = decide("approve", asked.idem_key)
        claimed = store.claim_sync(asked.id, stale_after_ms=0, actor=SYSTEM)
        assert claimed is not None
        succeeded = store.commit_sync(asked.id, CommitSucceeded(1), fence=2, actor=SYSTEM)

        running = store.begin_sync(new_effect()).effect
        store.begin_sync(
            NewEffect(**{**new_effect().__dict__, "idem_key": running.idem_key})
        )  # a replay
        parked = decide("request_approval", running.idem_key, SYSTEM)
        denied = decide("deny", running.idem_key)

        other = store.begin_sync(new_effect()).effect
        failed = store.commit_sync(
            other.id, CommitFailed(EffectError("boom")), fence=1, actor=SYSTEM
        )
        last = store.begin_sync(new_effect()).effect
        canceled = decide("cancel", last.idem_key)

    assert [(name, sender, effect, actor) for name, sender, effect, actor in received] == [
        ("approval_requested", EffectRow, asked, SYSTEM),
        ("effect_approved", EffectRow, approved.effect, ANN),
        ("effect_succeeded", EffectRow, succeeded, SYSTEM),
        ("approval_requested", EffectRow, parked.effect, SYSTEM),
        ("effect_denied", EffectRow, denied.effect, ANN),
        ("effect_failed", EffectRow, failed, SYSTEM),
        ("effect_canceled", EffectRow, canceled.effect, ANN),
    ]


@pytest.mark.django_db
def test_nothing_is_sent_until_the_transaction_commits(
    received: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks() as callbacks:
        effect = DjangoStore().begin_sync(new_effect(EffectStatus.REQUIRES_APPROVAL)).effect
        decide("approve", effect.idem_key)
    assert received == []
    for callback in callbacks:
        callback()
    assert [name for name, *_ in received] == ["approval_requested", "effect_approved"]


@pytest.mark.django_db
def test_a_refused_change_sends_nothing(
    received: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    store = DjangoStore()
    effect = store.begin_sync(new_effect()).effect
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert not decide("approve", effect.idem_key).changed
        assert store.commit_sync(effect.id, CommitSucceeded(1), fence=7, actor=SYSTEM) is None
    assert callbacks == []
    assert received == []


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_transition_sends_nothing(received: list[Any]) -> None:
    effect = DjangoStore().begin_sync(new_effect(EffectStatus.REQUIRES_APPROVAL)).effect
    received.clear()
    with pytest.raises(RuntimeError), db_transaction.atomic():
        assert decide("approve", effect.idem_key).changed
        raise RuntimeError("the request failed after approving")
    assert received == []
    assert DjangoStore().get_sync(effect.id).status is EffectStatus.REQUIRES_APPROVAL
    assert decide("deny", effect.idem_key).changed
    assert [name for name, *_ in received] == ["effect_denied"]


@pytest.mark.django_db(transaction=True)
def test_a_failing_receiver_is_logged_and_the_change_stands(
    received: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(**kwargs: Any) -> None:
        raise ValueError("receiver bug")

    ledger_signals.effect_approved.connect(broken, weak=False)
    try:
        effect = DjangoStore().begin_sync(new_effect(EffectStatus.REQUIRES_APPROVAL)).effect
        with caplog.at_level(logging.ERROR, logger="agent_ledger.stores.django"):
            record = decide("approve", effect.idem_key)
    finally:
        ledger_signals.effect_approved.disconnect(broken)
    assert record.changed
    assert DjangoStore().get_sync(effect.id).status is EffectStatus.READY
    assert "receiver bug" in caplog.text
    assert [name for name, *_ in received] == ["approval_requested", "effect_approved"]


@pytest.mark.django_db(transaction=True)
async def test_async_calls_send_signals_too(received: list[Any]) -> None:
    store = DjangoStore()
    effect = (await store.begin(new_effect(EffectStatus.REQUIRES_APPROVAL))).effect
    request = decision_request("deny", effect.idem_key, actor=ANN, reason="no")
    denied = await store.transition(effect.idem_key, **request)
    assert [(name, e, actor) for name, _, e, actor in received] == [
        ("approval_requested", effect, SYSTEM),
        ("effect_denied", denied.effect, ANN),
    ]


async def test_async_calls_send_the_same_signals_where_receivers_may_use_the_orm(
    transactional_db: None,
) -> None:
    """On PostgreSQL the async begin and commit run on the event loop; their signals still
    reach receivers off the loop (a receiver querying the ORM would fail on it) and after
    the change committed (the receiver sees it)."""
    seen: list[tuple[str, str, str]] = []

    def receiver(sender: Any, effect: Any, actor: Actor, signal: Signal, **kw: Any) -> None:
        stored = EffectRow.objects.get(pk=effect.id).status  # sync ORM: not on the loop
        seen.append((names[signal], effect.status.value, stored))

    names = {getattr(ledger_signals, name): name for name in ALL}
    for signal in names:
        signal.connect(receiver, weak=False)
    try:
        store = DjangoStore()
        asked = (await store.begin(new_effect(EffectStatus.REQUIRES_APPROVAL))).effect
        running = (await store.begin(new_effect())).effect
        await store.commit(running.id, CommitSucceeded(1), fence=1, actor=SYSTEM)
        other = (await store.begin(new_effect())).effect
        await store.commit(other.id, CommitFailed(EffectError("boom")), fence=1, actor=SYSTEM)
    finally:
        for signal in names:
            signal.disconnect(receiver)
    assert asked.status is EffectStatus.REQUIRES_APPROVAL
    assert seen == [
        ("approval_requested", "requires_approval", "requires_approval"),
        ("effect_succeeded", "succeeded", "succeeded"),
        ("effect_failed", "failed", "failed"),
    ]
