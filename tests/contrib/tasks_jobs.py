"""Module-level tasks for tests/contrib/test_tasks.py (django.tasks imports them by path, also
in the ``db_worker`` processes). Each run leaves files in ``out``: one per event, per process."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from agent_ledger.contrib.tasks import ledgered_task

try:
    from django.tasks import task
except ImportError:
    from django_tasks import task  # type: ignore[no-redef,import-not-found,unused-ignore]

#: Longest a body waits for the test to let it finish; the test fails long before.
WAIT_S = 60


def record(out: str, event: str) -> None:
    (Path(out) / f"{event}.{os.getpid()}.{uuid.uuid4().hex}").touch()


def work(out: str) -> int:
    """Start, then wait for the test's go-ahead (a crash test kills the worker meanwhile)."""
    record(out, "start")
    deadline = time.monotonic() + WAIT_S
    while not (Path(out) / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    record(out, "done")
    return os.getpid()


@task(backend="db")
def plain_job(out: str) -> int:
    return work(out)


@ledgered_task(workflow_id="crash-test", backend="db", stale_after_ms=1_000)
def ledgered_job(out: str) -> int:
    return work(out)


@ledgered_task(
    workflow_id=lambda out, order: f"order-{order}",
    tool="payments.refund",
    requires_approval=True,
    backend="db",
)
def refund(out: str, order: int) -> dict[str, Any]:
    record(out, f"refund-{order}")
    return {"refunded": order}


@ledgered_task(workflow_id="ctx", takes_context=True, backend="db")
def with_context(context: Any, out: str) -> int:
    record(out, "context")
    return int(context.attempt)
