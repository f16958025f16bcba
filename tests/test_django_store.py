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
    EffectLedger,
    EffectLedgerOptions,
    EffectLedgerValidationError,
    EffectNotFoundError,
    EffectStatus,
    EffectStoreError,
    ToolCall,
)
from agent_ledger.ledger import decision_request
from agent_ledger.models import Effect as EffectRow
from agent_ledger.models import EffectTransition
from agent_ledger.stores import django as django_store
from agent_ledger.stores.base import EffectStore, NewEffect
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
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Run the store's async calls on one known thread that goes idle after 50 ms."""
    executor = django_store._LedgerThreads(1, idle_close_s=0.05)
    monkeypatch.setattr(django_store, "_executor", executor)
    yield executor
    executor.shutdown()


async def on_thread(executor: Any, func: Callable[[], _T]) -> _T:
    return await asyncio.wrap_future(executor.submit(func))


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
    transactional_db: None, one_thread: Any, monkeypatch: pytest.MonkeyPatch
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

    broken = await on_thread(one_thread, break_it)
    with pytest.raises(EffectStoreError) as caught:
        await store.history(effect.id)
    assert isinstance(caught.value.__cause__, DatabaseError)
    assert len(await store.history(effect.id)) == 1
    fresh = await on_thread(one_thread, lambda: connection.connection)
    assert fresh is not None and fresh is not broken


async def test_a_burst_reuses_the_connection_and_idling_closes_it(
    transactional_db: None, one_thread: Any
) -> None:
    assert connection.settings_dict["CONN_MAX_AGE"] == 0
    store = DjangoStore()
    opened = []

    def begin_and_look(new: NewEffect) -> object:
        store.begin_sync(new)
        opened.append(connection.connection)
        return connection.connection

    calls = [
        asyncio.wrap_future(one_thread.submit(django_store._in_worker, begin_and_look, new))
        for new in [new_effect() for _ in range(5)]
    ]
    await asyncio.gather(*calls)
    assert len({id(c) for c in opened}) == 1
    await asyncio.sleep(0.2)
    assert await on_thread(one_thread, lambda: connection.connection) is None


