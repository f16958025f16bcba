"""Issue 8, point 4: every change wakes waiters in other processes on PostgreSQL.

Each change someone may be waiting for (begin of an approval request, commit of a key a second
caller waits on, claim, approve, deny, cancel), through every store and every surface
(``DjangoStore``'s async methods, its ORM path inside the caller's ``atomic()``, the sync
services, the admin, the REST API, the webhook, ``PostgresStore``), must send
``pg_notify('agent_ledger', <effect id>)`` in its own transaction; the two changes nobody can be
waiting for (``stores.base.worth_waking``) send none. A plain session of the test (not the
ledger's listener) LISTENs and checks, change by change, that exactly that payload was delivered
once: ``Notifications.drain()`` fences each read with a sentinel NOTIFY, and PostgreSQL delivers
notifications in commit order, so "nothing arrived" needs no sleep either.

Then end to end: a worker process waits for an approval in ``EffectLedger.run`` with a poll
interval far longer than the test's hang guard, so only the NOTIFY of a decision made in this
process (services or the admin) can wake it in time. On SQLite that test runs too, with short
intervals: the worker sees the decision by polling.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from agent_ledger import Actor, CommitSucceeded, EffectStatus
from agent_ledger.api.authentication import sign
from agent_ledger.ledger import decision_request
from agent_ledger.stores.base import EffectStore, NewEffect
from agent_ledger.types import SYSTEM
from tests.conftest import POSTGRES_URL
from tests.effects import new_effect
from tests.ledger_rows import make_user
from tests.pg_activity import Backends, Child, Notifications, conninfo, database_url, wait_until

on_postgres = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="LISTEN/NOTIFY is PostgreSQL's; on SQLite waiters in other processes poll",
)

VIEW = "agent_ledger.view_effect"
APPROVE = "agent_ledger.approve_effect"
#: Changes someone may be waiting for: each must NOTIFY. ``begin``: a new approval request
#: (whoever waits for approval requests); ``commit``: of a key a second caller waits on.
CHANGES = ["begin", "commit", "claim", "approve", "deny", "cancel"]
#: Changes nobody can be waiting for (``stores.base.worth_waking``): a new processing effect (no
#: one knew the key) and a commit of a key no second caller began. They send no NOTIFY, since
#: PostgreSQL serialises the commits of notifying transactions.
UNAWAITED = ["begin-processing", "commit-unawaited"]
DECISIONS = ["approve", "deny"]
#: The signing secret tests/settings.py configures for the webhook.
WEBHOOK_SECRET = "test-secret-0123456789"


@pytest.fixture(autouse=True)
def close_store_connections() -> Iterator[None]:
    """Close the store's threads' connections and its LISTEN connection (the flush and the
    DROP DATABASE at the end must not wait for them)."""
    yield
    from agent_ledger.stores.django import close_connections

    close_connections()


@pytest.fixture
def notifications(transactional_db: None) -> Iterator[Notifications]:
    """A plain LISTEN session on the test database. ``transactional_db``: a NOTIFY is delivered
    when its transaction commits, which ``db``'s wrapping transaction never does."""
    with Notifications(conninfo(connection.settings_dict)) as listening:
        yield listening


def pending() -> NewEffect:
    return new_effect(EffectStatus.REQUIRES_APPROVAL)


# -- DjangoStore -----------------------------------------------------------------------------


async def run_change(
    notifications: Notifications, store: EffectStore, change: str
) -> tuple[str, list[str]]:
    """Set ``store`` up for ``change``, drain, make the change through the store's async
    methods, and return the effect's id and the payloads the change sent."""
    processing = change in ("begin-processing", "commit", "commit-unawaited", "cancel")
    new = new_effect() if processing else pending()
    if not change.startswith("begin"):
        assert (await store.begin(new)).created
    if change == "commit":
        # A second caller of the key: it counts itself (dedup_count) before it waits.
        assert not (await store.begin(new)).created
    if change == "claim":
        assert await decide(store, "approve", new)
    notifications.drain()
    if change.startswith("begin"):
        changed = (await store.begin(new)).created
    elif change.startswith("commit"):
        outcome = CommitSucceeded({"ok": True})
        changed = await store.commit(new.id, outcome, fence=1, actor=SYSTEM) is not None
    elif change == "claim":
        changed = await store.claim(new.id, stale_after_ms=0, actor=SYSTEM) is not None
    else:
        changed = await decide(store, change, new)
    assert changed, f"{change} changed nothing"
    return new.id, notifications.drain(of=new.id)


