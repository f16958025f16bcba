"""``agent_ledger.resume``: a decision resumes its agent once, after commit, and a failed resume
never consumes the approval. Real database (SQLite file or PostgreSQL), real threads racing;
the inline backend (the default) runs the resumer in the deciding thread once it commits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import close_old_connections, connections, transaction
from django.db.models import DateTimeField, DurationField, ExpressionWrapper, Value
from django.db.models.functions import Now
from django.test import override_settings

from agent_ledger import (
    Actor,
    EffectLedgerValidationError,
    EffectStatus,
    ToolCall,
    resume,
    services,
)
from agent_ledger import signals as ledger_signals
from agent_ledger.models import Effect as EffectRow
from agent_ledger.models import EffectTransition, Resumption, ResumptionStatus
from agent_ledger.stores.django import DjangoStore, close_connections
from agent_ledger.types import Effect
from tests.effects import new_effect

ANN = Actor("admin", user_id=None, name="Ann")
#: Longest any thread or event is waited for: a hang fails the test instead of stalling it.
TIMEOUT_S = 30

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def close_store_connections() -> Iterator[None]:
    yield
    close_connections()


class Calls:
    """What a registered resumer saw; ``fail`` makes its next calls raise."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.fail = 0
        self.during: Callable[[Effect, str], None] | None = None

    def __call__(self, effect: Effect, decision: str) -> None:
        with self.lock:
            self.seen.append((effect.id, decision))
            failing = self.fail > 0
            self.fail -= 1
        if self.during is not None:
            self.during(effect, decision)
        if failing:
            raise RuntimeError("agent unreachable")


@pytest.fixture
def calls() -> Iterator[Calls]:
    recorder = Calls()
    resume.register("test-agent", recorder)
    yield recorder
    resume.unregister("test-agent")


def parked(resumer: str | None = "test-agent") -> Effect:
    """An effect awaiting approval whose continuation names ``resumer``."""
    continuation = None if resumer is None else {"resumer": resumer, "thread": "t-1"}
    new = new_effect(EffectStatus.REQUIRES_APPROVAL, continuation=continuation)
    return DjangoStore().begin_sync(new).effect


