"""Issue 8, point 4: from "approve" in the admin to the claim in another process (target: median
under 50 ms).

    .venv/bin/python bench/wakeup.py [--rounds 30] [--think-ms 50] [--django-conn pool]

A worker process (this script with ``--worker``) waits in ``get_ledger().run(call, handler,
RunOptions(requires_approval=True, ...))`` on ``DjangoStore``, polling only once a second, so
that only the approval's NOTIFY can make it fast. This process approves through the Django admin's
approve view (the test ``Client``, as a superuser), taking ``time.time()`` just before the POST;
the worker takes ``time.time()`` as its handler starts, i.e. once it has claimed the effect. Both
run on this machine, so the two clocks are one. One worker serves every round (a worker process
stays up and keeps its LISTEN connection); each round is a new key.

Django's tables live in schema ``bench_wakeup`` of the bench database (``bench/settings.py``,
``AGENT_LEDGER_BENCH_URL``), migrated on start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repository, not bench/

from bench.common import REPO_DIR, ensure_database, machine_facts, setup_django  # noqa: E402

SCHEMA = "bench_wakeup"
#: The worker's poll interval: a missed NOTIFY shows as a latency near this.
POLL_MS = 1_000
TARGET_MS = 50


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument(
        "--think-ms",
        type=float,
        default=50,
        help="pause between the worker starting to wait and the approval (a human is slower)",
    )
    parser.add_argument(
        "--django-conn",
        choices=("pool", "persistent", "close"),
        default="pool",
        help="how Django holds connections, in both processes (see bench/settings.py)",
    )
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    return measure(args)


# -- this process: the admin ----------------------------------------------------------------------


def measure(args: argparse.Namespace) -> int:
    ensure_database()
    setup_django(SCHEMA, pool_size=args.pool_size, django_conn=args.django_conn)
    from django.contrib.auth import get_user_model
    from django.test import Client
    from django.urls import reverse

    from agent_ledger.models import Effect

    user_model = get_user_model()
    user = user_model.objects.filter(username="bench-wakeup").first()
    if user is None:
        user = user_model.objects.create_superuser("bench-wakeup", "bench@example.invalid", "x")
    client = Client()
    client.force_login(user)

    env = {**os.environ, "PYTHONPATH": str(REPO_DIR)}
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--django-conn",
        args.django_conn,
        "--pool-size",
        str(args.pool_size),
    ]
    worker_process = subprocess.Popen(
        command, cwd=REPO_DIR, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert worker_process.stdin is not None and worker_process.stdout is not None
    latencies: list[float] = []
    admin_ms: list[float] = []
    run_id = uuid.uuid4().hex[:8]
    try:
        for round_no in range(args.rounds):
            worker_process.stdin.write(f"wakeup-{run_id}-{round_no}\n")
            worker_process.stdin.flush()
            waiting = _message(worker_process)
            idem_key = waiting["waiting"]
            effect = _await_approval_request(Effect, idem_key)
            time.sleep(args.think_ms / 1000)
            url = reverse("admin:agent_ledger_effect_approve", args=[effect.pk])
            approved_at = time.time()
            response = client.post(url)
            admin_ms.append((time.time() - approved_at) * 1000)
            if response.status_code != 302:
                raise RuntimeError(f"the admin answered {response.status_code}")
            claimed = _message(worker_process)
            latencies.append((claimed["claimed_at"] - approved_at) * 1000)
    finally:
        worker_process.stdin.close()
        worker_process.wait(30)

    facts = machine_facts()
    latencies.sort()
    p90 = latencies[max(0, math.ceil(0.9 * len(latencies)) - 1)]
    median = statistics.median(latencies)
    print(
        f"approve in the admin -> claim in another process, DjangoStore, "
        f"{args.django_conn} connections, worker polling every {POLL_MS} ms"
    )
    print(f"{facts['date']}; {facts['cpu']}; PostgreSQL {facts['postgresql']}; git {facts['git']}")
    print(
        f"rounds {len(latencies)}: median {median:.1f} ms, p90 {p90:.1f} ms, "
        f"max {latencies[-1]:.1f} ms, min {latencies[0]:.1f} ms "
        f"(target: median < {TARGET_MS} ms)"
    )
    print(
        f"of which the admin's approve request itself (until its response): "
        f"median {statistics.median(admin_ms):.1f} ms"
    )
    return 0 if median < TARGET_MS else 1


def _message(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    while True:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker exited ({process.wait(10)})")
        if line.startswith("{"):
            message: dict[str, Any] = json.loads(line)
            return message


def _await_approval_request(model: Any, idem_key: str) -> Any:
    """The worker's effect once it awaits approval (its begin has committed)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        effect = model.objects.filter(idem_key=idem_key).first()
        if effect is not None and effect.status == "requires_approval":
            return effect
        time.sleep(0.002)
    raise RuntimeError(f"effect {idem_key} never awaited approval")


# -- the worker process ---------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> int:
    os.environ["AGENT_LEDGER_BENCH_SCHEMA"] = SCHEMA
    os.environ["AGENT_LEDGER_BENCH_POOL"] = str(args.pool_size)
    os.environ["AGENT_LEDGER_BENCH_DJANGO_CONN"] = args.django_conn
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    import django

    django.setup()
    asyncio.run(_serve_rounds())
    return 0


async def _serve_rounds() -> None:
    from agent_ledger import ConcurrencyOptions, RunOptions, ToolCall
    from agent_ledger.services import get_ledger
    from agent_ledger.stores import _process

    ledger = get_ledger()
    options = RunOptions(
        requires_approval=True,
        concurrency=ConcurrencyOptions(
            wait_timeout_ms=60_000, initial_interval_ms=POLL_MS, max_interval_ms=POLL_MS
        ),
    )
    claimed_at: list[float] = []

    async def handler(effect: Any) -> dict[str, Any]:
        claimed_at.append(time.time())
        return {"fence": effect.fence}

    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line.strip():
            break
        call = ToolCall(workflow_id=line.strip(), tool="bench.deploy", args={"image": "app:v2"})
        task = asyncio.create_task(ledger.run(call, handler, options))
        # The first round starts the LISTEN connection: report "waiting" once it is in force,
        # so no round is timed against a NOTIFY sent before anyone listened.
        deadline = time.monotonic() + 30
        while True:
            listener = _process._listeners.get("default")
            if listener is not None and listener.listening.is_set():
                break
            if task.done() or time.monotonic() > deadline:
                raise RuntimeError("the worker never started listening")
            await asyncio.sleep(0.001)
        print(json.dumps({"waiting": ledger.idem_key(call)}), flush=True)
        await task
        print(json.dumps({"claimed_at": claimed_at[-1]}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
