"""The app's settings: one ``AGENT_LEDGER`` dict, read at call time so ``override_settings`` works.

Defaults (every key is optional)::

    AGENT_LEDGER = {
        "DATABASE": "default",              # alias DjangoStore() uses when none is given
        "MAX_ARGS_SIZE_BYTES": 1048576,     # canonical-JSON args larger than this are refused
        "WEBHOOK_SECRETS": {},              # {"name": "shared secret"}; several allow rotation
        "WEBHOOK_TOLERANCE_SECONDS": 300,   # signed timestamps older/newer than this are refused
        "ASYNC_THREADS": 16,                # threads (so at most this many connections) that
                                            # DjangoStore's async methods run their queries on;
                                            # read once, when the first async call is made
        "REDACT": None,                     # what to redact before storage (agent_ledger.redaction)
        "KEY_LIFETIME": None,               # how long a pruned key stays closed, e.g. "365d";
                                            # None: forever (agent_ledger.retention)
    }

Retired keys (refused by check E002 with a hint, never reused): ``PREPARE_STATEMENTS`` and
``REPLAY_COUNT_DELAY_SECONDS`` (0.1), whose machinery the stores no longer have.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

#: Webhook secrets shorter than this are refused by the system check and never used to verify.
MIN_WEBHOOK_SECRET_LENGTH = 16

DEFAULTS: dict[str, Any] = {
    "DATABASE": "default",
    "MAX_ARGS_SIZE_BYTES": 1024 * 1024,
    "WEBHOOK_SECRETS": {},
    "WEBHOOK_TOLERANCE_SECONDS": 300,
    "ASYNC_THREADS": 16,
    "REDACT": None,
    "KEY_LIFETIME": None,
}

#: Keys that once existed, with why they went (the check ids that validated them are retired).
RETIRED: dict[str, str] = {
    "PREPARE_STATEMENTS": "DjangoStore runs its statements through Django's own cursor now",
    "REPLAY_COUNT_DELAY_SECONDS": "replays are counted by the statement that finds the key",
}


class LedgerSettings:
    """Attribute access to ``settings.AGENT_LEDGER`` merged over ``DEFAULTS``."""

    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(f"AGENT_LEDGER has no setting {name!r}")
        return user_settings().get(name, DEFAULTS[name])


def user_settings() -> dict[str, Any]:
    value = getattr(settings, "AGENT_LEDGER", {})
    return value if isinstance(value, dict) else {}


ledger_settings = LedgerSettings()