async def decide(store: EffectStore, name: str, new: NewEffect) -> bool:
    request = decision_request(name, new.idem_key, actor=SYSTEM, reason=f"{name} in a test")
    return (await store.transition(new.idem_key, **request)).changed


@on_postgres
@pytest.mark.parametrize("change", CHANGES)
def test_django_store_async_changes_notify(notifications: Notifications, change: str) -> None:
    from agent_ledger.stores.django import DjangoStore

    effect_id, payloads = asyncio.run(run_change(notifications, DjangoStore(), change))
    assert payloads == [effect_id]


@on_postgres
@pytest.mark.parametrize("change", UNAWAITED)
def test_django_store_unawaited_changes_stay_quiet(
    notifications: Notifications, change: str
) -> None:
    from agent_ledger.stores.django import DjangoStore

    _, payloads = asyncio.run(run_change(notifications, DjangoStore(), change))
    assert payloads == []


class Rollback(Exception):
    pass


@on_postgres
def test_orm_path_in_atomic_notifies_only_when_the_block_commits(
    notifications: Notifications,
) -> None:
    """Inside the caller's ``atomic()`` the ORM path runs, in the caller's transaction: begin,
    a second caller's begin (a replay) and the commit are heard only once the block commits,
    then as the effect's id once (PostgreSQL folds equal payloads of one transaction)."""
    from agent_ledger.models import Effect as EffectRow
    from agent_ledger.stores.django import DjangoStore

    store = DjangoStore()
    new = new_effect()
    notifications.drain()
    with transaction.atomic():
        assert store.begin_sync(new).created
        assert not store.begin_sync(new).created
        assert store.commit_sync(new.id, CommitSucceeded({"ok": 1}), fence=1, actor=SYSTEM)
        assert notifications.drain(of=new.id) == []
    assert notifications.drain(of=new.id) == [new.id]
    row = EffectRow.objects.get(pk=new.id)
    assert (row.status, row.dedup_count) == (EffectStatus.SUCCEEDED.value, 1)


@on_postgres
def test_orm_path_in_atomic_approval_flow_notifies_when_the_block_commits(
    notifications: Notifications,
) -> None:
    """begin (awaiting approval), approve, claim and commit in one caller's transaction."""
    from agent_ledger.stores.django import DjangoStore

    store = DjangoStore()
    new = pending()
    notifications.drain()
    with transaction.atomic():
        assert store.begin_sync(new).created
        request = decision_request("approve", new.idem_key, actor=SYSTEM, reason=None)
        assert store.transition_sync(new.idem_key, **request).changed
        claimed = store.claim_sync(new.id, stale_after_ms=0, actor=SYSTEM)
        assert claimed is not None
        outcome = CommitSucceeded({"ok": 1})
        assert store.commit_sync(new.id, outcome, fence=claimed.fence, actor=SYSTEM)
        assert notifications.drain(of=new.id) == []
    assert notifications.drain(of=new.id) == [new.id]


@on_postgres
def test_orm_path_in_a_rolled_back_atomic_notifies_nobody(notifications: Notifications) -> None:
    from agent_ledger.models import Effect as EffectRow
    from agent_ledger.stores.django import DjangoStore

    store = DjangoStore()
    new = pending()
    notifications.drain()
    with pytest.raises(Rollback), transaction.atomic():
        assert store.begin_sync(new).created
        request = decision_request("approve", new.idem_key, actor=SYSTEM, reason=None)
        assert store.transition_sync(new.idem_key, **request).changed
        raise Rollback
    assert notifications.drain(of=new.id) == []
    assert not EffectRow.objects.filter(pk=new.id).exists()


# -- the sync surfaces: services, admin, REST API, webhook -----------------------------------


def begun_pending(change: str = "approve") -> NewEffect:
    """An effect in the database awaiting approval (or processing, to be canceled)."""
    from agent_ledger.stores.django import DjangoStore

    new = new_effect() if change == "cancel" else pending()
    DjangoStore().begin_sync(new)
    return new


