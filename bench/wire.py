"""Count statements and round trips on the wire: a small PostgreSQL protocol proxy.

Every target (psycopg pools, Django's pool, the upstream package in its own process) connects
to the proxy instead of the server during the counting step only, so the count sees exactly
what the server sees, whoever sent it: implicit ``BEGIN``s that psycopg sends before the first
statement of a non-autocommit transaction, ``COMMIT`` from ``conn.commit()`` or a pool returning
a connection, Django's ``SAVEPOINT``/``RELEASE``, prepared statements re-executed without a
new ``Parse``. Nothing is timed through the proxy.

Definitions (``README.md`` has them too):

- statement: one ``Execute`` message (extended protocol) or one SQL statement inside a
  ``Query`` message (simple protocol; ``;``-separated statements count one each).
- round trip: the client sending after the server has answered, i.e. one wait of the client
  for the server. A pipeline that sends three statements and then waits is one round trip.
- write: a statement that contains ``INSERT``, ``UPDATE`` or ``DELETE`` (CTEs included).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_WRITE = re.compile(r"\b(INSERT|UPDATE|DELETE)\b", re.IGNORECASE)
_TX = {"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE", "ABORT"}


@dataclass
class WireStats:
    round_trips: int = 0
    statements: int = 0
    writes: int = 0
    tx_control: int = 0
    kinds: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "round_trips": self.round_trips,
            "statements": self.statements,
            "writes": self.writes,
            "tx_control": self.tx_control,
            "kinds": dict(self.kinds),
        }


class WireCounter:
    """``await start()``, point connections at ``port``, ``reset()``, work, ``snapshot()``."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.stats = WireStats()
        #: When a list, every statement is appended as ``(round_trip_number, sql)``.
        self.trace: list[tuple[int, str]] | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop accepting, hang up on whoever is still connected, wait for the pumps to end."""
        if self._server is not None:
            self._server.close()
        for writers in list(self._writers):
            for writer in writers:
                with contextlib.suppress(Exception):
                    writer.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    def reset(self, *, trace: bool = False) -> None:
        self.stats = WireStats()
        self.trace = [] if trace else None

    def snapshot(self) -> WireStats:
        return self.stats

    # -- one proxied connection -----------------------------------------------------------------

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            sreader, swriter = await asyncio.open_connection(*self._target)
        except OSError:
            cwriter.close()
            self._tasks.discard(task)
            return
        writers = (cwriter, swriter)
        self._writers.add(writers)
        conn = _Conn(self)
        pumps = [
            asyncio.create_task(self._pump(creader, swriter, conn.from_client)),
            asyncio.create_task(self._pump(sreader, cwriter, conn.from_server)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in writers:
                with contextlib.suppress(Exception):
                    writer.close()
            self._writers.discard(writers)
            self._tasks.discard(task)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Any) -> None:
        while True:
            try:
                data = await reader.read(65536)
            except (ConnectionError, OSError):
                return
            if not data:
                return
            seen(data)
            writer.write(data)
            await writer.drain()


class _Conn:
    """Protocol state of one client connection: buffers, prepared statements, portals."""

    def __init__(self, counter: WireCounter) -> None:
        self._counter = counter
        self._buf = bytearray()
        self._startup = True
        self._opaque = False
        self._server_spoke = False
        self._statements: dict[bytes, str] = {}
        self._portals: dict[bytes, str] = {}

    def from_server(self, data: bytes) -> None:
        self._server_spoke = True
        if self._startup and data[:1] == b"S":
            self._opaque = True  # TLS was accepted: nothing readable any more

    def from_client(self, data: bytes) -> None:
        if self._opaque:
            return
        self._buf += data
        while True:
            if self._startup:
                if len(self._buf) < 8:
                    return
                (length,) = struct.unpack("!I", self._buf[:4])
                if len(self._buf) < length:
                    return
                (code,) = struct.unpack("!I", self._buf[4:8])
                del self._buf[:length]
                if code not in (_SSL_REQUEST, _GSSENC_REQUEST, _CANCEL_REQUEST):
                    self._startup = False  # the StartupMessage; typed messages follow
                self._server_spoke = False
                continue
            if len(self._buf) < 5:
                return
            kind = self._buf[:1]
            (length,) = struct.unpack("!I", self._buf[1:5])
            if len(self._buf) < 1 + length:
                return
            body = bytes(self._buf[5 : 1 + length])
            del self._buf[: 1 + length]
            self._message(kind, body)

    def _message(self, kind: bytes, body: bytes) -> None:
        if kind in (b"X", b"p"):  # Terminate; password/SASL during startup
            return
        stats = self._counter.stats
        if self._server_spoke:
            stats.round_trips += 1
            self._server_spoke = False
        if kind == b"Q":
            for sql in split_statements(body.split(b"\0", 1)[0].decode("utf-8", "replace")):
                self._count(sql)
        elif kind == b"P":
            name, rest = body.split(b"\0", 1)
            self._statements[name] = rest.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind == b"B":
            portal, rest = body.split(b"\0", 1)
            statement = rest.split(b"\0", 1)[0]
            self._portals[portal] = self._statements.get(statement, "?")
        elif kind == b"E":
            portal = body.split(b"\0", 1)[0]
            self._count(self._portals.get(portal, "?"))

    def _count(self, sql: str) -> None:
        stats = self._counter.stats
        stats.statements += 1
        word = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else "?"
        stats.kinds[word] += 1
        if word in _TX:
            stats.tx_control += 1
        elif _WRITE.search(sql):
            stats.writes += 1
        if self._counter.trace is not None:
            self._counter.trace.append((stats.round_trips, " ".join(sql.split())))


def split_statements(sql: str) -> list[str]:
    """Split a simple-protocol query on ``;`` outside quotes (enough for what drivers send)."""
    parts: list[str] = []
    start = 0
    quote = ""
    for index, char in enumerate(sql):
        if quote:
            if char == quote:
                quote = ""
        elif char in ("'", '"'):
            quote = char
        elif char == ";":
            parts.append(sql[start:index])
            start = index + 1
    parts.append(sql[start:])
    return [p for p in parts if p.strip()]
