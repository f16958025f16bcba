"""One small adapter per target; ``run.py`` drives them all the same way.

A target opens its connections (``open``, optionally through the counting proxy's port), empties
its tables (``truncate``, never timed), runs workload phases (``phase``; ``workload.run_phase``
does the timing and the checks), and closes everything it opened (``close``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg_pool import AsyncConnectionPool

from . import workload
from .common import (
    BENCH_DIR,
    SCHEMA_FLOOR,
    SCHEMA_OURS,
    SCHEMA_UPSTREAM,
    bench_url,
    conninfo,
    url_parts,
)
from .floor import EFFECT, TABLES_SQL, TRANSITION, FloorLedger

UPSTREAM_VERSION = "0.2.1"
UPSTREAM_VENV = BENCH_DIR / ".upstream-venv"


class Unavailable(Exception):
    """The target cannot run here (not written yet, not installable); the reason says why."""


class Target:
    #: ``run.py --pool-check``: every pool checks a connection (one round trip) on checkout.
    pool_check = False
    name = ""
    #: The schema holding this target's tables (for the server's row counters).
    schema = ""

    async def setup(self) -> None:
        """Create this target's tables once per run (idempotent)."""

    async def open(self, *, pool_size: int, port: int | None = None) -> None:
        raise NotImplementedError

    async def truncate(self) -> None:
        raise NotImplementedError

    async def phase(self, spec: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def finish_writes(self) -> None:
        """Write now whatever the target holds back for a later write (nothing, mostly)."""


async def _truncate(schema: str) -> None:
    async with await AsyncConnection.connect(
        conninfo(schema=schema, app="truncate"), autocommit=True
    ) as conn:
        await conn.execute(f"TRUNCATE {EFFECT}, {TRANSITION} CASCADE")


def _pool(dsn: str, size: int, name: str, **kwargs: Any) -> AsyncConnectionPool[Any]:
    """Every in-process target gets the same pool: ``size`` connections, all opened up front."""
    return AsyncConnectionPool(
        dsn,
        min_size=size,
        max_size=size,
        open=False,
        name=name,
        kwargs=kwargs or None,
        check=AsyncConnectionPool.check_connection if Target.pool_check else None,
    )


class FloorTarget(Target):
    name = "floor"
    schema = SCHEMA_FLOOR
    #: Which of ``floor.VARIANTS``; ``run.py --floor`` sets it.
    variant = "issue"

    def __init__(self) -> None:
        self._pool: AsyncConnectionPool[Any] | None = None
        self._ledger: FloorLedger | None = None

    async def setup(self) -> None:
        async with await AsyncConnection.connect(
            conninfo(schema=SCHEMA_FLOOR, app="setup"), autocommit=True
        ) as conn:
            await conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA_FLOOR))
            )
            await conn.execute(
                TABLES_SQL.format(effect=EFFECT, transition=TRANSITION, source=SCHEMA_OURS)
            )

    async def open(self, *, pool_size: int, port: int | None = None) -> None:
        dsn = conninfo(schema=SCHEMA_FLOOR, port=port, app=self.name)
        self._pool = _pool(dsn, pool_size, self.name, autocommit=True)
        await self._pool.open(wait=True, timeout=60)
        self._ledger = FloorLedger(self._pool, self.variant)

    async def truncate(self) -> None:
        await _truncate(SCHEMA_FLOOR)
        if self._ledger is not None:
            self._ledger.reset()

    async def phase(self, spec: dict[str, Any]) -> dict[str, Any]:
        assert self._ledger is not None
        ledger = self._ledger

        async def run_one(fields: dict[str, Any], handler: Any) -> Any:
            return await ledger.run(fields["workflow_id"], fields["tool"], fields["args"], handler)

        return await workload.run_phase(run_one, spec)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        self._pool = self._ledger = None


class _OursTarget(Target):
    """Our ``EffectLedger`` on one of our stores; the ledger builds the ``ToolCall``."""

    schema = SCHEMA_OURS

    def __init__(self) -> None:
        self._ledger: Any = None

    async def phase(self, spec: dict[str, Any]) -> dict[str, Any]:
        from agent_ledger import ToolCall

        ledger = self._ledger
        assert ledger is not None

        async def run_one(fields: dict[str, Any], handler: Any) -> Any:
            return await ledger.run(ToolCall(**fields), handler)

        return await workload.run_phase(run_one, spec)

    async def truncate(self) -> None:
        await _truncate(SCHEMA_OURS)


class OursPostgresTarget(_OursTarget):
    name = "ours-pg"

    def __init__(self) -> None:
        super().__init__()
        try:
            from agent_ledger.stores import postgres
        except ImportError as exc:
            raise Unavailable(f"agent_ledger.stores.postgres does not import: {exc}") from exc
        self._module = postgres
        self._pool: AsyncConnectionPool[Any] | None = None
        self._store: Any = None

    async def open(self, *, pool_size: int, port: int | None = None) -> None:
        from agent_ledger import EffectLedger, EffectLedgerOptions

        dsn = conninfo(schema=SCHEMA_OURS, port=port, app=self.name)
        self._pool = _pool(dsn, pool_size, self.name, autocommit=True)
        await self._pool.open(wait=True, timeout=60)
        self._store = self._module.PostgresStore(pool=self._pool)
        self._ledger = EffectLedger(EffectLedgerOptions(store=self._store))

    async def close(self) -> None:
        # Whatever the store started beside the pool (a LISTEN connection, say) goes too.
        closer = getattr(self._store, "aclose", None) or getattr(self._store, "close", None)
        if closer is not None:
            result = closer()
            if asyncio.iscoroutine(result):
                await result
        if self._pool is not None:
            await self._pool.close()
        self._pool = self._store = self._ledger = None


