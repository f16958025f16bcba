"""Views: they authenticate, check permissions, validate with a serializer and call the service.

A decision that was not applied is returned as a ``Response`` (409), not raised: under
``ATOMIC_REQUESTS`` a raised ``APIException`` would roll back the request's transaction.
"""

from __future__ import annotations

import base64
from typing import Any

from django.db.models import QuerySet
from django.utils.dateparse import parse_datetime
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.filters import OrderingFilter
from rest_framework.pagination import Cursor, CursorPagination
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .. import services
from ..errors import EffectLedgerValidationError, EffectNotFoundError
from ..models import Effect, EffectStatus, EffectTransition
from ..stores.base import TransitionRecord
from ..types import Actor
from .authentication import WebhookSender, WebhookSignatureAuthentication
from .filters import EffectFilterBackend
from .parsers import SafeJSONParser
from .permissions import (
    VIEW_PERMISSION,
    CanApproveEffects,
    CanViewEffects,
    IsSignedWebhook,
    SameSiteForAmbientCredentials,
)
from .schema import document, response, view_schema
from .serializers import (
    ConflictSerializer,
    DecisionOutcomeSerializer,
    DecisionSerializer,
    EffectDetailSerializer,
    EffectSerializer,
    WebhookDecisionSerializer,
    WebhookResultSerializer,
)

DECIDE = {"approve": services.approve, "deny": services.deny}
PAST = {"approve": "approved", "deny": "denied"}
DECISION_RESPONSES = {
    200: response(
        EffectDetailSerializer,
        "Decided; the effect with its history (only the outcome without view_effect).",
    ),
    400: response(None, "Bad body: unknown field, or reason not a string or too long."),
    403: response(None, "No approve_effect, or a cross-site request with browser credentials."),
    404: response(None, "No such effect."),
    409: response(ConflictSerializer, "Not awaiting approval; body has the current status."),
}


class EffectCursorPagination(CursorPagination):
    """Stable pages while new effects arrive; no COUNT(*), however large the table."""

    ordering = "-created_at"
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500

    def decode_cursor(self, request: Request) -> Cursor | None:
        """A cursor that was not made here is a 400: DRF would answer 404 for a bad encoding
        and let a tampered position reach the database (a 500 on PostgreSQL)."""
        invalid = ValidationError({self.cursor_query_param: ["Invalid cursor."]})
        encoded = request.query_params.get(self.cursor_query_param)
        if encoded is None:
            return None
        try:
            # DRF's decoding skips characters that are not base64; a cursor made here has none.
            base64.b64decode(encoded.encode("ascii"), validate=True)
            cursor = super().decode_cursor(request)
        except (ValueError, NotFound):
            raise invalid from None
        if cursor is not None and cursor.position is not None:
            try:
                valid = "\x00" not in cursor.position and parse_datetime(cursor.position)
            except ValueError:
                valid = False
            if not valid:
                raise invalid
        return cursor


#: Parsers of every view here: DRF's defaults, with JSON nested too deeply answered by a 400.
PARSERS = [SafeJSONParser, FormParser, MultiPartParser]


class EffectViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """The audit trail: list and read effects; approve or deny one awaiting approval.

    Authentication is the project's own (DRF's ``DEFAULT_AUTHENTICATION_CLASSES``), and so is
    the challenge: a 401 with ``WWW-Authenticate`` only when the first class asks for one (a
    Basic challenge makes browsers prompt and then send the login with every request).
    """

    queryset = Effect.objects.all()
    permission_classes = [CanViewEffects]
    parser_classes = PARSERS
    pagination_class = EffectCursorPagination
    filter_backends = [EffectFilterBackend, OrderingFilter]
    # Cursor pagination needs an unchanging position: the creation time, either direction.
    ordering_fields = ["created_at"]
    ordering = ["-created_at"]
    schema = view_schema()

    def get_queryset(self) -> QuerySet[Effect]:
        queryset = Effect.objects.all()
        if self.action == "retrieve":
            queryset = queryset.with_history()
        return queryset

    def get_serializer_class(self) -> type:
        if self.action == "list":
            return EffectSerializer
        if self.action in DECIDE:
            return DecisionSerializer
        return EffectDetailSerializer

    @document(request=DecisionSerializer, responses=DECISION_RESPONSES)
    @action(
        detail=True,
        methods=["post"],
        permission_classes=[CanApproveEffects, SameSiteForAmbientCredentials],
    )
    def approve(self, request: Request, pk: str | None = None) -> Response:
        """``requires_approval -> ready``; 409 with the current status when it is not waiting."""
        return self._decide(request, "approve")

    @document(request=DecisionSerializer, responses=DECISION_RESPONSES)
    @action(
        detail=True,
        methods=["post"],
        permission_classes=[CanApproveEffects, SameSiteForAmbientCredentials],
    )
    def deny(self, request: Request, pk: str | None = None) -> Response:
        """``requires_approval -> denied``; 409 with the current status when it is not waiting."""
        return self._decide(request, "deny")

    def _decide(self, request: Request, decision: str) -> Response:
        effect = self.get_object()
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        actor = Actor("api", user_id=request.user.pk, name=request.user.get_username())
        try:
            record = DECIDE[decision](
                effect.idem_key, actor=actor, reason=serializer.validated_data.get("reason")
            )
        except EffectNotFoundError:
            return Response({"detail": "Not found."}, status=status.HTTP_404_NOT_FOUND)
        except EffectLedgerValidationError as exc:
            return Response({exc.field or "detail": [str(exc)]}, status=400)
        if not record.changed:
            return Response(
                {
                    "detail": "The effect is not awaiting approval.",
                    "code": "not_awaiting_approval",
                    "status": record.effect.status.value,
                },
                status=status.HTTP_409_CONFLICT,
            )
        context = self.get_serializer_context()
        if not request.user.has_perm(VIEW_PERMISSION):
            # May decide, may not read: the outcome, never the args, result or history.
            return Response(DecisionOutcomeSerializer(record.effect, context=context).data)
        fresh = Effect.objects.with_history().get(pk=effect.pk)
        return Response(EffectDetailSerializer(fresh, context=context).data)


class WebhookView(APIView):
    """``POST`` a signed decision from an external approver (see ``authentication``).

    The same decision twice is a success that says "already"; a different one is a 409.
    """

    authentication_classes = [WebhookSignatureAuthentication]
    permission_classes = [IsSignedWebhook]
    parser_classes = [SafeJSONParser]
    schema = view_schema()

    def get_serializer(self, *args: Any, **kwargs: Any) -> WebhookDecisionSerializer:
        return WebhookDecisionSerializer(*args, **kwargs)

    @document(
        request=WebhookDecisionSerializer,
        responses={
            200: response(WebhookResultSerializer, "Decided, or the same decision already was."),
            400: response(None, "Unknown decision or a bad body."),
            401: response(None, "Missing or bad signature, or a stale timestamp."),
            503: response(None, "No webhook secret long enough to verify with is configured."),
            404: response(None, "No such effect."),
            409: response(ConflictSerializer, "The effect was decided otherwise or never waited."),
        },
    )
    def post(self, request: Request) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        lookup = {"idem_key": data["idem_key"]} if "idem_key" in data else {"pk": data["effect_id"]}
        effect = Effect.objects.filter(**lookup).only("pk", "idem_key").first()
        if effect is None:
            return Response({"detail": "No such effect."}, status=status.HTTP_404_NOT_FOUND)
        sender: WebhookSender = request.user
        actor = Actor(f"webhook:{sender.secret_name}", name=data["approver"])
        decision = data["decision"]
        try:
            record = DECIDE[decision](effect.idem_key, actor=actor, reason=data.get("reason"))
        except EffectNotFoundError:
            return Response({"detail": "No such effect."}, status=status.HTTP_404_NOT_FOUND)
        except EffectLedgerValidationError as exc:
            return Response({exc.field or "detail": [str(exc)]}, status=400)
        if record.changed:
            return self._answer(PAST[decision], record)
        if _already(decision, effect.pk, record):
            return self._answer(f"already {PAST[decision]}", record)
        return Response(
            {
                "detail": f"Cannot {decision}: the effect is not awaiting approval.",
                "code": "not_awaiting_approval",
                "status": record.effect.status.value,
                "effect_id": record.effect.id,
                "idem_key": record.effect.idem_key,
            },
            status=status.HTTP_409_CONFLICT,
        )

    @staticmethod
    def _answer(result: str, record: TransitionRecord) -> Response:
        return Response(
            {
                "result": result,
                "status": record.effect.status.value,
                "effect_id": record.effect.id,
                "idem_key": record.effect.idem_key,
            }
        )


def _already(decision: str, effect_pk: Any, record: TransitionRecord) -> bool:
    """Whether this decision was already made: denied, or once approved (it may have run since)."""
    if decision == "deny":
        return record.effect.status.value == EffectStatus.DENIED
    return EffectTransition.objects.filter(
        effect_id=effect_pk,
        from_status=EffectStatus.REQUIRES_APPROVAL,
        to_status=EffectStatus.READY,
    ).exists()
