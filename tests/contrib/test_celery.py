"""agent_ledger.contrib.celery against Celery 5.7 on the machine's Redis.

Each test first shows what goes wrong without the ledger (the body runs twice), then that it
runs once with it. The redelivery test runs two real worker processes; the others run Celery's
own in-process test worker (a thread of this process, so it sees this test's database).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, signals
from celery.contrib.testing.worker import start_worker
from django.db import connections
from django.test import override_settings

import agent_ledger.tasks  # noqa: F401  (registers agent_ledger.run_resumption with Celery)
from agent_ledger import (
    Actor,
    EffectDeniedError,
    EffectLedger,
    EffectLedgerOptions,
    EffectLedgerValidationError,
    EffectStatus,
    MemoryStore,
    services,
)
from agent_ledger.contrib.celery import LedgeredTask, ledgered_task
from agent_ledger.models import Effect
from tests.contrib.support import (
    REDIS_URL,
    database_env,
    drop_keys,
    poll,
    require_redis,
    unique_prefix,
)

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]
#: Longest any wait in these tests may take on a loaded CI machine.
TIMEOUT_S = 60

runs: list[str] = []


def make_app() -> tuple[Celery, str]:
    prefix = unique_prefix()
    app = Celery("agent_ledger_tests", broker=REDIS_URL, set_as_current=True)
    app.conf.update(
        task_default_queue=f"{prefix}q",
        broker_transport_options={"global_keyprefix": prefix},
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
    )
    return app, prefix


@pytest.fixture
def app() -> Iterator[Celery]:
    require_redis()
    app, prefix = make_app()
    runs.clear()
    yield app
    drop_keys(prefix)


class Finished:
    """task_postrun as events: wait for the n-th execution of a task id to end."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, str]] = []
        self.changed = threading.Condition()
        signals.task_postrun.connect(self.on_postrun, weak=False)

    def on_postrun(self, task_id: str, state: str | None = None, **kwargs: Any) -> None:
        # In the worker's thread: its connections would outlive the test (and its database).
        connections.close_all()
        with self.changed:
            self.ended.append((task_id, str(state)))
            self.changed.notify_all()

    def wait(self, task_id: str, times: int = 1) -> list[str]:
        with self.changed:
            done = self.changed.wait_for(
                lambda: sum(t == task_id for t, _ in self.ended) >= times, timeout=TIMEOUT_S
            )
        assert done, f"{task_id} did not end {times} time(s): {self.ended}"
        return [state for t, state in self.ended if t == task_id]

    def close(self) -> None:
        signals.task_postrun.disconnect(self.on_postrun)


@pytest.fixture
def finished() -> Iterator[Finished]:
    events = Finished()
    yield events
    events.close()


# -- the body sees its request; bad input ----------------------------------------------------


def test_body_sees_self_request_and_runs_once_per_task_id(app: Celery) -> None:
    @app.task(bind=True)
    def plain(self: Any, order: int) -> str:
        runs.append(self.request.id)
        return self.request.id

    @ledgered_task(app=app, bind=True)
    def charge(self: Any, order: int) -> str:
        runs.append(self.request.id)
        return self.request.id

    # Without the ledger, the same task id sent twice (a re-publish, a retried apply_async with
    # task_id=) runs its body twice.
    plain.apply(args=(7,), task_id="plain-1")
    plain.apply(args=(7,), task_id="plain-1")
    assert runs == ["plain-1", "plain-1"]

    runs.clear()
    first = charge.apply(args=(7,), task_id="charge-1").get()
    again = charge.apply(args=(7,), task_id="charge-1").get()
    assert runs == ["charge-1"]  # self.request.id inside the body: run_sync's caller thread
    assert first == again == "charge-1"
    effect = Effect.objects.get(call_id="charge-1")
    assert (effect.tool, effect.workflow_id, effect.dedup_count) == (charge.name, "charge-1", 1)
    assert effect.args_canonical == '{"order":7}'

    charge.apply(args=(7,), task_id="charge-2")  # another task id: another call
    assert runs == ["charge-1", "charge-2"]


