"""Plain helpers for the admin, API and webhook tests: ledger rows and users, made with the ORM."""

from __future__ import annotations

import hashlib
import itertools
import json
import uuid
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission

from agent_ledger.models import Effect, EffectStatus, EffectTransition

_numbers = itertools.count(1)
PASSWORD = "correct horse battery staple"


def make_effect(
    *,
    status: str = EffectStatus.REQUIRES_APPROVAL,
    workflow_id: str = "wf-1",
    tool: str = "k8s.deploy",
    args: Any = None,
    **fields: Any,
) -> Effect:
    """An effect row plus its first history row, as the ledger would have written them."""
    n = next(_numbers)
    args = {"n": n, "image": "app:v2"} if args is None else args
    fields.setdefault("idem_key", hashlib.sha256(f"{uuid.uuid4()}".encode()).hexdigest())
    fields.setdefault("call_id", f"call-{n}")
    effect = Effect.objects.create(
        status=status,
        workflow_id=workflow_id,
        tool=tool,
        args_canonical=json.dumps(args, sort_keys=True, separators=(",", ":")),
        **fields,
    )
    effect.refresh_from_db()
    EffectTransition.objects.create(
        effect=effect,
        from_status=None,
        to_status=status,
        actor_label="system",
        at=effect.created_at,
    )
    return effect


def make_user(username: str, *perms: str, staff: bool = True, **fields: Any) -> Any:
    """A user with the given ``app_label.codename`` permissions (password ``PASSWORD``)."""
    user = get_user_model().objects.create_user(
        username=username, password=PASSWORD, is_staff=staff, **fields
    )
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return get_user_model().objects.get(pk=user.pk)  # fresh: no stale permission cache
