"""The signed-link confirmation page and the Slack interactivity endpoint.

Both decide through ``services`` (so the tool's policy applies: expiry, who may decide, four
eyes, quorum) and answer a refusal with a 4xx, having changed nothing.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.module_loading import import_string
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods, require_POST

from . import services, slack
from .approvals import APPROVE_PERMISSION
from .conf import ledger_settings
from .errors import DecisionRefusedError, EffectLedgerValidationError, EffectNotFoundError
from .links import LinkError, args_hash, read_link
from .models import Effect, EffectStatus
from .policies import explain, policy_for
from .types import Actor

logger = logging.getLogger(__name__)
PAST = {"approve": "approved", "deny": "denied"}


@require_http_methods(["GET", "POST"])
def approval_link_view(request: HttpRequest, token: str) -> HttpResponse:
    """GET: what the link would decide, with Approve and Deny buttons; POST: decide. Never
    decides on GET (mail scanners and link previews follow links)."""
    if not request.user.is_authenticated:
        return redirect_to_login(request.get_full_path(), _login_url())
    try:
        claims = read_link(token)
    except LinkError as exc:
        return _page(request, None, str(exc), exc.status)
    effect = Effect.objects.filter(pk=claims["e"]).first()
    if effect is None:
        return _page(request, None, "This effect no longer exists.", 404)
    if claims["h"] != args_hash(effect.args_canonical):
        return _page(request, effect, "The arguments no longer match this link.", 409)
    if not request.user.has_perm(APPROVE_PERMISSION):
        return _page(request, effect, "You may not decide effects.", 403)
    if effect.status != EffectStatus.REQUIRES_APPROVAL:
        return _page(request, effect, "This effect is not awaiting approval.", 409)
    if request.method == "GET":
        return _page(request, effect, "", 200)
    decision = request.POST.get("decision")
    if decision not in PAST:
        return _page(request, effect, 'Choose "approve" or "deny".', 400)
    reason = request.POST.get("reason", "").strip() or None
    actor = Actor(f"link:{claims['n']}", request.user.pk, request.user.get_username())
    try:
        if decision == "approve":
            record = services.approve(effect.idem_key, actor=actor, reason=reason)
        else:
            record = services.deny(effect.idem_key, actor=actor, reason=reason)
    except DecisionRefusedError as exc:
        return _page(request, effect, str(exc), exc.http_status)
    except EffectLedgerValidationError as exc:
        return _page(request, effect, str(exc), 400)
    except EffectNotFoundError:
        return _page(request, None, "This effect no longer exists.", 404)
    if not record.changed:
        return _page(request, effect, "This effect is not awaiting approval.", 409)
    done = PAST[decision]
    if record.short_of_quorum:
        done = f"approval {record.approvals} of {record.quorum} recorded"
    return _page(request, effect, "", 200, done=done)


def _page(
    request: HttpRequest, effect: Effect | None, error: str, status: int, done: str = ""
) -> HttpResponse:
    context: dict[str, Any] = {"effect": effect, "error": error, "done": done}
    if effect is not None:
        context["args"] = json.dumps(effect.args, indent=2, ensure_ascii=False)
        context["policy"] = explain(
            policy_for(effect.tool), expires_at=effect.expires_at, now=timezone.now()
        )
    return TemplateResponse(request, "agent_ledger/approval_link.html", context, status=status)


def _login_url() -> str:
    try:
        return reverse("admin:login")
    except NoReverseMatch:
        return str(settings.LOGIN_URL)


@csrf_exempt  # Slack signs its requests (X-Slack-Signature); there is no browser session here
@require_POST
def slack_actions(request: HttpRequest) -> HttpResponse:
    """Slack's interactivity Request URL: an Approve or Deny button was pressed."""
    problem = slack.verify(
        request.body,
        request.headers.get("X-Slack-Request-Timestamp"),
        request.headers.get("X-Slack-Signature"),
        now=time.time(),
    )
    if problem == "unconfigured":
        logger.error("agent_ledger: SLACK_SIGNING_SECRET is missing or too short")
        return JsonResponse({"error": "Slack is not configured."}, status=503)
    if problem is not None:
        return JsonResponse({"error": f"Refused: {problem}."}, status=401)
    try:
        payload = json.loads(request.POST.get("payload", ""))
        action = payload["actions"][0]
        decision = {slack.APPROVE: "approve", slack.DENY: "deny"}[action["action_id"]]
        effect_id, team, slack_user = str(action["value"]), payload["team"]["id"], payload["user"]
        if not isinstance(team, str) or not isinstance(slack_user, dict):
            raise TypeError(team)
    except (ValueError, KeyError, IndexError, TypeError):
        return JsonResponse({"error": "Not an Approve or Deny action."}, status=400)
    effect = Effect.objects.filter(pk=effect_id).first() if _is_uuid(effect_id) else None
    if effect is None:
        return JsonResponse({"error": "No such effect."}, status=404)
    lookup = ledger_settings.SLACK_USER_LOOKUP
    user = import_string(lookup)(team, slack_user) if lookup else None
    if user is None:
        return JsonResponse({"error": "Your Slack user is not linked to a user here."}, status=403)
    if not user.is_active or not user.has_perm(APPROVE_PERMISSION):
        return JsonResponse({"error": "You may not decide effects."}, status=403)
    name = slack_user.get("username") or slack_user.get("name") or slack_user.get("id", "")
    actor = Actor(f"slack:{team}"[:100], user.pk, user.get_username())
    try:
        if decision == "approve":
            record = services.approve(effect.idem_key, actor=actor)
        else:
            record = services.deny(
                effect.idem_key, actor=actor, reason=f"denied in Slack by {name}"
            )
    except DecisionRefusedError as exc:
        return JsonResponse({"error": str(exc), "code": exc.code}, status=exc.http_status)
    except EffectNotFoundError:
        return JsonResponse({"error": "No such effect."}, status=404)
    if not record.changed:
        return JsonResponse(
            {"error": "Not awaiting approval.", "status": record.effect.status.value}, status=409
        )
    outcome = f"{PAST[decision]} by {user.get_username()}"
    if record.short_of_quorum:
        # Still waiting for others: keep the buttons, say who approved.
        message = slack.approval_message(effect)
        message["replace_original"] = True
        message["blocks"].insert(
            1, _note(f"approval {record.approvals} of {record.quorum}: {outcome}")
        )
        return JsonResponse(message)
    return JsonResponse(slack.decided_message(effect, outcome))


def _note(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": text}]}


def _is_uuid(value: str) -> bool:
    from .stores.base import parse_uuid

    return parse_uuid(value) is not None
