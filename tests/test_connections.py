"""Issue 8, point 2: a process holds at most ``ASYNC_THREADS`` ledger connections plus one
listener, whatever its event loops, and idle ones follow ``CONN_MAX_AGE``.

A child process (``worker()`` below, on the test database) makes real ledger calls in three
phases: 50 ``asyncio.run``, 50 ``async_to_sync``, and 100 requests to a sync view under a real
threaded WSGI server (``wsgiref``). Each phase mixes fresh calls, replays of finished keys and
pairs of concurrent callers of one key (the second waits, so ``wait_for_change`` and the LISTEN
connection are used). The test counts the server's backends of that database in
``pg_stat_activity`` from a session of its own, sampling all along, and after each phase (the
child reports on stdout when its last call returned):

- ``CONN_MAX_AGE = 0`` (Django's default): the peak stays within ``ASYNC_THREADS + 1`` over the
  baseline, and within a second of the last call the count is back to the baseline plus at most
  the listener;
- ``CONN_MAX_AGE = None``: peak and steady state within ``ASYNC_THREADS + 1`` (and connections
  really are kept), and ``close_connections()`` brings the count back to the baseline.

PostgreSQL only: SQLite has no server whose connections could be counted.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socketserver
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from django.db import connection, connections
from django.http import HttpRequest, JsonResponse
from django.urls import path

from tests.pg_activity import (
    Backends,
    Child,
    can_see_tcp_connections,
    conninfo,
    database_url,
)

pytestmark = [
    pytest.mark.skipif(
        connection.vendor != "postgresql",
        reason="counts the server's connections in pg_stat_activity; SQLite has no server",
    ),
    pytest.mark.skipif(
        not can_see_tcp_connections(),
        reason="tells open connections from exiting backends by /proc/net/tcp (Linux)",
    ),
]

#: Small, so that the bound (threads + listener) is tight next to 50-100 calls.
THREADS = 4
#: The issue's "back to baseline within a second of the last call".
IDLE_WITHIN_S = 1.0
#: Only a bound for close_connections() (the issue gives it no figure).
CLOSED_WITHIN_S = 10.0
APPLICATION_NAME = "agent-ledger-connections-test"

PHASES = ("asyncio", "async_to_sync", "wsgi")


@pytest.fixture(autouse=True)
def close_store_connections() -> Iterator[None]:
    yield
    _close_store_connections()


def _close_store_connections() -> None:
    # Imported when called: the child imports this module before django.setup().
    from agent_ledger.stores.django import close_connections

    close_connections()


@pytest.mark.parametrize("conn_max_age", [0, None], ids=["conn_max_age_0", "conn_max_age_none"])
def test_a_process_holds_at_most_threads_plus_listener(
    transactional_db: None, conn_max_age: int | None
) -> None:
    # Nothing of this process may come and go while the child is measured.
    _close_store_connections()
    connections.close_all()
    settings_dict = connection.settings_dict
    env = {
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": database_url(settings_dict),
        "LEDGER_TEST_CONN_MAX_AGE": "none" if conn_max_age is None else str(conn_max_age),
    }
    bound = THREADS + 1
    with Backends(conninfo(settings_dict)) as backends:
        baseline = backends.count()
        backends.start_sampling(limit=baseline + bound)
        with Child("from tests.test_connections import worker; worker()", env) as child:
            assert child.receive() == {"ready": True}
            for phase in PHASES:
                child.send(phase)
                report = child.receive()
                done = time.monotonic()
                assert report["done"] == phase
                # Every handler ran once per key: replays and waiters got the stored result.
                assert report["handler_runs"] == report["keys"], report
                peak = backends.take_peak()
                assert baseline < peak.live <= baseline + bound, (
                    f"{phase}: {peak.live - baseline} open connections over the baseline at the "
                    f"peak ({peak.raw - baseline} backends listed), bound {bound} ({THREADS} "
                    "threads + the listener)"
                )
                if conn_max_age == 0:
                    # Each call's connection closes with the call; only the listener stays.
                    _wait_for_at_most(
                        backends, baseline + 1, done + IDLE_WITHIN_S, f"{phase}: idle again"
                    )
                else:
                    steady = backends.live()
                    # Kept (persistent connections really are in use) yet within the bound.
                    assert baseline + 1 < steady <= baseline + bound, (phase, baseline, steady)
            child.send("close")
            assert child.receive() == {"done": "close"}
            _wait_for_at_most(
                backends,
                baseline,
                time.monotonic() + CLOSED_WITHIN_S,
                "close_connections() to close everything",
            )
            assert backends.take_peak().live <= baseline + bound
            child.finish()


def _wait_for_at_most(backends: Backends, target: int, deadline: float, what: str) -> None:
    """Poll until the count is at most ``target``; fail if it still is not at ``deadline``."""
    while True:
        now = backends.count()
        if now <= target:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {now} connections, expected at most {target}")
        time.sleep(0.005)


# -- the child process -----------------------------------------------------------------------------


def worker() -> None:
    """Runs in the child: configure Django on the test database, then run the phases the parent
    names on stdin, reporting each as a JSON line."""
    import django
    from django.conf import settings

    database = settings.DATABASES["default"]
    max_age = os.environ["LEDGER_TEST_CONN_MAX_AGE"]
    database["CONN_MAX_AGE"] = None if max_age == "none" else int(max_age)
    database.setdefault("OPTIONS", {})["application_name"] = APPLICATION_NAME
    settings.AGENT_LEDGER = {**settings.AGENT_LEDGER, "ASYNC_THREADS": THREADS}
    settings.ROOT_URLCONF = __name__
    settings.ALLOWED_HOSTS = ["127.0.0.1"]
    django.setup()

    phases: dict[str, Callable[[], dict[str, Any]]] = {
        "asyncio": _phase_asyncio,
        "async_to_sync": _phase_async_to_sync,
        "wsgi": _phase_wsgi,
    }
    _say({"ready": True})
    for line in sys.stdin:
        command = line.strip()
        if command == "close":
            _close_store_connections()
            _say({"done": "close"})
        elif command:
            _HANDLER_RUNS.clear()
            report = phases[command]()
            _say({"done": command, **report})


def _say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


#: Idempotency keys whose handler ran, in this phase (the parent checks one run per key).
_HANDLER_RUNS: list[str] = []
_runs_lock = threading.Lock()


def _call(phase: str, n: int, *, pair: bool = False) -> Any:
    from agent_ledger import ToolCall

    args: dict[str, Any] = {"n": n, "pair": True} if pair else {"n": n}
    return ToolCall(workflow_id=f"connections-{phase}", tool="test.echo", args=args)


async def _handler(effect: Any) -> dict[str, int]:
    """Returns ``{"n": n}``. For a pair, the owner returns only once the other caller of the key
    has begun (its replay is counted), so that caller waits for this outcome."""
    with _runs_lock:
        _HANDLER_RUNS.append(effect.idem_key)
    args = effect.args
    if args.get("pair"):
        from agent_ledger.services import get_ledger

        deadline = time.monotonic() + 60
        while True:
            current = await get_ledger().get_effect(effect.id)
            if current is not None and current.dedup_count >= 1:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the second caller of the pair never began")
            await asyncio.sleep(0.005)
    return {"n": args["n"]}


def _report(keys: int) -> dict[str, Any]:
    runs = list(_HANDLER_RUNS)
    assert len(runs) == len(set(runs)), "a handler ran twice for one key"
    return {"handler_runs": len(runs), "keys": keys}


def _phase_asyncio() -> dict[str, Any]:
    """50 ``asyncio.run``: 30 fresh keys, 10 replays of them, 10 pairs of concurrent callers."""
    from agent_ledger.services import get_ledger

    async def pair(call: Any) -> list[Any]:
        ledger = get_ledger()
        return list(await asyncio.gather(ledger.run(call, _handler), ledger.run(call, _handler)))

    for i in range(30):
        assert asyncio.run(get_ledger().run(_call("asyncio", i), _handler)) == {"n": i}
    for i in range(10):
        assert asyncio.run(get_ledger().run(_call("asyncio", i), _handler)) == {"n": i}
    for i in range(30, 40):
        assert asyncio.run(pair(_call("asyncio", i, pair=True))) == [{"n": i}] * 2
    return _report(keys=40)


def _phase_async_to_sync() -> dict[str, Any]:
    """50 ``async_to_sync``: 30 fresh, 10 replays, and 5 pairs of threads calling one key."""
    from asgiref.sync import async_to_sync

    from agent_ledger.services import get_ledger

    def run(call: Any) -> Any:
        return async_to_sync(get_ledger().run)(call, _handler)

    for i in range(30):
        assert run(_call("async_to_sync", i)) == {"n": i}
    for i in range(10):
        assert run(_call("async_to_sync", i)) == {"n": i}
    for i in range(30, 35):
        call = _call("async_to_sync", i, pair=True)
        assert _in_threads(2, functools.partial(run, call)) == [{"n": i}] * 2
    return _report(keys=35)


def _phase_wsgi() -> dict[str, Any]:
    """100 requests from 4 client threads to ``ledger_view`` under a threaded WSGI server:
    40 fresh keys, 20 pairs sent back to back (so both are in flight), 20 replays."""
    from django.core.wsgi import get_wsgi_application

    server = make_server("127.0.0.1", 0, get_wsgi_application(), ThreadingWSGIServer, QuietHandler)
    serving = threading.Thread(target=server.serve_forever, name="wsgi", daemon=True)
    serving.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/ledger/"
    jobs = [(i, False) for i in range(40)]
    for i in range(40, 60):
        jobs += [(i, True), (i, True)]
    jobs += [(i, False) for i in range(20)]
    assert len(jobs) == 100
    lock = threading.Lock()
    answers: list[tuple[int, int, Any]] = []

    def client() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                n, pair = jobs.pop(0)
            url = f"{base}?n={n}" + ("&pair=1" if pair else "")
            with urllib.request.urlopen(url, timeout=60) as response:
                answers.append((n, response.status, json.loads(response.read())))

    try:
        _in_threads(4, client)
    finally:
        server.shutdown()
        server.server_close()
        serving.join(10)
    assert len(answers) == 100
    for n, status, body in answers:
        assert (status, body) == (200, {"result": {"n": n}}), (n, status, body)
    return _report(keys=60)


def _in_threads(count: int, func: Callable[[], Any]) -> list[Any]:
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        try:
            results[index] = func()
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per request, as a threaded WSGI server (gunicorn gthread, mod_wsgi) has."""

    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def ledger_view(request: HttpRequest) -> JsonResponse:
    """A plain sync view calling the ledger the way sync Django code does."""
    from asgiref.sync import async_to_sync

    from agent_ledger.services import get_ledger

    n = int(request.GET["n"])
    call = _call("wsgi", n, pair="pair" in request.GET)
    return JsonResponse({"result": async_to_sync(get_ledger().run)(call, _handler)})


#: The child's ROOT_URLCONF (``worker()`` points it here).
urlpatterns = [path("ledger/", ledger_view)]
