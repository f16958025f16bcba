"""``manage.py agent_ledger_expire``: deny expired approvals and send expiry notices."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from agent_ledger import expiry


class Command(BaseCommand):
    help = (
        "Deny pending approvals past their expires_at (code 'expired', actor 'system') and send "
        "approval_expiring for those about to expire. Run it every minute or so."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch-size", type=int, default=100)
        parser.add_argument("--database", default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["batch_size"] < 1:
            self.stderr.write("--batch-size must be at least 1")
            raise SystemExit(2)
        done = expiry.run(using=options["database"], batch_size=options["batch_size"])
        self.stdout.write(f"{done['expired']} expired, {done['notified']} notified")
