"""A LISTEN connection that wakes this process's waiters when another process commits.

One daemon thread per store, with one connection of its own (not from the pool: it is held
for as long as the process runs). It only makes waiting faster: waiters still time out and
re-read, so while it is down (database restart, no permission) the ledger polls as before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .base import CHANNEL, ChangeNotifier

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger(__name__)

_RETRY_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Listener:
    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], notifier: ChangeNotifier):
        self._connect = connect
        self._notifier = notifier
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: Set once LISTEN is in force (tests and benchmarks wait for it before timing).
        self.listening = threading.Event()

    def start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="agent-ledger-listen", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=5)
        self._thread = None
        self._stop = threading.Event()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    failures = 0
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self._notifier.notify(note.payload)
            except Exception as exc:
                self.listening.clear()
                delay = _RETRY_S[min(failures, len(_RETRY_S) - 1)]
                failures += 1
                # One line, not a traceback: during a database restart this repeats.
                logger.warning("agent_ledger: LISTEN failed (%s); polling for %.1fs", exc, delay)
                self._stop.wait(delay)
        self.listening.clear()
