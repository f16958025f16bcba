"""``EffectQuerySet``: each adjective filter, on whichever database ``DATABASE_URL`` names."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agent_ledger.models import Effect, EffectStatus, EffectTransition

pytestmark = pytest.mark.django_db


def make_effect(**fields: Any) -> Effect:
    """An effect row with harmless defaults; ``created_at``/``updated_at`` may be overridden."""
    timestamps = {k: fields.pop(k) for k in ("created_at", "updated_at") if k in fields}
    values: dict[str, Any] = {
        "idem_key": uuid.uuid4().hex + uuid.uuid4().hex,
        "workflow_id": "wf-1",
        "call_id": str(uuid.uuid4()),
        "tool": "mail.send",
        "status": EffectStatus.PROCESSING,
        "args_canonical": "{}",
    }
    values.update(fields)
    effect = Effect.objects.create(**values)
    if timestamps:
        Effect.objects.filter(pk=effect.pk).update(**timestamps)
    effect.refresh_from_db()
    return effect


def ids(queryset: Any) -> set[str]:
    return {str(pk) for pk in queryset.values_list("pk", flat=True)}


def test_defaults_come_from_the_database() -> None:
    effect = make_effect()
    assert effect.dedup_count == 0
    assert effect.fence == 1
    assert abs(timezone.now() - effect.created_at) < timedelta(minutes=1)
    assert effect.updated_at == effect.created_at


def test_pending_approval() -> None:
    waiting = make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    make_effect(status=EffectStatus.READY)
    make_effect(status=EffectStatus.PROCESSING)
    assert ids(Effect.objects.pending_approval()) == {str(waiting.pk)}


def test_for_workflow() -> None:
    a1 = make_effect(workflow_id="a")
    a2 = make_effect(workflow_id="a", tool="other")
    make_effect(workflow_id="b")
    assert ids(Effect.objects.for_workflow("a")) == {str(a1.pk), str(a2.pk)}
    assert not Effect.objects.for_workflow("nope").exists()


def test_terminal_and_active_split_every_status() -> None:
    made = {status: make_effect(status=status) for status in EffectStatus.values}
    terminal = {"succeeded", "failed", "denied", "canceled"}
    assert ids(Effect.objects.terminal()) == {str(made[s].pk) for s in terminal}
    assert ids(Effect.objects.active()) == {str(made[s].pk) for s in set(made) - terminal}


def test_stale_uses_updated_at_and_only_processing() -> None:
    long_ago = timezone.now() - timedelta(hours=2)
    stale = make_effect(updated_at=long_ago)
    make_effect()  # processing but fresh
    make_effect(status=EffectStatus.READY, updated_at=long_ago)
    make_effect(status=EffectStatus.SUCCEEDED, updated_at=long_ago)
    assert ids(Effect.objects.stale(timedelta(hours=1))) == {str(stale.pk)}
    assert not Effect.objects.stale(timedelta(hours=3)).exists()


def test_stale_is_judged_by_the_database_clock() -> None:
    effect = make_effect()
    Effect.objects.filter(pk=effect.pk).update(updated_at=Now())
    assert not Effect.objects.stale(timedelta(seconds=30)).exists()
    Effect.objects.filter(pk=effect.pk).update(updated_at=timezone.now() - timedelta(seconds=31))
    assert ids(Effect.objects.stale(timedelta(seconds=30))) == {str(effect.pk)}


def test_by_tool() -> None:
    sent = make_effect(tool="mail.send")
    make_effect(tool="mail.delete")
    assert ids(Effect.objects.by_tool("mail.send")) == {str(sent.pk)}


def test_in_period_is_half_open_and_bounds_are_optional() -> None:
    t0 = timezone.now().replace(microsecond=0) - timedelta(days=1)
    before = make_effect(created_at=t0 - timedelta(seconds=1))
    at_start = make_effect(created_at=t0)
    inside = make_effect(created_at=t0 + timedelta(hours=1))
    at_end = make_effect(created_at=t0 + timedelta(hours=2))
    end = t0 + timedelta(hours=2)
    assert ids(Effect.objects.in_period(t0, end)) == {str(at_start.pk), str(inside.pk)}
    assert ids(Effect.objects.in_period(None, t0)) == {str(before.pk)}
    assert ids(Effect.objects.in_period(end, None)) == {str(at_end.pk)}


def test_filters_chain() -> None:
    hit = make_effect(workflow_id="w", tool="t", status=EffectStatus.FAILED)
    make_effect(workflow_id="w", tool="t", status=EffectStatus.PROCESSING)
    make_effect(workflow_id="w", tool="u", status=EffectStatus.FAILED)
    assert ids(Effect.objects.for_workflow("w").by_tool("t").terminal()) == {str(hit.pk)}


def test_with_history_prefetches_transitions_in_order() -> None:
    first, second = make_effect(), make_effect()
    for effect in (first, second):
        for from_status, to_status in [(None, "processing"), ("processing", "succeeded")]:
            EffectTransition.objects.create(
                effect=effect, from_status=from_status, to_status=to_status, actor_label="system"
            )
    with CaptureQueriesContext(connection) as queries:
        effects = list(Effect.objects.filter(pk__in=[first.pk, second.pk]).with_history())
        steps = [[t.to_status for t in e.transitions.all()] for e in effects]
    assert len(queries) == 2
    assert steps == [["processing", "succeeded"]] * 2


def test_str() -> None:
    assert str(make_effect(tool="t", workflow_id="w")) == "t in w (running)"
    effect = make_effect()
    row = EffectTransition.objects.create(effect=effect, to_status="processing", actor_label="api")
    assert str(row) == "- -> processing by api"