def in_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a thread of its own, so on a connection of its own; its result."""
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(fn())
        finally:
            connections.close_all()

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive()
    return out[0]


def make_due(row: Resumption) -> None:
    """The backoff is over: ``run_after`` an hour ago, by the database clock."""
    hour_ago = ExpressionWrapper(
        Now() - Value(timedelta(hours=1), output_field=DurationField()),
        output_field=DateTimeField(),
    )
    Resumption.objects.filter(pk=row.pk).update(run_after=hour_ago)


# -- one run per decision, after commit --------------------------------------------------------


def test_approve_runs_the_resumer_once_after_the_decision_commits(calls: Calls) -> None:
    effect = parked()
    seen_elsewhere: list[tuple[str, str]] = []

    def look_from_another_connection(effect: Effect, decision: str) -> None:
        def read() -> tuple[str, str]:
            row = EffectRow.objects.get(pk=effect.id)
            return row.status, Resumption.objects.get(effect_id=effect.id).status

        seen_elsewhere.append(in_thread(read))

    calls.during = look_from_another_connection
    record = services.approve(effect.idem_key, actor=ANN)

    assert record.changed
    assert calls.seen == [(effect.id, "approve")]
    # Another connection saw the decision committed, and the resumption claimed (running).
    assert seen_elsewhere == [(EffectStatus.READY.value, ResumptionStatus.RUNNING)]
    row = Resumption.objects.get(effect_id=effect.id)
    assert (row.status, row.attempts, row.decision, row.resumer) == (
        ResumptionStatus.DONE,
        1,
        "approve",
        "test-agent",
    )
    assert EffectRow.objects.get(pk=effect.id).status == EffectStatus.READY
    # Approving again changes nothing and resumes nothing.
    assert not services.approve(effect.idem_key, actor=ANN).changed
    assert len(calls.seen) == 1


def test_deny_runs_the_resumer_once_with_deny(calls: Calls) -> None:
    effect = parked()
    services.deny(effect.idem_key, actor=ANN, reason="not today")
    assert calls.seen == [(effect.id, "deny")]
    assert Resumption.objects.get(effect_id=effect.id).decision == "deny"


def test_the_async_ledger_resumes_too(calls: Calls) -> None:
    effect = parked()
    assert services.get_ledger().approve_sync(effect.idem_key, actor=ANN)
    assert calls.seen == [(effect.id, "approve")]


def test_no_continuation_no_resumption(calls: Calls) -> None:
    effect = parked(resumer=None)
    services.approve(effect.idem_key, actor=ANN)
    assert calls.seen == []
    assert not Resumption.objects.exists()


def test_a_cancel_resumes_nothing(calls: Calls) -> None:
    effect = parked()
    services.cancel(effect.idem_key, actor=ANN, reason="stop")
    assert calls.seen == []
    assert not Resumption.objects.exists()


def test_a_rolled_back_decision_leaves_no_resumption_and_runs_nothing(calls: Calls) -> None:
    effect = parked()
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        services.approve(effect.idem_key, actor=ANN)
        assert Resumption.objects.filter(effect_id=effect.id).exists()
        1 / 0  # noqa: B018
    assert calls.seen == []
    assert not Resumption.objects.exists()


def test_inside_an_outer_transaction_the_resumer_waits_for_its_commit(calls: Calls) -> None:
    effect = parked()
    with transaction.atomic():
        services.approve(effect.idem_key, actor=ANN)
        assert calls.seen == []
    assert calls.seen == [(effect.id, "approve")]


def test_an_async_resumer_is_awaited(calls: Calls) -> None:
    seen: list[str] = []

    @resume.register("async-agent")
    async def wake(effect: Effect, decision: str) -> None:
        seen.append(decision)

    try:
        effect = parked("async-agent")
        services.approve(effect.idem_key, actor=ANN)
    finally:
        resume.unregister("async-agent")
    assert seen == ["approve"]
    assert Resumption.objects.get(effect_id=effect.id).status == ResumptionStatus.DONE


# -- exactly once under races --------------------------------------------------------------------


def pending_resumption(resumer: str = "test-agent") -> Resumption:
    """A decided effect with its resumption pending and nobody told (as after a crash)."""
    effect = parked(resumer)
    with transaction.atomic():
        services.approve(effect.idem_key, actor=ANN)
        row = Resumption.objects.get(effect_id=effect.id)
        # The process dies between the commit and its after-commit callbacks: nobody told.
        transaction.get_connection().run_on_commit = []
    return row


@pytest.mark.parametrize("workers", [2, 6])
def test_workers_racing_to_resume_one_decision_resume_once(calls: Calls, workers: int) -> None:
    row = pending_resumption()
    assert calls.seen == []
    start = threading.Barrier(workers)
    returned: list[str | None] = []
    losers_done = threading.Condition()
    release = threading.Event()

    def hold_until_the_others_returned(effect: Effect, decision: str) -> None:
        # The winner keeps the row "running" until every other worker has tried and returned.
        with losers_done:
            assert losers_done.wait_for(lambda: len(returned) == workers - 1, TIMEOUT_S)
        release.set()

    calls.during = hold_until_the_others_returned

    def worker() -> None:
        try:
            start.wait(TIMEOUT_S)
            outcome = resume.resume_now(row.pk)
            with losers_done:
                returned.append(outcome)
                losers_done.notify_all()
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert release.is_set()
    assert len(calls.seen) == 1
    assert sorted(returned, key=str) == [None] * (workers - 1) + ["done"]
    row.refresh_from_db()
    assert (row.status, row.attempts) == (ResumptionStatus.DONE, 1)


def test_the_sweep_racing_the_after_commit_hand_over_resumes_once(calls: Calls) -> None:
    effect = parked()
    start = threading.Barrier(2)
    handed: list[int] = []

    def approve() -> None:
        start.wait(TIMEOUT_S)
        services.approve(effect.idem_key, actor=ANN)

    def sweeper() -> None:
        start.wait(TIMEOUT_S)
        # Sweep until the resumption is finished, whoever ran it.
        for _ in range(10_000):
            handed.append(resume.sweep())
            if Resumption.objects.filter(effect_id=effect.id, status="done").exists():
                return

    threads = [threading.Thread(target=_closing(job)) for job in (approve, sweeper)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert calls.seen == [(effect.id, "approve")]
    assert Resumption.objects.get(effect_id=effect.id).attempts == 1


def _closing(job: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            job()
        finally:
            connections.close_all()

    return run


def test_the_sweep_hands_over_what_a_crash_left_pending(calls: Calls) -> None:
    row = pending_resumption()
    assert resume.sweep() == 1
    assert len(calls.seen) == 1
    assert Resumption.objects.get(pk=row.pk).status == ResumptionStatus.DONE
    assert resume.sweep() == 0
    assert len(calls.seen) == 1


def test_the_sweep_gives_back_a_run_whose_worker_was_lost(calls: Calls) -> None:
    row = pending_resumption()
    old = ExpressionWrapper(
        Now() - Value(timedelta(hours=1), output_field=DurationField()),
        output_field=DateTimeField(),
    )
    Resumption.objects.filter(pk=row.pk).update(status="running", attempts=1, updated_at=old)
    assert resume.resume_now(row.pk) is None  # running: not ours to take
    assert resume.sweep() == 1
    row.refresh_from_db()
    assert (row.status, row.attempts) == (ResumptionStatus.DONE, 2)
    assert len(calls.seen) == 1


def test_a_recent_running_row_is_left_alone_by_the_sweep(calls: Calls) -> None:
    row = pending_resumption()
    Resumption.objects.filter(pk=row.pk).update(status="running", attempts=1)
    assert resume.sweep() == 0
    assert Resumption.objects.get(pk=row.pk).status == ResumptionStatus.RUNNING
    assert calls.seen == []


# -- failures: retried with backoff, never consuming the approval -----------------------------


def test_a_failed_resume_is_retried_after_its_backoff_and_keeps_the_approval(
    calls: Calls,
) -> None:
    calls.fail = 1
    effect = parked()
    services.approve(effect.idem_key, actor=ANN)

    row = Resumption.objects.get(effect_id=effect.id)
    assert (row.status, row.attempts) == (ResumptionStatus.PENDING, 1)
    assert row.last_error == "RuntimeError: agent unreachable"
    assert EffectRow.objects.get(pk=effect.id).status == EffectStatus.READY
    # Not due until the backoff is over: neither a worker nor the sweep runs it early.
    assert resume.resume_now(row.pk) is None
    assert resume.sweep() == 0
    assert len(calls.seen) == 1

    make_due(row)
    assert resume.resume_now(row.pk) == "done"
    row.refresh_from_db()
    assert (row.status, row.attempts, row.last_error) == (ResumptionStatus.DONE, 2, "")
    assert len(calls.seen) == 2
    assert EffectRow.objects.get(pk=effect.id).status == EffectStatus.READY


@override_settings(AGENT_LEDGER={"RESUME_MAX_ATTEMPTS": 2, "RESUME_RETRY_DELAY_SECONDS": 0})
def test_after_its_last_attempt_a_resumption_is_failed_until_retried(calls: Calls) -> None:
    calls.fail = 2
    effect = parked()
    services.approve(effect.idem_key, actor=ANN)  # no delay: the retry runs at once
    row = Resumption.objects.get(effect_id=effect.id)
    assert (row.status, row.attempts) == (ResumptionStatus.FAILED, 2)
    assert resume.sweep() == 0
    assert EffectRow.objects.get(pk=effect.id).status == EffectStatus.READY

    assert resume.retry(row.pk)
    row.refresh_from_db()
    assert (row.status, row.attempts) == (ResumptionStatus.DONE, 3)
    assert len(calls.seen) == 3
    assert not resume.retry(row.pk)  # done: nothing to retry


def test_an_unknown_resumer_fails_with_a_clear_error() -> None:
    effect = parked("nobody-registered-this")
    services.approve(effect.idem_key, actor=ANN)
    row = Resumption.objects.get(effect_id=effect.id)
    assert row.status == ResumptionStatus.PENDING
    assert row.last_error.startswith(
        "UnknownResumerError: no resumer is registered as 'nobody-registered-this'"
    )
    assert EffectRow.objects.get(pk=effect.id).status == EffectStatus.READY


def test_resume_signals(calls: Calls) -> None:
    got: list[tuple[str, Any]] = []

    def done(sender: Any, resumption: Resumption, effect: Effect, **kw: Any) -> None:
        got.append(("done", resumption.pk))

    def failed(sender: Any, resumption: Resumption, error: str, final: bool, **kw: Any) -> None:
        got.append(("failed", (error, final)))

    ledger_signals.resume_done.connect(done, weak=False)
    ledger_signals.resume_failed.connect(failed, weak=False)
    try:
        calls.fail = 1
        effect = parked()
        services.approve(effect.idem_key, actor=ANN)
        row = Resumption.objects.get(effect_id=effect.id)
        make_due(row)
        resume.resume_now(row.pk)
    finally:
        ledger_signals.resume_done.disconnect(done)
        ledger_signals.resume_failed.disconnect(failed)
    assert got == [("failed", ("RuntimeError: agent unreachable", False)), ("done", row.pk)]


# -- the registry, the backoff, the command ------------------------------------------------------


def test_register_refuses_bad_names_and_non_callables() -> None:
    for name in ("", "   ", None, 7, "x" * 256):
        with pytest.raises(EffectLedgerValidationError) as caught:
            resume.register(name, print)  # type: ignore[arg-type]
        assert caught.value.field == "name"
    with pytest.raises(EffectLedgerValidationError, match="callable") as caught:
        resume.register("agent", "not a function")  # type: ignore[call-overload]
    assert caught.value.field == "fn"
    with pytest.raises(resume.UnknownResumerError):
        resume.get_resumer("agent")


def test_propose_refuses_a_resumer_name_no_resumption_could_store() -> None:
    ledger = services.get_ledger()
    call = ToolCall(tool="refund", workflow_id="wf-long", args={})
    with pytest.raises(EffectLedgerValidationError) as caught:
        ledger.propose_sync(call, continuation={"resumer": "r" * 256})
    assert caught.value.field == "continuation.resumer"
    effect = ledger.propose_sync(call, continuation={"resumer": "r" * 255})
    assert effect.continuation == {"resumer": "r" * 255}


def test_register_as_a_decorator_and_again() -> None:
    @resume.register("twice")
    def first(effect: Effect, decision: str) -> None: ...

    def second(effect: Effect, decision: str) -> None: ...

    try:
        assert resume.get_resumer("twice") is first
        assert resume.register("twice", second) is second
        assert resume.get_resumer("twice") is second
    finally:
        resume.unregister("twice")


@override_settings(
    AGENT_LEDGER={"RESUME_RETRY_DELAY_SECONDS": 10, "RESUME_RETRY_MAX_DELAY_SECONDS": 60}
)
def test_backoff_doubles_up_to_its_cap() -> None:
    waits = [resume.backoff(n).total_seconds() for n in (1, 2, 3, 4, 5, 1000)]
    assert waits == [10, 20, 40, 60, 60, 60]


def test_the_command_sweeps(calls: Calls) -> None:
    pending_resumption()
    out = StringIO()
    call_command("agent_ledger_resume", stdout=out)
    assert out.getvalue().strip() == "Handed 1 resumption(s) to inline."
    assert len(calls.seen) == 1


def test_each_decision_of_a_re_parked_effect_resumes_once(calls: Calls) -> None:
    """Approved, claimed, parked again and approved again: two decisions, two resumptions."""
    effect = parked()
    store = DjangoStore()
    services.approve(effect.idem_key, actor=ANN)
    claimed = store.claim_sync(effect.id, stale_after_ms=0, actor=ANN)
    assert claimed is not None
    services.get_ledger().request_approval_sync(effect.idem_key)
    services.approve(effect.idem_key, actor=ANN)
    assert calls.seen == [(effect.id, "approve"), (effect.id, "approve")]
    decisions = EffectTransition.objects.filter(
        effect_id=effect.id, from_status="requires_approval"
    )
    assert sorted(r.transition_id for r in Resumption.objects.all()) == sorted(
        d.pk for d in decisions
    )
    close_old_connections()
