"""Connections of the calling event loop for ``DjangoStore``'s hot path on PostgreSQL.

Why: the ledger calls ``begin`` and ``commit`` on every tool call. Handing each to a worker
thread and back costs two thread wake-ups and Django's per-call connection bookkeeping, about
as much as the statement itself, so on PostgreSQL these two (and the reads that waiting
callers poll with, many at once) run here instead: the shared statements (``_pgsql``) on
asyncio psycopg connections of the caller's own loop. Everything else (decisions, claims,
history, and anything inside the caller's ``atomic()``) keeps the worker threads and the ORM.

Connections are made from Django's own parameters for the alias (so ``OPTIONS``, the adapters
Django registers and the ``application_name`` carry over), in autocommit, at most
``AGENT_LEDGER["ASYNC_THREADS"]`` per loop; one that has been idle for ``idle_close_s`` is
closed, as the worker threads close theirs, and ``close_all()`` closes every idle one now.
Projects whose connections need Django's session set-up (``OPTIONS["assume_role"]``) stay on
the threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from ..conf import ledger_settings
from ..errors import EffectLedgerError, EffectStoreError

if TYPE_CHECKING:
    from psycopg import AsyncConnection

#: How long an idle connection is kept for the next call.
IDLE_CLOSE_S = 1.0

_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, LoopConnections]] = (
    weakref.WeakKeyDictionary()
)
_all: weakref.WeakSet[LoopConnections] = weakref.WeakSet()
_lock = threading.Lock()


def for_alias(using: str) -> LoopConnections | None:
    """This loop's connections for ``using``, or None when the alias must use the threads.

    On every call's path: settings are read only when a loop first asks for an alias."""
    loop = asyncio.get_running_loop()
    per_alias = _by_loop.get(loop)
    found = per_alias.get(using) if per_alias is not None else None
    if found is not None:
        return found if found.usable else None
    params, max_age = _connection_params(using, prepare=ledger_settings.PREPARE_STATEMENTS)
    created = LoopConnections(params, limit=ledger_settings.ASYNC_THREADS, max_age=max_age)
    with _lock:
        per_alias = _by_loop.setdefault(loop, {})
        created = per_alias.setdefault(using, created)
        _all.add(created)
    return created if created.usable else None


def close_all() -> None:
    """Close every idle connection of every loop and forget them all (the next call builds
    them again, from the settings as they are then). Call it with no ledger call in flight."""
    with _lock:
        every = list(_all)
        _all.clear()
        _by_loop.clear()
    for connections in every:
        connections.close_idle()


def _connection_params(using: str, *, prepare: bool) -> tuple[dict[str, Any] | None, Any]:
    """Django's connection parameters for the alias (None: not PostgreSQL, or its sessions
    need Django's set-up) and its ``CONN_MAX_AGE``."""
    from django.db import connections

    return session_params(connections.create_connection(using), prepare=prepare)


def session_params(wrapper: Any, *, prepare: bool) -> tuple[dict[str, Any] | None, Any]:
    """``_connection_params`` from a Django connection wrapper (none is opened)."""
    max_age = wrapper.settings_dict["CONN_MAX_AGE"]
    if wrapper.vendor != "postgresql" or wrapper.settings_dict["OPTIONS"].get("assume_role"):
        return None, max_age
    params = dict(wrapper.get_connection_params())
    params.pop("cursor_factory", None)  # Django's sync cursor class
    params["prepare_threshold"] = 0 if prepare else None
    params["autocommit"] = True
    return params, max_age


