"""Export of the audit trail (``agent_ledger.export``): rows, filters, formats, redaction, the
``agent_ledger_export`` command and the streaming ``GET export/`` endpoint."""

from __future__ import annotations

import csv
import io
import itertools
import json
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.http import StreamingHttpResponse
from django.test import override_settings
from django.urls import reverse
from rest_framework.test import APIClient

from agent_ledger import EffectLedgerValidationError
from agent_ledger.export import EFFECT_COLUMNS, HISTORY_COLUMNS, ExportFilter, export_lines
from agent_ledger.models import Effect, EffectTransition
from tests.ledger_rows import make_effect, make_user

pytestmark = pytest.mark.django_db

EXPORT = reverse("agent_ledger_api:export")
CARD = "4242424242424242"
T0 = datetime(2026, 3, 1, tzinfo=dt_timezone.utc)
_users = itertools.count(1)


@pytest.fixture
def trail() -> list[Effect]:
    """Three effects on two workflows and two tools, a day apart, with their history."""
    effects = []
    for day, (workflow, tool, status) in enumerate(
        [
            ("order-1", "stripe.charge", "succeeded"),
            ("order-1", "mail.send", "failed"),
            ("order-2", "stripe.charge", "succeeded"),
        ]
    ):
        effect = make_effect(
            status=status,
            workflow_id=workflow,
            tool=tool,
            args={"amount": 10 * (day + 1), "card": {"number": CARD}},
        )
        at = T0 + timedelta(days=day)
        Effect.objects.filter(pk=effect.pk).update(
            created_at=at,
            completed_at=at + timedelta(seconds=2),
            result={"charge": f"ch_{day}"} if status == "succeeded" else None,
            error={"message": f"card {CARD} declined", "code": "card"}
            if status == "failed"
            else None,
        )
        EffectTransition.objects.filter(effect=effect).update(at=at)
        EffectTransition.objects.create(
            effect=effect,
            from_status="processing",
            to_status=status,
            at=at + timedelta(seconds=2),
            actor_label="system",
        )
        effect.refresh_from_db()
        effects.append(effect)
    return effects


def jsonl(lines: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines]


def test_history_rows_in_time_order_with_each_call_named(trail: list[Effect]) -> None:
    rows = jsonl(export_lines("jsonl"))
    assert [tuple(row) for row in rows] == [HISTORY_COLUMNS] * 6
    assert [(r["workflow_id"], r["tool"], r["from_status"], r["to_status"]) for r in rows] == [
        ("order-1", "stripe.charge", None, "succeeded"),
        ("order-1", "stripe.charge", "processing", "succeeded"),
        ("order-1", "mail.send", None, "failed"),
        ("order-1", "mail.send", "processing", "failed"),
        ("order-2", "stripe.charge", None, "succeeded"),
        ("order-2", "stripe.charge", "processing", "succeeded"),
    ]
    assert rows[0]["effect_id"] == str(trail[0].pk) and rows[0]["at"].startswith("2026-03-01")


def test_filters_by_period_workflow_tool_and_status(trail: list[Effect]) -> None:
    def effects(**filters: Any) -> list[str]:
        return [r["id"] for r in jsonl(export_lines("jsonl", "effects", ExportFilter(**filters)))]

    ids = [str(e.pk) for e in trail]
    assert effects() == ids
    assert effects(since=T0 + timedelta(days=1)) == ids[1:]
    assert effects(until=T0 + timedelta(days=1)) == ids[:1]
    assert effects(workflow_id="order-1") == ids[:2]
    assert effects(tool="stripe.charge") == [ids[0], ids[2]]
    assert effects(status="failed") == [ids[1]]
    history = jsonl(export_lines("jsonl", "history", ExportFilter(tool="mail.send")))
    assert {r["effect_id"] for r in history} == {ids[1]}


def test_effect_rows_carry_args_result_and_error(trail: list[Effect]) -> None:
    first, second = jsonl(export_lines("jsonl", "effects"))[:2]
    assert tuple(first) == EFFECT_COLUMNS
    assert first["args"] == {"amount": 10, "card": {"number": CARD}}  # no rules: exact
    assert first["result"] == {"charge": "ch_0"}
    assert second["error"] == {"message": f"card {CARD} declined", "code": "card"}


def test_the_export_redacts_with_the_current_rules_even_rows_stored_before_them(
    trail: list[Effect],
) -> None:
    with override_settings(AGENT_LEDGER={**settings.AGENT_LEDGER, "REDACT": ["card.number"]}):
        text = "".join(export_lines("jsonl", "effects")) + "".join(export_lines("csv", "effects"))
    assert CARD not in text
    assert "[redacted]" in text


