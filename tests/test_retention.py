"""Retention on the Django tables: ``agent_ledger.retention.prune``, the ``agent_ledger_prune``
command and ``prune_task``; tombstones keep pruned keys closed until ``KEY_LIFETIME``; ledger
traffic goes on while a prune runs, and no replay of a key being pruned runs its handler."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connections
from django.db import transaction as db_transaction
from django.test import override_settings
from django.utils import timezone

from agent_ledger import (
    EffectLedgerValidationError,
    EffectPurgedError,
    EffectStatus,
    ToolCall,
    services,
)
from agent_ledger.models import Effect, EffectTombstone, EffectTransition
from agent_ledger.retention import prune, prune_task
from agent_ledger.stores.django import DjangoStore, close_connections
from tests.effects import new_effect
from tests.ledger_rows import make_effect

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def close_store_connections() -> Iterator[None]:
    yield
    close_connections()


def days_ago(days: float) -> Any:
    return timezone.now() - timedelta(days=days)


def finished(status: str = "succeeded", *, days: float = 100, **fields: Any) -> Effect:
    """An effect that finished ``days`` ago (created a day before), with two history rows."""
    effect = make_effect(status=status, **fields)
    EffectTransition.objects.create(
        effect=effect, from_status="processing", to_status=status, actor_label="system"
    )
    done = None if status in ("processing", "requires_approval", "ready") else days_ago(days)
    Effect.objects.filter(pk=effect.pk).update(created_at=days_ago(days + 1), completed_at=done)
    effect.refresh_from_db()
    return effect


def test_prune_deletes_old_finished_effects_and_their_history_leaving_tombstones() -> None:
    old = [finished(status) for status in ("succeeded", "failed", "denied", "canceled")]
    recent = finished(days=10)
    live = [finished(status) for status in ("processing", "requires_approval", "ready")]

    report = prune("90d")

    assert (report.effects, report.transitions, report.batches) == (4, 8, 1)
    assert set(Effect.objects.values_list("pk", flat=True)) == {recent.pk} | {e.pk for e in live}
    assert not EffectTransition.objects.filter(effect_id__in=[e.pk for e in old]).exists()
    tombstones = {t.idem_key: t for t in EffectTombstone.objects.all()}
    assert set(tombstones) == {e.idem_key for e in old}
    for effect in old:
        tombstone = tombstones[effect.idem_key]
        assert (tombstone.effect_id, tombstone.status, tombstone.tool) == (
            effect.pk,
            effect.status,
            effect.tool,
        )
        assert tombstone.created_at == effect.created_at
    assert prune("90d").effects == 0  # nothing left to do


def test_a_dry_run_counts_and_changes_nothing() -> None:
    for _ in range(3):
        finished()
    finished(days=1)
    report = prune("30d", dry_run=True)
    assert (report.effects, report.transitions, report.dry_run) == (3, 6, True)
    assert Effect.objects.count() == 4 and not EffectTombstone.objects.exists()


def test_prune_works_in_batches_and_reports_progress() -> None:
    for _ in range(5):
        finished()
    seen: list[tuple[int, int]] = []
    report = prune("90d", batch_size=2, progress=lambda r: seen.append((r.batches, r.effects)))
    assert seen == [(1, 2), (2, 4), (3, 5)]
    assert report.effects == 5 and EffectTombstone.objects.count() == 5


def test_a_pruned_key_raises_effect_purged_on_every_path() -> None:
    store = DjangoStore()
    effect = finished()
    prune("90d")
    again = new_effect(idem_key=effect.idem_key)
    with pytest.raises(EffectPurgedError) as caught:
        store.begin_sync(again)  # PostgreSQL: the single-statement path
    assert caught.value.status == "succeeded"
    with pytest.raises(EffectPurgedError), db_transaction.atomic():
        store.begin_sync(again)  # inside the caller's transaction: the ORM path
    assert not Effect.objects.filter(idem_key=effect.idem_key).exists()


def test_tombstones_expire_after_the_key_lifetime_and_the_call_runs_anew() -> None:
    call = ToolCall(workflow_id="wf", tool="mail.send", args={"to": "a@example.com"})
    ran: list[str] = []
    asyncio.run(services.get_ledger().run(call, lambda e: ran.append("first")))
    Effect.objects.update(created_at=days_ago(400), completed_at=days_ago(399))
    young = finished(days=100)  # first used 101 days ago: its key stays closed

    with override_settings(AGENT_LEDGER={**settings.AGENT_LEDGER, "KEY_LIFETIME": "365d"}):
        report = prune("90d")
    assert (report.effects, report.tombstones_expired) == (2, 1)
    assert list(EffectTombstone.objects.values_list("idem_key", flat=True)) == [young.idem_key]
    asyncio.run(services.get_ledger().run(call, lambda e: ran.append("again")))
    assert ran == ["first", "again"]


def test_without_a_key_lifetime_tombstones_stay() -> None:
    finished(days=5000)
    assert prune("1d").tombstones_expired == 0
    assert EffectTombstone.objects.count() == 1


@pytest.mark.parametrize(
    ("older_than", "batch_size", "field"),
    [
        ("90x", 10, "older_than"),
        ("", 10, "older_than"),
        ("0d", 10, "older_than"),
        ("-5d", 10, "older_than"),
        (90, 10, "older_than"),
        (None, 10, "older_than"),
        ("90d", 0, "batch_size"),
        ("90d", "100", "batch_size"),
        ("90d", True, "batch_size"),
        ("90d", 10**9, "batch_size"),
    ],
)
def test_bad_input_is_refused_before_anything_changes(
    older_than: Any, batch_size: Any, field: str
) -> None:
    finished()
    with pytest.raises(EffectLedgerValidationError) as caught:
        prune(older_than, batch_size=batch_size)
    assert caught.value.field == field
    assert Effect.objects.count() == 1


def test_the_command_prunes_prints_progress_and_supports_a_dry_run() -> None:
    for _ in range(3):
        finished()
    out = StringIO()
    call_command("agent_ledger_prune", "--older-than", "90d", "--dry-run", stdout=out)
    assert "would prune 3 effects and 6 history rows" in out.getvalue()
    assert Effect.objects.count() == 3
    out = StringIO()
    call_command("agent_ledger_prune", "--older-than=90d", "--batch-size=2", stdout=out)
    text = out.getvalue()
    assert "batch 1: 2 effects" in text  # then at most a line a second
    assert "pruned 3 effects and 6 history rows" in text
    assert not Effect.objects.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "90x"], "is not a duration"),
        (["--older-than", "0s"], "must be positive"),
        (["--older-than", "90d", "--batch-size", "0"], "batch_size: must be between"),
        (["--older-than", "90d", "--batch-size", "ten"], "invalid int value"),
        ([], "--older-than"),
    ],
)
def test_the_command_refuses_bad_input(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        call_command("agent_ledger_prune", *args, stdout=StringIO())


def test_the_command_warns_when_keys_would_reopen_at_once() -> None:
    err = StringIO()
    with override_settings(AGENT_LEDGER={**settings.AGENT_LEDGER, "KEY_LIFETIME": "30d"}):
        call_command("agent_ledger_prune", "--older-than", "90d", stdout=StringIO(), stderr=err)
    assert "shorter than --older-than" in err.getvalue()


def test_the_task_returns_plain_counts() -> None:
    finished()
    assert prune_task("90d") == {
        "effects": 1,
        "transitions": 2,
        "tombstones_expired": 0,
        "batches": 1,
    }


def test_replays_racing_a_prune_never_run_the_handler_and_fresh_calls_go_on() -> None:
    """Real threads: callers replay the keys being pruned (and make fresh calls) the whole time
    a prune of small batches runs. Every replay returns the stored result or raises
    ``EffectPurgedError``; no handler of a pruned key runs; fresh calls complete meanwhile."""
    calls = [ToolCall(workflow_id="race", tool="t", args={"n": n}) for n in range(60)]
    ledger = services.get_ledger()

    async def first_runs() -> None:
        for call in calls:
            await ledger.run(call, lambda e: {"n": e.args["n"]})

    asyncio.run(first_runs())
    Effect.objects.update(created_at=days_ago(100), completed_at=days_ago(99))
    done = threading.Event()
    started = threading.Barrier(4)
    outcomes: list[str] = []
    rerun: list[Any] = []
    errors: list[BaseException] = []
    fresh = 0

    def replayer(offset: int) -> None:
        async def loop() -> None:
            index = offset
            while not done.is_set():
                call = calls[index % len(calls)]
                try:
                    result = await ledger.run(call, lambda e: rerun.append(e.args))
                    assert result == {"n": call.args["n"]}
                    outcomes.append("replayed")
                except EffectPurgedError:
                    outcomes.append("purged")
                index += 7

        try:
            started.wait(10)
            asyncio.run(loop())
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    def fresh_caller() -> None:
        nonlocal fresh

        async def loop() -> None:
            nonlocal fresh
            n = 0
            while not done.is_set():
                await ledger.run(ToolCall(workflow_id="new", tool="t", args={"n": n}), lambda e: 1)
                fresh += 1
                n += 1

        try:
            started.wait(10)
            asyncio.run(loop())
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=replayer, args=(i,)) for i in range(2)]
    threads.append(threading.Thread(target=fresh_caller))
    for thread in threads:
        thread.start()
    started.wait(10)
    fresh_before = fresh
    try:
        report = prune("90d", batch_size=5)
    finally:
        done.set()
        for thread in threads:
            thread.join(60)
        connections.close_all()
    assert not errors, errors
    assert report.effects == 60
    assert rerun == []  # no pruned key ran again
    assert "replayed" in outcomes or "purged" in outcomes
    assert fresh > fresh_before or fresh > 0
    assert EffectTombstone.objects.count() == 60
    assert set(Effect.objects.values_list("workflow_id", flat=True)) <= {"new"}
    assert Effect.objects.filter(workflow_id="new", status=EffectStatus.SUCCEEDED).count() == fresh


def test_on_postgresql_a_batch_waits_for_snapshots_older_than_its_tombstones() -> None:
    """A session holding a snapshot from before the tombstones could still insert the key once
    its effect is deleted: the prune waits for it (here: gives up after a short wait, leaving
    tombstones and effects both in place), and finishes once it is gone."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("SQLite serialises writers: there are no older snapshots to wait for")
    import psycopg

    from agent_ledger import EffectStoreError

    effect = finished()
    params = connection.get_connection_params()
    with psycopg.connect(
        autocommit=True,
        **{key: params[key] for key in ("host", "port", "user", "dbname") if params.get(key)},
    ) as other:
        other.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        other.execute("SELECT count(*) FROM agent_ledger_effect")  # takes its snapshot
        with pytest.raises(EffectStoreError, match="transactions older than the tombstones"):
            prune("90d", snapshot_wait_s=0.2)
        assert EffectTombstone.objects.filter(idem_key=effect.idem_key).exists()
        assert Effect.objects.filter(pk=effect.pk).exists()  # a begin now is a replay
        other.execute("ROLLBACK")
    assert prune("90d").effects == 1
    assert not Effect.objects.filter(pk=effect.pk).exists()
