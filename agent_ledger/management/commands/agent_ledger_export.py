"""``manage.py agent_ledger_export [--format jsonl|csv] [--rows history|effects] [--since ...]
[--until ...] [--workflow-id ...] [--tool ...] [--status ...] [--output FILE]``."""

from __future__ import annotations

from datetime import datetime, time
from datetime import timezone as dt_timezone
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from ...errors import EffectLedgerError
from ...export import FORMATS, ROWS, ExportFilter, export_lines


def moment(value: str, option: str) -> datetime:
    """An ISO 8601 date or datetime; a date means its midnight, naive means UTC."""
    try:
        parsed = parse_datetime(value)
        if parsed is None and (day := parse_date(value)) is not None:
            parsed = datetime.combine(day, time.min)
    except ValueError:
        parsed = None
    if parsed is None:
        raise CommandError(f"{option}: {value!r} is not an ISO 8601 date or datetime")
    return timezone.make_aware(parsed, dt_timezone.utc) if timezone.is_naive(parsed) else parsed


class Command(BaseCommand):
    help = (
        "Export the audit trail (one row per status change, or per effect with --rows effects) "
        "as JSON Lines or CSV, redacted, to stdout or --output."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--format", default="jsonl", help=f"One of {', '.join(FORMATS)}.")
        parser.add_argument("--rows", default="history", help=f"One of {', '.join(ROWS)}.")
        parser.add_argument("--since", help="From this date or datetime (inclusive, ISO 8601).")
        parser.add_argument("--until", help="Until this date or datetime (exclusive).")
        parser.add_argument("--workflow-id", help="Only this workflow's calls.")
        parser.add_argument("--tool", help="Only calls of this tool (exact name).")
        parser.add_argument("--status", help="Only effects with this status now.")
        parser.add_argument("--output", help="Write to this file instead of stdout.")
        parser.add_argument("--database", default=None, help="Database alias (AGENT_LEDGER's).")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            filters = ExportFilter(
                since=moment(options["since"], "--since") if options["since"] else None,
                until=moment(options["until"], "--until") if options["until"] else None,
                workflow_id=options["workflow_id"],
                tool=options["tool"],
                status=options["status"],
            )
            lines = export_lines(
                options["format"], options["rows"], filters, using=options["database"]
            )
        except EffectLedgerError as exc:
            raise CommandError(str(exc)) from exc
        count = 0
        if options["output"]:
            with open(options["output"], "w", encoding="utf-8", newline="") as out:
                for line in lines:
                    out.write(line)
                    count += 1
            self.stderr.write(f"wrote {count:,} lines to {options['output']}")
            return
        for line in lines:
            self.stdout.write(line, ending="")