def test_a_task_can_use_its_own_ledger(app: Celery) -> None:
    memory = EffectLedger(EffectLedgerOptions(store=MemoryStore()))

    @ledgered_task(app=app, ledger=lambda: memory, name="tests.celery.own_ledger")
    def send(to: str) -> str:
        runs.append(to)
        return to

    for _ in range(2):
        send.apply(args=("bob",), task_id="own-1")
    assert runs == ["bob"]
    assert not Effect.objects.exists()  # not Django's ledger


def test_bad_input_is_refused_with_clear_errors(app: Celery) -> None:
    @ledgered_task(app=app, bind=True, name="tests.celery.bad_input")
    def charge(self: Any, order: Any) -> None:
        runs.append("ran")

    with pytest.raises(EffectLedgerValidationError, match=r"task_id: .*not directly"):
        charge(7)
    with pytest.raises(EffectLedgerValidationError, match="args"):
        charge.apply(args=(object(),), task_id="t-1", throw=True)
    with pytest.raises(EffectLedgerValidationError, match=r"args: .*positional"):
        charge.apply(args=(1, 2), task_id="t-2", throw=True)
    with pytest.raises(EffectLedgerValidationError, match="requires_approval: must be a bool"):
        ledgered_task(app=app, requires_approval="yes")
    with pytest.raises(EffectLedgerValidationError, match="base: must be LedgeredTask"):
        ledgered_task(app=app, base=object)
    with pytest.raises(EffectLedgerValidationError, match="tool"):
        ledgered_task(app=app, tool="")
    assert runs == []
    assert isinstance(charge, LedgeredTask)


# -- retry() -----------------------------------------------------------------------------------


def test_retry_keeps_the_key_runnable_and_a_resend_after_success_replays(
    app: Celery, finished: Finished
) -> None:
    @ledgered_task(app=app, bind=True, max_retries=3, default_retry_delay=0)
    def send(self: Any) -> str:
        if self.request.retries == 0:
            raise self.retry()  # before acting: a rate limit, say
        runs.append(self.request.id)
        return "sent"

    with start_worker(app, perform_ping_check=False):
        send.apply_async(task_id="send-1")
        assert finished.wait("send-1", times=2) == ["RETRY", "SUCCESS"]
        send.apply_async(task_id="send-1")  # the same id again, after success
        assert finished.wait("send-1", times=3)[-1] == "SUCCESS"
    assert runs == ["send-1"]
    effect = Effect.objects.get(call_id="send-1")
    assert (effect.status, effect.attempts, effect.result) == ("succeeded", 2, "sent")
    history = effect.transitions.order_by("id").values_list("reason", flat=True)
    assert any("retryable" in (reason or "") for reason in history)


# -- approval: parked without holding a worker, resumed by the decision ----------------------


