"""Database failures in the middle of a store call, the same scenarios for every store.

``tests/test_faults.py`` runs them in-process on ``PostgresStore`` and through this module's
``main`` in a Django process on ``DjangoStore``. Each scenario holds a row lock from another
connection so the store's statement blocks inside its transaction, then kills the store's
backend with ``pg_terminate_backend`` (never the server: others share it), and checks that the
caller got an ``EffectStoreError`` with the driver's exception chained, that the change and its
history row landed together or not at all, and that the next call works. The store's
connections carry ``application_name`` so they can be found.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import traceback
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from agent_ledger import Actor, CommitSucceeded, EffectStatus, EffectStoreError
from agent_ledger.stores.base import EffectStore
from agent_ledger.types import SYSTEM
from tests.effects import new_effect
from tests.workers.common import configure_django, connect, parser

#: Longest a scenario waits for the store's statement to block.
BLOCK_TIMEOUT_S = 15
ADMIN = Actor("admin", 1, "Ann")


@dataclasses.dataclass
class Kit:
    store: EffectStore
    conninfo: str
    schema: str
    #: Every connection the store opens carries this name.
    application_name: str


async def state(kit: Kit, idem_key: str) -> tuple[Any, ...] | None:
    """(status, fence, number of history rows), read past the store."""
    async with await connect(kit.conninfo, kit.schema) as conn:
        cursor = await conn.execute(
            "SELECT e.status, e.fence, (SELECT count(*) FROM agent_ledger_effecttransition t"
            " WHERE t.effect_id = e.id) FROM agent_ledger_effect e WHERE e.idem_key = %s",
            (idem_key,),
        )
        return await cursor.fetchone()


async def orphan_history(kit: Kit) -> int:
    async with await connect(kit.conninfo, kit.schema) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM agent_ledger_effecttransition t WHERE NOT EXISTS"
            " (SELECT 1 FROM agent_ledger_effect e WHERE e.id = t.effect_id)"
        )
        row = await cursor.fetchone()
        return int(row[0]) if row else 0


async def kill_when_blocked(
    kit: Kit, call: Awaitable[Any], operation: str, *, may_skip: bool = False
) -> EffectStoreError | None:
    """Run ``call`` until its statement waits for a lock, terminate its backend, and return
    the error the caller got. ``may_skip``: a call that skips locked rows (``skip_locked``)
    may instead answer None at once, without blocking; then None is returned."""
    task = asyncio.ensure_future(call)
    async with await connect(kit.conninfo, kit.schema) as admin:
        deadline = asyncio.get_running_loop().time() + BLOCK_TIMEOUT_S
        while True:
            cursor = await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s AND wait_event_type = 'Lock'",
                (kit.application_name,),
            )
            if await cursor.fetchall():
                break
            if may_skip and task.done() and task.exception() is None and task.result() is None:
                return None
            if task.done() or asyncio.get_running_loop().time() > deadline:
                task.cancel()
                raise AssertionError(f"{operation} never blocked on the held lock")
            await asyncio.sleep(0.01)
    try:
        await asyncio.wait_for(task, BLOCK_TIMEOUT_S)
    except EffectStoreError as exc:
        check_error(exc, operation)
        return exc
    raise AssertionError(f"{operation} did not fail when its connection was killed")


def check_error(exc: EffectStoreError, operation: str) -> None:
    assert exc.operation == operation, (exc.operation, operation)
    assert exc.__cause__ is not None, "the driver's exception is not chained"
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__
    assert any(isinstance(c, psycopg.Error) for c in chain), [type(c) for c in chain]


class Locker:
    """Another connection holding a row lock (or an uncommitted row) in an open transaction."""

    def __init__(self, kit: Kit) -> None:
        self.kit = kit
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def __aenter__(self) -> psycopg.AsyncConnection[Any]:
        self.conn = await connect(self.kit.conninfo, self.kit.schema)
        await self.conn.execute("BEGIN")
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        assert self.conn is not None
        await self.conn.execute("ROLLBACK")
        await self.conn.close()


async def lock_row(conn: psycopg.AsyncConnection[Any], idem_key: str) -> None:
    await conn.execute(
        "SELECT 1 FROM agent_ledger_effect WHERE idem_key = %s FOR UPDATE", (idem_key,)
    )


# -- the scenarios ---------------------------------------------------------------------------


async def transition_killed_mid_transaction(kit: Kit) -> None:
    new = new_effect(EffectStatus.REQUIRES_APPROVAL)
    await kit.store.begin(new)

    def approve() -> Awaitable[Any]:
        return kit.store.transition(
            new.idem_key,
            from_statuses={EffectStatus.REQUIRES_APPROVAL},
            to_status=EffectStatus.READY,
            actor=ADMIN,
        )

    async with Locker(kit) as locker:
        await lock_row(locker, new.idem_key)
        await kill_when_blocked(kit, approve(), "transition")
    assert await state(kit, new.idem_key) == ("requires_approval", 1, 1)
    record = await approve()
    assert record.changed
    assert await state(kit, new.idem_key) == ("ready", 1, 2)


async def commit_killed_mid_transaction(kit: Kit) -> None:
    new = new_effect()
    effect = (await kit.store.begin(new)).effect

    def commit() -> Awaitable[Any]:
        return kit.store.commit(effect.id, CommitSucceeded({"ok": 1}), fence=1, actor=SYSTEM)

    async with Locker(kit) as locker:
        await lock_row(locker, new.idem_key)
        await kill_when_blocked(kit, commit(), "commit")
    assert await state(kit, new.idem_key) == ("processing", 1, 1)
    committed = await commit()
    assert committed is not None
    assert committed.result == {"ok": 1}
    assert await state(kit, new.idem_key) == ("succeeded", 1, 2)


async def claim_killed_mid_transaction(kit: Kit) -> None:
    new = new_effect(EffectStatus.READY)
    effect = (await kit.store.begin(new)).effect

    def claim() -> Awaitable[Any]:
        return kit.store.claim(effect.id, stale_after_ms=0, actor=SYSTEM)

    async with Locker(kit) as locker:
        await lock_row(locker, new.idem_key)
        # PostgresStore's claim queues on the lock; DjangoStore's skips a locked row (someone
        # else is claiming it). Either way nothing may change while the lock is held.
        await kill_when_blocked(kit, claim(), "claim", may_skip=True)
    assert await state(kit, new.idem_key) == ("ready", 1, 1)
    claimed = await claim()
    assert claimed is not None
    assert claimed.fence == 2
    assert await state(kit, new.idem_key) == ("processing", 2, 2)


async def begin_killed_mid_transaction(kit: Kit) -> None:
    """The store's insert waits for another caller's uncommitted row with the same key."""
    new = new_effect()
    async with Locker(kit) as locker:
        await locker.execute(
            "INSERT INTO agent_ledger_effect (id, idem_key, workflow_id, call_id, tool, status,"
            " args_canonical) VALUES (%s, %s, 'other', 'other', 'fault.tool', 'processing', '{}')",
            (uuid.uuid4(), new.idem_key),
        )
        await kill_when_blocked(kit, kit.store.begin(new), "begin")
    # The other caller rolled back and the killed begin wrote nothing: no row, no history.
    assert await state(kit, new.idem_key) is None
    assert await orphan_history(kit) == 0
    record = await kit.store.begin(new)
    assert record.created
    assert await state(kit, new.idem_key) == ("processing", 1, 1)


async def idle_connections_killed(kit: Kit) -> None:
    """Connections the server dropped between calls are not handed to the next call."""
    new = new_effect()
    effect = (await kit.store.begin(new)).effect
    await asyncio.gather(*(kit.store.get(effect.id) for _ in range(4)))
    async with await connect(kit.conninfo, kit.schema) as admin:
        cursor = await admin.execute(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s",
            (kit.application_name,),
        )
        killed = [pid for pid, _ in await cursor.fetchall()]
        # Between calls: the backends are gone (and their sockets closed) before the next one.
        for _ in range(500):
            cursor = await admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (killed,)
            )
            row = await cursor.fetchone()
            if row is not None and row[0] == 0:
                break
            await asyncio.sleep(0.01)
    assert await kit.store.get(effect.id) == effect
    assert await kit.store.commit(effect.id, CommitSucceeded(1), fence=1, actor=SYSTEM)


SCENARIOS: dict[str, Callable[[Kit], Awaitable[None]]] = {
    f.__name__: f
    for f in (
        transition_killed_mid_transaction,
        commit_killed_mid_transaction,
        claim_killed_mid_transaction,
        begin_killed_mid_transaction,
        idle_connections_killed,
    )
}


async def unreachable(store: EffectStore) -> None:
    """Every call on a store whose database cannot be reached fails with a chained error."""
    try:
        await store.get(str(uuid.uuid4()))
    except EffectStoreError as exc:
        check_error(exc, "get")
    else:
        raise AssertionError("get did not fail")
    try:
        await store.begin(new_effect())
    except EffectStoreError as exc:
        check_error(exc, "begin")
    else:
        raise AssertionError("begin did not fail")


# -- the Django process ------------------------------------------------------------------------


async def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--port", help="connect here instead (a closed port: the unreachable case)")
    args = p.parse_args()
    conninfo = args.conninfo
    if args.port:
        conninfo = make_conninfo(conninfo, port=args.port)
    # Django's counterpart of the pool's ``check=``: a connection kept between calls is
    # pinged before a call uses it, so one the server dropped is replaced, not used.
    configure_django(
        conninfo, args.schema, application_name=args.application_name, health_checks=True
    )
    from agent_ledger.stores.django import DjangoStore

    store = DjangoStore()
    scenarios: dict[str, Callable[[Kit], Awaitable[None]]] = dict(SCENARIOS)
    if args.port:
        scenarios = {"unreachable": lambda kit: unreachable(kit.store)}
    kit = Kit(store, args.conninfo, args.schema, args.application_name)
    report: dict[str, str] = {}
    for name, scenario in scenarios.items():
        try:
            await asyncio.wait_for(scenario(kit), 60)
            report[name] = "ok"
        except BaseException:
            report[name] = traceback.format_exc()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
