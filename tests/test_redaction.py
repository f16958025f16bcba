"""Redaction before storage without Django: the rules, the ledger on ``MemoryStore``, and
``PostgresStore`` (every column of its tables scanned for the raw values).

The Django side (settings, tables on SQLite and PostgreSQL, logs, admin, API, signals) is in
``test_redaction_django.py``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from psycopg import sql

from agent_ledger import (
    CommitFailed,
    CommitSucceeded,
    Effect,
    EffectError,
    EffectFailedError,
    EffectLedger,
    EffectLedgerOptions,
    EffectLedgerValidationError,
    MemoryStore,
    ToolCall,
)
from agent_ledger.redaction import REDACTED, Redactor
from agent_ledger.stores.postgres import PostgresStore
from tests.stores.postgres import connect, ledger_schema, schema_pool, search_path

API_KEY = "sk_live_S3CRET_51Hx"
CARD = "4242424242424242"
BEARER = "Bearer tok_9f8e7d6c5b4a"
SECRETS = (API_KEY, CARD, BEARER)
RULES = ["*.api_key", "card.number", "authorization"]


def charge(api_key: str = API_KEY, card: str = CARD) -> ToolCall:
    return ToolCall(
        workflow_id="order-7",
        tool="stripe.charge",
        args={
            "amount": 1000,
            "stripe": {"api_key": api_key},
            "card": {"number": card, "exp": "12/30"},
            "headers": [{"Authorization": BEARER}],
        },
    )


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into: {text[:500]}"


# -- the rules --------------------------------------------------------------------------------


def test_rules_match_key_paths_from_their_end_case_insensitively() -> None:
    redactor = Redactor(RULES)
    value = {
        "api_key": "top-level stays",  # "*.api_key" needs a parent
        "stripe": {"api_key": "x1", "API_KEY": "x2"},
        "card": {"number": "x3", "exp": "12/30"},
        "nested": {"card": {"number": "x4"}},
        "headers": [{"Authorization": "x5"}, {"accept": "json"}],
    }
    redacted, found = redactor.redact(value, tool="t", part="args")
    assert redacted == {
        "api_key": "top-level stays",
        "stripe": {"api_key": REDACTED, "API_KEY": REDACTED},
        "card": {"number": REDACTED, "exp": "12/30"},
        "nested": {"card": {"number": REDACTED}},
        "headers": [{"Authorization": REDACTED}, {"accept": "json"}],
    }
    assert sorted(found) == ["x1", "x2", "x3", "x4", "x5"]
    assert value["stripe"] == {"api_key": "x1", "API_KEY": "x2"}  # the input is not touched


def test_an_anchored_rule_matches_at_the_root_only_and_a_match_hides_a_whole_subtree() -> None:
    redactor = Redactor(["$.token", "secrets"])
    redacted, found = redactor.redact(
        {"token": "a", "inner": {"token": "b"}, "secrets": {"x": ["c", 4242]}},
        tool="t",
        part="args",
    )
    assert redacted == {"token": REDACTED, "inner": {"token": "b"}, "secrets": REDACTED}
    assert sorted(found) == ["4242", "a", "c"]


def test_keyed_hashes_match_equal_secrets_without_revealing_them() -> None:
    redactor = Redactor(["password"], hash_key="k" * 32)
    first, _ = redactor.redact({"password": "hunter22"}, tool="t", part="args")
    again, _ = redactor.redact({"a": {"password": "hunter22"}}, tool="t", part="args")
    other, _ = redactor.redact({"password": "hunter23"}, tool="t", part="args")
    elsewhere, _ = Redactor(["password"], hash_key="j" * 32).redact(
        {"password": "hunter22"}, tool="t", part="args"
    )
    mask = first["password"]
    assert mask.startswith("[redacted:") and len(mask) == len("[redacted:]") + 12
    assert again["a"]["password"] == mask
    assert other["password"] != mask
    assert elsewhere["password"] != mask  # another key, another hash


def test_tool_rules_and_a_function_add_to_the_global_rules() -> None:
    def drop_email(value: Any, *, tool: str, part: str) -> Any:
        return {**value, "seen": f"{tool}/{part}"}

    redactor = Redactor(["token"], tools={"crm.*": ["customer.email"]}, function=drop_email)
    args = {"token": "t", "customer": {"email": "a@example.com"}}
    crm, _ = redactor.redact(args, tool="crm.update", part="args")
    mail, _ = redactor.redact(args, tool="mail.send", part="result")
    assert crm == {"token": REDACTED, "customer": {"email": REDACTED}, "seen": "crm.update/args"}
    assert mail == {
        "token": REDACTED,
        "customer": {"email": "a@example.com"},
        "seen": "mail.send/result",
    }


def test_error_messages_lose_the_redacted_strings() -> None:
    redactor = Redactor(["card.number"])
    error = EffectError(f"card {CARD} declined (card {CARD})", code="card_declined")
    assert redactor.error(error, [CARD, "ab"]) == EffectError(
        f"card {REDACTED} declined (card {REDACTED})", code="card_declined"
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"paths": "authorization"}, "redact.paths"),
        ({"paths": [""]}, "redact.paths"),
        ({"paths": ["a..b"]}, "redact.paths"),
        ({"paths": [3]}, "redact.paths"),
        ({"tools": ["stripe.*"]}, "redact.tools"),
        ({"tools": {"": ["x"]}}, "redact.tools"),
        ({"function": "not callable"}, "redact.function"),
        ({"hash_key": "short"}, "redact.hash_key"),
        ({"hash_key": 12345678901234567890}, "redact.hash_key"),
    ],
)
def test_bad_rules_are_refused_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    paths = kwargs.pop("paths", ())
    with pytest.raises(EffectLedgerValidationError) as caught:
        Redactor(paths, **kwargs)
    assert caught.value.field == field


def test_the_ledger_option_must_be_a_redactor() -> None:
    with pytest.raises(EffectLedgerValidationError) as caught:
        EffectLedgerOptions(store=MemoryStore(), redact=["authorization"])  # type: ignore[arg-type]
    assert caught.value.field == "redact"


# -- the ledger on MemoryStore ------------------------------------------------------------------


def ledger_on(store: Any) -> EffectLedger:
    return EffectLedger(EffectLedgerOptions(store=store, redact=Redactor(RULES)))


async def test_the_handler_sees_raw_args_the_store_and_every_caller_the_redacted_ones() -> None:
    ledger = ledger_on(MemoryStore())
    seen: list[Any] = []

    def handler(effect: Effect) -> Any:
        seen.append(effect.args)
        return {"charge": "ch_1", "card": {"number": effect.args["card"]["number"]}}

    fresh = await ledger.run(charge(), handler)
    replay = await ledger.run(charge(), handler)
    assert seen == [charge().args]  # raw, and once
    assert fresh == replay == {"charge": "ch_1", "card": {"number": REDACTED}}
    effect = await ledger.find_by_idem_key(ledger.idem_key(charge()))
    assert effect is not None
    assert_no_secret(repr(effect))
    assert effect.args["card"] == {"number": REDACTED, "exp": "12/30"}


async def test_the_key_comes_from_the_raw_args() -> None:
    ledger = ledger_on(MemoryStore())
    calls: list[str] = []
    await ledger.run(charge(), lambda e: calls.append("first"))
    await ledger.run(charge(card="4000056655665556"), lambda e: calls.append("other card"))
    await ledger.run(charge(), lambda e: calls.append("replay"))
    assert calls == ["first", "other card"]  # same redacted args, different keys
    assert ledger.idem_key(charge()) == EffectLedger(
        EffectLedgerOptions(store=MemoryStore())
    ).idem_key(charge())


async def test_a_failure_message_quoting_a_secret_is_stored_without_it() -> None:
    ledger = ledger_on(MemoryStore())

    def handler(effect: Effect) -> Any:
        raise ValueError(f"card {effect.args['card']['number']} declined")

    with pytest.raises(ValueError, match=CARD):  # the caller's own exception, unchanged
        await ledger.run(charge(), handler)
    with pytest.raises(EffectFailedError) as replay:
        await ledger.run(charge(), handler)
    assert replay.value.error == EffectError(f"card {REDACTED} declined", code="ValueError")


async def test_manual_begin_and_commit_are_redacted_too() -> None:
    ledger = ledger_on(MemoryStore())
    started = await ledger.begin(charge())
    assert_no_secret(started.effect.args_canonical)
    assert await ledger.commit(started.effect.id, CommitSucceeded({"authorization": BEARER}))
    done = await ledger.get_effect(started.effect.id)
    assert done is not None and done.result == {"authorization": REDACTED}
    other = await ledger.begin(charge(card="5555555555554444"))
    assert await ledger.commit(other.effect.id, CommitFailed(EffectError("boom")))


async def test_a_redaction_function_that_fails_stores_a_failure_not_the_result() -> None:
    def broken(value: Any, *, tool: str, part: str) -> Any:
        if part == "result":
            raise RuntimeError(f"cannot {value}")
        return value

    ledger = EffectLedger(
        EffectLedgerOptions(store=MemoryStore(), redact=Redactor(RULES, function=broken))
    )
    with pytest.raises(EffectFailedError) as caught:
        await ledger.run(charge(), lambda e: {"secret": API_KEY})
    assert caught.value.error.code == "redaction_failed"
    assert_no_secret(str(caught.value))


async def test_no_rules_change_nothing() -> None:
    ledger = EffectLedger(EffectLedgerOptions(store=MemoryStore(), redact=Redactor()))
    assert await ledger.run(charge(), lambda e: {"card": {"number": CARD}}) == {
        "card": {"number": CARD}
    }


# -- PostgresStore: nothing raw in any column ---------------------------------------------------

LEDGER_TABLES = ("agent_ledger_effect", "agent_ledger_effecttransition")


@pytest.mark.postgres
async def test_postgres_store_keeps_no_raw_value_in_any_column() -> None:
    async with ledger_schema() as schema, schema_pool(schema) as pool:
        ledger = ledger_on(PostgresStore(pool=pool))

        def handler(effect: Effect) -> Any:
            assert effect.args["stripe"]["api_key"] == API_KEY
            return {"echo": {"authorization": BEARER}, "card": {"number": CARD}}

        await ledger.run(charge(), handler)
        with pytest.raises(ValueError):
            await ledger.run(
                charge(card="4000000000000002"),
                lambda e: (_ for _ in ()).throw(ValueError(f"{API_KEY} refused")),
            )
        async with await connect(options=search_path(schema)) as conn:
            dumped = []
            for table in LEDGER_TABLES:
                cursor = await conn.execute(
                    sql.SQL("SELECT row_to_json(t)::text FROM {} t").format(sql.Identifier(table))
                )
                dumped += [row[0] for row in await cursor.fetchall()]
        assert len(dumped) == 2 + 4  # two effects, two history rows each
        assert_no_secret("\n".join(dumped))
        assert any(REDACTED in json.loads(row).get("args_canonical", "") for row in dumped)


@pytest.mark.parametrize(
    ("older_than", "field"),
    [("90x", "older_than"), (0, "older_than"), ("0d", "older_than"), (None, "older_than")],
)
async def test_memory_store_prune_refuses_bad_durations(older_than: Any, field: str) -> None:
    with pytest.raises(EffectLedgerValidationError) as caught:
        await MemoryStore().prune(older_than)
    assert caught.value.field == field