@on_postgres
@pytest.mark.parametrize("change", ["approve", "deny", "cancel"])
def test_services_decisions_notify(notifications: Notifications, change: str) -> None:
    from agent_ledger import services

    new = begun_pending(change)
    notifications.drain()
    decide = getattr(services, change)
    record = decide(new.idem_key, actor=Actor("admin", None, "alice"), reason="from services")
    assert record.changed
    assert notifications.drain(of=new.id) == [new.id]


@on_postgres
@pytest.mark.parametrize("change", DECISIONS)
def test_admin_decisions_notify(notifications: Notifications, change: str) -> None:
    client = Client()
    client.force_login(make_user("alice", VIEW, APPROVE))
    new = begun_pending()
    notifications.drain()
    url = reverse(f"admin:agent_ledger_effect_{change}", args=[new.id])
    response = client.post(url, {"reason": "from the admin"})
    assert response.status_code == 302
    assert notifications.drain(of=new.id) == [new.id]
    _assert_decided(new, change)


@on_postgres
@pytest.mark.parametrize("change", DECISIONS)
def test_api_decisions_notify(notifications: Notifications, change: str) -> None:
    client = APIClient()
    client.force_authenticate(make_user("alice", VIEW, APPROVE, staff=False))
    new = begun_pending()
    notifications.drain()
    url = reverse(f"agent_ledger_api:effect-{change}", args=[new.id])
    response = client.post(url, {"reason": "from the API"}, format="json")
    assert response.status_code == 200, response.content
    assert notifications.drain(of=new.id) == [new.id]
    _assert_decided(new, change)


@on_postgres
@pytest.mark.parametrize("change", DECISIONS)
def test_webhook_decisions_notify(notifications: Notifications, change: str) -> None:
    new = begun_pending()
    notifications.drain()
    body = json.dumps(
        {"decision": change, "approver": "carol", "idem_key": new.idem_key, "reason": "hook"}
    ).encode()
    stamp = str(int(time.time()))
    response = Client().post(
        reverse("agent_ledger_api:webhook"),
        body,
        content_type="application/json",
        HTTP_X_AGENT_LEDGER_TIMESTAMP=stamp,
        HTTP_X_AGENT_LEDGER_SIGNATURE=sign(WEBHOOK_SECRET, stamp, body),
    )
    assert response.status_code == 200, response.content
    assert notifications.drain(of=new.id) == [new.id]
    _assert_decided(new, change)


def _assert_decided(new: NewEffect, change: str) -> None:
    from agent_ledger.models import Effect as EffectRow

    expected = EffectStatus.READY if change == "approve" else EffectStatus.DENIED
    assert EffectRow.objects.get(pk=new.id).status == expected.value


# -- PostgresStore -------------------------------------------------------------------------------


@pytest.fixture
async def postgres_store() -> AsyncIterator[Any]:
    """A PostgresStore in a schema of its own of the ``TEST_POSTGRES_URL`` database."""
    from agent_ledger.stores.postgres import PostgresStore
    from tests.stores.postgres import ledger_schema, schema_pool

    async with ledger_schema(prefix="wakeup") as schema, schema_pool(schema) as pool:
        store = PostgresStore(pool=pool)
        try:
            yield store
        finally:
            await store.aclose()


@pytest.mark.postgres
@pytest.mark.skipif(
    os.environ.get("AGENT_LEDGER_TEST_PASS") == "again",
    reason="PostgresStore at TEST_POSTGRES_URL does not depend on DATABASE_URL: first pass only",
)
@pytest.mark.parametrize("change", CHANGES + UNAWAITED)
async def test_postgres_store_changes_notify(postgres_store: Any, change: str) -> None:
    """Its tables live in a schema of their own; NOTIFY is per database, so a session of the
    same database (whatever its search_path) hears it."""
    with Notifications(POSTGRES_URL) as listening:
        effect_id, payloads = await run_change(listening, postgres_store, change)
    assert payloads == ([] if change in UNAWAITED else [effect_id])


# -- end to end: a worker process waits, this process approves ----------------------------------

#: The worker's poll interval on PostgreSQL: longer than the hang guard below, so that only a
#: wake-up (the approval's NOTIFY) can let it finish in time.
POLL_MS_POSTGRES = 300_000
#: On SQLite there is nothing to wake it: it polls.
POLL_MS_SQLITE = 50
#: How long the worker may take after the approval (a hang guard, not a latency target).
FINISH_S = 60.0


