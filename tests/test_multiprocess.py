"""Real OS processes racing on one PostgreSQL ledger (``tests/workers/race.py``).

In-process tests share one event loop and one pool; only separate processes, released together
by an advisory-lock barrier, show that the database (the unique key, row locks, the fence) is
what keeps a handler to one run. Handler runs are counted in a table outside the ledger.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from psycopg import AsyncConnection

from agent_ledger import CommitSucceeded, EffectLedger, EffectLedgerOptions, EffectStatus
from agent_ledger.stores.postgres import PostgresStore
from tests.conftest import POSTGRES_URL
from tests.stores.postgres import connect, ledger_schema, schema_pool, search_path
from tests.workers.common import HANDLER_RUNS_SQL
from tests.workers.race import call_for

#: Needs the PostgreSQL at ``TEST_POSTGRES_URL`` (whatever ``DATABASE_URL`` says); an
#: unreachable server fails these tests, it never skips them.
pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = 4
COROUTINES = 25
#: Longest a worker may take; a hang fails the test instead of stalling the suite.
TIMEOUT_S = 60


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    async with ledger_schema(prefix="race") as name:
        async with await connect(options=search_path(name)) as conn:
            await conn.execute(HANDLER_RUNS_SQL)
        yield name


@pytest.fixture
async def db(schema: str) -> AsyncIterator[AsyncConnection[Any]]:
    """The test's own connection: barrier locks, handler counts, raw rows."""
    async with await connect(options=search_path(schema)) as conn:
        yield conn


