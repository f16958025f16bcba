"""The Django side of a shared ledger: migrate, run calls and decide them through the ORM.

``--steps`` is a JSON list run in order, each ``{"op": ...}``:

- ``{"op": "migrate"}``: ``manage.py migrate`` into the schema;
- ``{"op": "run", "workflow_id", "requires_approval", "wait_ms"}``: ``EffectLedger.run`` on
  ``DjangoStore``, the handler returning ``{"by": "django", "fence": ...}``;
- ``{"op": "approve", "idem_key", "actor": [label, user_id, name], "reason"}``:
  ``agent_ledger.services.approve``, what the admin and the API call;
- ``{"op": "history", "idem_key"}``: the effect and its transitions as Django reads them.

Prints one JSON line: the list of step results (an exception becomes ``{"error": name}``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.workers.common import configure_django, parser


def call_for(workflow_id: str) -> Any:
    from agent_ledger import ToolCall

    return ToolCall(workflow_id=workflow_id, tool="deploy", args={"image": "app:v2"})


async def step(op: dict[str, Any]) -> Any:
    from agent_ledger import (
        Actor,
        ConcurrencyOptions,
        EffectLedger,
        EffectLedgerOptions,
        RunOptions,
    )
    from agent_ledger.stores.django import DjangoStore

    ledger = EffectLedger(EffectLedgerOptions(store=DjangoStore()))
    kind = op["op"]
    if kind == "migrate":
        from asgiref.sync import sync_to_async
        from django.core.management import call_command

        await sync_to_async(call_command)("migrate", verbosity=0, interactive=False)
        return "migrated"
    if kind == "run":

        async def handler(effect: Any) -> Any:
            return {"by": "django", "fence": effect.fence}

        options = RunOptions(
            requires_approval=op.get("requires_approval", False),
            concurrency=ConcurrencyOptions(
                wait_timeout_ms=op.get("wait_ms", 5_000),
                initial_interval_ms=20,
                max_interval_ms=100,
            ),
        )
        return {"result": await ledger.run(call_for(op["workflow_id"]), handler, options)}
    if kind == "approve":
        from asgiref.sync import sync_to_async

        from agent_ledger import services

        label, user_id, name = op["actor"]
        record = await sync_to_async(services.approve)(
            op["idem_key"], actor=Actor(label, user_id, name), reason=op.get("reason")
        )
        return {"changed": record.changed, "status": record.effect.status.value}
    if kind == "history":
        effect = await ledger.find_by_idem_key(op["idem_key"])
        assert effect is not None
        return {
            "status": effect.status.value,
            "result": effect.result,
            "fence": effect.fence,
            "dedup_count": effect.dedup_count,
            "transitions": [
                [
                    t.from_status.value if t.from_status else None,
                    t.to_status.value,
                    t.actor.label,
                    t.actor.user_id,
                    t.actor.name,
                    t.reason,
                ]
                for t in await ledger.history(effect.id)
            ],
        }
    raise ValueError(f"unknown op {kind!r}")


async def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--steps", required=True)
    args = p.parse_args()
    configure_django(args.conninfo, args.schema, application_name=args.application_name)
    results: list[Any] = []
    for op in json.loads(args.steps):
        try:
            results.append(await step(op))
        except Exception as exc:
            results.append({"error": type(exc).__name__, "message": str(exc)})
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