async def test_persistent_connections_are_kept_when_idle(
    transactional_db: None, one_thread: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", None)
    store = DjangoStore()
    await store.history(str(uuid.uuid4()))
    first = await on_thread(one_thread, lambda: connection.connection)
    await asyncio.sleep(0.2)
    await store.history(str(uuid.uuid4()))
    assert await on_thread(one_thread, lambda: connection.connection) is first


async def test_shutting_the_threads_down_closes_their_connections(
    transactional_db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", None)
    closed: list[bool] = []
    original = connections.close_all

    def spy() -> None:
        original()
        closed.append(True)

    store = DjangoStore()
    await asyncio.gather(*(store.history(str(uuid.uuid4())) for _ in range(4)))
    threads = len(django_store._get_executor()._threads)
    with mock.patch.object(connections, "close_all", spy):
        await asyncio.to_thread(django_store.close_connections)
    assert len(closed) == threads >= 1
    assert django_store._executor is None
    assert (await store.begin(new_effect())).created  # new threads on the next call


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


async def test_concurrent_claims_through_one_store_share_one_round_trip(
    transactional_db: None,
) -> None:
    store = DjangoStore()
    effect = (await store.begin(new_effect(status=EffectStatus.REQUIRES_APPROVAL))).effect
    request = decision_request("approve", effect.idem_key, actor=SYSTEM, reason=None)
    await store.transition(effect.idem_key, **request)
    original = DjangoStore.claim_sync
    attempts = 0

    def counted(self: DjangoStore, *args: Any, **kwargs: Any) -> Any:
        nonlocal attempts
        attempts += 1
        time.sleep(0.05)
        return original(self, *args, **kwargs)

    with mock.patch.object(DjangoStore, "claim_sync", counted):
        claims = await asyncio.gather(
            *(store.claim(effect.id, stale_after_ms=0, actor=SYSTEM) for _ in range(10))
        )
        assert attempts == 1
        assert len([claim for claim in claims if claim is not None]) == 1
        # Once it is settled, the next claim asks the database again.
        assert await store.claim(effect.id, stale_after_ms=0, actor=SYSTEM) is None
        assert attempts == 2


# -- races between connections -------------------------------------------------------------------


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

    def approve(_: int) -> tuple[float, Any]:
        locked.wait(10)
        started = time.monotonic()
        record = decide(store, "approve", effect.idem_key)
        return time.monotonic() - started, record

    results = in_threads(2, lambda i: (deny_slowly, approve)[i](i))
    waited, record = results[1]
    assert waited >= 0.3
    assert not record.changed
    assert record.effect.status is EffectStatus.DENIED


# -- threads and connections -------------------------------------------------------------------


async def test_async_calls_run_off_the_event_loop_on_several_threads(
    transactional_db: None,
) -> None:
    store = DjangoStore()
    seen: set[int] = set()
    original = DjangoStore.history_sync

    def slow_history(self: DjangoStore, effect_id: str) -> Any:
        seen.add(threading.get_ident())
        time.sleep(0.2)
        return original(self, effect_id)

    with mock.patch.object(DjangoStore, "history_sync", slow_history):
        started = time.monotonic()
        await asyncio.gather(*(store.history(str(uuid.uuid4())) for _ in range(8)))
        elapsed = time.monotonic() - started
    assert threading.get_ident() not in seen
    assert len(seen) == 8
    assert elapsed < 8 * 0.2 / 2


def _pg_backends_counter() -> Callable[[], Any]:
    import psycopg

    info = connection.settings_dict
    test_db = info["NAME"]

    async def count() -> int:
        async with await psycopg.AsyncConnection.connect(
            host=info["HOST"] or None,
            port=info["PORT"] or None,
            user=info["USER"] or None,
            password=info["PASSWORD"] or None,
            dbname="postgres",
            autocommit=True,
        ) as conn:
            cursor = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (test_db,)
            )
            row = await cursor.fetchone()
            return int(row[0]) if row else 0

    return count


async def _run_calls(count: int) -> None:
    ledger = EffectLedger(EffectLedgerOptions(store=DjangoStore()))

    async def handler(effect: Any) -> str:
        return effect.id

    await asyncio.gather(
        *(
            ledger.run(ToolCall(workflow_id="leak", tool="t", args={"n": n}), handler)
            for n in range(count)
        )
    )


async def _settles_at(count: Callable[[], Any], expected: int, timeout: float = 5.0) -> int:
    """Poll until the backend count equals ``expected`` (idle threads close after ~1 s)."""
    deadline = time.monotonic() + timeout
    while (current := await count()) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return current


@on_postgres
async def test_connections_return_to_baseline_after_200_concurrent_calls(
    transactional_db: None,
) -> None:
    count = _pg_backends_counter()
    baseline = await count()
    peak = baseline
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, await count())
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    await _run_calls(200)
    done.set()
    await watcher
    # Bounded by the store's threads, not by the number of calls...
    assert baseline < peak <= baseline + django_store._get_executor()._max_workers
    # ...and all closed once the threads go idle, without anyone calling close_connections().
    assert await _settles_at(count, baseline) == baseline
    await _run_calls(200)
    assert await _settles_at(count, baseline) == baseline


