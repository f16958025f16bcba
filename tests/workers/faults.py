"""Database failures in the middle of a store call, the same scenarios for every store.

``tests/test_faults.py`` runs them in-process on ``PostgresStore`` and through this module's
``main`` in a Django process on ``DjangoStore``. Each scenario holds a lock from another
connection so the store's statement blocks, then kills the store's backend with
``pg_terminate_backend`` (never the server: others share it), and checks that the caller got an
``EffectStoreError`` with the driver's exception chained (or, for a waiter or an owner, that the
ledger retried until it got through), that the change and its history row landed together or not
at all, and that the next call works. The store's connections carry ``application_name`` so they
can be found.

Every kit logs in as a role of its own (``tests.stores.postgres.create_login_role``): the
read-only spell turns ``default_transaction_read_only`` on for that role's new sessions only,
so other test runs sharing the server and its database never see it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg.errors import ReadOnlySqlTransaction

from agent_ledger import (
    Actor,
    CommitSucceeded,
    ConcurrencyOptions,
    EffectLedger,
    EffectLedgerOptions,
    EffectStatus,
    EffectStoreError,
    RunOptions,
    ToolCall,
)
from agent_ledger.stores.base import EffectStore
from agent_ledger.types import SYSTEM
from tests.effects import new_effect
from tests.workers.common import configure_django, connect, options, parser

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
    #: What scenarios measured, by scenario (reported, never asserted: no wall-clock limits).
    measured: dict[str, Any] = dataclasses.field(default_factory=dict)


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


def chain_of(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes."""
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__
    return chain


def check_error(exc: EffectStoreError, operation: str) -> None:
    assert exc.operation == operation, (exc.operation, operation)
    assert exc.__cause__ is not None, "the driver's exception is not chained"
    chain = chain_of(exc)
    assert any(isinstance(c, psycopg.Error) for c in chain), [type(c) for c in chain]


def read_only_refusal(exc: BaseException) -> bool:
    return any(isinstance(c, ReadOnlySqlTransaction) for c in chain_of(exc))


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


async def terminate(
    admin: psycopg.AsyncConnection[Any], application_name: str, pids: Collection[int] = ()
) -> list[int]:
    """Terminate ``pids``, or else every backend named ``application_name``; their pids."""
    if pids:
        query, params = "WHERE pid = ANY(%s)", (list(pids),)
    else:
        query, params = "WHERE application_name = %s", (application_name,)
    # In the select list, so it runs for the matching rows only (a WHERE clause may be
    # evaluated in any order, and terminating other roles' backends is refused).
    cursor = await admin.execute(
        f"SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity {query}", params
    )
    return [pid for pid, _ in await cursor.fetchall()]


async def wait_gone(admin: psycopg.AsyncConnection[Any], pids: Collection[int]) -> None:
    """Until the terminated backends are gone (and their sockets closed)."""
    deadline = time.monotonic() + BLOCK_TIMEOUT_S
    while True:
        cursor = await admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (list(pids),)
        )
        row = await cursor.fetchone()
        if row is not None and row[0] == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"backends {list(pids)} still there after termination")
        await asyncio.sleep(0.01)


async def wait_blocked(
    admin: psycopg.AsyncConnection[Any],
    kit: Kit,
    task: asyncio.Future[Any],
    what: str,
    *,
    exclude: Collection[int] = (),
) -> list[int]:
    """Until one of the store's backends (other than ``exclude``) waits for a lock; its pids.
    Fails if ``task`` ends meanwhile: the call should be blocked, not done."""
    deadline = time.monotonic() + BLOCK_TIMEOUT_S
    while True:
        cursor = await admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
            " AND wait_event_type = 'Lock' AND NOT pid = ANY(%s)",
            (kit.application_name, list(exclude)),
        )
        if pids := [pid for (pid,) in await cursor.fetchall()]:
            return pids
        if task.done():
            outcome = task.exception() or task.result()
            raise AssertionError(f"{what}: the call ended ({outcome!r}) instead of blocking")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never blocked on the held lock")
        await asyncio.sleep(0.01)


