"""``manage.py agent_ledger_prune --older-than 90d [--dry-run] [--batch-size N]``."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ...errors import EffectLedgerError
from ...retention import DEFAULT_BATCH_SIZE, key_lifetime, prune
from ...types import PruneReport, parse_duration


class Command(BaseCommand):
    help = (
        "Delete effects that finished longer ago than --older-than, with their history, in "
        "batches; their keys stay closed (tombstones) until AGENT_LEDGER['KEY_LIFETIME']. "
        "Pending, approved and running effects are never pruned."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            required=True,
            help="Prune effects finished longer ago than this: 45s, 30m, 12h, 90d, 2w.",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=DEFAULT_BATCH_SIZE,
            help=f"Effects per batch (one short transaction each); default {DEFAULT_BATCH_SIZE}.",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Count what would be pruned; change nothing."
        )
        parser.add_argument("--database", default=None, help="Database alias (AGENT_LEDGER's).")

    def handle(self, *args: Any, **options: Any) -> None:
        started = time.monotonic()
        try:
            age = parse_duration(options["older_than"], "--older-than")
            lifetime = key_lifetime()
        except EffectLedgerError as exc:
            raise CommandError(str(exc)) from exc
        if lifetime is not None and lifetime < age:
            self.stderr.write(
                self.style.WARNING(
                    f"KEY_LIFETIME ({lifetime}) is shorter than --older-than ({age}): pruned "
                    "keys reopen at once, so the same calls may run again."
                )
            )

        last = [0.0]

        def progress(report: PruneReport) -> None:
            # At most one line a second (a large prune has thousands of batches).
            if time.monotonic() - last[0] < 1:
                return
            last[0] = time.monotonic()
            self.stdout.write(
                f"batch {report.batches}: {report.effects:,} effects, "
                f"{report.transitions:,} history rows pruned so far "
                f"({time.monotonic() - started:.1f} s)"
            )

        try:
            report = prune(
                age,
                batch_size=options["batch_size"],
                dry_run=options["dry_run"],
                using=options["database"],
                progress=progress,
            )
        except EffectLedgerError as exc:
            raise CommandError(str(exc)) from exc
        verb, reopened = (
            ("would prune", "would reopen") if report.dry_run else ("pruned", "reopened")
        )
        self.stdout.write(
            self.style.SUCCESS(
                f"{verb} {report.effects:,} effects and {report.transitions:,} history rows "
                f"finished more than {options['older_than']} ago; {reopened} "
                f"{report.tombstones_expired:,} keys past KEY_LIFETIME "
                f"({time.monotonic() - started:.1f} s)"
            )
        )
