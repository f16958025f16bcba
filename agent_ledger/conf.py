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
        "RESUME_BACKEND": "inline",         # how resumers run after a decision commits:
                                            # "inline" (in the deciding thread, for development),
                                            # "django_tasks" or "celery" (agent_ledger.tasks)
        "RESUME_MAX_ATTEMPTS": 5,           # a resumer failing this often is left "failed"
        "RESUME_RETRY_DELAY_SECONDS": 10,   # backoff after the first failure, doubling each time
        "RESUME_RETRY_MAX_DELAY_SECONDS": 3600,  # ... up to this
        "RESUME_STALE_SECONDS": 600,        # a resumption "running" this long lost its worker;
                                            # the sweep makes it pending again
        "TOOLS": {},                        # per-tool approval policies (agent_ledger.policies)
        "EXPIRING_NOTICE_BEFORE": 3600,     # approval_expiring this long (s) before expiry
        "SLACK_SIGNING_SECRET": "",         # verifies the Slack interactivity endpoint
        "SLACK_USER_LOOKUP": None,          # dotted path: fn(team_id, slack_user) -> user | None
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
    "RESUME_BACKEND": "inline",
    "RESUME_MAX_ATTEMPTS": 5,
    "RESUME_RETRY_DELAY_SECONDS": 10,
    "RESUME_RETRY_MAX_DELAY_SECONDS": 3600,
    "RESUME_STALE_SECONDS": 600,
    "TOOLS": {},
    "EXPIRING_NOTICE_BEFORE": 3600,
    "SLACK_SIGNING_SECRET": "",
    "SLACK_USER_LOOKUP": None,
}

#: ``RESUME_BACKEND`` values, and the module each needs (None: none).
RESUME_BACKENDS: dict[str, str | None] = {
    "inline": None,
    "django_tasks": "django.tasks (Django 6) or django_tasks (pip install django-tasks)",
    "celery": "celery",
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
