"""``DjangoStore`` beyond the contract suite: transactions, locks, races, threads, connections.

The race tests use real threads, each with its own connection, on whichever database
``DATABASE_URL`` names (SQLite serialises the writers; PostgreSQL takes the row locks).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, TypeVar
from unittest import mock

import pytest
from django.contrib.auth import get_user_model
from django.db import DatabaseError, InterfaceError, OperationalError, connection, connections
from django.db import transaction as db_transaction
from django.db.models import QuerySet
from django.test import override_settings
from django.utils import timezone

from agent_ledger import (
    Actor,
    CommitFailed,
    CommitSucceeded,
    EffectError,
    EffectLedgerValidationError,
    EffectNotFoundError,
    EffectStatus,
    EffectStoreError,
)
from agent_ledger.ledger import decision_request
from agent_ledger.models import Effect as EffectRow
from agent_ledger.models import EffectTransition
from agent_ledger.stores import _process
from agent_ledger.stores import django as django_store
from agent_ledger.stores.base import EffectStore
from agent_ledger.stores.django import DjangoStore
from agent_ledger.types import SYSTEM
from tests.effects import new_effect

_T = TypeVar("_T")

on_postgres = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="counts PostgreSQL backends"
)
pg_statements = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="the PostgreSQL single-statement path"
)


def decide(store: DjangoStore, name: str, idem_key: str, actor: Actor = SYSTEM) -> Any:
    request = decision_request(name, idem_key, actor=actor, reason=None)
    return store.transition_sync(idem_key, **request)


def history_of(effect_id: str) -> list[tuple[str | None, str, str | None]]:
    rows = EffectTransition.objects.filter(effect_id=effect_id).order_by("at", "id")
    return [(r.from_status, r.to_status, r.reason) for r in rows]


def in_threads(count: int, func: Callable[[int], _T]) -> list[_T]:
    """Run ``func(i)`` on ``count`` threads released together; each closes its connection."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = func(index)
        except BaseException as exc:
            results[index] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


@pytest.fixture(autouse=True)
def close_store_connections() -> Iterator[None]:
    """The store's threads keep connections briefly; close them before the tables are flushed."""
    yield
    django_store.close_connections()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The store's async calls on a single thread (a fresh pool of one)."""
    django_store.close_connections()
    with override_settings(AGENT_LEDGER={"ASYNC_THREADS": 1}):
        yield
    django_store.close_connections()


async def on_store_thread(func: Callable[[], _T]) -> _T:
    """Run ``func`` on the store's (only) thread, as a store call would be."""
    return await _process.in_thread(func)


# -- configuration -----------------------------------------------------------------------------


def test_is_an_effect_store() -> None:
    assert isinstance(DjangoStore(), EffectStore)


def test_alias_defaults_to_the_setting_read_at_call_time() -> None:
    store = DjangoStore()
    assert store.using == "default"
    with override_settings(AGENT_LEDGER={"DATABASE": "replica"}):
        assert store.using == "replica"
    assert DjangoStore(using="other").using == "other"
    assert repr(DjangoStore(using="other")) == "DjangoStore(using='other')"


# -- begin ---------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_begin_inserts_once_then_counts_replays() -> None:
    store = DjangoStore()
    new = new_effect()
    first = store.begin_sync(new)
    assert first.created
    assert first.effect.id == new.id
    assert first.effect.status is EffectStatus.PROCESSING
    assert (first.effect.fence, first.effect.dedup_count) == (1, 0)
    assert first.effect.created_at == first.effect.updated_at
    again = store.begin_sync(new_effect(idem_key=new.idem_key))
    assert not again.created
    assert again.effect.id == new.id
    assert again.effect.dedup_count == 1
    assert EffectRow.objects.count() == 1
    assert history_of(new.id) == [(None, "processing", None)]


@pytest.mark.django_db
def test_begin_refuses_a_row_that_breaks_another_constraint() -> None:
    bogus = new_effect(status=SimpleNamespace(value="bogus"))
    with pytest.raises(EffectStoreError) as caught:
        DjangoStore().begin_sync(bogus)
    assert caught.value.operation == "begin"
    assert isinstance(caught.value.__cause__, DatabaseError)
    assert not EffectRow.objects.exists()
    assert not EffectTransition.objects.exists()


# -- one transaction per change ----------------------------------------------------------------