async def wait_replayed(kit: Kit, idem_key: str, task: asyncio.Future[Any]) -> None:
    """Until a waiter's ``begin`` found the key (it counted its replay): it is now waiting."""
    deadline = time.monotonic() + BLOCK_TIMEOUT_S
    async with await connect(kit.conninfo, kit.schema) as conn:
        while True:
            cursor = await conn.execute(
                "SELECT dedup_count FROM agent_ledger_effect WHERE idem_key = %s", (idem_key,)
            )
            row = await cursor.fetchone()
            if row is not None and row[0] >= 1:
                return
            if task.done():
                outcome = task.exception() or task.result()
                raise AssertionError(f"the waiter ended ({outcome!r}) instead of waiting")
            if time.monotonic() > deadline:
                raise AssertionError("the waiter never began")
            await asyncio.sleep(0.01)


async def lock_table(conn: psycopg.AsyncConnection[Any]) -> None:
    """In ``conn``'s open transaction: every statement on the effects, reads too, now waits."""
    await conn.execute("LOCK TABLE agent_ledger_effect IN ACCESS EXCLUSIVE MODE")


@asynccontextmanager
async def other_store(kit: Kit) -> AsyncIterator[EffectStore]:
    """A second ``PostgresStore`` on the kit's schema, named so that the kit's terminations
    never reach it: the owner of an effect the kit's store waits for."""
    from psycopg_pool import AsyncConnectionPool

    from agent_ledger.stores.postgres import PostgresStore

    pool = AsyncConnectionPool(
        kit.conninfo,
        kwargs={"options": options(kit.schema), "application_name": f"{kit.application_name}-2"},
        min_size=1,
        max_size=2,
        timeout=BLOCK_TIMEOUT_S,
        check=AsyncConnectionPool.check_connection,
        open=False,
    )
    await pool.open(wait=True, timeout=BLOCK_TIMEOUT_S)
    store = PostgresStore(pool=pool, listen=False)
    try:
        yield store
    finally:
        await pool.close()


def fault_call(name: str) -> ToolCall:
    return ToolCall(workflow_id=f"{name}-{uuid.uuid4().hex}", tool="fault.tool", args={})


def waiting(wait_timeout_ms: float) -> RunOptions:
    return RunOptions(
        concurrency=ConcurrencyOptions(
            wait_timeout_ms=wait_timeout_ms, initial_interval_ms=20, max_interval_ms=100
        )
    )


async def never_run(effect: Any) -> Any:
    raise AssertionError(f"a waiter ran the handler of {effect.idem_key}")


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


#: Writes tried during the read-only spell before one must have been refused as read-only.
SPELL_ATTEMPTS = 5
#: Calls after the spell before one must succeed: each failure must be a read-only connection
#: from the spell that the store then closed, never the same one again and again.
RECOVERY_ATTEMPTS = 3
#: Further calls after the first success, each of which must succeed too but for the spell's
#: leftovers (more than ``ASYNC_THREADS``: every Django store thread gets its turn).
AFTER_RECOVERY = 12