def test_csv_has_a_header_json_cells_and_no_formulas(trail: list[Effect]) -> None:
    Effect.objects.filter(pk=trail[0].pk).update(workflow_id='=HYPERLINK("http://x")')
    rows = list(csv.reader(io.StringIO("".join(export_lines("csv", "effects")))))
    assert tuple(rows[0]) == EFFECT_COLUMNS
    assert len(rows) == 4
    first = dict(zip(EFFECT_COLUMNS, rows[1], strict=True))
    assert first["workflow_id"] == '\'=HYPERLINK("http://x")'
    assert json.loads(first["args"]) == {"amount": 10, "card": {"number": CARD}}
    assert first["completed_at"].startswith("2026-03-01T00:00:02")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: export_lines("xml"), "format"),
        (lambda: export_lines("csv", "rows"), "rows"),
        (lambda: ExportFilter(since=T0, until=T0), "until"),
        (lambda: ExportFilter(since="2026-01-01"), "since"),
        (lambda: ExportFilter(status="done"), "status"),
        (lambda: ExportFilter(workflow_id=""), "workflow_id"),
        (lambda: ExportFilter(tool="t" * 256), "tool"),
        (lambda: export_lines("csv", "history", {"tool": "x"}), "filters"),
    ],
)
def test_bad_export_input_is_refused(call: Any, field: str) -> None:
    with pytest.raises(EffectLedgerValidationError) as caught:
        call()
    assert caught.value.field == field


# -- the command --------------------------------------------------------------------------------


def test_the_command_writes_jsonl_to_stdout_and_csv_to_a_file(
    trail: list[Effect], tmp_path: Path
) -> None:
    out = io.StringIO()
    call_command("agent_ledger_export", "--workflow-id", "order-2", stdout=out)
    rows = jsonl(out.getvalue().splitlines())
    assert [(r["from_status"], r["to_status"]) for r in rows] == [
        (None, "succeeded"),
        ("processing", "succeeded"),
    ]
    target = tmp_path / "trail.csv"
    err = io.StringIO()
    call_command(
        "agent_ledger_export",
        "--format=csv",
        "--rows=effects",
        "--since=2026-03-02",
        "--until=2026-03-03T00:00:00+00:00",
        f"--output={target}",
        stdout=io.StringIO(),
        stderr=err,
    )
    rows_in_file = list(csv.reader(target.open(encoding="utf-8")))
    assert [r[0] for r in rows_in_file[1:]] == [str(trail[1].pk)]
    assert "wrote 2 lines" in err.getvalue()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "xml"], "unknown format"),
        (["--rows", "users"], "unknown rows"),
        (["--since", "yesterday"], "not an ISO 8601"),
        (["--since", "2026-13-45"], "not an ISO 8601"),
        (["--since", "2026-03-02", "--until", "2026-03-01"], "later than since"),
        (["--status", "done"], "status"),
    ],
)
def test_the_command_refuses_bad_input(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        call_command("agent_ledger_export", *args, stdout=io.StringIO())


# -- the API ------------------------------------------------------------------------------------


def api(*perms: str) -> APIClient:
    client = APIClient()
    client.force_authenticate(make_user(f"exporter{next(_users)}", *perms))
    return client


def body(response: Any) -> str:
    assert isinstance(response, StreamingHttpResponse)
    return b"".join(response.streaming_content).decode()  # type: ignore[arg-type]


def test_the_api_streams_jsonl_and_csv(trail: list[Effect]) -> None:
    client = api("agent_ledger.view_effect")
    response = client.get(EXPORT, {"workflow_id": "order-1", "rows": "effects"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/x-ndjson")
    assert 'filename="agent-ledger-effects-' in response["Content-Disposition"]
    assert [r["tool"] for r in jsonl(body(response).splitlines())] == [
        "stripe.charge",
        "mail.send",
    ]
    response = client.get(EXPORT, {"output": "csv", "since": "2026-03-03T00:00:00Z"})
    assert response["Content-Type"].startswith("text/csv")
    assert len(list(csv.reader(io.StringIO(body(response))))) == 1 + 2


def test_the_api_export_is_redacted(trail: list[Effect]) -> None:
    with override_settings(AGENT_LEDGER={**settings.AGENT_LEDGER, "REDACT": ["number"]}):
        response = api("agent_ledger.view_effect").get(EXPORT, {"rows": "effects"})
        text = body(response)
    assert CARD not in text and "[redacted]" in text


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"output": "xml"}, "output"),
        ({"rows": "users"}, "rows"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-03-02T00:00:00Z", "until": "2026-03-01T00:00:00Z"}, "until"),
        ({"status": "done"}, "status"),
        ({"tool": "t" * 256}, "tool"),
        ({"workflow": "order-1"}, "workflow"),
    ],
)
def test_the_api_refuses_bad_filters(query: dict[str, str], field: str) -> None:
    response = api("agent_ledger.view_effect").get(EXPORT, query)
    assert response.status_code == 400
    assert field in response.json()


def test_the_api_export_needs_view_permission() -> None:
    assert api().get(EXPORT).status_code == 403
    assert APIClient().get(EXPORT).status_code in (401, 403)