@pytest.mark.django_db
def test_changes_and_history_roll_back_with_the_callers_transaction() -> None:
    store = DjangoStore()
    kept = store.begin_sync(new_effect(status=EffectStatus.REQUIRES_APPROVAL)).effect
    with pytest.raises(RuntimeError), db_transaction.atomic():
        store.begin_sync(new_effect())
        decide(store, "approve", kept.idem_key)
        raise RuntimeError("the request failed")
    assert EffectRow.objects.count() == 1
    assert store.get_sync(kept.id).status is EffectStatus.REQUIRES_APPROVAL
    assert history_of(kept.id) == [(None, "requires_approval", None)]


@pytest.mark.django_db
@pytest.mark.parametrize("operation", ["begin", "commit", "transition", "claim"])
def test_a_failing_history_row_undoes_the_change(operation: str) -> None:
    store = DjangoStore()
    effect = store.begin_sync(new_effect()).effect
    if operation == "claim":
        decide(store, "request_approval", effect.idem_key)
        decide(store, "approve", effect.idem_key)
    before = store.get_sync(effect.id)
    steps = len(history_of(effect.id))
    calls: dict[str, Callable[[], Any]] = {
        "begin": lambda: store.begin_sync(new_effect()),
        "commit": lambda: store.commit_sync(
            effect.id, CommitSucceeded({"ok": 1}), fence=1, actor=SYSTEM
        ),
        "transition": lambda: decide(store, "cancel", effect.idem_key),
        "claim": lambda: store.claim_sync(effect.id, stale_after_ms=0, actor=SYSTEM),
    }
    broken = mock.patch.object(EffectTransition, "save", side_effect=OperationalError("disk full"))
    with broken, pytest.raises(EffectStoreError) as caught:
        calls[operation]()
    assert caught.value.operation == operation
    assert isinstance(caught.value.__cause__, OperationalError)
    assert store.get_sync(effect.id) == before
    assert len(history_of(effect.id)) == steps
    assert EffectRow.objects.count() == 1


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("error", [OperationalError, InterfaceError, DatabaseError])
def test_database_errors_become_store_errors_with_the_cause_chained(
    error: type[Exception],
) -> None:
    store = DjangoStore()
    effect_id = str(uuid.uuid4())
    failing = mock.patch.object(QuerySet, "first", side_effect=error("server went away"))
    with failing, pytest.raises(EffectStoreError, match="server went away") as caught:
        store.get_sync(effect_id)
    assert caught.value.operation == "get"
    assert isinstance(caught.value.__cause__, error)


