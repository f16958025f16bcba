"""What ``DjangoStore`` keeps per process: its threads, its LISTEN connections, its notifier.

The threads: one bounded pool (``AGENT_LEDGER["ASYNC_THREADS"]``) for every event loop of the
process, each call wrapped in ``close_old_connections()`` as Django wraps a request, so Django's
settings (``CONN_MAX_AGE``, ``CONN_HEALTH_CHECKS``, ``OPTIONS["pool"]``) govern each connection
and a short-lived loop (``asyncio.run``, ``async_to_sync``) strands nothing. Nothing here is
bound to an event loop, and a forked child starts afresh.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import TYPE_CHECKING, Any, TypeVar

from django.db import DataError, Error, IntegrityError, close_old_connections, connections

from ..conf import ledger_settings
from ..errors import EffectStoreError
from ._listen import Listener
from .base import ChangeNotifier

if TYPE_CHECKING:
    import psycopg

_T = TypeVar("_T")

#: Wakes this process's waiters when a change commits (any thread, any event loop); the
#: LISTEN connections feed it the changes other processes make.
notifier = ChangeNotifier()

_threads: tuple[ThreadPoolExecutor, int] | None = None
_threads_lock = threading.Lock()


async def in_thread(func: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    context = contextvars.copy_context()
    call = functools.partial(context.run, _unit_of_work, func, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_executor(), call)


def _unit_of_work(func: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """One store call on a store thread, with Django's connection handling around it (what a
    request gets from its start and end signals)."""
    close_old_connections()
    try:
        return func(*args, **kwargs)
    except EffectStoreError as exc:
        if _suspect(exc):
            # Broken, read-only, or from a server that was shutting down: is_usable() may still
            # say yes (SQLite's always does), so never hand it to the next call.
            for conn in connections.all(initialized_only=True):
                conn.close()
        raise
    finally:
        close_old_connections()


def _suspect(exc: EffectStoreError) -> bool:
    """A failure that may be the connection's, not the statement data's."""
    cause = exc.__cause__
    return isinstance(cause, Error) and not isinstance(cause, (DataError, IntegrityError))


def _executor() -> ThreadPoolExecutor:
    global _threads
    threads = _threads
    if threads is None:
        with _threads_lock:
            if _threads is None:
                size = ledger_settings.ASYNC_THREADS
                _threads = (ThreadPoolExecutor(size, thread_name_prefix="agent-ledger"), size)
            threads = _threads
    return threads[0]


def close_connections() -> None:
    """Close the connections the store's threads keep (``CONN_MAX_AGE`` > 0) and its LISTEN
    connections now, and stop the threads; the next async call starts new ones.

    For tests (before the test database is dropped) and shutdown hooks; call it when no async
    ledger call is in flight.
    """
    global _threads
    with _threads_lock:
        threads, _threads = _threads, None
    _stop_listening()
    if threads is None:
        return
    executor, size = threads
    # One task per thread: each waits at the barrier until all threads hold one, so every
    # thread (even idle ones) closes the connections it owns.
    barrier = threading.Barrier(size)

    def close_mine() -> None:
        connections.close_all()
        with suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=5)

    for _ in range(size):
        executor.submit(close_mine)
    executor.shutdown(wait=True)


def _forget_after_fork() -> None:
    """A forked child (Celery prefork, gunicorn) has none of the parent's threads; it must not
    touch the parent's sockets either, so it drops, not closes, what it inherited."""
    global _threads
    _threads = None
    _listeners.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


_listeners: dict[str, Listener] = {}


def listen(using: str) -> None:
    """Hear other processes' commits on PostgreSQL (one LISTEN connection per alias)."""
    listener = _listeners.get(using)
    if listener is None:
        conn = connections[using]
        if conn.vendor != "postgresql":
            return
        with _threads_lock:
            listener = _listeners.get(using)
            if listener is None:
                params = conn.get_connection_params()
                params.pop("cursor_factory", None)
                params.pop("pool", None)

                def connect() -> psycopg.Connection[Any]:
                    import psycopg

                    return psycopg.connect(**{**params, "autocommit": True})

                listener = _listeners[using] = Listener(connect, notifier)
    listener.start()


def _stop_listening() -> None:
    with _threads_lock:
        listeners = list(_listeners.values())
        _listeners.clear()
    for listener in listeners:
        listener.stop()
