"""System checks for ``AGENT_LEDGER``: misconfiguration fails at startup, not at the first call.

Ids are ``agent_ledger.E001``... (errors) and ``agent_ledger.W001``... (warnings); never reuse one.
Retired: E009 (``PREPARE_STATEMENTS``) and E010 (``REPLAY_COUNT_DELAY_SECONDS``).
Data governance (``check_data_settings``): E011 ``REDACT``, E012 its ``function``, E013
``KEY_LIFETIME``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register

from .conf import DEFAULTS, MIN_WEBHOOK_SECRET_LENGTH, RETIRED
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
    size = value.get("MAX_ARGS_SIZE_BYTES", DEFAULTS["MAX_ARGS_SIZE_BYTES"])
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        errors.append(
            Error(
                "AGENT_LEDGER['MAX_ARGS_SIZE_BYTES'] must be a positive int.",
                hint=f"Got {size!r}; the default is {DEFAULTS['MAX_ARGS_SIZE_BYTES']}.",
                id="agent_ledger.E004",
            )
        )
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
    threads = value.get("ASYNC_THREADS", DEFAULTS["ASYNC_THREADS"])
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        errors.append(
            Error(
                "AGENT_LEDGER['ASYNC_THREADS'] must be a positive int.",
                hint=f"Got {threads!r}; the default is {DEFAULTS['ASYNC_THREADS']}. It also caps "
                "the connections async ledger calls open.",
                id="agent_ledger.E007",
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
    return errors


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
