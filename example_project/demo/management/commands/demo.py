"""``manage.py demo``: a simulated agent works through a few tickets, so the admin has a story.

Every tool call goes through the real ledger (``agent_ledger.services.get_ledger()``), so the
rows, replays, approvals and history are exactly what an agent would leave. Running it again
replays the same calls: no new effects, only higher replay counts.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from agent_ledger import (
    ApprovalPendingError,
    ConcurrencyOptions,
    EffectDeniedError,
    EffectFailedError,
    RunOptions,
    ToolCall,
    services,
)
from agent_ledger.models import Effect
from agent_ledger.types import Actor

#: Calls that need a human come back at once (ApprovalPendingError) instead of waiting.
NO_WAIT = ConcurrencyOptions(wait_timeout_ms=0)
NEEDS_APPROVAL = RunOptions(requires_approval=True, concurrency=NO_WAIT)
DEMO_WORKFLOWS = (
    "support-ticket-1042",
    "order-7731",
    "deploy-prod-2025-06",
    "cleanup-tmp-tables",
    "bug-triage-311",
)
OPERATOR = Actor("cli", name="demo operator")
PAST = {"approve": "approved", "deny": "denied"}


class SmtpDown(Exception):
    """The receipt email's SMTP relay refused the message."""


def tool(result: Any = None, *, seconds: float = 0.1, fail: str | None = None) -> Callable:
    """A pretend tool: takes a little while, then returns ``result`` or raises."""

    async def handler(effect: Any) -> Any:
        await asyncio.sleep(seconds * random.uniform(0.8, 1.2))
        if fail:
            raise SmtpDown(fail)
        return result

    return handler


# (call, handler, options, how many times the agent makes the call)
CALLS: list[tuple[ToolCall, Callable, RunOptions | None, int]] = [
    (
        ToolCall(
            workflow_id="support-ticket-1042",
            tool="crm.lookup_customer",
            args={"email": "dana@example.com"},
        ),
        tool({"customer_id": "cus_8812", "plan": "pro", "open_tickets": 2}, seconds=0.08),
        None,
        1,
    ),
    (
        ToolCall(
            workflow_id="support-ticket-1042",
            tool="slack.send_message",
            args={"channel": "#support", "text": "Ticket 1042 is resolved: refund issued."},
        ),
        tool({"ok": True, "ts": "1718000000.000100"}, seconds=0.25),
        None,
        3,  # the agent retried after a timeout twice: one message, two replays
    ),
    (
        ToolCall(
            workflow_id="order-7731",
            tool="stripe.charge",
            args={"amount": 4999, "currency": "eur", "customer": "cus_8812"},
            idempotency_keys=["amount", "currency", "customer"],
        ),
        tool({"charge_id": "ch_3PqR7731", "status": "succeeded"}, seconds=0.6),
        None,
        2,
    ),
    (
        ToolCall(
            workflow_id="order-7731",
            tool="email.send_receipt",
            args={"to": "dana@example.com", "order": 7731},
        ),
        tool(fail="421 smtp.example.com: service not available, try again later", seconds=0.4),
        None,
        2,  # the replay gets the stored failure, not a second attempt
    ),
    (
        ToolCall(
            workflow_id="deploy-prod-2025-06",
            tool="k8s.deploy",
            args={"namespace": "prod", "image": "registry.example.com/app:v2.4.0", "replicas": 6},
        ),
        tool({"rollout": "complete"}, seconds=1.5),
        NEEDS_APPROVAL,
        1,
    ),
    (
        ToolCall(
            workflow_id="deploy-prod-2025-06",
            tool="db.migrate",
            args={"database": "orders", "to": "0042_add_refund_reason"},
        ),
        tool({"applied": ["0041", "0042"]}, seconds=0.9),
        NEEDS_APPROVAL,
        1,
    ),
    (
        ToolCall(
            workflow_id="order-7731",
            tool="stripe.refund",
            args={"charge": "ch_3PqR7731", "amount": 4999, "reason": "requested_by_customer"},
        ),
        tool({"refund_id": "re_1Pq7731"}, seconds=0.5),
        NEEDS_APPROVAL,
        1,
    ),
    (
        ToolCall(
            workflow_id="cleanup-tmp-tables",
            tool="db.drop_table",
            args={"database": "orders", "table": "orders"},
        ),
        tool({"dropped": True}, seconds=0.2),
        NEEDS_APPROVAL,
        1,
    ),
    (
        ToolCall(
            workflow_id="bug-triage-311",
            tool="github.create_issue",
            args={"repo": "acme/app", "title": "Refund button 500s on Safari", "labels": ["bug"]},
        ),
        tool({"number": 312, "url": "https://github.com/acme/app/issues/312"}, seconds=0.7),
        NEEDS_APPROVAL,
        1,
    ),
]

#: What the pretend operator decides while the agent waits (by tool).
DECISIONS = {
    "db.drop_table": ("deny", "Dropping the live orders table is never a cleanup step."),
    "github.create_issue": ("approve", "Good repro steps, file it."),
}


class Command(BaseCommand):
    help = "Run a simulated agent through the ledger so the admin dashboard has data."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--webhook-secret",
            action="store_true",
            help="Print the webhook secret to sign demo requests with (its value), and stop.",
        )
        parser.add_argument(
            "--reset",
            action="store_true",
            help="Delete the demo workflows' effects (and history) first, for a fresh start.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["webhook_secret"]:
            # The value, not the name: the name only labels the actor (webhook:demo).
            self.stdout.write(settings.AGENT_LEDGER["WEBHOOK_SECRETS"]["demo"])
            return
        if options["reset"]:
            deleted, _ = Effect.objects.filter(workflow_id__in=DEMO_WORKFLOWS).delete()
            self.stdout.write(f"Deleted {deleted} demo rows.")
        ledger = services.get_ledger()
        before = Effect.objects.count()

        outcomes = asyncio.run(self._run_all(CALLS))
        for call, _handler, _options, _times in CALLS:
            if call.tool in DECISIONS:
                decision, reason = DECISIONS[call.tool]
                decide = services.approve if decision == "approve" else services.deny
                record = decide(ledger.idem_key(call), actor=OPERATOR, reason=reason)
                done = PAST[decision] if record.changed else "already decided"
                outcomes.append(f"  operator   {call.tool:<22} {done}: {reason}")
        # The agent comes back for the decided calls: the approved one runs now, once.
        decided = [entry for entry in CALLS if entry[0].tool in DECISIONS]
        outcomes += asyncio.run(self._run_all(decided))

        for line in outcomes:
            self.stdout.write(line)
        statuses = Counter(Effect.objects.values_list("status", flat=True))
        created = Effect.objects.count() - before
        summary = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
        self.stdout.write(self.style.SUCCESS(f"{created} new effects; the ledger holds {summary}."))

    async def _run_all(self, calls: list[tuple[ToolCall, Callable, Any, int]]) -> list[str]:
        ledger = services.get_ledger()
        lines = []
        for call, handler, run_options, times in calls:
            for _ in range(times):
                try:
                    result = await ledger.run(call, handler, run_options)
                    outcome = f"ok {result}"
                except ApprovalPendingError:
                    outcome = "waiting for approval"
                except EffectDeniedError as exc:
                    outcome = f"denied: {exc.reason}"
                except SmtpDown as exc:
                    outcome = f"failed: {exc}"
                except EffectFailedError as exc:
                    outcome = f"failed before (replayed, not retried): {exc.error.message}"
                lines.append(f"  {call.workflow_id:<20} {call.tool:<22} {outcome}")
        return lines