class OursDjangoTarget(_OursTarget):
    name = "ours-django"

    def __init__(self) -> None:
        super().__init__()
        try:
            from agent_ledger.stores.django import DjangoStore
        except ImportError as exc:
            raise Unavailable(f"agent_ledger.stores.django does not import: {exc}") from exc
        self._store_class = DjangoStore
        self._settings_port: str | None = None

    async def open(self, *, pool_size: int, port: int | None = None) -> None:
        from agent_ledger import EffectLedger, EffectLedgerOptions

        # The pool size comes from settings (AGENT_LEDGER_BENCH_POOL), set before setup.
        await self._reset_pool(port, prefill=True)
        self._ledger = EffectLedger(EffectLedgerOptions(store=self._store_class()))

    async def close(self) -> None:
        await self._reset_pool(None, prefill=False)
        self._ledger = None

    async def _reset_pool(self, port: int | None, *, prefill: bool) -> None:
        """Close every connection DjangoStore holds (its worker threads', its LISTEN connection,
        Django's pool) and point the next ones at ``port`` (the counting proxy) or back at the
        server."""
        from django.db import connections

        def reset() -> None:
            from agent_ledger.stores import django as django_store

            django_store.close_connections()  # its threads' connections and LISTEN
            wrapper = connections["default"]
            if self._settings_port is None:
                self._settings_port = wrapper.settings_dict["PORT"]
            wrapper.close()
            wrapper.close_pool()
            # settings_dict is shared by every thread's connection wrapper.
            if port is None:
                wrapper.settings_dict.update(PORT=self._settings_port, HOST=_server_host())
            else:
                wrapper.settings_dict.update(PORT=str(port), HOST="127.0.0.1")

        def fill() -> None:
            # Open every pooled connection now, as the other targets' pools do, not mid-timing.
            pool = connections["default"].pool
            if pool is not None:
                pool.open()
                pool.wait(timeout=60)

        await asyncio.to_thread(reset)
        if prefill:
            await asyncio.to_thread(fill)


def _server_host() -> str:
    return url_parts(bench_url())["host"]


class UpstreamTarget(Target):
    """agent-ledger 0.2.1 from PyPI, in its own virtualenv and process (its import name is
    ``agent_ledger`` too). Speaks JSON lines with ``bench/upstream_driver.py``."""

    name = "upstream"
    schema = SCHEMA_UPSTREAM

    def __init__(self, venv: Path = UPSTREAM_VENV) -> None:
        self._python = ensure_upstream_venv(venv)
        self._proc: asyncio.subprocess.Process | None = None

    async def _start(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env["AGENT_LEDGER_BENCH_URL"] = bench_url()
        # -E -s: no PYTHONPATH, no user site; cwd and script dir are bench/, so the only
        # ``agent_ledger`` on sys.path is the upstream venv's (the driver checks this too).
        self._proc = await asyncio.create_subprocess_exec(
            str(self._python),
            "-E",
            "-s",
            str(BENCH_DIR / "upstream_driver.py"),
            cwd=str(BENCH_DIR),
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=2**24,
        )

    async def _call(self, message: dict[str, Any]) -> Any:
        await self._start()
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        proc.stdin.write((json.dumps(message) + "\n").encode())
        await proc.stdin.drain()
        line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"upstream driver exited ({await proc.wait()}); see stderr above")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"upstream driver failed on {message['op']}:\n{reply.get('error')}")
        return reply.get("result")

    async def setup(self) -> None:
        dsn = conninfo(app="setup")
        await self._call({"op": "setup", "conninfo": dsn, "schema": SCHEMA_UPSTREAM})

    async def open(self, *, pool_size: int, port: int | None = None) -> None:
        dsn = conninfo(schema=SCHEMA_UPSTREAM, port=port, app=self.name)
        await self._call(
            {"op": "open", "conninfo": dsn, "pool_size": pool_size, "check": Target.pool_check}
        )

    async def truncate(self) -> None:
        await self._call({"op": "truncate"})

    async def phase(self, spec: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._call({"op": "phase", "spec": spec})
        return result

    async def close(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            await self._call({"op": "close"})

    async def shutdown(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


def ensure_upstream_venv(venv: Path = UPSTREAM_VENV) -> Path:
    """The upstream venv's python, creating the venv and installing agent-ledger on first use."""
    python = venv / "bin" / "python"
    if _installed_version(python) == UPSTREAM_VERSION:
        return python
    print(f"== creating {venv} with agent-ledger[postgres]=={UPSTREAM_VERSION}", file=sys.stderr)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                f"agent-ledger[postgres]=={UPSTREAM_VERSION}",
            ],
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise Unavailable(f"could not install agent-ledger=={UPSTREAM_VERSION}: {exc}") from exc
    found = _installed_version(python)
    if found != UPSTREAM_VERSION:
        raise Unavailable(f"{venv} has agent-ledger {found!r}, wanted {UPSTREAM_VERSION}")
    return python


def _installed_version(python: Path) -> str | None:
    if not python.exists():
        return None
    out = subprocess.run(
        [
            str(python),
            "-E",
            "-s",
            "-c",
            "import importlib.metadata as m; print(m.version('agent-ledger'))",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=str(BENCH_DIR),
    )
    return out.stdout.strip() if out.returncode == 0 else None
