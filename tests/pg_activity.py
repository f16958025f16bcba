"""Watching a database from outside, for the connection and wake-up tests.

- ``Backends``: client backends of one database in ``pg_stat_activity``, counted on a plain psycopg
  connection of its own (never Django's, so measuring does not change the count), with a sampling
  thread that keeps the peak.
- ``Notifications``: a plain ``LISTEN agent_ledger`` session; ``drain()`` returns what arrived,
  fenced by a sentinel NOTIFY so nothing needs a sleep: PostgreSQL delivers notifications in
  commit order, so everything committed before the sentinel is read before it.
- ``Child``: a Python process that talks in JSON lines (commands on stdin, reports on stdout).
- ``wait_until``: poll a condition up to a deadline (a bound, never a synchronising sleep).
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import closing
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import psycopg

ROOT = Path(__file__).resolve().parent.parent

#: The ledger's channel (``agent_ledger.stores.base.CHANNEL``), and a private one for fences.
CHANNEL = "agent_ledger"
SENTINEL_CHANNEL = "agent_ledger_test_sentinel"

#: Longest any single wait of these tests may take before it fails (a hang guard, not a timing).
HANG_S = 120.0


def conninfo(settings_dict: Mapping[str, Any]) -> dict[str, Any]:
    """psycopg connection keywords for a Django PostgreSQL ``DATABASES`` entry."""
    params: dict[str, Any] = {
        "dbname": settings_dict["NAME"],
        "user": settings_dict.get("USER") or "postgres",
        "host": settings_dict.get("HOST") or "127.0.0.1",
        "port": str(settings_dict.get("PORT") or 5432),
        "connect_timeout": 10,
    }
    if settings_dict.get("PASSWORD"):
        params["password"] = settings_dict["PASSWORD"]
    return params


def database_url(settings_dict: Mapping[str, Any]) -> str:
    """A ``DATABASE_URL`` (as ``tests/settings.py`` reads it) for the same database, so a child
    process started with it works on the test database pytest-django made."""
    if settings_dict["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{Path(settings_dict['NAME']).resolve()}"
    user = quote(settings_dict.get("USER") or "postgres", safe="")
    if settings_dict.get("PASSWORD"):
        user += ":" + quote(settings_dict["PASSWORD"], safe="")
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = settings_dict.get("PORT") or 5432
    return f"postgres://{user}@{host}:{port}/{settings_dict['NAME']}"


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = HANG_S) -> float:
    """Poll ``check`` until true; fail once ``timeout_s`` has passed. Returns the time taken."""
    started = time.monotonic()
    deadline = started + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - started


class Backends:
    """Client backends connected to ``dbname`` (this object's own session excluded).

    Only ``backend_type = 'client backend'``: an autovacuum worker also shows the database's
    name, and would come and go with no relation to the code under test.

    A client that closes its connection is gone at once, but its backend stays in
    ``pg_stat_activity`` until the server has scheduled it to exit: under a churn of short
    connections (``CONN_MAX_AGE = 0``) the raw count briefly includes such backends. ``live``
    counts only the backends whose client end is still an open (ESTABLISHED) TCP connection,
    read from ``/proc/net/tcp`` (the server runs on this machine, as in CI): that is the number
    of connections clients hold.
    """

    QUERY = (
        "SELECT pid, client_port FROM pg_stat_activity WHERE datname = %s"
        " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.dbname = params["dbname"]
        self.port = int(params.get("port") or 5432)
        self._conn = psycopg.connect(**params, autocommit=True)
        self._lock = threading.Lock()
        self._limit = float("inf")
        self._peak = Peak(0, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def count(self) -> int:
        """The raw count: every backend of the database, exiting ones included."""
        return len(self._rows())

    def live(self) -> int:
        return self._live(self._rows())

    def _rows(self) -> list[tuple[int, int | None]]:
        with self._lock:
            return self._conn.execute(self.QUERY, (self.dbname,)).fetchall()

    def _live(self, rows: list[tuple[int, int | None]]) -> int:
        open_ports = established_client_ports(self.port)
        return sum(1 for _, port in rows if port in open_ports)

    def count_where(self, condition: str, *params: Any) -> int:
        """Backends of the database matching an extra SQL ``condition``."""
        with self._lock:
            rows = self._conn.execute(
                f"{self.QUERY} AND {condition}", (self.dbname, *params)
            ).fetchall()
        return len(rows)

    def listening(self, application_name: str) -> bool:
        """A session of ``application_name`` has run ``LISTEN agent_ledger`` and is idle since:
        the LISTEN is in force."""
        return (
            self.count_where(
                "application_name = %s AND state = 'idle' AND query = %s",
                application_name,
                f"LISTEN {CHANNEL}",
            )
            > 0
        )

    def start_sampling(self, limit: int) -> None:
        """Keep the highest counts seen until ``take_peak()``, on a thread of its own. The live
        count (which reads ``/proc/net/tcp``) is worked out only when the raw one is over
        ``limit``: below it, live <= raw <= limit anyway."""
        self._limit = limit
        self._peak = self._sample_once(Peak(0, 0))
        self._thread = threading.Thread(target=self._sample, name="pg-backends", daemon=True)
        self._thread.start()

    def take_peak(self) -> Peak:
        """The highest counts since the last call (or the start), including one read now."""
        now = self._sample_once(Peak(0, 0))
        with self._lock:
            if self._error is not None:
                raise self._error
            peak, self._peak = self._peak.max(now), now
        return peak

    def _sample_once(self, peak: Peak) -> Peak:
        rows = self._rows()
        raw = len(rows)
        live = raw if raw <= self._limit else self._live(rows)
        return peak.max(Peak(live, raw))

    def _sample(self) -> None:
        try:
            while not self._stop.is_set():
                sample = self._sample_once(Peak(0, 0))
                with self._lock:
                    self._peak = self._peak.max(sample)
                # Leave the CPU to the process under test between reads (2 cores on CI).
                self._stop.wait(0.002)
        except BaseException as exc:  # reported by take_peak()
            self._error = exc

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._conn.close()

    def __enter__(self) -> Backends:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class Peak:
    #: Backends whose client still holds the connection open.
    live: int
    #: Every backend listed, including those still exiting after their client hung up.
    raw: int

    def max(self, other: Peak) -> Peak:
        return Peak(max(self.live, other.live), max(self.raw, other.raw))


_TCP_ESTABLISHED = "01"


def established_client_ports(server_port: int) -> set[int]:
    """Local ports of this machine's open (ESTABLISHED) TCP connections to ``server_port``."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    local, remote, state = fields[1], fields[2], fields[3]
                    if state == _TCP_ESTABLISHED and int(remote.rsplit(":", 1)[1], 16) == (
                        server_port
                    ):
                        ports.add(int(local.rsplit(":", 1)[1], 16))
        except FileNotFoundError:
            continue
    return ports


def can_see_tcp_connections() -> bool:
    return os.path.exists("/proc/net/tcp")


class Notifications:
    """A plain session listening on the ledger's channel (and on a private sentinel channel)."""

    def __init__(self, params: Mapping[str, Any] | str) -> None:
        if isinstance(params, str):
            self._conn = psycopg.connect(params, autocommit=True, connect_timeout=10)
        else:
            self._conn = psycopg.connect(**params, autocommit=True)
        self._conn.execute(f"LISTEN {CHANNEL}")
        self._conn.execute(f"LISTEN {SENTINEL_CHANNEL}")

    def drain(self, of: str | None = None, timeout_s: float = 10.0) -> list[str]:
        """The ledger payloads committed since the last drain, in commit order; with ``of``,
        only those equal to it (another run may share the database: NOTIFY is per database).

        Sends a sentinel (committed now, so after every change already committed) and reads
        until it arrives; ``timeout_s`` is only the deadline for that.
        """
        sentinel = f"sentinel-{uuid.uuid4()}"
        self._conn.execute("SELECT pg_notify(%s, %s)", (SENTINEL_CHANNEL, sentinel))
        payloads: list[str] = []
        with closing(self._conn.notifies(timeout=timeout_s)) as received:
            for note in received:
                if note.channel == SENTINEL_CHANNEL and note.payload == sentinel:
                    return payloads
                if note.channel == CHANNEL and of in (None, note.payload):
                    payloads.append(note.payload)
        raise AssertionError(
            f"the sentinel NOTIFY did not arrive within {timeout_s:g} s; got {payloads}"
        )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Notifications:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Child:
    """``python -c <code>`` in the repository, talking in JSON lines on stdin and stdout.

    stderr goes to a file, quoted in every failure, so a crash in the child is readable.
    """

    def __init__(self, code: str, env: Mapping[str, str]) -> None:
        # Closed in __exit__: the file outlives this call, as the process does.
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name="child-stdout", daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def receive(self, timeout_s: float = HANG_S) -> dict[str, Any]:
        """The child's next JSON line (other output is skipped)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"the child said nothing for {timeout_s:g} s; stderr:\n{self.stderr()}"
                ) from None
            if line is None:
                self.process.wait(10)
                raise AssertionError(
                    f"the child exited ({self.process.returncode}); stderr:\n{self.stderr()}"
                )
            if line.startswith("{"):
                message: dict[str, Any] = json.loads(line)
                return message

    def finish(self, timeout_s: float = HANG_S) -> None:
        """Close its stdin and wait for a clean exit."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the child did not exit; stderr:\n{self.stderr()}") from None
        assert code == 0, f"the child exited with {code}; stderr:\n{self.stderr()}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> Child:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
        self._stderr.close()
