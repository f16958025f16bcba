"""Serializers: they validate input and shape output; the views call the service."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from ..ledger import MAX_REASON_LENGTH
from ..models import Effect, EffectStatus, EffectTransition, status_label
from ..types import MAX_NAME_LENGTH

#: ``EffectTransition.actor_name`` is this wide.
MAX_APPROVER_LENGTH = 150


class StrictCharField(serializers.CharField):
    """A CharField that refuses numbers and booleans instead of turning them into text."""

    default_error_messages = {"invalid": "Must be a string."}

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return str(super().to_internal_value(data))


class StrictSerializer(serializers.Serializer):
    """Refuses fields it does not know, so a typo ("reson") is a 400, not a silent no-op."""

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if isinstance(self.initial_data, dict):
            unknown = sorted(set(self.initial_data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError(
                    {name: ["Unknown field."] for name in unknown}, code="unknown_field"
                )
        return attrs


class ActorSerializer(serializers.Serializer):
    label = serializers.CharField(source="actor_label")
    user_id = serializers.CharField(source="actor_user_id", allow_null=True)
    name = serializers.CharField(source="actor_name")


class TransitionSerializer(serializers.ModelSerializer):
    actor = ActorSerializer(source="*")

    class Meta:
        model = EffectTransition
        fields = ("from_status", "to_status", "at", "actor", "reason")


class EffectSerializer(serializers.ModelSerializer):
    """An effect without its (possibly large) arguments and result: the list view."""

    status_label = serializers.SerializerMethodField()
    duration_ms = serializers.SerializerMethodField()

    class Meta:
        model = Effect
        fields: tuple[str, ...] = (
            "id",
            "idem_key",
            "workflow_id",
            "call_id",
            "tool",
            "status",
            "status_label",
            "dedup_count",
            "error",
            "created_at",
            "updated_at",
            "completed_at",
            "duration_ms",
        )
        read_only_fields: tuple[str, ...] = fields

    def get_status_label(self, obj: Effect) -> str:
        """The same words the admin shows (``EffectStatus`` labels)."""
        return status_label(obj.status)

    def get_duration_ms(self, obj: Effect) -> float | None:
        if obj.completed_at is None or obj.created_at is None:
            return None
        return round((obj.completed_at - obj.created_at).total_seconds() * 1000, 3)


class EffectDetailSerializer(EffectSerializer):
    """One effect in full: arguments, resource, result, error and its history."""

    args = serializers.SerializerMethodField()
    resource = serializers.SerializerMethodField()
    resource_id = serializers.SerializerMethodField()
    history = TransitionSerializer(source="transitions", many=True, read_only=True)

    class Meta(EffectSerializer.Meta):
        fields = (
            *EffectSerializer.Meta.fields,
            "args",
            "resource",
            "resource_id",
            "result",
            "fence",
            "history",
        )
        read_only_fields = fields

    def get_args(self, obj: Effect) -> Any:
        return obj.args

    def get_resource(self, obj: Effect) -> dict[str, Any] | None:
        """``{"namespace", "type", "id"}`` when the key was made from a ``ResourceDescriptor``."""
        return obj.resource

    def get_resource_id(self, obj: Effect) -> Any:
        resource = obj.resource
        return None if resource is None else resource["id"]


class DecisionOutcomeSerializer(serializers.Serializer):
    """A decision's answer to an approver without ``view_effect``: the outcome, nothing read."""

    id = serializers.CharField()
    idem_key = serializers.CharField()
    status = serializers.CharField()
    status_label = serializers.SerializerMethodField()

    def get_status_label(self, obj: Any) -> str:
        return status_label(str(obj.status))


class DecisionSerializer(StrictSerializer):
    """The body of ``POST .../approve/`` and ``.../deny/``: an optional reason."""

    reason = StrictCharField(
        required=False, allow_null=True, allow_blank=True, max_length=MAX_REASON_LENGTH
    )

    def validate_reason(self, value: str | None) -> str | None:
        return (value.strip() or None) if value is not None else None


class WebhookDecisionSerializer(StrictSerializer):
    """An external approver's decision, naming the effect by key or by id (exactly one)."""

    DECISIONS = ("approve", "deny")

    decision = serializers.ChoiceField(
        choices=DECISIONS,
        error_messages={"invalid_choice": 'Unknown decision "{input}"; use "approve" or "deny".'},
    )
    approver = StrictCharField(max_length=MAX_APPROVER_LENGTH)
    reason = StrictCharField(
        required=False, allow_null=True, allow_blank=True, max_length=MAX_REASON_LENGTH
    )
    idem_key = StrictCharField(required=False, max_length=64)
    effect_id = serializers.UUIDField(required=False)

    def validate_reason(self, value: str | None) -> str | None:
        return (value.strip() or None) if value is not None else None

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        if ("idem_key" in attrs) == ("effect_id" in attrs):
            raise serializers.ValidationError(
                {"idem_key": ["Give exactly one of idem_key and effect_id."]}, code="required"
            )
        return attrs


class ConflictSerializer(serializers.Serializer):
    """A decision that does not apply: the effect is not awaiting approval (HTTP 409)."""

    detail = serializers.CharField()
    code = serializers.CharField()
    status = serializers.ChoiceField(choices=EffectStatus.choices)


class WebhookResultSerializer(serializers.Serializer):
    """What the webhook did: "approved", "denied", "already approved" or "already denied"."""

    result = serializers.CharField()
    status = serializers.ChoiceField(choices=EffectStatus.choices)
    effect_id = serializers.UUIDField()
    idem_key = serializers.CharField()


class EffectFilterSerializer(serializers.Serializer):
    """The list's query parameters; a bad value is a 400, never an ignored filter."""

    status = serializers.ChoiceField(choices=EffectStatus.choices, required=False)
    tool = StrictCharField(required=False, max_length=MAX_NAME_LENGTH)
    workflow_id = StrictCharField(required=False, max_length=MAX_NAME_LENGTH)
    created_after = serializers.DateTimeField(required=False)
    created_before = serializers.DateTimeField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        after, before = attrs.get("created_after"), attrs.get("created_before")
        if after is not None and before is not None and after > before:
            raise serializers.ValidationError(
                {"created_before": ["Must not be earlier than created_after."]}
            )
        return attrs
