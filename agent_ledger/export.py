"""Export the audit trail of a period, a workflow or a tool as JSON Lines or CSV, streamed.

Two row kinds: ``history`` (one row per status change: who did what to which call, when; the
audit trail proper) and ``effects`` (one row per call with its arguments, result and error).
Filters: ``since`` (inclusive) and ``until`` (exclusive), on the effect's creation for
``effects`` and on the change's time for ``history``; ``workflow_id``, ``tool`` and ``status``
(the effect's). Rows come in time order, read in chunks (``QuerySet.iterator()``), so memory
stays flat however large the period.

Redaction: what the tables hold is already redacted (``agent_ledger.redaction``); an export
applies ``AGENT_LEDGER["REDACT"]`` once more to arguments, results and error messages, so rows
stored before a rule was added leave redacted too. CSV cells that a spreadsheet would run as a
formula (starting with ``= + - @``, a tab or a carriage return) get a leading ``'``; JSON Lines
keep every value exactly, for loading into a warehouse. The management command
``agent_ledger_export`` and ``GET export/`` of the API use ``export_lines``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Iterator
from datetime import datetime
from datetime import timezone as dt_timezone
from typing import Any

from django.utils import timezone

from .conf import ledger_settings
from .errors import EffectLedgerValidationError
from .models import Effect, EffectStatus, EffectTransition
from .redaction import Redactor, settings_redactor
from .types import MAX_NAME_LENGTH, EffectError

__all__ = ["FORMATS", "ROWS", "ExportFilter", "columns", "export_lines"]

FORMATS = ("jsonl", "csv")
ROWS = ("history", "effects")
EFFECT_COLUMNS = (
    "id",
    "idem_key",
    "workflow_id",
    "call_id",
    "tool",
    "status",
    "dedup_count",
    "fence",
    "created_at",
    "updated_at",
    "completed_at",
    "args",
    "resource_id",
    "result",
    "error",
)
HISTORY_COLUMNS = (
    "effect_id",
    "idem_key",
    "workflow_id",
    "call_id",
    "tool",
    "at",
    "from_status",
    "to_status",
    "actor_label",
    "actor_user_id",
    "actor_name",
    "reason",
)
CHUNK_SIZE = 2_000
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclasses.dataclass(frozen=True)
class ExportFilter:
    """What to export; every field optional. Validated where it is built."""

    since: datetime | None = None
    until: datetime | None = None
    workflow_id: str | None = None
    tool: str | None = None
    status: str | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, datetime):
                raise EffectLedgerValidationError(
                    f"must be a datetime, got {type(value).__name__}", field=name
                )
            if isinstance(value, datetime) and timezone.is_naive(value):
                object.__setattr__(self, name, timezone.make_aware(value, dt_timezone.utc))
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise EffectLedgerValidationError("must be later than since", field="until")
        for name in ("workflow_id", "tool"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, str) or not value or len(value) > MAX_NAME_LENGTH
            ):
                raise EffectLedgerValidationError(
                    f"must be a string of 1-{MAX_NAME_LENGTH} characters", field=name
                )
        if self.status is not None and self.status not in EffectStatus.values:
            raise EffectLedgerValidationError(
                f"must be one of {', '.join(EffectStatus.values)}, got {self.status!r}",
                field="status",
            )


def columns(rows: str) -> tuple[str, ...]:
    return EFFECT_COLUMNS if rows == "effects" else HISTORY_COLUMNS


def export_lines(
    fmt: str,
    rows: str = "history",
    filters: ExportFilter | None = None,
    *,
    using: str | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> Iterator[str]:
    """The export as lines of text (each ends with a newline); CSV starts with its header.

    Validates everything before the first line, so a bad request fails before streaming.
    """
    if fmt not in FORMATS:
        raise EffectLedgerValidationError(
            f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}", field="format"
        )
    if rows not in ROWS:
        raise EffectLedgerValidationError(
            f"unknown rows {rows!r}; use one of {', '.join(ROWS)}", field="rows"
        )
    filters = filters or ExportFilter()
    if not isinstance(filters, ExportFilter):
        raise EffectLedgerValidationError("must be an ExportFilter", field="filters")
    using = using or ledger_settings.DATABASE
    records = (
        _effects(filters, using, chunk_size)
        if rows == "effects"
        else _history(filters, using, chunk_size)
    )
    return _csv(records, columns(rows)) if fmt == "csv" else _jsonl(records)


def _effects(filters: ExportFilter, using: str, chunk_size: int) -> Iterator[dict[str, Any]]:
    queryset = Effect.objects.using(using).in_period(filters.since, filters.until)
    queryset = _narrowed(queryset, filters, prefix="")
    redactor = settings_redactor()
    for row in queryset.order_by("created_at", "id").iterator(chunk_size=chunk_size):
        args = _loads(row.args_canonical)
        result, error = row.result, row.error
        if redactor and isinstance(args, dict):
            result, error = _redacted(redactor, row, args, result, error)
            args = redactor.redact(args, tool=row.tool, part="args")[0]
        yield {
            "id": str(row.pk),
            "idem_key": row.idem_key,
            "workflow_id": row.workflow_id,
            "call_id": row.call_id,
            "tool": row.tool,
            "status": row.status,
            "dedup_count": row.dedup_count,
            "fence": row.fence,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "completed_at": row.completed_at,
            "args": args,
            "resource_id": None
            if row.resource_id_canonical is None
            else _loads(row.resource_id_canonical),
            "result": result,
            "error": error,
        }


def _history(filters: ExportFilter, using: str, chunk_size: int) -> Iterator[dict[str, Any]]:
    queryset = EffectTransition.objects.using(using).all()
    if filters.since is not None:
        queryset = queryset.filter(at__gte=filters.since)
    if filters.until is not None:
        queryset = queryset.filter(at__lt=filters.until)
    queryset = _narrowed(queryset, filters, prefix="effect__")
    values = queryset.order_by("at", "id").values_list(
        "effect_id",
        "effect__idem_key",
        "effect__workflow_id",
        "effect__call_id",
        "effect__tool",
        "at",
        "from_status",
        "to_status",
        "actor_label",
        "actor_user_id",
        "actor_name",
        "reason",
    )
    for row in values.iterator(chunk_size=chunk_size):
        record = dict(zip(HISTORY_COLUMNS, row, strict=True))
        record["effect_id"] = str(record["effect_id"])
        yield record


def _narrowed(queryset: Any, filters: ExportFilter, *, prefix: str) -> Any:
    for name in ("workflow_id", "tool", "status"):
        value = getattr(filters, name)
        if value is not None:
            queryset = queryset.filter(**{f"{prefix}{name}": value})
    return queryset


def _redacted(
    redactor: Redactor, row: Effect, args: dict[str, Any], result: Any, error: Any
) -> tuple[Any, Any]:
    result = redactor.redact(result, tool=row.tool, part="result")[0]
    if isinstance(error, dict):
        secrets = redactor.redact(args, tool=row.tool, part="args")[1]
        stored = EffectError.from_dict(error)
        if stored is not None:
            error = redactor.error(stored, secrets).to_dict()
    return result, error


def _jsonl(records: Iterator[dict[str, Any]]) -> Iterator[str]:
    for record in records:
        yield json.dumps(record, default=_default, ensure_ascii=False, sort_keys=False) + "\n"


def _csv(records: Iterator[dict[str, Any]], names: tuple[str, ...]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def line(values: list[Any]) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(values)
        return buffer.getvalue()

    yield line(list(names))
    for record in records:
        yield line([_cell(record[name]) for name in names])


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (dict, list)):
        value = json.dumps(value, ensure_ascii=False, sort_keys=True)
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value  # a spreadsheet would run it as a formula
    return value


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
