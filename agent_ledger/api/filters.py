"""The list's filters, as a DRF filter backend (django-filter is not required)."""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import ValidationError
from rest_framework.filters import BaseFilterBackend
from rest_framework.request import Request

from ..models import EffectQuerySet
from .serializers import EffectFilterSerializer


class EffectFilterBackend(BaseFilterBackend):
    """``?status=&tool=&workflow_id=&created_after=&created_before=`` (after inclusive, before
    exclusive); each filter has an index."""

    def filter_queryset(
        self, request: Request, queryset: EffectQuerySet, view: Any
    ) -> EffectQuerySet:
        fields = EffectFilterSerializer().fields
        params = {
            name: request.query_params[name] for name in fields if name in request.query_params
        }
        serializer = EffectFilterSerializer(data=params)
        if not serializer.is_valid():
            raise ValidationError(serializer.errors)
        data = serializer.validated_data
        if "status" in data:
            queryset = queryset.filter(status=data["status"])
        if "tool" in data:
            queryset = queryset.by_tool(data["tool"])
        if "workflow_id" in data:
            queryset = queryset.for_workflow(data["workflow_id"])
        if "created_after" in data or "created_before" in data:
            queryset = queryset.in_period(data.get("created_after"), data.get("created_before"))
        return queryset

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        def param(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
            return {
                "name": name,
                "required": False,
                "in": "query",
                "description": description,
                "schema": schema,
            }

        from ..models import EffectStatus

        return [
            param(
                "status",
                "Only effects with this status.",
                {"type": "string", "enum": EffectStatus.values},
            ),
            param("tool", "Only calls of this tool (exact name).", {"type": "string"}),
            param("workflow_id", "Only this workflow's calls.", {"type": "string"}),
            param(
                "created_after",
                "Created at or after (ISO 8601).",
                {"type": "string", "format": "date-time"},
            ),
            param(
                "created_before",
                "Created before (ISO 8601).",
                {"type": "string", "format": "date-time"},
            ),
        ]
