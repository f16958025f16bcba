"""``GET export/``: the audit trail as JSON Lines or CSV, streamed (``agent_ledger.export``).

Query parameters: ``output`` (``jsonl`` or ``csv``; not ``format``, which DRF keeps for content
negotiation), ``rows`` (``history`` or ``effects``), ``since`` (inclusive) and ``until``
(exclusive, ISO 8601), ``workflow_id``, ``tool``, ``status``. Unknown parameters and bad values
are a 400 before anything streams. Needs ``agent_ledger.view_effect``: the same data as the
list and detail endpoints, in bulk.
"""

from __future__ import annotations

from typing import Any

from django.http import StreamingHttpResponse
from django.utils import timezone
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from ..errors import EffectLedgerValidationError
from ..export import FORMATS, ROWS, ExportFilter, export_lines
from ..models import EffectStatus
from ..types import MAX_NAME_LENGTH
from .permissions import CanViewEffects
from .schema import document, response, view_schema
from .serializers import StrictCharField, StrictSerializer

CONTENT_TYPES = {"jsonl": "application/x-ndjson; charset=utf-8", "csv": "text/csv; charset=utf-8"}


class ExportQuerySerializer(StrictSerializer):
    output = serializers.ChoiceField(choices=FORMATS, default="jsonl")
    rows = serializers.ChoiceField(choices=ROWS, default="history")
    since = serializers.DateTimeField(required=False)
    until = serializers.DateTimeField(required=False)
    workflow_id = StrictCharField(required=False, max_length=MAX_NAME_LENGTH)
    tool = StrictCharField(required=False, max_length=MAX_NAME_LENGTH)
    status = serializers.ChoiceField(choices=EffectStatus.choices, required=False)


class ExportView(APIView):
    """Stream the audit trail of a period, a workflow or a tool."""

    permission_classes = [CanViewEffects]
    schema = view_schema()

    @document(
        parameters=[ExportQuerySerializer],
        responses={
            200: response(None, "The rows, streamed (JSON Lines or CSV with a header)."),
            400: response(None, "Unknown parameter or a bad value."),
        },
    )
    def get(self, request: Request) -> Any:
        query = ExportQuerySerializer(data=request.query_params.dict())
        if not query.is_valid():
            return Response(query.errors, status=400)
        data = query.validated_data
        try:
            filters = ExportFilter(
                since=data.get("since"),
                until=data.get("until"),
                workflow_id=data.get("workflow_id"),
                tool=data.get("tool"),
                status=data.get("status"),
            )
            lines = export_lines(data["output"], data["rows"], filters)
        except EffectLedgerValidationError as exc:
            return Response({exc.field or "detail": [str(exc)]}, status=400)
        output, rows = data["output"], data["rows"]
        stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
        streamed = StreamingHttpResponse(lines, content_type=CONTENT_TYPES[output])
        streamed["Content-Disposition"] = (
            f'attachment; filename="agent-ledger-{rows}-{stamp}.{output}"'
        )
        return streamed
