"""One decision through any surface (API, admin, webhook, signed link, Slack), for tests that
check a rule on every one. ``decide_via`` returns the HTTP status the surface answered."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import urlencode

from django.contrib.auth import get_user_model
from django.test import Client, override_settings
from django.urls import reverse

from agent_ledger.api.authentication import sign
from agent_ledger.links import approval_link
from agent_ledger.models import Effect

SURFACES = ["api", "admin", "webhook", "link", "slack"]
WEBHOOK_SECRET = "test-secret-0123456789"
SLACK_SECRET = "slack-signing-secret-0123456789"


def settings_with(tools: dict[str, Any] | None = None, **more: Any) -> Any:
    return override_settings(
        AGENT_LEDGER={
            "TOOLS": tools or {},
            "WEBHOOK_SECRETS": {"primary": WEBHOOK_SECRET},
            "SLACK_SIGNING_SECRET": SLACK_SECRET,
            "SLACK_USER_LOOKUP": "tests.surfaces.slack_user",
            **more,
        }
    )


def slack_user(team_id: str, user: dict[str, Any]) -> Any:
    """The test lookup: the Slack user id is the Django username."""
    return get_user_model().objects.filter(username=user["id"]).first()


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def decide_via(
    surface: str, effect: Effect, user: Any, decision: str = "approve", reason: str = "ok"
) -> int:
    """``user``: the Django user (for the webhook, whose approver is only a name: its name)."""
    if surface == "api":
        url = reverse(f"agent_ledger_api:effect-{decision}", args=[effect.pk])
        body = {"reason": reason}
        return logged_in(user).post(url, body, content_type="application/json").status_code
    if surface == "admin":
        url = reverse(f"admin:agent_ledger_effect_{decision}", args=[effect.pk])
        response = logged_in(user).post(url, {"reason": reason}, follow=True)
        errors = [m for m in response.context["messages"] if m.level_tag == "error"]
        return 403 if errors else response.status_code
    if surface == "webhook":
        name = user if isinstance(user, str) else user.get_username()
        body = {"decision": decision, "approver": name, "idem_key": effect.idem_key}
        return webhook(body).status_code
    if surface == "link":
        return logged_in(user).post(approval_link(effect), {"decision": decision}).status_code
    if surface == "slack":
        return slack_post(effect, user.get_username(), decision).status_code
    raise ValueError(surface)


def webhook(body: dict[str, Any]) -> Any:
    raw = json.dumps(body).encode()
    stamp = str(int(time.time()))
    return Client().post(
        reverse("agent_ledger_api:webhook"),
        raw,
        content_type="application/json",
        HTTP_X_AGENT_LEDGER_TIMESTAMP=stamp,
        HTTP_X_AGENT_LEDGER_SIGNATURE=sign(WEBHOOK_SECRET, stamp, raw),
    )


def slack_body(effect: Effect | str, slack_id: str, decision: str = "approve") -> bytes:
    effect_id = effect if isinstance(effect, str) else str(effect.pk)
    payload = {
        "type": "block_actions",
        "team": {"id": "T0001"},
        "user": {"id": slack_id, "username": slack_id, "team_id": "T0001"},
        "actions": [{"action_id": f"agent_ledger_{decision}", "value": effect_id}],
    }
    return urlencode({"payload": json.dumps(payload)}).encode()


def slack_signature(body: bytes, stamp: str, secret: str = SLACK_SECRET) -> str:
    base = b"v0:" + stamp.encode() + b":" + body
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


def slack_post(
    effect: Effect | str,
    slack_id: str,
    decision: str = "approve",
    *,
    stamp: str | None = None,
    signature: str | None = None,
    body: bytes | None = None,
) -> Any:
    body = slack_body(effect, slack_id, decision) if body is None else body
    stamp = str(int(time.time())) if stamp is None else stamp
    headers = {"HTTP_X_SLACK_REQUEST_TIMESTAMP": stamp}
    headers["HTTP_X_SLACK_SIGNATURE"] = (
        slack_signature(body, stamp) if signature is None else signature
    )
    return Client().post(
        reverse("agent_ledger:slack-actions"),
        body,
        content_type="application/x-www-form-urlencoded",
        **headers,
    )
