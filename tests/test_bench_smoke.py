"""The benchmark still runs: ``bench/run.py --quick`` end to end, in a subprocess.

One round with tiny N against the floor and our stores (no upstream virtualenv), in a database
of its own so it never disturbs a real benchmark run. It checks that the harness works and that
every store answers correctly under it; it asserts nothing about speed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import POSTGRES_URL

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.postgres


def test_quick_run_prints_the_table() -> None:
    url = urlunsplit(urlsplit(POSTGRES_URL)._replace(path="/agent_ledger_bench_smoke"))
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["AGENT_LEDGER_BENCH_URL"] = url
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout
    assert "fresh, sequential [ops/s]" in table
    assert "round trips / fresh run" in table
    header = next(line for line in table.splitlines() if line.strip().startswith("floor"))
    assert "ours-pg" in header
    assert "ours-django" in header
