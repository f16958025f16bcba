"""The Celery app the redelivery test runs in two real worker processes (``celery -A``).

Everything comes from the environment the test sets: the broker, a key prefix of its own (so
no other Redis user's messages are touched by the low visibility timeout), the directory the
tasks write their evidence to, and the test database (``DATABASE_URL`` / ``SQLITE_TEST_NAME``,
read by ``tests.settings``). Each event is a file of its own, so processes never share a write.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
django.setup()

from celery import Celery, signals  # noqa: E402

from agent_ledger.contrib.celery import ledgered_task  # noqa: E402

OUT = Path(os.environ["AGENT_LEDGER_TEST_OUT"])
#: Longest a body waits for the redelivered copy; the test fails long before.
WAIT_S = 60

app = Celery("agent_ledger_redelivery", broker=os.environ["AGENT_LEDGER_TEST_BROKER"])
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_default_queue=os.environ["AGENT_LEDGER_TEST_QUEUE"],
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        # What "Observed (5.7.0)" used, quicker: a message unacked for 1 s is handed to the
        # other worker by its sweep, which runs every second.
        "visibility_timeout": 1,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
        "global_keyprefix": os.environ["AGENT_LEDGER_TEST_PREFIX"],
    },
)


def record(event: str, task_id: str) -> None:
    (OUT / f"{event}.{task_id}.{os.getpid()}.{uuid.uuid4().hex}").touch()


def count(event: str, task_id: str) -> int:
    return len(list(OUT.glob(f"{event}.{task_id}.*")))


def wait_until(condition: Any) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


@signals.worker_ready.connect
def ready(**kwargs: Any) -> None:
    record("ready", "worker")


@signals.task_postrun.connect
def finished(task_id: str, **kwargs: Any) -> None:
    record("finished", task_id)


@app.task(bind=True)
def plain_send(self: Any) -> None:
    """Without the ledger: holds on until the redelivered copy has started too."""
    record("start", self.request.id)
    wait_until(lambda: count("start", self.request.id) >= 2)


@ledgered_task(app=app, bind=True, ledger_stale_after_ms=120_000)
def ledgered_send(self: Any) -> dict[str, Any]:
    """With the ledger: holds on until the redelivered copy has reached the ledger (counted as
    a replay of this very effect), then finishes."""
    from agent_ledger.models import Effect

    record("start", self.request.id)
    wait_until(lambda: Effect.objects.filter(call_id=self.request.id, dedup_count__gte=1).exists())
    return {"sent_by": os.getpid()}
