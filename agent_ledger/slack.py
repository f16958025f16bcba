"""Approve / Deny buttons in Slack: the message, the signature check, the user lookup.

Posting is yours (the Slack SDK, a webhook URL, a task); this builds what to post and checks
what Slack sends back. A receiver that posts each new approval request::

    from django.dispatch import receiver
    from agent_ledger import signals, slack

    @receiver(signals.approval_requested)
    def post_to_slack(sender, effect, actor, **kwargs):
        client.chat_postMessage(channel="#approvals", **slack.approval_message(effect))

Slack's interactivity Request URL is ``agent_ledger.urls``' ``slack/actions/``; set
``AGENT_LEDGER["SLACK_SIGNING_SECRET"]`` and ``AGENT_LEDGER["SLACK_USER_LOOKUP"]`` (the dotted
path of ``fn(team_id, slack_user) -> Django user or None``; ``slack_user`` is the payload's
``user`` dict: ``id``, ``username``, ``team_id``). See ``by_email`` for one way.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from .conf import MIN_WEBHOOK_SECRET_LENGTH, ledger_settings

__all__ = ["APPROVE", "DENY", "approval_message", "decided_message", "verify"]

APPROVE = "agent_ledger_approve"
DENY = "agent_ledger_deny"


def approval_message(effect: Any, *, request: Any = None) -> dict[str, Any]:
    """``text`` and ``blocks`` for ``chat.postMessage``: the call, the policy, two buttons."""
    from .policies import explain, policy_for

    args = json.dumps(json.loads(effect.args_canonical), indent=1, ensure_ascii=False)
    if len(args) > 2500:
        args = args[:2500] + "\n…"
    from django.utils import timezone

    policy = explain(
        policy_for(effect.tool),
        expires_at=getattr(effect, "expires_at", None),
        now=timezone.now(),
    )
    effect_id = str(getattr(effect, "id", None) or effect.pk)
    text = f"Approval needed: {effect.tool} in {effect.workflow_id}"
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*{_escape(text)}*"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": f"```{_escape(args)}```"}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": _escape(policy)}]},
            {
                "type": "actions",
                "block_id": f"agent_ledger:{effect_id}",
                "elements": [
                    {
                        "type": "button",
                        "action_id": APPROVE,
                        "style": "primary",
                        "text": {"type": "plain_text", "text": "Approve"},
                        "value": effect_id,
                    },
                    {
                        "type": "button",
                        "action_id": DENY,
                        "style": "danger",
                        "text": {"type": "plain_text", "text": "Deny"},
                        "value": effect_id,
                    },
                ],
            },
        ],
    }


def decided_message(effect: Any, outcome: str) -> dict[str, Any]:
    """The replacement for the request once decided: no buttons, who did what."""
    text = f"{effect.tool} in {effect.workflow_id}: {outcome}"
    return {
        "replace_original": True,
        "text": text,
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": _escape(text)}}],
    }


def verify(body: bytes, timestamp: str | None, signature: str | None, *, now: float) -> str | None:
    """None when the request is Slack's (``v0`` HMAC-SHA256 of ``v0:<ts>:<body>`` with the
    signing secret, timestamp within ``WEBHOOK_TOLERANCE_SECONDS``), else why not."""
    secret = ledger_settings.SLACK_SIGNING_SECRET
    if not isinstance(secret, str) or len(secret) < MIN_WEBHOOK_SECRET_LENGTH:
        return "unconfigured"
    if not timestamp or not signature:
        return "missing signature"
    try:
        sent = int(timestamp)
    except ValueError:
        return "bad timestamp"
    if abs(now - sent) > ledger_settings.WEBHOOK_TOLERANCE_SECONDS:
        return "stale timestamp"
    base = b"v0:" + timestamp.encode() + b":" + body
    expected = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        return "bad signature"
    return None


def by_email(team_id: str, slack_user: dict[str, Any]) -> Any:
    """An example lookup: the active user whose email is the Slack user's ``email`` field
    (present when your app adds it to the payload, e.g. from ``users.info``)."""
    from django.contrib.auth import get_user_model

    email = slack_user.get("email")
    if not email:
        return None
    return get_user_model()._default_manager.filter(email__iexact=email, is_active=True).first()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
