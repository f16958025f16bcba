"""The example project's demo agent in a real browser: ``manage.py demo_agent`` parks the
refund, an approver clicks Approve in the admin of a running server, and the agent finishes by
itself (the resumer re-invokes the graph). Runs the example project in subprocesses on its own
SQLite file; the suite never imports example_project."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright import sync_api as playwright_sync

from tests.test_admin_browser import CHROMIUM_ARGS

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
MANAGE = ROOT / "example_project" / "manage.py"
PASSWORD = "demo-agent-pw"


def environ(database: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env.update({"DATABASE_URL": f"sqlite:///{database}", "ADMIN_PASSWORD": PASSWORD})
    return env


def manage(database: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(MANAGE), *args],
        cwd=ROOT,
        env=environ(database),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    database = tmp_path / "demo.sqlite3"
    manage(database, "migrate", "--noinput", "-v", "0")
    manage(
        database,
        "shell",
        "-c",
        "from django.contrib.auth import get_user_model as g;"
        f"g().objects.create_superuser('admin', 'a@example.com', '{PASSWORD}')",
    )
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(MANAGE), "runserver", "--noreload", f"127.0.0.1:{port}"],
        cwd=ROOT,
        env=environ(database),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the example server did not start"
            assert process.poll() is None, "the example server exited"
            time.sleep(0.1)  # polling a port that is not open yet, with a deadline
    try:
        yield url, database
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_demo_agent_resumes_after_approve_in_the_admin(server: tuple[str, Path]) -> None:
    url, database = server
    started = manage(database, "demo_agent")
    assert "waits for approval of refund_order" in started
    admin_path = started.strip().rsplit(": ", 1)[1]
    assert manage(database, "demo_agent", "--status").strip() == "waiting"

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("The browser tests need Debian's chromium: apt-get install chromium")
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        page: Any = browser.new_page()
        page.set_default_timeout(30_000)
        page.goto(f"{url}/admin/login/?next={admin_path}")
        page.fill("#id_username", "admin")
        page.fill("#id_password", PASSWORD)
        page.click("input[type=submit]")
        page.get_by_role("button", name="Approve").click()
        page.wait_for_load_state()
        browser.close()

    deadline = time.monotonic() + 60
    while manage(database, "demo_agent", "--status").strip() != "finished":
        assert time.monotonic() < deadline, "the agent did not finish after Approve"
    assert "The agent finished" in manage(database, "demo_agent")  # a rerun replays, runs nothing
