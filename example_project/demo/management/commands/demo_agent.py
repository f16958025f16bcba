"""``manage.py demo_agent``: start the LangGraph demo agent; its refund waits in the admin.

Approve it there and the agent resumes by itself (``RESUME_BACKEND`` "inline": in the server
that recorded the decision) and answers the customer. ``--status`` says whether it finished.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from agent_ledger import urls_for
from agent_ledger.models import Effect


class Command(BaseCommand):
    help = "Start the demo agent (LangGraph, scripted model); its refund waits for approval."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--status", action="store_true", help="print finished or waiting")

    def handle(self, *args: Any, status: bool = False, **options: Any) -> None:
        from demo import agent

        if status:
            self.stdout.write("finished" if agent.finished() else "waiting")
            return
        result = agent.run()
        pending = result.get("__interrupt__")
        if not pending:
            self.stdout.write(f"The agent finished: {result['messages'][-1].content}")
            return
        effect = Effect.objects.get(pk=pending[0].value["effect_id"])
        self.stdout.write(
            f"The demo agent waits for approval of {effect.tool} {effect.args_canonical}: "
            f"{urls_for(effect.pk)['admin']}"
        )