async def read_only_spell(kit: Kit) -> None:
    """New sessions are read-only for a while (a failover's standby, ``default_transaction_
    read_only``); once writes are accepted again the store serves calls after at most
    ``RECOVERY_ATTEMPTS``: the connections made during the spell (a pool's, or Django's kept
    by ``CONN_MAX_AGE`` with health checks, which a read-only session passes) are discarded
    when their statement is refused, never handed out again."""
    store = kit.store
    assert (await store.begin(new_effect())).created
    # Opened before the spell, so it stays read-write and can end the spell (its role's
    # setting reaches new sessions only).
    async with await connect(kit.conninfo, kit.schema) as admin:
        await admin.execute("ALTER ROLE CURRENT_USER SET default_transaction_read_only = on")
        try:
            # The store's sessions predate the spell: end them, so its next ones are read-only.
            await wait_gone(admin, await terminate(admin, kit.application_name))
            # The first may fail on the killed connection instead; soon one is refused.
            for _ in range(SPELL_ATTEMPTS):
                try:
                    await store.begin(new_effect())
                except EffectStoreError as exc:
                    check_error(exc, "begin")
                    if read_only_refusal(exc):
                        break
                else:
                    raise AssertionError("a write succeeded while new sessions were read-only")
            else:
                raise AssertionError(f"no write refused as read-only in {SPELL_ATTEMPTS} tries")
            # A read works in a read-only session, so the store keeps the connection it used,
            # as it would for a waiter polling through the spell.
            missing = str(uuid.uuid4())
            assert await store.get(missing) is None
        finally:
            await admin.execute("ALTER ROLE CURRENT_USER RESET default_transaction_read_only")
        reset_at = time.monotonic()
    # The spell left at most one read-only connection (the one the read used; the one whose
    # write was refused is gone). Django's threads take turns, so that connection may come up
    # at any of the next calls: it must fail one of them, and then be gone.
    failures: list[EffectStoreError] = []
    first_success: tuple[float, int] | None = None
    for number in range(1, RECOVERY_ATTEMPTS + AFTER_RECOVERY + 1):
        try:
            record = await store.begin(new_effect())
        except EffectStoreError as exc:
            check_error(exc, "begin")
            failures.append(exc)
            assert first_success is not None or number < RECOVERY_ATTEMPTS, (
                f"still failing {RECOVERY_ATTEMPTS} calls after the spell: "
                + "; ".join(str(exc) for exc in failures)
            )
            continue
        assert record.created
        if first_success is None:
            first_success = (time.monotonic() - reset_at, number)
    assert first_success is not None
    # Only connections from the spell failed, and each of them once: never one over and over.
    assert all(read_only_refusal(exc) for exc in failures), [str(exc) for exc in failures]
    assert len(failures) < RECOVERY_ATTEMPTS, [str(exc) for exc in failures]
    kit.measured["read_only_spell"] = {
        "reset_to_first_success_s": round(first_success[0], 4),
        "attempts_to_first_success": first_success[1],
        "failed_calls_after_reset": len(failures),
    }


#: Rounds of terminating a waiter's connections (a restart that takes a while).
TERMINATION_ROUNDS = 5


async def waiter_survives_terminations(kit: Kit) -> None:
    """A caller waits (30 s) for an effect another caller owns, while its store's connections
    are killed again and again: each of its reads fails (it is blocked behind a table lock when
    its backend is terminated, so no health check can hide the fault), it retries with its own
    backoff instead of raising, and once the owner commits it returns the owner's result."""
    call = fault_call("waiter")
    waiter = EffectLedger(EffectLedgerOptions(store=kit.store))
    key = waiter.idem_key(call)
    async with other_store(kit) as owner_store:
        owner = EffectLedger(EffectLedgerOptions(store=owner_store))
        begun = await owner.begin(call)
        assert begun.claimed
        task = asyncio.ensure_future(waiter.run(call, never_run, waiting(30_000)))
        try:
            await wait_replayed(kit, key, task)
            killed: list[int] = []
            async with Locker(kit) as locker, await connect(kit.conninfo, kit.schema) as admin:
                await lock_table(locker)
                for round_ in range(TERMINATION_ROUNDS):
                    await wait_blocked(
                        admin, kit, task, f"the waiter's read (round {round_})", exclude=killed
                    )
                    # Every connection of the store, busy or idle: as a restart would.
                    killed += await terminate(admin, kit.application_name)
            assert not task.done(), task
            assert await owner.commit(begun.effect.id, CommitSucceeded({"by": "owner"}))
            assert await asyncio.wait_for(task, BLOCK_TIMEOUT_S) == {"by": "owner"}
        finally:
            task.cancel()
    assert await state(kit, key) == ("succeeded", 1, 2)


