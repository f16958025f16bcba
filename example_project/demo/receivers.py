"""Tell a chat channel when an agent waits for a human (the README's signals example).

Set ``LEDGER_CHAT_WEBHOOK_URL`` to a Slack-style incoming-webhook URL to try it; unset, the
receiver only logs. It runs after the transaction commits, in the thread that made the change,
so it keeps the request short (5 s timeout) and never raises; a busy site would hand the post
to a task queue instead.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from typing import Any

from django.dispatch import receiver
from django.urls import reverse

from agent_ledger.signals import approval_requested

logger = logging.getLogger("agent_ledger.demo")


@receiver(approval_requested, dispatch_uid="demo.ask_in_chat")
def ask_in_chat(sender: Any, effect: Any, actor: Any, **kwargs: Any) -> None:
    base = os.environ.get("LEDGER_ADMIN_BASE_URL", "http://127.0.0.1:8000")
    link = base + reverse("admin:agent_ledger_effect_change", args=[effect.id])
    text = (
        f":raised_hand: `{effect.tool}` in `{effect.workflow_id}` is waiting for approval: {link}"
    )
    url = os.environ.get("LEDGER_CHAT_WEBHOOK_URL")
    if not url:
        logger.debug("approval requested (no LEDGER_CHAT_WEBHOOK_URL set): %s", text)
        return
    request = urllib.request.Request(
        url,
        data=json.dumps({"text": text}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()
    except OSError:
        logger.exception("could not post the approval request for %s to chat", effect.id)
