"""Helpers for the approval-policy tests: pending effects with a requester, policies, users."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth.models import Group
from django.db.models.functions import Now
from django.test import Client, override_settings

from agent_ledger.models import Effect, EffectTransition
from tests.ledger_rows import make_effect, make_user

VIEW = "agent_ledger.view_effect"
APPROVE = "agent_ledger.approve_effect"


def pending(tool: str = "stripe.refund", requester: Any = None, **fields: Any) -> Effect:
    """A pending approval whose first history row names ``requester`` (a user) as who asked."""
    effect = make_effect(tool=tool, **fields)
    if requester is not None:
        EffectTransition.objects.filter(effect=effect).update(
            actor_label="user", actor_user_id=requester.pk, actor_name=requester.get_username()
        )
    return effect


def expire_now(effect: Effect) -> None:
    """Move ``expires_at`` into the past by the database clock."""
    Effect.objects.filter(pk=effect.pk).update(expires_at=Now() - timedelta(seconds=1))


def approver(name: str, *groups: str) -> Any:
    user = make_user(name, VIEW, APPROVE)
    for group in groups:
        user.groups.add(Group.objects.get_or_create(name=group)[0])
    return user


def client_for(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def tools(**policies: dict[str, Any]) -> Any:
    """``override_settings`` with ``TOOLS``; keys use ``__`` for ``.`` and ``_star`` for ``*``."""
    table = {k.replace("__", ".").replace("_star", "*"): v for k, v in policies.items()}
    return override_settings(AGENT_LEDGER={"TOOLS": table, "WEBHOOK_SECRETS": SECRETS})


SECRETS = {"primary": "test-secret-0123456789"}
