"""``AGENT_LEDGER["REDACT"]`` on the Django tables: after real calls through ``DjangoStore`` (and,
on PostgreSQL, ``PostgresStore`` on the same tables), no raw secret is in any column of any
table, any log line (DEBUG, every logger), any signal, admin page or API response."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.checks import run_checks
from django.db import connection
from django.test import Client, override_settings
from django.urls import reverse
from psycopg_pool import AsyncConnectionPool

from agent_ledger import Effect, EffectLedger, EffectLedgerOptions, services, signals
from agent_ledger.models import Effect as EffectRow
from agent_ledger.redaction import REDACTED, Redactor
from agent_ledger.stores.django import DjangoStore, close_connections
from agent_ledger.stores.postgres import PostgresStore
from tests.test_redaction import API_KEY, BEARER, CARD, RULES, assert_no_secret, charge

pytestmark = pytest.mark.django_db(transaction=True)

REDACT = {**settings.AGENT_LEDGER, "REDACT": {"paths": RULES, "hash": True}}


@pytest.fixture(autouse=True)
def redacting() -> Iterator[None]:
    with override_settings(AGENT_LEDGER=REDACT):
        yield
    close_connections()


def every_table_dump() -> str:
    """Every row of every table of the database, as text."""
    lines = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names(cursor):
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
            lines += [repr(row) for row in cursor.fetchall()]
    return "\n".join(lines)


def run_calls(ledger: EffectLedger) -> list[Any]:
    seen: list[Any] = []

    def pay(effect: Effect) -> Any:
        seen.append(effect.args)
        return {"charge": "ch_1", "echo": {"authorization": BEARER}}

    def decline(effect: Effect) -> Any:
        raise ValueError(f"card {effect.args['card']['number']} declined by {API_KEY}")

    async def calls() -> None:
        await ledger.run(charge(), pay)
        await ledger.run(charge(), pay)  # a replay
        with pytest.raises(ValueError):
            await ledger.run(charge(card="4000000000000002"), decline)

    asyncio.run(calls())
    return seen


def test_no_raw_secret_reaches_a_table_a_log_line_or_a_signal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sent: list[Any] = []

    def receiver(sender: Any, effect: Any, actor: Any, **kwargs: Any) -> None:
        sent.append(effect)

    for signal in (signals.effect_succeeded, signals.effect_failed):
        signal.connect(receiver, weak=False)
    try:
        with caplog.at_level(logging.DEBUG):
            seen = run_calls(services.get_ledger())
    finally:
        for signal in (signals.effect_succeeded, signals.effect_failed):
            signal.disconnect(receiver)
    assert seen == [charge().args]  # the handler had the raw arguments
    assert len(sent) == 2
    assert_no_secret(repr(sent))
    assert_no_secret(caplog.text)
    dump = every_table_dump()
    assert_no_secret(dump)
    assert "[redacted:" in dump  # hash: True, keyed by SECRET_KEY
    failed = EffectRow.objects.get(status="failed")
    assert failed.error == {
        "message": f"card {REDACTED} declined by {REDACTED}",
        "code": "ValueError",
    }


def test_no_raw_secret_in_admin_or_api_responses() -> None:
    run_calls(EffectLedger(EffectLedgerOptions(store=DjangoStore())))  # no redact=: settings'
    user = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(user)
    pages = [
        reverse("admin:agent_ledger_effect_changelist"),
        reverse("agent_ledger_api:effect-list"),
    ]
    for effect in EffectRow.objects.all():
        pages.append(reverse("admin:agent_ledger_effect_change", args=[effect.pk]))
        pages.append(reverse("agent_ledger_api:effect-detail", args=[effect.pk]))
    for page in pages:
        response = client.get(page)
        assert response.status_code == 200, page
        assert_no_secret(response.content.decode())
    assert "[redacted:" in client.get(pages[-1]).content.decode()


def test_equal_secrets_get_equal_hashes_and_the_setting_is_read_at_call_time() -> None:
    run_calls(services.get_ledger())
    first, second = EffectRow.objects.order_by("created_at")
    assert '"api_key":"[redacted:' in first.args_canonical
    mask = first.args_canonical.split('"api_key":"')[1].split('"')[0]
    assert mask in second.args_canonical  # the same API key in both calls
    with override_settings(AGENT_LEDGER={**REDACT, "REDACT": None}):
        assert DjangoStore().redactor is None


@pytest.mark.postgres
def test_postgres_store_on_the_django_tables_redacts_too() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("PostgresStore shares the Django tables on PostgreSQL only")
    params = connection.get_connection_params()
    conninfo = " ".join(
        f"{key}={params[key]}" for key in ("host", "port", "user", "dbname") if params.get(key)
    )

    async def main() -> list[Any]:
        async with AsyncConnectionPool(conninfo, min_size=1, max_size=2, open=False) as pool:
            store = PostgresStore(pool=pool, listen=False)
            ledger = EffectLedger(EffectLedgerOptions(store=store, redact=Redactor(RULES)))
            return await asyncio.to_thread(run_calls, ledger)

    assert asyncio.run(main()) == [charge().args]
    dump = every_table_dump()
    assert_no_secret(dump)
    assert CARD not in dump and dump.count(REDACTED) >= 4


@pytest.mark.parametrize(
    ("redact", "check_id"),
    [
        ("authorization", "agent_ledger.E011"),
        ({"paths": ["a..b"]}, "agent_ledger.E011"),
        ({"pahts": ["x"]}, "agent_ledger.E011"),
        ({"paths": ["x"], "hash": "yes"}, "agent_ledger.E011"),
        ({"paths": ["x"], "hash": True, "hash_key": b"0123456789abcdef"}, "agent_ledger.E011"),
        ({"paths": ["x"], "hash": True, "hash_key": "short"}, "agent_ledger.E011"),
        ({"paths": ["x"], "tools": {"stripe.*": "card"}}, "agent_ledger.E011"),
        ({"paths": ["x"], "function": "no.such.module.fn"}, "agent_ledger.E012"),
        ({"paths": ["x"], "function": "agent_ledger.redaction.REDACTED"}, "agent_ledger.E012"),
    ],
)
def test_a_bad_redact_setting_fails_its_check(redact: Any, check_id: str) -> None:
    with override_settings(AGENT_LEDGER={**REDACT, "REDACT": redact}):
        assert [m.id for m in run_checks() if m.id and m.id.startswith("agent_ledger")] == [
            check_id
        ]


@pytest.mark.parametrize("lifetime", ["90x", "0d", -5, "", [1]])
def test_a_bad_key_lifetime_fails_its_check(lifetime: Any) -> None:
    with override_settings(AGENT_LEDGER={**REDACT, "KEY_LIFETIME": lifetime}):
        assert [m.id for m in run_checks() if m.id and m.id.startswith("agent_ledger")] == [
            "agent_ledger.E013"
        ]


def test_good_data_settings_pass_their_checks() -> None:
    with override_settings(
        AGENT_LEDGER={
            **REDACT,
            "KEY_LIFETIME": "365d",
            "REDACT": {"paths": ["x"], "function": "tests.test_redaction_django.keep"},
        }
    ):
        assert [m.id for m in run_checks() if m.id and m.id.startswith("agent_ledger")] == []


def keep(value: Any, *, tool: str, part: str) -> Any:
    return value
