"""System checks for ``AGENT_LEDGER``: misconfiguration fails at startup, not at the first call.

Ids are ``agent_ledger.E001``... (errors) and ``agent_ledger.W001``... (warnings); never reuse one.
E030-E039: per-tool policies, expiry notices and Slack (``check_approval_settings``).
Retired: E009 (``PREPARE_STATEMENTS``) and E010 (``REPLAY_COUNT_DELAY_SECONDS``).
E020..E029 are the resume settings' (``agent_ledger.resume``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.utils.module_loading import import_string

from .conf import DEFAULTS, MIN_WEBHOOK_SECRET_LENGTH, RESUME_BACKENDS, RETIRED
from .errors import EffectLedgerValidationError


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    value = getattr(settings, "AGENT_LEDGER", {})
    if not isinstance(value, dict):
        return [
            Error(
                "AGENT_LEDGER must be a dict.",
                hint=f"Got {type(value).__name__}. See agent_ledger/conf.py for the keys.",
                id="agent_ledger.E001",
            )
        ]
    for key in sorted(set(value) - set(DEFAULTS)):
        hint = f"Known keys: {', '.join(sorted(DEFAULTS))}."
        if key in RETIRED:
            hint = f"{key} was retired ({RETIRED[key]}); remove it. {hint}"
        errors.append(
            Error(f"AGENT_LEDGER has an unknown key {key!r}.", hint=hint, id="agent_ledger.E002")
        )
    database = value.get("DATABASE", DEFAULTS["DATABASE"])
    if database not in settings.DATABASES:
        errors.append(
            Error(
                f"AGENT_LEDGER['DATABASE'] is {database!r}, which is not in DATABASES.",
                hint=f"Use one of: {', '.join(sorted(settings.DATABASES))}.",
                id="agent_ledger.E003",
            )
        )
    errors.extend(_positive_int(value, "MAX_ARGS_SIZE_BYTES", "E004"))
    secrets = value.get("WEBHOOK_SECRETS", DEFAULTS["WEBHOOK_SECRETS"])
    if not isinstance(secrets, dict) or not all(
        # The name becomes the actor label "webhook:<name>", a 100-character column.
        isinstance(name, str)
        and 0 < len(name) <= 90
        and isinstance(secret, str)
        and len(secret) >= MIN_WEBHOOK_SECRET_LENGTH
        for name, secret in secrets.items()
    ):
        errors.append(
            Error(
                "AGENT_LEDGER['WEBHOOK_SECRETS'] must map names (1-90 characters) to secrets "
                "of 16+ characters.",
                hint='For example {"slack": os.environ["LEDGER_WEBHOOK_SECRET"]}.',
                id="agent_ledger.E005",
            )
        )
    tolerance = value.get("WEBHOOK_TOLERANCE_SECONDS", DEFAULTS["WEBHOOK_TOLERANCE_SECONDS"])
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance <= 0:
        errors.append(
            Error(
                "AGENT_LEDGER['WEBHOOK_TOLERANCE_SECONDS'] must be a positive number.",
                hint=f"Got {tolerance!r}; the default is 300 (five minutes).",
                id="agent_ledger.E006",
            )
        )
    errors.extend(
        _positive_int(
            value, "ASYNC_THREADS", "E007", " It also caps the connections async ledger calls open."
        )
    )
    if not settings.USE_TZ:
        errors.append(
            Error(
                "agent_ledger needs USE_TZ = True.",
                hint="Effects are timed by the database clock and compared with aware datetimes; "
                "naive ones would break stale detection.",
                id="agent_ledger.E008",
            )
        )
    if database in settings.DATABASES:
        errors.extend(_check_sqlite(database, settings.DATABASES[database]))
    errors.extend(_check_resume(value))
    return errors


def _check_resume(value: Mapping[str, Any]) -> list[CheckMessage]:
    """The task engine that runs resumers, and how often and how late they are retried."""
    errors: list[CheckMessage] = []
    backend = value.get("RESUME_BACKEND", DEFAULTS["RESUME_BACKEND"])
    if backend not in RESUME_BACKENDS:
        errors.append(
            Error(
                f"AGENT_LEDGER['RESUME_BACKEND'] is {backend!r}.",
                hint=f"Use one of: {', '.join(repr(name) for name in RESUME_BACKENDS)}.",
                id="agent_ledger.E020",
            )
        )
    elif not _engine_installed(backend):
        errors.append(
            Error(
                f"AGENT_LEDGER['RESUME_BACKEND'] is {backend!r}, but its engine is not installed.",
                hint=f"It needs {RESUME_BACKENDS[backend]}; pip install "
                f"'django-agent-ledger[{'tasks' if backend == 'django_tasks' else 'celery'}]'.",
                id="agent_ledger.E021",
            )
        )
    errors.extend(_positive_int(value, "RESUME_MAX_ATTEMPTS", "E022"))
    delay = value.get("RESUME_RETRY_DELAY_SECONDS", DEFAULTS["RESUME_RETRY_DELAY_SECONDS"])
    cap = value.get("RESUME_RETRY_MAX_DELAY_SECONDS", DEFAULTS["RESUME_RETRY_MAX_DELAY_SECONDS"])
    if not (_seconds(delay, zero=True) and _seconds(cap, zero=True) and delay <= cap):
        errors.append(
            Error(
                "AGENT_LEDGER['RESUME_RETRY_DELAY_SECONDS'] and "
                "['RESUME_RETRY_MAX_DELAY_SECONDS'] must be numbers >= 0, the first no larger.",
                hint=f"Got {delay!r} and {cap!r}; the defaults are 10 and 3600.",
                id="agent_ledger.E023",
            )
        )
    stale = value.get("RESUME_STALE_SECONDS", DEFAULTS["RESUME_STALE_SECONDS"])
    if not _seconds(stale, zero=False):
        errors.append(
            Error(
                "AGENT_LEDGER['RESUME_STALE_SECONDS'] must be a positive number.",
                hint=f"Got {stale!r}; the default is 600. Make it longer than a resumer runs.",
                id="agent_ledger.E024",
            )
        )
    return errors


def _engine_installed(backend: str) -> bool:
    if backend == "django_tasks":
        return any(_importable(name) for name in ("django.tasks", "django_tasks"))
    if backend == "celery":
        return _importable("celery")
    return True


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package is missing
        return False


def _seconds(value: Any, *, zero: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value >= 0 if zero else value > 0


def _positive_int(
    value: Mapping[str, Any], key: str, code: str, more: str = ""
) -> list[CheckMessage]:
    got = value.get(key, DEFAULTS[key])
    if isinstance(got, bool) or not isinstance(got, int) or got < 1:
        return [
            Error(
                f"AGENT_LEDGER[{key!r}] must be a positive int.",
                hint=f"Got {got!r}; the default is {DEFAULTS[key]}.{more}",
                id=f"agent_ledger.{code}",
            )
        ]
    return []


def _check_sqlite(alias: str, config: Mapping[str, Any]) -> list[CheckMessage]:
    """SQLite works, but only as a file and with writers that queue instead of failing."""
    if not str(config.get("ENGINE", "")).endswith("sqlite3"):
        return []
    warnings: list[CheckMessage] = []
    name = str(config.get("NAME", ""))
    if name in ("", ":memory:") or "mode=memory" in name:
        warnings.append(
            Warning(
                f"DATABASES[{alias!r}] is an in-memory SQLite database.",
                hint="Async ledger calls run on worker threads, each with its own connection and "
                "so its own empty in-memory database. Use a file.",
                id="agent_ledger.W001",
            )
        )
    if str(config.get("OPTIONS", {}).get("transaction_mode", "")).upper() != "IMMEDIATE":
        warnings.append(
            Warning(
                f"DATABASES[{alias!r}] is SQLite without OPTIONS['transaction_mode'] = "
                "'IMMEDIATE'.",
                hint="Concurrent ledger writes then fail with 'database is locked' instead of "
                'waiting. Set "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20}.',
                id="agent_ledger.W002",
            )
        )
    return warnings


_POLICY_HINTS = {
    "E030": 'TOOLS maps tool-name patterns to dicts, e.g. {"stripe.*": {"quorum": 2}}.',
    "E031": "Known keys: requires_approval, permission, group, quorum, expires_after, "
    "notify_before, allow_edit, allow_self_approval, redact.",
    "E032": 'True, False, or the dotted path of a callable of the args ("myapp.rules.big").',
    "E033": 'A permission is "app_label.codename"; a group is the name of a Group.',
    "E034": "The number of distinct approvers needed (1 is one approver).",
    "E035": "For example timedelta(hours=3) or 10800.",
    "E036": "True or False.",
}


@register()
def check_approval_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """``TOOLS``, expiry notices and Slack: ids agent_ledger.E030-E039."""
    from .policies import as_timedelta, problems

    value = getattr(settings, "AGENT_LEDGER", {})
    if not isinstance(value, dict):
        return []  # E001 says so
    errors: list[CheckMessage] = [
        Error(
            f"AGENT_LEDGER['TOOLS']: {message}.",
            hint=_POLICY_HINTS[code],
            id=f"agent_ledger.{code}",
        )
        for code, message in problems(value.get("TOOLS", {}))
    ]
    notice = value.get("EXPIRING_NOTICE_BEFORE", DEFAULTS["EXPIRING_NOTICE_BEFORE"])
    if as_timedelta(notice) is None:
        errors.append(
            Error(
                "AGENT_LEDGER['EXPIRING_NOTICE_BEFORE'] must be a positive timedelta or seconds.",
                hint=f"Got {notice!r}; the default is 3600 (an hour).",
                id="agent_ledger.E035",
            )
        )
    secret = value.get("SLACK_SIGNING_SECRET", "")
    if not isinstance(secret, str) or (secret and len(secret) < MIN_WEBHOOK_SECRET_LENGTH):
        errors.append(
            Error(
                "AGENT_LEDGER['SLACK_SIGNING_SECRET'] must be empty (no Slack) or the app's "
                f"signing secret ({MIN_WEBHOOK_SECRET_LENGTH}+ characters).",
                hint='For example os.environ["SLACK_SIGNING_SECRET"] (Basic Information page).',
                id="agent_ledger.E037",
            )
        )
    lookup = value.get("SLACK_USER_LOOKUP")
    if lookup is not None:
        problem = None
        if not isinstance(lookup, str):
            problem = f"must be a dotted path, got {type(lookup).__name__}"
        else:
            try:
                if not callable(import_string(lookup)):
                    problem = f"{lookup} is not callable"
            except ImportError as exc:
                problem = f"cannot import {lookup}: {exc}"
        if problem:
            errors.append(
                Error(
                    f"AGENT_LEDGER['SLACK_USER_LOOKUP'] {problem}.",
                    hint="The dotted path of fn(team_id, slack_user) -> a user or None.",
                    id="agent_ledger.E038",
                )
            )
    return errors


@register()
def check_data_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """``REDACT`` and ``KEY_LIFETIME``: built here once, as the ledger would build them."""
    from .redaction import redactor_from_setting
    from .types import parse_duration

    value = getattr(settings, "AGENT_LEDGER", {})
    if not isinstance(value, dict):
        return []  # E001 says so
    errors: list[CheckMessage] = []
    redact = value.get("REDACT")
    if redact is not None:
        try:
            redactor_from_setting(redact, str(getattr(settings, "SECRET_KEY", "")))
        except EffectLedgerValidationError as exc:
            function = exc.field == "REDACT['function']"
            errors.append(
                Error(
                    f"AGENT_LEDGER['REDACT'] is invalid: {exc}",
                    hint=(
                        "Give the dotted path of a function (value, *, tool, part) -> value."
                        if function
                        else 'A list of key-path rules ("authorization", "*.api_key", '
                        '"card.number") or a dict with paths, tools, function, hash, hash_key.'
                    ),
                    id="agent_ledger.E012" if function else "agent_ledger.E011",
                )
            )
    lifetime = value.get("KEY_LIFETIME")
    if lifetime is not None:
        try:
            parse_duration(lifetime, "KEY_LIFETIME")
        except EffectLedgerValidationError as exc:
            errors.append(
                Error(
                    f"AGENT_LEDGER['KEY_LIFETIME'] is invalid: {exc}",
                    hint='None (pruned keys stay closed forever), a duration such as "365d", '
                    "or a timedelta.",
                    id="agent_ledger.E013",
                )
            )
    return errors
