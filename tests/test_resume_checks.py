"""The resume settings' system checks, E020..E024, each triggered by its misconfiguration."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from django.test import override_settings

from agent_ledger.checks import check_settings


def ids(**ledger: Any) -> list[str]:
    with override_settings(AGENT_LEDGER=ledger):
        return [message.id for message in check_settings(None) if message.id]


@pytest.mark.parametrize("backend", ["inline", "django_tasks", "celery"])
def test_each_backend_passes_when_its_engine_is_installed(backend: str) -> None:
    assert ids(RESUME_BACKEND=backend) == []


@pytest.mark.parametrize("backend", ["rq", "", None, "Celery"])
def test_an_unknown_backend_is_e020(backend: Any) -> None:
    with override_settings(AGENT_LEDGER={"RESUME_BACKEND": backend}):
        (message,) = check_settings(None)
    assert message.id == "agent_ledger.E020"
    assert "'inline', 'django_tasks', 'celery'" in (message.hint or "")


def test_celery_without_celery_installed_is_e021(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "celery", None)  # as if it were not installed
    with override_settings(AGENT_LEDGER={"RESUME_BACKEND": "celery"}):
        (message,) = check_settings(None)
    assert message.id == "agent_ledger.E021"
    assert "django-agent-ledger[celery]" in (message.hint or "")


def test_django_tasks_without_an_engine_is_e021(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "django.tasks", None)
    monkeypatch.setitem(sys.modules, "django_tasks", None)
    assert ids(RESUME_BACKEND="django_tasks") == ["agent_ledger.E021"]


@pytest.mark.parametrize("value", [0, -1, 1.5, "5", True])
def test_max_attempts_is_e022(value: Any) -> None:
    assert ids(RESUME_MAX_ATTEMPTS=value) == ["agent_ledger.E022"]


@pytest.mark.parametrize(
    "delays",
    [
        {"RESUME_RETRY_DELAY_SECONDS": -1},
        {"RESUME_RETRY_DELAY_SECONDS": "10"},
        {"RESUME_RETRY_MAX_DELAY_SECONDS": None},
        {"RESUME_RETRY_DELAY_SECONDS": 60, "RESUME_RETRY_MAX_DELAY_SECONDS": 30},
    ],
)
def test_retry_delays_are_e023(delays: dict[str, Any]) -> None:
    assert ids(**delays) == ["agent_ledger.E023"]


def test_no_delay_at_all_is_allowed() -> None:
    assert ids(RESUME_RETRY_DELAY_SECONDS=0, RESUME_RETRY_MAX_DELAY_SECONDS=0) == []


@pytest.mark.parametrize("value", [0, -5, "600", False])
def test_stale_seconds_is_e024(value: Any) -> None:
    assert ids(RESUME_STALE_SECONDS=value) == ["agent_ledger.E024"]