class LoopConnections:
    """The connections of one event loop for one alias (use them only from that loop).

    ``max_age`` is the alias' ``CONN_MAX_AGE``, applied as the worker threads apply it: 0
    closes a connection once it has been idle for ``idle_close_s``, None keeps it, a number of
    seconds closes it once it is that old and idle.
    """

    def __init__(
        self,
        params: dict[str, Any] | None,
        *,
        limit: int,
        max_age: float | None = 0,
        idle_close_s: float = IDLE_CLOSE_S,
    ) -> None:
        self.usable = params is not None
        self._params = params or {}
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[tuple[AsyncConnection[Any], float]] = []  # (conn, when to close it)
        self._opened: dict[int, float] = {}  # id(conn) -> when it was opened
        self._max_age = max_age
        self._idle_close_s = idle_close_s
        self._sweep: asyncio.TimerHandle | None = None
        #: The store's own state for this loop (``DjangoStore`` keeps its shared begins here),
        #: so it lives and goes with the loop's connections.
        self.extra: Any = None

    def connection(self, operation: str) -> _Borrowed:
        return _Borrowed(self, operation)

    async def _borrow(self) -> AsyncConnection[Any]:
        await self._slots.acquire()
        try:
            while self._idle:
                conn, _ = self._idle.pop()
                if _alive(conn):
                    return conn
                self._opened.pop(id(conn), None)
                _finish(conn)
            import psycopg

            conn = await psycopg.AsyncConnection.connect(**self._params)
            self._opened[id(conn)] = time.monotonic()
            return conn
        except BaseException:
            self._slots.release()
            raise

    def _give_back(self, conn: AsyncConnection[Any], *, reusable: bool) -> None:
        from psycopg import pq

        try:
            idle = conn.info.transaction_status == pq.TransactionStatus.IDLE
            if reusable and not conn.closed and idle:
                self._idle.append((conn, self._close_at(conn)))
                if self._sweep is None and self._max_age is not None:
                    self._sweep = asyncio.get_running_loop().call_later(
                        self._idle_close_s, self._close_stale
                    )
            else:
                self._opened.pop(id(conn), None)
                _finish(conn)
        finally:
            self._slots.release()

    def _close_at(self, conn: AsyncConnection[Any]) -> float:
        """When an idle connection is closed: after ``idle_close_s`` idle with ``max_age`` 0,
        once it is ``max_age`` old with a number, never with None."""
        if self._max_age is None:
            return float("inf")
        if not self._max_age:
            return time.monotonic() + self._idle_close_s
        return self._opened.get(id(conn), time.monotonic()) + self._max_age

    def _close_stale(self) -> None:
        self._sweep = None
        now = time.monotonic()
        keep = []
        for conn, close_at in self._idle:
            if close_at <= now:
                self._opened.pop(id(conn), None)
                _finish(conn)
            else:
                keep.append((conn, close_at))
        self._idle = keep
        if keep:
            self._sweep = asyncio.get_running_loop().call_later(
                self._idle_close_s, self._close_stale
            )

    def close_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            _finish(conn)
        self._opened.clear()
        if self._sweep is not None:
            with contextlib.suppress(RuntimeError):  # its loop may be closed already
                self._sweep.cancel()
            self._sweep = None


class _Borrowed:
    """One connection for one step; the driver's failures become ``EffectStoreError`` and
    the connection of a failed step is closed rather than reused."""

    __slots__ = ("_conn", "_operation", "_owner")

    def __init__(self, owner: LoopConnections, operation: str) -> None:
        self._owner = owner
        self._operation = operation
        self._conn: AsyncConnection[Any] | None = None

    async def __aenter__(self) -> AsyncConnection[Any]:
        try:
            self._conn = await self._owner._borrow()
        except BaseException as exc:
            raise _translated(exc, self._operation) from exc
        return self._conn

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._owner._give_back(conn, reusable=exc is None)
        if exc is not None:
            translated = _translated(exc, self._operation)
            if translated is not exc:
                raise translated from exc


def _translated(exc: BaseException, operation: str) -> BaseException:
    import psycopg

    if isinstance(exc, (psycopg.Error, OSError)) and not isinstance(exc, EffectLedgerError):
        return EffectStoreError(f"{type(exc).__name__}: {exc}", operation=operation)
    return exc


def _alive(conn: AsyncConnection[Any]) -> bool:
    """Would an idle connection still work? An idle connection has nothing to read unless the
    server went away (a terminated backend sends its goodbye and closes the socket), so a
    zero-timeout ``select`` finds the dead ones without a round trip. A connection lost
    without a word is found by the next statement, which then fails with ``EffectStoreError``.
    """
    if conn.closed:
        return False
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _finish(conn: AsyncConnection[Any]) -> None:
    """Close without awaiting: from a timer, or from another thread at shutdown."""
    with contextlib.suppress(Exception):
        conn.pgconn.finish()
