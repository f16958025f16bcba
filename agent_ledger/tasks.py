"""The task engines' entry points for ``agent_ledger.resume``, one per engine installed.

``django.tasks`` (Django 6; the ``django-tasks`` backport, imported as ``django_tasks``, on 5.2):
``run_resumption`` and ``sweep_resumptions``. Celery: ``celery_run_resumption`` and
``celery_sweep_resumptions`` (registered as ``agent_ledger.run_resumption`` and
``agent_ledger.sweep_resumptions``; Celery's ``app.autodiscover_tasks()`` imports this module).
Each task is defined only when its engine imports; ``AGENT_LEDGER["RESUME_BACKEND"]`` picks the
one ``resume.enqueue`` uses, and check ``agent_ledger.E021`` says when its engine is missing.

Schedule a sweep every minute or so (``sweep_resumptions`` / ``celery_sweep_resumptions``, or
``manage.py agent_ledger_resume`` from cron): it retries failed resumers once their backoff is
over where the engine cannot defer a task, and hands over what a crash or a ``PostgresStore``
worker left behind.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from . import resume

__all__ = ["enqueue_celery_task", "enqueue_django_task"]

try:
    from django.tasks import task as django_task
except ImportError:  # Django 5.2: the backport, if installed
    try:
        from django_tasks import task as django_task  # type: ignore[no-redef,import-not-found,unused-ignore]
    except ImportError:
        django_task = None  # type: ignore[assignment,unused-ignore]

try:
    from celery import shared_task
except ImportError:
    shared_task = None


if django_task is not None:

    @django_task
    def run_resumption(resumption_id: int, using: str | None = None) -> str | None:
        """Claim and run one resumption (``resume.resume_now``)."""
        return resume.resume_now(resumption_id, using=using)

    @django_task
    def sweep_resumptions(using: str | None = None, limit: int = 100) -> int:
        """Hand due resumptions over again (``resume.sweep``); schedule it periodically."""
        return resume.sweep(using=using, limit=limit)


if shared_task is not None:

    @shared_task(name="agent_ledger.run_resumption", ignore_result=True)  # type: ignore[untyped-decorator,unused-ignore]
    def celery_run_resumption(resumption_id: int, using: str | None = None) -> str | None:
        """Claim and run one resumption (``resume.resume_now``)."""
        return resume.resume_now(resumption_id, using=using)

    @shared_task(name="agent_ledger.sweep_resumptions", ignore_result=True)  # type: ignore[untyped-decorator,unused-ignore]
    def celery_sweep_resumptions(using: str | None = None, limit: int = 100) -> int:
        """Hand due resumptions over again (``resume.sweep``); put it in beat's schedule."""
        return resume.sweep(using=using, limit=limit)


def enqueue_django_task(resumption_id: int, using: str, delay_s: float) -> None:
    """``run_resumption`` on the default task backend; a delayed one only where the backend can
    defer (``supports_defer``), else the sweep hands it over when it is due."""
    if django_task is None:
        raise ImproperlyConfigured(
            'RESUME_BACKEND "django_tasks" needs Django 6 or the django-tasks package'
        )
    task: Any = run_resumption
    if delay_s > 0:
        if not task.get_backend().supports_defer:
            return
        task = task.using(run_after=timezone.now() + timedelta(seconds=delay_s))
    task.enqueue(resumption_id, using)


def enqueue_celery_task(resumption_id: int, using: str, delay_s: float) -> None:
    """``celery_run_resumption`` through the project's Celery app, ``delay_s`` later."""
    if shared_task is None:
        raise ImproperlyConfigured('RESUME_BACKEND "celery" needs the celery package')
    celery_run_resumption.apply_async(
        args=(resumption_id, using), countdown=delay_s if delay_s > 0 else None
    )
