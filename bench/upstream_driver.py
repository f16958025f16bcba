"""Drives PyPI's agent-ledger 0.2.1 for ``run.py``, inside ``bench/.upstream-venv``.

Its import name (``agent_ledger``) is ours too, so it runs in its own virtualenv and process:
``.upstream-venv/bin/python -E -s upstream_driver.py`` with cwd ``bench/``. It reads one JSON
command per line on stdin and answers one JSON line on stdout:

- ``{"op": "setup", "conninfo": c, "schema": s}``: create schema ``s`` and upstream's
  ``SCHEMA_SQL`` in it.
- ``{"op": "open", "conninfo": c, "pool_size": n, "check": b}``: ``AsyncConnectionPool(c,
  min_size=n, max_size=n)``, as upstream's README builds it (no autocommit: upstream commits
  through the pool; ``check_connection`` on checkout when ``b``), and
  ``EffectLedger(EffectLedgerOptions(store=PostgresStore(pool)))``.
- ``{"op": "truncate"}``, ``{"op": "phase", "spec": {...}}`` (``workload.run_phase``),
  ``{"op": "close"}``.

Answers are ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "<traceback>"}``.
Anything upstream prints goes to stderr, so stdout carries only answers.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import workload  # bench/workload.py: this script's directory is sys.path[0]

EXPECTED_VERSION = "0.2.1"


def _check_isolation() -> Any:
    """Refuse to run against the wrong ``agent_ledger`` (ours, from the repository)."""
    import agent_ledger

    where = Path(agent_ledger.__file__).resolve()
    version = importlib.metadata.version("agent-ledger")
    if version != EXPECTED_VERSION or not str(where).startswith(str(Path(sys.prefix).resolve())):
        raise SystemExit(
            f"upstream_driver: wrong agent_ledger: {where} (agent-ledger {version}); "
            f"expected {EXPECTED_VERSION} inside {sys.prefix}"
        )
    return agent_ledger


class Driver:
    def __init__(self) -> None:
        self.upstream = _check_isolation()
        from agent_ledger.stores import postgres

        self.postgres = postgres
        self.pool: Any = None
        self.ledger: Any = None
        self.conninfo = ""

    async def setup(self, conninfo: str, schema: str) -> None:
        from psycopg import AsyncConnection, sql

        async with await AsyncConnection.connect(conninfo, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
            )
            await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            await conn.execute(self.postgres.SCHEMA_SQL)

    async def open(self, conninfo: str, pool_size: int, check: bool) -> None:
        from psycopg_pool import AsyncConnectionPool

        self.conninfo = conninfo
        self.pool = AsyncConnectionPool(
            conninfo,
            min_size=pool_size,
            max_size=pool_size,
            open=False,
            name="upstream",
            check=AsyncConnectionPool.check_connection if check else None,
        )
        await self.pool.open(wait=True, timeout=60)
        store = self.postgres.PostgresStore(pool=self.pool)
        options = self.upstream.EffectLedgerOptions(store=store)
        self.ledger = self.upstream.EffectLedger(options)

    async def truncate(self) -> None:
        from psycopg import AsyncConnection

        async with await AsyncConnection.connect(self.conninfo, autocommit=True) as conn:
            await conn.execute(f"TRUNCATE {self.postgres.TABLE_NAME}")

    async def phase(self, spec: dict[str, Any]) -> dict[str, Any]:
        ledger = self.ledger
        tool_call = self.upstream.ToolCall

        async def run_one(fields: dict[str, Any], handler: Any) -> Any:
            return await ledger.run(tool_call(**fields), handler)

        return await workload.run_phase(run_one, spec)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        self.pool = self.ledger = None


async def main() -> None:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # anything upstream or psycopg prints must not reach the answers
    driver = Driver()
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        try:
            message = json.loads(line)
            op = message["op"]
            if op == "setup":
                result: Any = await driver.setup(message["conninfo"], message["schema"])
            elif op == "open":
                result = await driver.open(
                    message["conninfo"], message["pool_size"], message.get("check", False)
                )
            elif op == "truncate":
                result = await driver.truncate()
            elif op == "phase":
                result = await driver.phase(message["spec"])
            elif op == "close":
                result = await driver.close()
            else:
                raise ValueError(f"unknown op {op!r}")
            answer = {"ok": True, "result": result}
        except Exception:
            answer = {"ok": False, "error": traceback.format_exc()}
        answers.write(json.dumps(answer) + "\n")
    await driver.close()


if __name__ == "__main__":
    asyncio.run(main())