async def waiter_raises_at_its_deadline(kit: Kit) -> None:
    """A waiter whose store fails at every read until its deadline (1 s) then raises the last
    ``EffectStoreError``, with the driver's error chained."""
    call = fault_call("deadline")
    waiter = EffectLedger(EffectLedgerOptions(store=kit.store))
    key = waiter.idem_key(call)
    async with other_store(kit) as owner_store:
        owner = EffectLedger(EffectLedgerOptions(store=owner_store))
        begun = await owner.begin(call)
        task = asyncio.ensure_future(waiter.run(call, never_run, waiting(1_000)))
        try:
            await wait_replayed(kit, key, task)
            killed: list[int] = []
            async with Locker(kit) as locker, await connect(kit.conninfo, kit.schema) as admin:
                await lock_table(locker)
                deadline = time.monotonic() + BLOCK_TIMEOUT_S
                while not task.done():
                    if time.monotonic() > deadline:
                        raise AssertionError("the waiter kept waiting past its deadline")
                    cursor = await admin.execute(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                        " AND wait_event_type = 'Lock' AND NOT pid = ANY(%s)",
                        (kit.application_name, killed),
                    )
                    if pids := [pid for (pid,) in await cursor.fetchall()]:
                        killed += await terminate(admin, kit.application_name, pids)
                    else:
                        await asyncio.wait({task}, timeout=0.01)
            assert killed, "the waiter never read while the table was locked"
            exc = task.exception()
            assert isinstance(exc, EffectStoreError), repr(exc)
            check_error(exc, "get")
        finally:
            task.cancel()
        assert await owner.commit(begun.effect.id, CommitSucceeded(None))
    assert await state(kit, key) == ("succeeded", 1, 2)


async def owner_retries_its_commit(kit: Kit) -> None:
    """The handler has acted; its owner's commit is killed on the server. The owner retries
    the fenced commit (within the stale window) instead of leaving the effect processing for a
    takeover to run the tool again: the run returns the handler's result, which ran once."""
    ledger = EffectLedger(EffectLedgerOptions(store=kit.store))
    call = fault_call("owner")
    key = ledger.idem_key(call)
    runs: list[int] = []
    async with Locker(kit) as locker, await connect(kit.conninfo, kit.schema) as admin:

        async def handler(effect: Any) -> Any:
            runs.append(effect.fence)
            # Someone else holds the row now, so the commit's UPDATE waits for the lock.
            await lock_row(locker, key)
            return {"charged": 1}

        task = asyncio.ensure_future(ledger.run(call, handler, waiting(30_000)))
        try:
            first = await wait_blocked(admin, kit, task, "the owner's commit")
            await terminate(admin, kit.application_name, first)
            # The retry, on a new connection, waits for the same lock.
            await wait_blocked(admin, kit, task, "the owner's retried commit", exclude=first)
            assert not task.done(), task
        except BaseException:
            task.cancel()
            raise
    # The lock is gone (ROLLBACK): the retried commit goes through.
    assert await asyncio.wait_for(task, BLOCK_TIMEOUT_S) == {"charged": 1}
    assert runs == [1]
    assert await state(kit, key) == ("succeeded", 1, 2)


SCENARIOS: dict[str, Callable[[Kit], Awaitable[None]]] = {
    f.__name__: f
    for f in (
        transition_killed_mid_transaction,
        commit_killed_mid_transaction,
        claim_killed_mid_transaction,
        begin_killed_mid_transaction,
        idle_connections_killed,
        read_only_spell,
        waiter_survives_terminations,
        waiter_raises_at_its_deadline,
        owner_retries_its_commit,
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
    # Connections kept between calls (CONN_MAX_AGE) and Django's counterpart of the pool's
    # ``check=``: a kept connection is pinged before a call uses it, so one the server dropped
    # is replaced, not used. A read-only session passes that ping: the store itself must drop it.
    configure_django(
        conninfo,
        args.schema,
        application_name=args.application_name,
        conn_max_age=60,
        health_checks=True,
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
    print(json.dumps({"results": report, "measured": kit.measured}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