@on_postgres
async def test_persistent_connections_stay_bounded_by_the_threads(
    transactional_db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads keep theirs and so do the loop's own connections (begin and commit on
    PostgreSQL): at most ASYNC_THREADS of each."""
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", None)
    monkeypatch.setattr(django_store, "_executor", django_store._LedgerThreads(3))
    count = _pg_backends_counter()
    baseline = await count()
    with override_settings(AGENT_LEDGER={"ASYNC_THREADS": 3}):
        await _run_calls(200)
        await asyncio.sleep(1.5)  # idle, but persistent: kept
    assert baseline < await count() <= baseline + 3 + 3
    await asyncio.to_thread(django_store.close_connections)
    assert await _settles_at(count, baseline) == baseline


# -- prepared statements (PostgreSQL) ----------------------------------------------------------


def _ledger_statements_prepared() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s",
            ["%INSERT INTO agent_ledger_effect%"],
        )
        (count,) = cursor.fetchone()
    return int(count)


@pg_statements
@pytest.mark.django_db(transaction=True)
def test_begin_and_commit_are_prepared_once_per_connection() -> None:
    """Django binds parameters on the client, so every call would be parsed and planned anew;
    the store's own statements are prepared instead, and Django's setting is left as it was."""
    store = DjangoStore()
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    assert _ledger_statements_prepared() == 0
    threshold = connection.connection.prepare_threshold
    for _ in range(3):
        new = new_effect()
        assert store.begin_sync(new).created
        assert store.begin_sync(new_effect(idem_key=new.idem_key)).effect.dedup_count == 1
    assert _ledger_statements_prepared() == 1
    assert connection.connection.prepare_threshold == threshold


@pg_statements
@pytest.mark.django_db(transaction=True)
def test_prepare_statements_off_prepares_nothing() -> None:
    store = DjangoStore()
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    with override_settings(AGENT_LEDGER={"PREPARE_STATEMENTS": False}):
        for _ in range(3):
            new = new_effect()
            assert store.begin_sync(new).created
            assert store.begin_sync(new_effect(idem_key=new.idem_key)).effect.dedup_count == 1
    assert _ledger_statements_prepared() == 0


# -- replay counts of finished effects (PostgreSQL) --------------------------------------------


def _finished_effect(store: DjangoStore) -> NewEffect:
    new = new_effect()
    store.begin_sync(new)
    store.commit_sync(new.id, CommitSucceeded({"ok": 1}), fence=1, actor=SYSTEM)
    return new


def _row_dedup(effect_id: str) -> int:
    return EffectRow.objects.values_list("dedup_count", flat=True).get(pk=effect_id)


@pg_statements
@pytest.mark.django_db(transaction=True)
@override_settings(AGENT_LEDGER={"REPLAY_COUNT_DELAY_SECONDS": 30})
def test_replays_of_a_finished_effect_are_counted_later_in_one_write() -> None:
    store = DjangoStore()
    new = _finished_effect(store)
    for count in range(1, 5):
        assert store.begin_sync(new_effect(idem_key=new.idem_key)).effect.dedup_count == count
    assert _row_dedup(new.id) == 0  # no write per replay
    effect = store.get_sync(new.id)  # the store's own read writes what it owes first
    assert effect is not None and effect.dedup_count == 4
    assert _row_dedup(new.id) == 4
    store.begin_sync(new_effect(idem_key=new.idem_key))
    with db_transaction.atomic():
        # Inside the caller's transaction nothing is written on its behalf: the read lags.
        lagging = store.get_by_idem_key_sync(new.idem_key)
        assert lagging is not None and lagging.dedup_count == 4
    django_store.close_connections()  # shutdown writes the rest
    assert _row_dedup(new.id) == 5


@pg_statements
@pytest.mark.django_db(transaction=True)
@override_settings(AGENT_LEDGER={"REPLAY_COUNT_DELAY_SECONDS": 0.05})
def test_held_counts_are_written_by_a_store_thread_after_the_delay() -> None:
    store = DjangoStore()
    new = _finished_effect(store)
    for _ in range(3):
        store.begin_sync(new_effect(idem_key=new.idem_key))
    deadline = time.monotonic() + 5
    while _row_dedup(new.id) != 3:
        assert time.monotonic() < deadline, "never written"
        time.sleep(0.02)


@pg_statements
@pytest.mark.django_db(transaction=True)
@override_settings(AGENT_LEDGER={"REPLAY_COUNT_DELAY_SECONDS": 0})
def test_zero_delay_counts_every_replay_at_once() -> None:
    store = DjangoStore()
    new = _finished_effect(store)
    for count in range(1, 4):
        assert store.begin_sync(new_effect(idem_key=new.idem_key)).effect.dedup_count == count
        assert _row_dedup(new.id) == count


# -- the hot path on the caller's event loop (PostgreSQL) --------------------------------------


class _CountingThreads(django_store._LedgerThreads):
    """The store's thread pool, counting what is handed to it."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