class Worker:
    """One ``tests.workers.race`` process and, once it ends, its JSON report."""

    def __init__(self, process: asyncio.subprocess.Process, store: str) -> None:
        self.process = process
        self.store = store

    @classmethod
    async def start(cls, schema: str, store: str, *args: object) -> Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.workers.race",
            "--conninfo",
            POSTGRES_URL,
            "--schema",
            schema,
            "--store",
            store,
            *map(str, args),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        return cls(process, store)

    async def report(self) -> dict[str, Any]:
        stdout, stderr = await asyncio.wait_for(self.process.communicate(), TIMEOUT_S)
        assert self.process.returncode == 0, f"{self.store} worker failed:\n{stderr.decode()}"
        return json.loads(stdout.decode().strip().splitlines()[-1])


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, workers: Sequence[Worker] = ()
) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not await check():
        for worker in workers:
            if worker.process.returncode is not None:
                _, stderr = await worker.process.communicate()
                pytest.fail(f"a worker exited while waiting for {what}:\n{stderr.decode()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def scalar(db: AsyncConnection[Any], query: str, *params: object) -> Any:
    cursor = await db.execute(query, params)
    row = await cursor.fetchone()
    assert row is not None
    return row[0]


async def run_together(
    db: AsyncConnection[Any], schema: str, stores: list[str], rounds: int, *args: object
) -> list[dict[str, Any]]:
    """Start one worker per entry of ``stores`` and release each round once all of them wait."""
    group = secrets.randbelow(2**31 - 1) + 1
    for step in range(rounds):
        await db.execute("SELECT pg_advisory_lock(%s, %s)", (group, step))
    workers = [
        await Worker.start(schema, store, "--rounds", rounds, "--barrier", group, *args)
        for store in stores
    ]
    for step in range(rounds):

        async def all_waiting(step: int = step) -> bool:
            waiting = await scalar(
                db,
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND classid = %s::oid AND objid = %s::oid AND objsubid = 2",
                group,
                step,
            )
            return bool(waiting == len(workers))

        await wait_until(all_waiting, f"every worker at round {step}", workers)
        await db.execute("SELECT pg_advisory_unlock(%s, %s)", (group, step))
    return [await worker.report() for worker in workers]


async def history_of(db: AsyncConnection[Any], workflow_id: str) -> list[tuple[Any, ...]]:
    cursor = await db.execute(
        "SELECT t.from_status, t.to_status, t.reason FROM agent_ledger_effecttransition t"
        " JOIN agent_ledger_effect e ON e.id = t.effect_id WHERE e.workflow_id = %s"
        " ORDER BY t.at, t.id",
        (workflow_id,),
    )
    return await cursor.fetchall()


@pytest.mark.parametrize(
    ("stores", "rounds", "coroutines"),
    [
        pytest.param(["postgres"] * PROCESSES, 15, COROUTINES, id="postgres"),
        # Two DjangoStore processes race each other and two PostgresStore ones on the same
        # rows; then four DjangoStore processes. Fewer rounds: a Django process starts slowly.
        pytest.param(["django", "postgres"] * (PROCESSES // 2), 5, 10, id="mixed"),
        pytest.param(["django"] * PROCESSES, 5, 25, id="django"),
    ],
)
async def test_the_handler_runs_once_per_key_across_processes(
    db: AsyncConnection[Any], schema: str, stores: list[str], rounds: int, coroutines: int
) -> None:
    """4 processes x 25 coroutines per key: one handler run, one answer for every caller."""
    reports = await run_together(
        db, schema, stores, rounds, "--prefix", "race", "--sleep-ms", 30, "--coroutines", coroutines
    )
    callers = len(stores) * coroutines
    for step in range(rounds):
        workflow_id = f"race-{step}"
        runs = await (
            await db.execute(
                "SELECT pid, fence FROM handler_runs WHERE workflow_id = %s", (workflow_id,)
            )
        ).fetchall()
        assert len(runs) == 1, f"{workflow_id}: handler ran {len(runs)} times"
        pid, fence = runs[0]
        answers = [result for report in reports for result in report["rounds"][step]["results"]]
        assert len(answers) == callers
        assert all(answer == {"pid": pid, "fence": fence} for answer in answers), answers
        status, dedup = await (
            await db.execute(
                "SELECT status, dedup_count FROM agent_ledger_effect WHERE workflow_id = %s",
                (workflow_id,),
            )
        ).fetchone() or (None, None)
        assert (status, dedup) == ("succeeded", callers - 1)
        assert await history_of(db, workflow_id) == [
            (None, "processing", None),
            ("processing", "succeeded", None),
        ]


async def test_a_killed_owner_is_taken_over_by_exactly_one_process(
    db: AsyncConnection[Any], schema: str
) -> None:
    """SIGKILL mid-handler; after the stale time exactly one of 3 processes (DjangoStore and
    PostgresStore ones) runs it again, and the dead owner's late commit (old fence) is refused."""
    owner = await Worker.start(
        schema, "postgres", "--prefix", "kill", "--coroutines", 1, "--sleep-ms", 3_600_000
    )

    async def owner_is_in_handler() -> bool:
        count = await scalar(db, "SELECT count(*) FROM handler_runs")
        return bool(count == 1)

    await wait_until(owner_is_in_handler, "the owner to start its handler", [owner])
    owner.process.send_signal(signal.SIGKILL)
    assert await owner.process.wait() == -signal.SIGKILL

    async with schema_pool(schema, max_size=2) as pool:
        ledger = EffectLedger(EffectLedgerOptions(store=PostgresStore(pool=pool)))
        key = ledger.idem_key(call_for("kill", 0))
        dead = await ledger.find_by_idem_key(key)
        assert dead is not None
        assert (dead.status, dead.fence) == (EffectStatus.PROCESSING, 1)

        reports = await run_together(
            db,
            schema,
            ["django", "postgres", "django"],
            1,
            "--prefix",
            "kill",
            "--coroutines",
            5,
            "--stale-ms",
            1_000,
            "--sleep-ms",
            30,
        )

        runs = await (
            await db.execute("SELECT pid, fence FROM handler_runs ORDER BY id")
        ).fetchall()
        assert len(runs) == 2, runs
        (dead_pid, dead_fence), (taker_pid, taker_fence) = runs
        assert (dead_pid, dead_fence) == (owner.process.pid, 1)
        assert taker_fence == 2
        assert taker_pid in {report["pid"] for report in reports}
        answers = [result for report in reports for result in report["rounds"][0]["results"]]
        assert answers == [{"pid": taker_pid, "fence": 2}] * 15

        late = await ledger.commit(dead.id, CommitSucceeded({"late": True}), fence=dead.fence)
        assert late is False
        final = await ledger.get_effect(dead.id)
        assert final is not None
        assert (final.status, final.result, final.fence) == (
            EffectStatus.SUCCEEDED,
            {"pid": taker_pid, "fence": 2},
            2,
        )
        assert await history_of(db, "kill-0") == [
            (None, "processing", None),
            ("processing", "processing", "stale takeover"),
            ("processing", "succeeded", None),
        ]


#: Replays a worker reports before it is killed.
REPLAYS = 200


@pytest.mark.parametrize("store", ["postgres", "django"])
async def test_sigkill_loses_no_reported_replay_count(
    db: AsyncConnection[Any], schema: str, store: str
) -> None:
    """A replay is counted by the ``BEGIN`` that finds the key, before the call returns, so a
    process SIGKILLed after reporting N replays leaves a count of at least N (and at most the
    one more it may have had in flight): nothing is held in the process to be lost."""
    worker = await Worker.start(schema, store, "--prefix", "replay", "--replay-forever")
    stdout = worker.process.stdout
    assert stdout is not None
    reported = 0
    while reported < REPLAYS:
        line = await asyncio.wait_for(stdout.readline(), TIMEOUT_S)
        if not line:
            _, stderr = await worker.process.communicate()
            pytest.fail(f"the {store} worker exited:\n{stderr.decode()}")
        if line.startswith(b"replayed "):
            reported = int(line.split()[1])
    worker.process.send_signal(signal.SIGKILL)
    rest, _ = await asyncio.wait_for(worker.process.communicate(), TIMEOUT_S)
    assert worker.process.returncode == -signal.SIGKILL
    # What it printed before it died counts as reported too (only whole lines).
    for line in rest.split(b"\n")[:-1]:
        if line.startswith(b"replayed "):
            reported = int(line.split()[1])
    dedup = await scalar(
        db, "SELECT dedup_count FROM agent_ledger_effect WHERE workflow_id = %s", "replay-0"
    )
    assert reported <= dedup <= reported + 1, (reported, dedup)
