"""What every bench script shares: the database URL, creating the database, machine facts."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent

#: The database the benchmark owns; the URL's database name is created when missing.
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/agent_ledger_bench"

#: One schema per target, so the floor, our stores and upstream never see each other's rows.
SCHEMA_OURS = "bench_ours"
SCHEMA_FLOOR = "bench_floor"
SCHEMA_UPSTREAM = "bench_upstream"
SCHEMA_AUDIT = "bench_audit"

#: Every connection the bench opens carries this prefix, so pg_stat_activity can tell them apart.
APP_PREFIX = "agent-ledger-bench"


def bench_url() -> str:
    return os.environ.get("AGENT_LEDGER_BENCH_URL", DEFAULT_URL)


def url_parts(url: str) -> dict[str, str]:
    """host, port, user, password and dbname of a ``postgresql://`` URL."""
    parts = urlsplit(url)
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": str(parts.port or 5432),
        "user": parts.username or "postgres",
        "password": parts.password or "",
        "dbname": parts.path.lstrip("/") or "postgres",
    }


def conninfo(
    url: str | None = None,
    *,
    schema: str | None = None,
    port: int | None = None,
    app: str = "",
    dbname: str | None = None,
) -> str:
    """A libpq conninfo for ``url`` with its own search_path, application_name, no TLS.

    ``port`` points the connection somewhere else (the round-trip counting proxy) while keeping
    everything else identical, so the counted connections are the measured ones.
    """
    p = url_parts(url or bench_url())
    params = {
        "host": p["host"] if port is None else "127.0.0.1",
        "port": str(port) if port is not None else p["port"],
        "user": p["user"],
        "dbname": dbname or p["dbname"],
        # Same transport for every target; also lets the counting proxy read the protocol.
        "sslmode": "disable",
        "gssencmode": "disable",
        "application_name": f"{APP_PREFIX}:{app}" if app else APP_PREFIX,
    }
    if p["password"]:
        params["password"] = p["password"]
    if schema:
        params["options"] = f"-c search_path={schema}"
    return psycopg.conninfo.make_conninfo(**params)


def server_address(url: str | None = None) -> tuple[str, int]:
    p = url_parts(url or bench_url())
    return p["host"], int(p["port"])


def ensure_database(url: str | None = None) -> str:
    """Create the bench database when it does not exist yet; return its name."""
    url = url or bench_url()
    name = url_parts(url)["dbname"]
    with psycopg.connect(conninfo(url, dbname="postgres", app="setup"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    return name


def with_dbname(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def machine_facts(url: str | None = None) -> dict[str, str]:
    """What the README's figures need next to them: the machine, the server, the date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with psycopg.connect(conninfo(url, app="facts"), autocommit=True) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        preload = conn.execute("SHOW shared_preload_libraries").fetchone()[0]  # type: ignore[index]
        sync_commit = conn.execute("SHOW synchronous_commit").fetchone()[0]  # type: ignore[index]
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{os.cpu_count()} cores, {cpu}",
        "python": platform.python_version(),
        "postgresql": server,
        "synchronous_commit": sync_commit,
        "pg_stat_statements": "loaded" if "pg_stat_statements" in preload else "not loaded",
        "psycopg": psycopg.__version__,
        "git": _git_head(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def _git_head() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    head = out.stdout.strip() or "unknown"
    return head + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def setup_django(schema: str, *, pool_size: int = 16, django_conn: str = "pool") -> None:
    """Configure Django with ``bench.settings`` on ``schema`` and migrate that schema."""
    if str(REPO_DIR) not in sys.path:
        sys.path.insert(0, str(REPO_DIR))
    os.environ["AGENT_LEDGER_BENCH_SCHEMA"] = schema
    os.environ["AGENT_LEDGER_BENCH_POOL"] = str(pool_size)
    os.environ["AGENT_LEDGER_BENCH_DJANGO_CONN"] = django_conn
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    with psycopg.connect(conninfo(app="setup"), autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(psycopg.sql.Identifier(schema))
        )
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)
    from django.db import connections

    # Migrating opened Django's pool; close it so it holds no connections until a target runs.
    connections["default"].close()
    connections["default"].close_pool()