@pytest.mark.parametrize("surface", ["services", "admin"])
def test_an_approval_here_wakes_a_worker_waiting_in_another_process(
    transactional_db: None, surface: str
) -> None:
    from agent_ledger import services
    from agent_ledger.models import Effect as EffectRow
    from agent_ledger.models import EffectTransition

    user = make_user("alice", VIEW, APPROVE)
    on_pg = connection.vendor == "postgresql"
    application_name = f"agent-ledger-wakeup-{uuid.uuid4().hex[:8]}"
    env = {
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": database_url(connection.settings_dict),
        "LEDGER_TEST_POLL_MS": str(POLL_MS_POSTGRES if on_pg else POLL_MS_SQLITE),
        "LEDGER_TEST_APPLICATION_NAME": application_name,
        "LEDGER_TEST_WORKFLOW": f"wakeup-{surface}",
    }
    code = "import django; django.setup(); from tests.test_wakeups import approval_worker as w; w()"
    with Child(code, env) as child:
        idem_key = child.receive()["waiting"]

        def awaiting_approval() -> bool:
            row = EffectRow.objects.filter(idem_key=idem_key).only("status").first()
            return row is not None and row.status == EffectStatus.REQUIRES_APPROVAL.value

        wait_until(awaiting_approval, "the worker's effect to await approval")
        if on_pg:
            # Its LISTEN must be in force, or the NOTIFY would pass it by (it would poll).
            with Backends(conninfo(connection.settings_dict)) as backends:
                wait_until(
                    lambda: backends.listening(application_name), "the worker's LISTEN session"
                )
        effect = EffectRow.objects.get(idem_key=idem_key)
        if surface == "services":
            record = services.approve(idem_key, actor=Actor("admin", user.pk, "alice"))
            assert record.changed
        else:
            client = Client()
            client.force_login(user)
            response = client.post(reverse("admin:agent_ledger_effect_approve", args=[effect.pk]))
            assert response.status_code == 302
        report = child.receive(timeout_s=FINISH_S)
        assert report == {"result": {"by": child.process.pid, "fence": 2}}
        child.finish()
    effect.refresh_from_db()
    assert effect.status == EffectStatus.SUCCEEDED.value
    history = EffectTransition.objects.filter(effect=effect).order_by("at", "id")
    assert [(t.from_status, t.to_status, t.actor_label) for t in history] == [
        (None, "requires_approval", "system"),
        ("requires_approval", "ready", "admin"),
        ("ready", "processing", "system"),
        ("processing", "succeeded", "system"),
    ]


def approval_worker() -> None:
    """Runs in the child (after ``django.setup()``, on the test database): ``EffectLedger.run``
    with ``requires_approval=True`` on DjangoStore, waiting with the poll interval it is given;
    reports the handler's answer."""
    from django.db import connections

    database = connections["default"].settings_dict
    if database["ENGINE"] == "django.db.backends.postgresql":
        # Before any connection opens: the LISTEN session takes its parameters from here too.
        options = database.setdefault("OPTIONS", {})
        options["application_name"] = os.environ["LEDGER_TEST_APPLICATION_NAME"]
    asyncio.run(_wait_for_approval())


async def _wait_for_approval() -> None:
    from agent_ledger import ConcurrencyOptions, RunOptions, ToolCall
    from agent_ledger.services import get_ledger

    poll_ms = float(os.environ["LEDGER_TEST_POLL_MS"])
    ledger = get_ledger()
    call = ToolCall(
        workflow_id=os.environ["LEDGER_TEST_WORKFLOW"], tool="deploy", args={"image": "app:v2"}
    )
    options = RunOptions(
        requires_approval=True,
        concurrency=ConcurrencyOptions(
            wait_timeout_ms=max(poll_ms * 2, 120_000),
            initial_interval_ms=poll_ms,
            max_interval_ms=poll_ms,
        ),
    )

    async def handler(effect: Any) -> dict[str, int]:
        return {"by": os.getpid(), "fence": effect.fence}

    print(json.dumps({"waiting": ledger.idem_key(call)}), flush=True)
    result = await ledger.run(call, handler, options)
    print(json.dumps({"result": result}), flush=True)
