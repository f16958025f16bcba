"""Each system check id, triggered by the misconfiguration it exists for."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings
from django.core.checks import run_checks
from django.test import override_settings

from agent_ledger.checks import check_settings

#: The checks read settings.DATABASES; no connection is touched, so the override is safe.
databases_override = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")


def ids(**overrides: Any) -> list[str]:
    with override_settings(**overrides):
        return [message.id for message in check_settings(None) if message.id]


def sqlite(**config: Any) -> dict[str, Any]:
    base = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": "/tmp/ledger.sqlite3",
        "OPTIONS": {"transaction_mode": "IMMEDIATE"},
    }
    return {"default": {**base, **config}}


def test_the_test_settings_pass() -> None:
    assert ids() == []


def test_no_agent_ledger_setting_at_all_passes() -> None:
    with override_settings():
        del settings.AGENT_LEDGER
        assert [m.id for m in check_settings(None)] == []


def test_checks_are_registered() -> None:
    with override_settings(AGENT_LEDGER=[]):
        assert "agent_ledger.E001" in [m.id for m in run_checks()]


def test_e001_not_a_dict() -> None:
    assert ids(AGENT_LEDGER=[("DATABASE", "default")]) == ["agent_ledger.E001"]


def test_e002_unknown_key() -> None:
    with override_settings(AGENT_LEDGER={"DATABSE": "default"}):
        (message,) = check_settings(None)
    assert message.id == "agent_ledger.E002"
    assert "'DATABSE'" in message.msg
    assert "DATABASE" in message.hint


def test_e003_database_not_configured() -> None:
    assert ids(AGENT_LEDGER={"DATABASE": "ledger"}) == ["agent_ledger.E003"]


@pytest.mark.parametrize("value", [0, -1, "1MB", 1.5, True])
def test_e004_max_args_size(value: Any) -> None:
    assert ids(AGENT_LEDGER={"MAX_ARGS_SIZE_BYTES": value}) == ["agent_ledger.E004"]


@pytest.mark.parametrize(
    "value", [["secret"], {"a": "short"}, {"": "x" * 16}, {"a": 1234}, {"n" * 91: "x" * 16}]
)
def test_e005_webhook_secrets(value: Any) -> None:
    assert ids(AGENT_LEDGER={"WEBHOOK_SECRETS": value}) == ["agent_ledger.E005"]


@pytest.mark.parametrize("value", [0, -5, "300", False])
def test_e006_webhook_tolerance(value: Any) -> None:
    assert ids(AGENT_LEDGER={"WEBHOOK_TOLERANCE_SECONDS": value}) == ["agent_ledger.E006"]


@pytest.mark.parametrize("value", [0, -1, "16", 2.0, True])
def test_e007_async_threads(value: Any) -> None:
    assert ids(AGENT_LEDGER={"ASYNC_THREADS": value}) == ["agent_ledger.E007"]


@pytest.mark.parametrize("key", ["PREPARE_STATEMENTS", "REPLAY_COUNT_DELAY_SECONDS"])
def test_retired_keys_are_refused_with_a_hint_that_says_so(key: str) -> None:
    """E009 and E010 validated these; both ids stay retired, never reused."""
    with override_settings(AGENT_LEDGER={key: 0}):
        messages = check_settings(None)
    assert [m.id for m in messages] == ["agent_ledger.E002"]
    assert "retired" in (messages[0].hint or "")


def test_e008_use_tz() -> None:
    assert ids(USE_TZ=False) == ["agent_ledger.E008"]


@databases_override
@pytest.mark.parametrize("name", [":memory:", "", "file:memorydb?mode=memory&cache=shared"])
def test_w001_in_memory_sqlite(name: str) -> None:
    assert ids(DATABASES=sqlite(NAME=name)) == ["agent_ledger.W001"]


@databases_override
@pytest.mark.parametrize("options", [{}, {"transaction_mode": "DEFERRED"}])
def test_w002_sqlite_without_immediate_transactions(options: dict[str, Any]) -> None:
    assert ids(DATABASES=sqlite(OPTIONS=options)) == ["agent_ledger.W002"]


@databases_override
def test_sqlite_checks_look_at_the_ledgers_database_only() -> None:
    databases = {
        "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
        "ledger": sqlite()["default"],
    }
    assert ids(DATABASES=databases, AGENT_LEDGER={"DATABASE": "ledger"}) == []
    postgres = {"ENGINE": "django.db.backends.postgresql", "NAME": "x"}
    assert ids(DATABASES={"default": postgres}) == []


def test_every_message_has_a_hint() -> None:
    bad = {
        "DATABSE": 1,
        "DATABASE": "nope",
        "MAX_ARGS_SIZE_BYTES": 0,
        "WEBHOOK_SECRETS": 1,
        "WEBHOOK_TOLERANCE_SECONDS": 0,
        "ASYNC_THREADS": 0,
    }
    with override_settings(AGENT_LEDGER=bad, USE_TZ=False):
        messages = check_settings(None)
    assert len({m.id for m in messages}) == 7
    assert all(m.hint for m in messages)
