"""agent_ledger.contrib.tasks on django.tasks (Django 6.1's, or the django-tasks backport on
5.2) with django-tasks-db's database backend and its real ``db_worker``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.management import call_command
from django.test import override_settings

from agent_ledger import Actor, EffectLedgerValidationError, EffectStatus, services
from agent_ledger.contrib.tasks import ledgered_task
from agent_ledger.models import Effect
from tests.contrib import tasks_jobs
from tests.contrib.support import database_env, poll

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60


def events(out: Path, event: str) -> list[Path]:
    return list(out.glob(f"{event}.*"))


def statuses() -> list[str]:
    from django_tasks_db.models import DBTaskResult

    return sorted(DBTaskResult.objects.values_list("status", flat=True))


def work_queue() -> None:
    """``db_worker --batch`` in this process: run every queued task, then return."""
    call_command("db_worker", "--backend", "db", "--batch", "--no-startup-delay", verbosity=0)


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def start_worker(started: list[subprocess.Popen[bytes]], *extra: str) -> subprocess.Popen[bytes]:
    """A real ``manage.py db_worker`` process on this test's database."""
    env = {**os.environ, **database_env(), "PYTHONPATH": str(ROOT),
           "DJANGO_SETTINGS_MODULE": "tests.settings"}  # fmt: skip
    command = [sys.executable, "-m", "django", "db_worker", "--backend", "db",
               "--no-startup-delay", "--interval", "0.05", *extra]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    started.append(process)
    return process


def test_a_killed_worker_leaves_the_task_running_and_is_taken_over_once(
    tmp_path: Path, workers: list[subprocess.Popen[bytes]]
) -> None:
    plain, ledgered = tmp_path / "plain", tmp_path / "ledgered"
    plain.mkdir()
    ledgered.mkdir()
    tasks_jobs.plain_job.enqueue(str(plain))
    tasks_jobs.ledgered_job.enqueue(str(ledgered))
    for _ in range(2):
        start_worker(workers)
    poll(lambda: len(events(plain, "start")) == len(events(ledgered, "start")) == 1,
         TIMEOUT_S, "both tasks to start")  # fmt: skip
    for process in workers:
        process.send_signal(signal.SIGKILL)  # mid-task
        process.wait()
    assert statuses() == ["RUNNING", "RUNNING"]  # nothing recovers them
    assert Effect.objects.get().status == EffectStatus.PROCESSING

    # The operator's remedy (django-tasks #146): enqueue again; here twice, worked by two
    # workers at once.
    for out in (plain, ledgered):
        (out / "go").touch()
    for _ in range(2):
        tasks_jobs.plain_job.enqueue(str(plain))
        tasks_jobs.ledgered_job.enqueue(str(ledgered))
    batch = [start_worker(workers, "--batch") for _ in range(2)]
    for process in batch:
        assert process.wait(timeout=TIMEOUT_S) == 0

    # Without the ledger: the body started 3 times and finished twice.
    assert (len(events(plain, "start")), len(events(plain, "done"))) == (3, 2)
    # With it: one takeover after the stale window; the other run replayed its result.
    assert (len(events(ledgered, "start")), len(events(ledgered, "done"))) == (2, 1)
    effect = Effect.objects.get()
    assert (effect.status, effect.attempts, effect.dedup_count) == ("succeeded", 2, 2)
    assert statuses().count("SUCCESSFUL") == 4


@override_settings(AGENT_LEDGER={"RESUME_BACKEND": "django_tasks"})
def test_approval_enqueues_the_task_again_and_a_denial_fails_it(tmp_path: Path) -> None:
    from django_tasks_db.models import DBTaskResult

    out = str(tmp_path)
    tasks_jobs.refund.enqueue(out, 7)
    tasks_jobs.refund.enqueue(out, 8)
    work_queue()
    assert statuses() == ["FAILED", "FAILED"]  # parked: no worker waits for a human
    assert events(tmp_path, "refund-*") == []
    seven = Effect.objects.get(workflow_id="order-7")
    eight = Effect.objects.get(workflow_id="order-8")
    assert seven.status == EffectStatus.REQUIRES_APPROVAL
    assert seven.continuation["resumer"] == "agent_ledger.contrib.tasks"

    services.approve(seven.idem_key, actor=Actor("admin", 1, "alice"))
    services.deny(eight.idem_key, actor=Actor("admin", 1, "alice"), reason="not eligible")
    # A second click resumes nothing.
    assert not services.approve(seven.idem_key, actor=Actor("admin", 1, "bob")).changed
    assert DBTaskResult.objects.count() == 4  # one new task per decision
    work_queue()
    assert len(events(tmp_path, "refund-7")) == 1 and events(tmp_path, "refund-8") == []
    newest = DBTaskResult.objects.order_by("-enqueued_at")[:2]
    outcome = {r.args_kwargs["args"][1]: (r.status, r.return_value) for r in newest}
    assert outcome[7] == ("SUCCESSFUL", {"refunded": 7})
    assert outcome[8][0] == "FAILED"
    last = DBTaskResult.objects.filter(status="FAILED").order_by("-enqueued_at").first()
    assert last is not None and "EffectDeniedError" in last.exception_class_path

    tasks_jobs.refund.enqueue(out, 7)  # resumed twice: replays, no second refund
    work_queue()
    assert len(events(tmp_path, "refund-7")) == 1


def test_the_task_context_is_passed_and_not_part_of_the_key(tmp_path: Path) -> None:
    tasks_jobs.with_context.enqueue(str(tmp_path))
    tasks_jobs.with_context.enqueue(str(tmp_path))
    work_queue()
    assert len(events(tmp_path, "context")) == 1
    assert Effect.objects.get().args_canonical == f'{{"out":"{tmp_path}"}}'


def test_bad_input_is_refused_with_clear_errors() -> None:
    with pytest.raises(EffectLedgerValidationError, match="workflow_id: must be a non-empty"):
        ledgered_task(workflow_id="")
    with pytest.raises(EffectLedgerValidationError, match="requires_approval: must be a bool"):
        ledgered_task(workflow_id="w", requires_approval=1)
    with pytest.raises(EffectLedgerValidationError, match="stale_after_ms"):
        ledgered_task(workflow_id="w", stale_after_ms=-1)

    async def coroutine() -> None: ...

    with pytest.raises(EffectLedgerValidationError, match="function: must be a sync function"):
        ledgered_task(workflow_id="w")(coroutine)
    with pytest.raises(EffectLedgerValidationError, match="args"):
        tasks_jobs.ledgered_job.call("out", "extra")