@pg_statements
@override_settings(AGENT_LEDGER={"REPLAY_COUNT_DELAY_SECONDS": 30})
async def test_begin_and_commit_run_on_the_loop_without_a_thread(
    transactional_db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every tool call's statements (and waiters' polls) skip the hand-off to a thread."""
    threads = _CountingThreads(4)
    monkeypatch.setattr(django_store, "_executor", threads)
    assert not signals_listened()
    ledger = EffectLedger(EffectLedgerOptions(store=DjangoStore()))
    call = ToolCall(workflow_id="loop", tool="t", args={"n": 1})

    async def handler(effect: Any) -> str:
        return effect.id

    first = await ledger.run(call, handler)
    assert await ledger.run(call, handler) == first  # a replay of a finished effect
    effect = await ledger.find_by_idem_key(ledger.idem_key(call))  # reads too (waiters poll)
    assert effect is not None and (effect.status, effect.dedup_count) == ("succeeded", 1)
    assert threads.submitted == 0
    assert len(await ledger.history(effect.id)) == 2  # the rest keeps the threads
    assert threads.submitted == 1


def signals_listened() -> bool:
    from agent_ledger import signals

    return any(
        getattr(signals, name).has_listeners(EffectRow)
        for name in ("approval_requested", "effect_succeeded", "effect_failed")
    )


@pg_statements
def test_sessions_that_need_djangos_set_up_stay_on_the_threads() -> None:
    from agent_ledger.stores import _aio

    wrapper = connections.create_connection("default")  # a wrapper of our own, unconnected
    params, _ = _aio.session_params(wrapper, prepare=True)
    assert params is not None and params["autocommit"] and "cursor_factory" not in params
    assert params["prepare_threshold"] == 0
    assert _aio.session_params(wrapper, prepare=False)[0]["prepare_threshold"] is None  # type: ignore[index]
    options = {**wrapper.settings_dict["OPTIONS"], "assume_role": "auditor"}
    wrapper.settings_dict = {**wrapper.settings_dict, "OPTIONS": options}
    assert _aio.session_params(wrapper, prepare=True)[0] is None


@pytest.mark.skipif(connection.vendor == "postgresql", reason="the other databases")
async def test_other_databases_use_the_threads(transactional_db: None) -> None:
    from agent_ledger.stores import _aio

    assert _aio.for_alias("default") is None


@on_postgres
async def test_close_connections_closes_the_loops_idle_connections_at_once(
    transactional_db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", None)  # never idle-closed
    django_store.close_connections()
    count = _pg_backends_counter()
    baseline = await count()
    await _run_calls(50)
    assert await count() > baseline
    await asyncio.to_thread(django_store.close_connections)
    # Persistent, so only close_connections() can have closed them (other connections of the
    # test process may close meanwhile too: at most the baseline, not exactly it).
    deadline = time.monotonic() + 5
    while (now := await count()) > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert now <= baseline
    await _run_calls(5)  # and the next calls open new ones


@pg_statements
@override_settings(AGENT_LEDGER={"REPLAY_COUNT_DELAY_SECONDS": 30})
async def test_a_storm_on_one_key_costs_one_statement_on_the_loop(
    transactional_db: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements: list[str] = []
    original = django_store._fetch_async

    async def spy(conn: Any, query: str, params: Any) -> Any:
        statements.append(query)
        await asyncio.sleep(0.05)  # keep the first statement in flight while the others arrive
        return await original(conn, query, params)

    monkeypatch.setattr(django_store, "_fetch_async", spy)
    store = DjangoStore()
    new = new_effect()
    records = await asyncio.gather(
        store.begin(new), *(store.begin(new_effect(idem_key=new.idem_key)) for _ in range(15))
    )
    assert statements.count(django_store.pgsql.BEGIN) == 1
    assert [r.created for r in records] == [True] + [False] * 15
    assert sorted(r.effect.dedup_count for r in records) == list(range(16))
    effect = await store.get(new.id)  # written before the read
    assert effect is not None and effect.dedup_count == 15
