"""``POST effects/<id>/retry/`` and ``POST effects/<id>/resolve/``: the operator actions
(``agent_ledger.operator``) over the API. Serializers validate, the views call the service; a
refused action is a 409 ``Response`` (not a raised exception, which would roll back under
``ATOMIC_REQUESTS``)."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers, status
from rest_framework.generics import GenericAPIView
from rest_framework.request import Request
from rest_framework.response import Response

from .. import services
from ..errors import EffectLedgerValidationError, EffectNotFoundError
from ..models import Effect
from ..operator import MAX_ERROR_MESSAGE_LENGTH, MAX_REASON_LENGTH, outcome_of
from ..stores.base import TransitionRecord
from ..types import Actor
from .parsers import SafeJSONParser
from .permissions import SameSiteForAmbientCredentials, _HasPermission
from .schema import document, response, view_schema
from .serializers import (
    ConflictSerializer,
    EffectDetailSerializer,
    StrictCharField,
    StrictSerializer,
)


class CanRetryEffects(_HasPermission):
    permission = "agent_ledger.retry_effect"
    message = "You need the agent_ledger.retry_effect permission."


class CanResolveEffects(_HasPermission):
    permission = "agent_ledger.resolve_effect"
    message = "You need the agent_ledger.resolve_effect permission."


class RetrySerializer(StrictSerializer):
    """Why the failed effect may run again (required)."""

    reason = StrictCharField(max_length=MAX_REASON_LENGTH)


class ErrorSerializer(serializers.Serializer):
    message = StrictCharField(max_length=MAX_ERROR_MESSAGE_LENGTH)
    code = StrictCharField(required=False, allow_null=True, max_length=100)

    def to_internal_value(self, data: Any) -> Any:
        # Nested, so StrictSerializer's check (on initial_data) does not reach it.
        if isinstance(data, dict) and set(data) - set(self.fields):
            unknown = sorted(set(data) - set(self.fields))
            raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return super().to_internal_value(data)


class ResolveSerializer(StrictSerializer):
    """What really happened: ``succeeded`` with an optional JSON ``result``, or ``failed`` with
    an ``error``; and why the operator knows."""

    outcome = serializers.ChoiceField(choices=["succeeded", "failed"])
    result = serializers.JSONField(required=False, allow_null=True)
    error = ErrorSerializer(required=False)
    reason = StrictCharField(max_length=MAX_REASON_LENGTH)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        if attrs["outcome"] == "failed" and "error" not in attrs:
            raise serializers.ValidationError({"error": ["Required when the outcome is failed."]})
        if attrs["outcome"] == "succeeded" and "error" in attrs:
            raise serializers.ValidationError({"error": ["Only when the outcome is failed."]})
        if attrs["outcome"] == "failed" and attrs.get("result") is not None:
            raise serializers.ValidationError({"result": ["Only when the outcome is succeeded."]})
        return attrs


OPERATOR_RESPONSES = {
    200: response(EffectDetailSerializer, "Done; the effect with its history."),
    400: response(None, "Bad body: unknown field, missing reason, bad outcome."),
    404: response(None, "No such effect."),
    409: response(ConflictSerializer, "The effect is not in the status this action needs."),
}


class _OperatorView(GenericAPIView):
    queryset = Effect.objects.all()
    parser_classes = [SafeJSONParser]
    schema = view_schema()
    #: The status the action needs, for the 409's message.
    needs = ""

    def act(self, effect: Effect, data: dict[str, Any], actor: Actor) -> TransitionRecord:
        raise NotImplementedError

    def post(self, request: Request, pk: str) -> Response:
        effect = self.get_object()
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        actor = Actor("api", user_id=request.user.pk, name=request.user.get_username())
        try:
            record = self.act(effect, serializer.validated_data, actor)
        except EffectNotFoundError:
            return Response({"detail": "Not found."}, status=status.HTTP_404_NOT_FOUND)
        except EffectLedgerValidationError as exc:
            return Response({exc.field or "detail": [str(exc)]}, status=400)
        if not record.changed:
            return Response(
                {
                    "detail": f"The effect is not {self.needs}.",
                    "code": f"not_{self.needs}",
                    "status": record.effect.status.value,
                },
                status=status.HTTP_409_CONFLICT,
            )
        fresh = Effect.objects.with_history().get(pk=effect.pk)
        return Response(EffectDetailSerializer(fresh, context=self.get_serializer_context()).data)


class RetryView(_OperatorView):
    """Reopen a failed effect (``failed -> ready``): the next run of its call runs again."""

    permission_classes = [CanRetryEffects, SameSiteForAmbientCredentials]
    serializer_class = RetrySerializer
    needs = "failed"

    @document(request=RetrySerializer, responses=OPERATOR_RESPONSES)
    def post(self, request: Request, pk: str) -> Response:
        return super().post(request, pk)

    def act(self, effect: Effect, data: dict[str, Any], actor: Actor) -> TransitionRecord:
        return services.retry(effect.idem_key, actor=actor, reason=data["reason"])


class ResolveView(_OperatorView):
    """Record the outcome of a processing effect whose owner is gone; waiters receive it."""

    permission_classes = [CanResolveEffects, SameSiteForAmbientCredentials]
    serializer_class = ResolveSerializer
    needs = "processing"

    @document(request=ResolveSerializer, responses=OPERATOR_RESPONSES)
    def post(self, request: Request, pk: str) -> Response:
        return super().post(request, pk)

    def act(self, effect: Effect, data: dict[str, Any], actor: Actor) -> TransitionRecord:
        error = data.get("error") or {}
        outcome = outcome_of(
            data["outcome"],
            result=data.get("result"),
            error_message=error.get("message", ""),
            error_code=error.get("code"),
        )
        return services.resolve(effect.idem_key, outcome, actor=actor, reason=data["reason"])
