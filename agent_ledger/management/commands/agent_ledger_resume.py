"""``manage.py agent_ledger_resume``: hand due resumptions to the task engine (``resume.sweep``).

Run it every minute or so (cron, systemd timer), or schedule the ``sweep_resumptions`` task
instead: it retries failed resumers once their backoff is over, and hands over resumptions a
crash or a ``PostgresStore`` worker left behind. Safe to run from many hosts at once.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from ...conf import ledger_settings
from ...resume import sweep


class Command(BaseCommand):
    help = "Hand due resumptions (agent_ledger.resume) to AGENT_LEDGER['RESUME_BACKEND']."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--database", default=None, help="Database alias (default: ledger's).")
        parser.add_argument(
            "--limit", type=int, default=100, help="Most resumptions to hand over (oldest first)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        using = options["database"] or ledger_settings.DATABASE
        count = sweep(using=using, limit=max(options["limit"], 0))
        self.stdout.write(f"Handed {count} resumption(s) to {ledger_settings.RESUME_BACKEND}.")
