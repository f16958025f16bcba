"""The sync service admin, DRF and commands call: same rules as the ledger, caller's transaction."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from django.db import connection
from django.db import transaction as db_transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from agent_ledger import (
    Actor,
    EffectError,
    EffectLedger,
    EffectLedgerValidationError,
    EffectNotFoundError,
    EffectStatus,
    services,
)
from agent_ledger.models import EffectTransition
from agent_ledger.stores.base import NewEffect
from agent_ledger.stores.django import DjangoStore
from agent_ledger.types import SYSTEM

pytestmark = pytest.mark.django_db

ANN = Actor("admin", name="Ann")


def make_effect(status: EffectStatus = EffectStatus.REQUIRES_APPROVAL) -> str:
    """An effect in ``status`` (one the store can begin in); returns its idempotency key."""
    key = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    DjangoStore().begin_sync(
        NewEffect(
            id=str(uuid.uuid4()),
            idem_key=key,
            workflow_id="wf",
            call_id="c1",
            tool="deploy",
            status=status,
            args_canonical="{}",
            resource_id_canonical=None,
            actor=SYSTEM,
        )
    )
    return key


def test_get_ledger_is_built_once_on_django_store() -> None:
    ledger = services.get_ledger()
    assert isinstance(ledger, EffectLedger)
    assert isinstance(ledger.store, DjangoStore)
    assert services.get_ledger() is ledger


def test_get_ledger_follows_agent_ledger_settings() -> None:
    with override_settings(AGENT_LEDGER={"MAX_ARGS_SIZE_BYTES": 10}):
        small = services.get_ledger()
        assert small._options.max_args_size_bytes == 10
    assert services.get_ledger() is not small
    assert services.get_ledger()._options.max_args_size_bytes == 1024 * 1024


def test_approve() -> None:
    key = make_effect()
    record = services.approve(key, actor=ANN, reason="looks fine")
    assert record.changed
    assert record.effect.status is EffectStatus.READY
    row = EffectTransition.objects.filter(effect_id=record.effect.id).last()
    assert (row.actor_label, row.actor_name, row.reason) == ("admin", "Ann", "looks fine")


def test_deny_stores_the_reason_as_the_error() -> None:
    record = services.deny(make_effect(), actor=ANN, reason="not on a Friday")
    assert record.changed
    assert record.effect.status is EffectStatus.DENIED
    assert record.effect.error == EffectError("not on a Friday", code="denied")


def test_cancel_stops_an_unfinished_effect() -> None:
    record = services.cancel(make_effect(EffectStatus.PROCESSING), actor=Actor("cli"))
    assert record.changed
    assert record.effect.status is EffectStatus.CANCELED
    assert record.effect.error == EffectError("canceled", code="canceled")


@pytest.mark.parametrize("second", ["approve", "deny", "cancel"])
def test_a_second_decision_reports_already_decided(second: str) -> None:
    key = make_effect()
    services.deny(key, actor=ANN)
    record = getattr(services, second)(key, actor=Actor("api"))
    assert not record.changed
    assert record.effect.status is EffectStatus.DENIED
    assert EffectTransition.objects.filter(effect__idem_key=key).count() == 2


@pytest.mark.parametrize("name", ["approve", "deny", "cancel"])
def test_unknown_key(name: str) -> None:
    with pytest.raises(EffectNotFoundError):
        getattr(services, name)("no-such-key", actor=ANN)


def test_inputs_are_validated_like_the_ledger_does() -> None:
    key = make_effect()
    with pytest.raises(EffectLedgerValidationError) as caught:
        services.approve(key, actor=ANN, reason="x" * 2_001)
    assert caught.value.field == "reason"
    with pytest.raises(EffectLedgerValidationError) as caught:
        services.deny(" ", actor=ANN)
    assert caught.value.field == "idem_key"
    assert services.approve(key, actor=ANN).changed


def test_runs_on_the_callers_connection_and_transaction() -> None:
    key = make_effect()
    with (
        CaptureQueriesContext(connection) as queries,
        pytest.raises(RuntimeError),
        db_transaction.atomic(),
    ):
        assert services.approve(key, actor=ANN).changed
        raise RuntimeError("the view failed afterwards")
    assert any("agent_ledger_effect" in q["sql"] for q in queries.captured_queries)
    assert DjangoStore().get_by_idem_key_sync(key).status is EffectStatus.REQUIRES_APPROVAL