@override_settings(AGENT_LEDGER={"RESUME_BACKEND": "celery"})
def test_parked_approval_frees_the_worker_and_the_decision_resends_the_task(
    app: Celery, finished: Finished
) -> None:
    @ledgered_task(app=app, bind=True, requires_approval=True, tool="payments.refund")
    def refund(self: Any, order: int) -> str:
        runs.append(f"refund {order}")
        return "refunded"

    @app.task
    def other() -> None:
        runs.append("other")

    with start_worker(app, perform_ping_check=False):  # one worker, concurrency 1
        refund.apply_async(args=(7,), task_id="refund-7")
        refund.apply_async(args=(8,), task_id="refund-8")
        assert finished.wait("refund-7") == ["IGNORED"]
        assert finished.wait("refund-8") == ["IGNORED"]
        done = other.apply_async()
        finished.wait(done.id)  # the one worker is free while both wait for a human
        assert runs == ["other"]

        seven = Effect.objects.get(call_id="refund-7")
        assert seven.status == EffectStatus.REQUIRES_APPROVAL
        services.approve(seven.idem_key, actor=Actor("admin", 1, "alice"))
        assert finished.wait("refund-7", times=2) == ["IGNORED", "SUCCESS"]
        eight = Effect.objects.get(call_id="refund-8")
        services.deny(eight.idem_key, actor=Actor("admin", 1, "alice"), reason="not eligible")
        assert finished.wait("refund-8", times=2) == ["IGNORED", "FAILURE"]

        # A second decision changes nothing and resends nothing; a redelivery replays.
        assert not services.approve(seven.idem_key, actor=Actor("admin", 1, "bob")).changed
        refund.apply_async(args=(7,), task_id="refund-7")
        assert finished.wait("refund-7", times=3)[-1] == "SUCCESS"
    assert runs == ["other", "refund 7"]
    seven.refresh_from_db()
    assert (seven.status, seven.result, seven.attempts) == ("succeeded", "refunded", 1)
    with pytest.raises(EffectDeniedError, match="not eligible"):
        refund.apply(args=(8,), task_id="refund-8", throw=True)


# -- redelivery: two real worker processes -----------------------------------------------------


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[Path, Celery]]:
    """Two ``celery worker`` processes (solo pool, prefetch 1, acks_late, visibility 1 s)."""
    require_redis()
    prefix = unique_prefix()
    env = {
        **os.environ,
        **database_env(),
        "PYTHONPATH": str(ROOT),
        "AGENT_LEDGER_TEST_OUT": str(tmp_path),
        "AGENT_LEDGER_TEST_BROKER": REDIS_URL,
        "AGENT_LEDGER_TEST_PREFIX": prefix,
        "AGENT_LEDGER_TEST_QUEUE": f"{prefix}q",
    }
    command = [sys.executable, "-m", "celery", "-A", "tests.workers.celery_app", "worker",
               "--pool=solo", "--concurrency=1", "--without-gossip", "--without-mingle",
               "--without-heartbeat", "--loglevel=WARNING"]  # fmt: skip
    processes = [
        subprocess.Popen([*command, f"--hostname=w{i}@%h"], cwd=ROOT, env=env) for i in (1, 2)
    ]
    client = Celery("client", broker=REDIS_URL, set_as_current=False)
    client.conf.update(
        broker_transport_options={"global_keyprefix": prefix},
        task_default_queue=f"{prefix}q",
    )
    try:
        poll(lambda: len(list(tmp_path.glob("ready.*"))) == 2, TIMEOUT_S, "two workers")
        yield tmp_path, client
    finally:
        for process in processes:
            process.kill()  # test workers: nothing to finish
            process.wait()
        drop_keys(prefix)


def test_redelivery_runs_twice_without_the_ledger_and_once_with_it(
    workers: tuple[Path, Celery],
) -> None:
    out, client = workers

    def events(event: str, task_id: str) -> list[str]:
        return sorted(p.name.split(".")[2] for p in out.glob(f"{event}.{task_id}.*"))

    started = time.monotonic()
    plain = client.send_task("tests.workers.celery_app.plain_send").id
    poll(lambda: len(events("finished", plain)) >= 2, TIMEOUT_S, "the redelivered copy")
    pids = events("start", plain)
    assert len(pids) >= 2 and len(set(pids)) == 2  # the same task id ran on both workers

    ledgered = client.send_task("tests.workers.celery_app.ledgered_send").id
    poll(lambda: len(events("finished", ledgered)) >= 2, TIMEOUT_S, "the redelivered copy")
    assert len(events("start", ledgered)) == 1  # delivered twice, the body ran once
    effect = Effect.objects.get(call_id=ledgered)
    assert effect.status == EffectStatus.SUCCEEDED
    assert effect.dedup_count >= 1 and effect.attempts == 1
    assert time.monotonic() - started < TIMEOUT_S
