"""Each ``RESUME_BACKEND`` with its real engine: ``django.tasks`` (the ``django-tasks`` backport
on Django 5.2) on its ImmediateBackend, and Celery through the real Redis broker to a worker
running in this process. The inline backend is what ``test_resume.py`` uses throughout."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections
from django.test import override_settings

from agent_ledger import Actor, EffectStatus, resume, services, tasks
from agent_ledger.models import Resumption, ResumptionStatus
from agent_ledger.stores.django import DjangoStore, close_connections
from agent_ledger.types import Effect
from tests.effects import new_effect

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT_S = 30
REDIS_URL = "redis://127.0.0.1:6379/13"


@pytest.fixture(autouse=True)
def close_store_connections() -> Iterator[None]:
    yield
    close_connections()


@pytest.fixture
def seen() -> Iterator[list[tuple[str, str, str]]]:
    """(effect id, decision, thread name) per resumer call."""
    calls: list[tuple[str, str, str]] = []

    def wake(effect: Effect, decision: str) -> None:
        calls.append((effect.id, decision, threading.current_thread().name))

    resume.register("engine-agent", wake)
    yield calls
    resume.unregister("engine-agent")


def parked() -> Effect:
    new = new_effect(EffectStatus.REQUIRES_APPROVAL, continuation={"resumer": "engine-agent"})
    return DjangoStore().begin_sync(new).effect


def test_django_tasks_runs_the_resumer_through_the_task(seen: list[Any]) -> None:
    try:
        from django.tasks.signals import task_finished
    except ImportError:
        from django_tasks.signals import task_finished  # type: ignore[no-redef]
    finished: list[Any] = []

    def on_finished(sender: Any, task_result: Any, **kwargs: Any) -> None:
        finished.append(task_result)

    task_finished.connect(on_finished, weak=False)
    try:
        with override_settings(AGENT_LEDGER={"RESUME_BACKEND": "django_tasks"}):
            effect = parked()
            services.approve(effect.idem_key, actor=Actor("admin"))
    finally:
        task_finished.disconnect(on_finished)
    assert [(e, d) for e, d, _ in seen] == [(effect.id, "approve")]
    (result,) = finished
    assert result.task.module_path == "agent_ledger.tasks.run_resumption"
    assert result.status == "SUCCESSFUL"
    assert result.return_value == "done"
    assert Resumption.objects.get(effect_id=effect.id).status == ResumptionStatus.DONE


def test_django_tasks_sweep_task(seen: list[Any]) -> None:
    effect = parked()
    with override_settings(AGENT_LEDGER={"RESUME_BACKEND": "django_tasks"}):
        # A resumption nobody handed over (the decision's process died after its commit).
        Resumption.objects.create(
            effect_id=effect.id,
            transition_id=_decide_quietly(effect),
            decision="approve",
            resumer="engine-agent",
        )
        result = tasks.sweep_resumptions.enqueue()
    assert result.return_value == 1
    assert len(seen) == 1


def _decide_quietly(effect: Effect) -> int:
    """Mark the effect approved with its history row, as a decision would, but no resumption."""
    from agent_ledger.models import Effect as EffectRow
    from agent_ledger.models import EffectTransition

    EffectRow.objects.filter(pk=effect.id).update(status="ready")
    row = EffectTransition.objects.create(
        effect_id=effect.id, from_status="requires_approval", to_status="ready", actor_label="t"
    )
    return row.pk


@pytest.fixture
def celery_app() -> Iterator[Any]:
    celery = pytest.importorskip("celery")
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    app = celery.Celery("agent_ledger_tests", broker=REDIS_URL)
    app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True)
    previous = celery.current_app._get_current_object()
    app.set_current()
    yield app
    previous.set_current()
    app.close()


def test_celery_runs_the_resumer_on_a_worker_through_redis(
    seen: list[Any], celery_app: Any
) -> None:
    from celery.contrib.testing.worker import start_worker
    from celery.signals import task_postrun

    done = threading.Event()
    task_names: list[str] = []

    def after_task(sender: Any = None, **kwargs: Any) -> None:
        # As a Django project's Celery setup does: the worker's connections end with the task.
        connections.close_all()
        task_names.append(sender.name)
        done.set()

    task_postrun.connect(after_task, weak=False)
    try:
        with (
            override_settings(AGENT_LEDGER={"RESUME_BACKEND": "celery"}),
            start_worker(celery_app, perform_ping_check=False, shutdown_timeout=TIMEOUT_S),
        ):
            effect = parked()
            services.deny(effect.idem_key, actor=Actor("admin"), reason="no")
            assert done.wait(TIMEOUT_S)
    finally:
        task_postrun.disconnect(after_task)
    assert task_names == ["agent_ledger.run_resumption"]
    ((effect_id, decision, thread),) = seen
    assert (effect_id, decision) == (effect.id, "deny")
    assert thread != threading.current_thread().name  # the worker's, not the deciding thread
    row = Resumption.objects.get(effect_id=effect.id)
    assert (row.status, row.attempts) == (ResumptionStatus.DONE, 1)


def test_a_broker_that_is_down_leaves_the_row_for_the_sweep(seen: list[Any]) -> None:
    celery = pytest.importorskip("celery")
    app = celery.Celery("agent_ledger_down", broker="redis://127.0.0.1:1/0")
    app.conf.update(broker_connection_retry=False, broker_connection_max_retries=0)
    previous = celery.current_app._get_current_object()
    app.set_current()
    try:
        with override_settings(AGENT_LEDGER={"RESUME_BACKEND": "celery"}):
            effect = parked()
            record = services.approve(effect.idem_key, actor=Actor("admin"))
    finally:
        previous.set_current()
    assert record.changed  # the decision stands
    assert seen == []
    assert Resumption.objects.get(effect_id=effect.id).status == ResumptionStatus.PENDING
    assert resume.sweep() == 1  # inline now: the sweep hands it over
    assert len(seen) == 1
