"""The example project works as the README says: check, migrate, and a demo that can run twice.

It runs in a subprocess on its own SQLite file; the test suite never imports example_project.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MANAGE = ROOT / "example_project" / "manage.py"


def manage(*args: str, database: Path, **environ: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["DATABASE_URL"] = f"sqlite:///{database}"
    env.update(environ)
    result = subprocess.run(
        [sys.executable, str(MANAGE), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("example") / "db.sqlite3"


def rows(database: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(database) as connection:
        return connection.execute(sql).fetchall()


def test_check_migrate_and_demo_twice(database: Path) -> None:
    assert "no issues" in manage("check", database=database)
    manage("migrate", "--noinput", database=database)
    assert "9 new effects" in manage("demo", database=database)
    first = rows(database, "SELECT id, status, dedup_count FROM agent_ledger_effect ORDER BY id")

    second_run = manage("demo", database=database)
    assert "0 new effects" in second_run
    second = rows(database, "SELECT id, status, dedup_count FROM agent_ledger_effect ORDER BY id")
    assert [(i, s) for i, s, _ in second] == [(i, s) for i, s, _ in first]  # same effects
    assert sum(d for *_, d in second) > sum(d for *_, d in first)  # the replays were counted

    statuses = {status for _, status, _ in second}
    assert {"succeeded", "failed", "requires_approval", "denied"} <= statuses
    assert len({w for (w,) in rows(database, "SELECT workflow_id FROM agent_ledger_effect")}) >= 3
    assert len({t for (t,) in rows(database, "SELECT tool FROM agent_ledger_effect")}) >= 5
    deciders = rows(
        database,
        "SELECT to_status, actor_label, actor_name FROM agent_ledger_effecttransition "
        "WHERE from_status = 'requires_approval'",
    )
    assert sorted(deciders) == [
        ("denied", "cli", "demo operator"),
        ("ready", "cli", "demo operator"),
    ]


def test_the_demo_prints_the_webhook_secret_itself(database: Path) -> None:
    """The banner once printed the secret's name ("demo"); signing with that gave 401."""
    printed = manage("demo", "--webhook-secret", database=database).strip()
    assert printed == "dev-only-webhook-secret-change-me"
    chosen = "a-secret-from-the-environment-0123"
    assert (
        manage(
            "demo", "--webhook-secret", database=database, AGENT_LEDGER_WEBHOOK_SECRET=chosen
        ).strip()
        == chosen
    )
    script = (ROOT / "scripts" / "demo.sh").read_text()
    assert "WEBHOOK_SECRET=$(manage demo --webhook-secret)" in script
    assert "sign with the secret $WEBHOOK_SECRET" in script