async def test_a_connection_broken_mid_call_does_not_poison_the_next(
    transactional_db: None, one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Persistent connections, so only the error handling (not CONN_MAX_AGE) replaces it.
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", None)
    store = DjangoStore()
    effect = (await store.begin(new_effect())).effect
    assert len(await store.history(effect.id)) == 1  # history runs on the thread's connection

    def break_it() -> object:
        broken = connection.connection
        broken.close()  # what the server going away looks like to the driver
        return broken

    broken = await on_store_thread(break_it)
    with pytest.raises(EffectStoreError) as caught:
        await store.history(effect.id)
    assert isinstance(caught.value.__cause__, DatabaseError)
    assert len(await store.history(effect.id)) == 1
    fresh = await on_store_thread(lambda: connection.connection)
    assert fresh is not None and fresh is not broken


# -- reads, actors, ids ------------------------------------------------------------------------


@pytest.mark.django_db
def test_ids_that_are_not_uuids_name_nothing() -> None:
    store = DjangoStore()
    assert store.get_sync("not-a-uuid") is None
    assert store.get_by_idem_key_sync("nope") is None
    assert store.commit_sync("x", CommitSucceeded(1), fence=None, actor=SYSTEM) is None
    assert store.claim_sync("x", stale_after_ms=1, actor=SYSTEM) is None
    assert store.history_sync("x") == []
    with pytest.raises(EffectNotFoundError):
        decide(store, "approve", "no-such-key")


@pytest.mark.django_db
def test_actor_is_kept_on_every_history_row() -> None:
    user = get_user_model().objects.create_user("ann")
    store = DjangoStore()
    effect = store.begin_sync(new_effect(status=EffectStatus.REQUIRES_APPROVAL)).effect
    ann = Actor("admin", user_id=user.pk, name="Ann")
    store.transition_sync(
        effect.idem_key, **decision_request("approve", effect.idem_key, actor=ann, reason="ok")
    )
    approved = store.history_sync(effect.id)[-1]
    assert approved.actor == ann
    assert approved.reason == "ok"
    assert (approved.from_status, approved.to_status) == (
        EffectStatus.REQUIRES_APPROVAL,
        EffectStatus.READY,
    )
    row = EffectTransition.objects.get(effect_id=effect.id, to_status="ready")
    assert (row.actor_label, row.actor_user, row.actor_name) == ("admin", user, "Ann")
    # Deleting the user keeps the row and the name (SET_NULL on a constraint-free column).
    user.delete()
    assert store.history_sync(effect.id)[-1].actor == Actor("admin", None, "Ann")


@pytest.mark.django_db
def test_a_user_id_that_cannot_be_a_user_pk_is_refused_before_writing() -> None:
    store = DjangoStore()
    effect = store.begin_sync(new_effect(status=EffectStatus.REQUIRES_APPROVAL)).effect
    with pytest.raises(EffectLedgerValidationError) as caught:
        decide(store, "approve", effect.idem_key, actor=Actor("api", user_id="bob"))
    assert caught.value.field == "actor.user_id"
    assert store.get_sync(effect.id).status is EffectStatus.REQUIRES_APPROVAL
    assert len(history_of(effect.id)) == 1


# -- transitions, commits, claims ------------------------------------------------------------


@pytest.mark.django_db
def test_transition_reports_the_current_state_when_already_decided() -> None:
    store = DjangoStore()
    effect = store.begin_sync(new_effect(status=EffectStatus.REQUIRES_APPROVAL)).effect
    denied = decide(store, "deny", effect.idem_key)
    assert denied.changed
    assert denied.effect.status is EffectStatus.DENIED
    assert denied.effect.error == EffectError("denied", code="denied")
    assert denied.effect.completed_at is not None
    late = decide(store, "approve", effect.idem_key)
    assert not late.changed
    assert late.effect == denied.effect
    assert [step[:2] for step in history_of(effect.id)] == [
        (None, "requires_approval"),
        ("requires_approval", "denied"),
    ]


@pytest.mark.django_db
def test_commit_needs_processing_and_the_current_fence() -> None:
    store = DjangoStore()
    effect = store.begin_sync(new_effect()).effect
    assert store.commit_sync(effect.id, CommitSucceeded(1), fence=2, actor=SYSTEM) is None
    failed = store.commit_sync(
        effect.id, CommitFailed(EffectError("boom", "E1")), fence=1, actor=SYSTEM
    )
    assert failed is not None
    assert failed.status is EffectStatus.FAILED
    assert failed.error == EffectError("boom", "E1")
    assert failed.completed_at is not None
    assert failed.updated_at >= effect.updated_at
    assert store.commit_sync(effect.id, CommitSucceeded(1), fence=None, actor=SYSTEM) is None
    assert history_of(effect.id) == [(None, "processing", None), ("processing", "failed", None)]


@pytest.mark.django_db
def test_claim_of_a_ready_effect_raises_the_fence() -> None:
    store = DjangoStore()
    effect = store.begin_sync(new_effect(status=EffectStatus.REQUIRES_APPROVAL)).effect
    assert store.claim_sync(effect.id, stale_after_ms=0, actor=SYSTEM) is None
    decide(store, "approve", effect.idem_key)
    claimed = store.claim_sync(effect.id, stale_after_ms=0, actor=SYSTEM)
    assert claimed is not None
    assert (claimed.status, claimed.fence) == (EffectStatus.PROCESSING, 2)
    assert store.claim_sync(effect.id, stale_after_ms=0, actor=SYSTEM) is None
    assert history_of(effect.id)[-1] == ("ready", "processing", None)


@pytest.mark.django_db
def test_stale_takeover_by_the_database_clock() -> None:
    store = DjangoStore()
    effect = store.begin_sync(new_effect()).effect
    # However far the application's clock runs ahead, the database says it is fresh.
    future = timezone.now() + timedelta(days=1)
    with mock.patch("django.utils.timezone.now", return_value=future):
        assert store.claim_sync(effect.id, stale_after_ms=1_000, actor=SYSTEM) is None
    EffectRow.objects.filter(pk=effect.id).update(updated_at=timezone.now() - timedelta(seconds=5))
    assert store.claim_sync(effect.id, stale_after_ms=0, actor=SYSTEM) is None
    assert store.claim_sync(effect.id, stale_after_ms=60_000, actor=SYSTEM) is None
    taken = store.claim_sync(effect.id, stale_after_ms=1_000, actor=Actor("worker-2"))
    assert taken is not None
    assert taken.fence == 2
    assert timezone.now() - taken.updated_at < timedelta(seconds=5)
    assert history_of(effect.id)[-1] == ("processing", "processing", "stale takeover")
    # The old owner's commit is refused; the new owner's is not.
    assert store.commit_sync(effect.id, CommitSucceeded("old"), fence=1, actor=SYSTEM) is None
    assert store.commit_sync(effect.id, CommitSucceeded("new"), fence=2, actor=SYSTEM)


@pytest.mark.django_db(transaction=True)
def test_threads_racing_on_one_key_create_it_once() -> None:
    store = DjangoStore()
    key = hashlib.sha256(b"race").hexdigest()
    records = in_threads(8, lambda _: store.begin_sync(new_effect(idem_key=key)))
    assert sum(record.created for record in records) == 1
    assert len({record.effect.id for record in records}) == 1
    row = EffectRow.objects.get(idem_key=key)
    assert row.dedup_count == 7
    assert history_of(str(row.pk)) == [(None, "processing", None)]


@pytest.mark.django_db(transaction=True)
def test_approve_racing_deny_has_exactly_one_winner() -> None:
    store = DjangoStore()
    for _ in range(5):
        effect = store.begin_sync(new_effect(status=EffectStatus.REQUIRES_APPROVAL)).effect
        key = effect.idem_key
        records = in_threads(2, lambda i, key=key: decide(store, ("approve", "deny")[i], key))
        assert sum(record.changed for record in records) == 1
        final = store.get_sync(effect.id)
        winner = next(record for record in records if record.changed)
        assert final == winner.effect
        loser = next(record for record in records if not record.changed)
        assert loser.effect.status is final.status
        decisions = [step for step in history_of(effect.id) if step[0] == "requires_approval"]
        assert len(decisions) == 1


@pytest.mark.django_db(transaction=True)
def test_threads_racing_to_claim_a_ready_effect_have_one_owner() -> None:
    store = DjangoStore()
    effect = store.begin_sync(new_effect(status=EffectStatus.REQUIRES_APPROVAL)).effect
    decide(store, "approve", effect.idem_key)
    claims = in_threads(8, lambda _: store.claim_sync(effect.id, stale_after_ms=0, actor=SYSTEM))
    owners = [claim for claim in claims if claim is not None]
    assert len(owners) == 1
    assert owners[0].fence == 2
    assert [step for step in history_of(effect.id) if step[1] == "processing"] == [
        ("ready", "processing", None)
    ]


@pytest.mark.django_db(transaction=True)
def test_a_decision_waits_for_the_row_lock_held_by_another_connection() -> None:
    store = DjangoStore()
    effect = store.begin_sync(new_effect(status=EffectStatus.REQUIRES_APPROVAL)).effect
    locked = threading.Event()

    def deny_slowly(_: int) -> None:
        with db_transaction.atomic():
            EffectRow.objects.select_for_update().get(pk=effect.id)
            locked.set()
            time.sleep(0.5)
            EffectRow.objects.filter(pk=effect.id).update(status="denied")

    def approve(_: int) -> Any:
        locked.wait(10)
        return decide(store, "approve", effect.idem_key)

    # Had the approve not waited for the lock, it would have found the effect still awaiting
    # approval and approved it; it waited, so it finds it denied and changes nothing.
    record = in_threads(2, lambda i: (deny_slowly, approve)[i](i))[1]
    assert not record.changed
    assert record.effect.status is EffectStatus.DENIED


# -- threads and connections -------------------------------------------------------------------


async def test_async_calls_run_off_the_event_loop_on_several_threads(
    transactional_db: None,
) -> None:
    """Eight calls in flight at once meet at a barrier of eight: only possible if each has a
    thread of its own (one thread would serialise them and the barrier would break)."""
    store = DjangoStore()
    seen: set[int] = set()
    barrier = threading.Barrier(8, timeout=30)
    original = DjangoStore.history_sync

    def meeting_history(self: DjangoStore, effect_id: str) -> Any:
        seen.add(threading.get_ident())
        barrier.wait()
        return original(self, effect_id)

    with mock.patch.object(DjangoStore, "history_sync", meeting_history):
        await asyncio.gather(*(store.history(str(uuid.uuid4())) for _ in range(8)))
    assert threading.get_ident() not in seen
    assert len(seen) == 8
