"""A decision under the tool's policy: expiry, who may decide, four eyes, quorum, edits.

Every surface (admin, bulk actions, API, webhook, signed links, Slack) decides through
``services.approve`` / ``services.deny``, which land here, so each rule is enforced once, under
the effect's row lock: lock -> expired? -> allowed? -> record -> commit. A refused decision
raises ``DecisionRefusedError`` and writes nothing, except an expired approval, which is denied
(code ``expired``, actor ``system``) and committed before the refusal is raised.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models.functions import Now

from . import keys
from .conf import ledger_settings
from .errors import DecisionRefusedError, EffectLedgerValidationError, EffectNotFoundError
from .ledger import decision_request
from .models import Effect as EffectRow
from .models import EffectStatus, EffectTransition
from .policies import ToolPolicy, policy_for
from .stores.base import NewEffect, TransitionRecord, effect_from_columns
from .stores.django import DjangoStore
from .types import SYSTEM, Actor, Effect, EffectError, ToolCall
from .types import EffectStatus as Status

__all__ = ["DecisionRecord", "decide", "requesters"]

APPROVE_PERMISSION = "agent_ledger.approve_effect"
RA = EffectStatus.REQUIRES_APPROVAL.value


@dataclasses.dataclass(frozen=True)
class DecisionRecord(TransitionRecord):
    """``changed``: the decision was recorded (an approval short of the quorum too: then the
    effect still awaits approval, with ``approvals`` of ``quorum``). ``edited``: the new effect
    an approval with edited arguments created and approved (``effect`` is the superseded one)."""

    approvals: int = 0
    quorum: int = 1
    edited: Effect | None = None

    @property
    def short_of_quorum(self) -> bool:
        """An approval was recorded and the effect still waits for more."""
        return self.changed and 0 < self.approvals < self.quorum


def decide(
    name: str,
    idem_key: str,
    *,
    actor: Actor,
    reason: str | None = None,
    args: Any = None,
    using: str | None = None,
) -> DecisionRecord:
    """Approve or deny ``idem_key`` as ``actor`` under its tool's policy; ``args``: approve
    with edited arguments (the policy must ``allow_edit``)."""
    request = decision_request(name, idem_key, actor=actor, reason=reason)
    store = DjangoStore(using)
    using = store.using
    refusal: DecisionRefusedError | None = None
    with transaction.atomic(using=using):
        # The row lock serialises every decider of this effect (and the expiry sweep): two
        # approvers of a quorum cannot both count themselves as the first, approve and deny
        # cannot both apply, and an expiry cannot slip between the check and the write.
        row = (
            EffectRow.objects.using(using)
            .select_for_update()
            .filter(idem_key=idem_key)
            .annotate(db_now=Now())
            .first()
        )
        if row is None:
            raise EffectNotFoundError(idem_key)
        if row.status != RA:
            return DecisionRecord(_effect(row), changed=False)
        policy = policy_for(row.tool)
        if row.expires_at is not None and row.expires_at <= row.db_now:  # type: ignore[attr-defined]
            expire_locked(store, row)
            refusal = DecisionRefusedError(
                "expired", "This approval request expired; it was denied.", http_status=409
            )
        else:
            _check_decider(row, policy, actor, name, using)
            if name == "deny":
                record = store.transition_sync(idem_key, **request)
                return DecisionRecord(record.effect, record.changed, quorum=policy.quorum)
            if args is not None and _canonical(args) != row.args_canonical:
                return _approve_edited(store, row, policy, actor, reason, args)
            return _approve(store, row, policy, actor, reason, request)
    assert refusal is not None  # the only way out of the block without a return
    raise refusal


def expire_locked(store: DjangoStore, row: EffectRow) -> TransitionRecord:
    """Deny a locked, expired pending approval as ``system`` with code ``expired``."""
    when = row.expires_at.isoformat() if row.expires_at else "-"
    return store.transition_sync(
        row.idem_key,
        from_statuses={Status.REQUIRES_APPROVAL},
        to_status=Status.DENIED,
        actor=SYSTEM,
        reason="approval expired",
        error=EffectError(f"approval expired at {when}", code="expired"),
    )


# -- the rules ------------------------------------------------------------------------------------


def _check_decider(row: EffectRow, policy: ToolPolicy, actor: Actor, name: str, using: str) -> None:
    if actor.label.startswith("link:") and (
        EffectTransition.objects.using(using)
        .filter(effect_id=row.pk, actor_label=actor.label)
        .exists()
    ):
        # A signed link's nonce is its actor label: a history row with it means it was used.
        raise DecisionRefusedError("link_used", "This link was used already.", http_status=409)
    user = None
    if actor.user_id is not None:
        # No such user (a worker's actor, a deleted account): a person without a user here,
        # whom a policy naming a group or a permission refuses below.
        user = get_user_model()._default_manager.using(using).filter(pk=actor.user_id).first()
        if user is not None and (not user.is_active or not user.has_perm(APPROVE_PERMISSION)):
            raise DecisionRefusedError("not_permitted", "You may not decide effects.")
    if policy.permission and (user is None or not user.has_perm(policy.permission)):
        raise DecisionRefusedError(
            "not_permitted", f"Deciding {row.tool} needs the permission {policy.permission}."
        )
    if policy.group and (user is None or not user.groups.filter(name=policy.group).exists()):
        raise DecisionRefusedError(
            "not_permitted", f"Deciding {row.tool} needs a member of the group {policy.group}."
        )
    if name != "approve" or policy.allow_self_approval:
        return
    if any(_same(actor, asker) for asker in requesters(row.pk, using)):
        raise DecisionRefusedError(
            "self_approval", "Nobody approves a request they made (four eyes)."
        )


def requesters(effect_pk: Any, using: str | None = None) -> list[Actor]:
    """Who asked for the effect: the actor of its first history row (who proposed or ran it)
    and of every move into ``requires_approval`` from elsewhere (a ``request_approval``)."""
    rows = EffectTransition.objects.using(using or DjangoStore().using).filter(
        effect_id=effect_pk, to_status=RA
    )
    return [
        Actor(r.actor_label, r.actor_user_id, r.actor_name)
        for r in rows.order_by("at", "id")
        if r.from_status != RA
    ]


def _same(actor: Actor, other: Actor) -> bool:
    """One person: the same user, or (no user on either side) the same label and name."""
    if actor.user_id is not None or other.user_id is not None:
        return actor.user_id is not None and str(actor.user_id) == str(other.user_id)
    return (actor.label, actor.name or "") == (other.label, other.name or "")


def approvers(effect_pk: Any, using: str) -> list[Actor]:
    """The approvals recorded so far toward a quorum (``requires_approval -> itself`` rows)."""
    rows = EffectTransition.objects.using(using).filter(
        effect_id=effect_pk, from_status=RA, to_status=RA
    )
    return [Actor(r.actor_label, r.actor_user_id, r.actor_name) for r in rows]


def _approve(
    store: DjangoStore,
    row: EffectRow,
    policy: ToolPolicy,
    actor: Actor,
    reason: str | None,
    request: dict[str, Any],
) -> DecisionRecord:
    given = approvers(row.pk, store.using)
    if any(_same(actor, other) for other in given):
        raise DecisionRefusedError(
            "already_approved",
            "You approved this already; it needs another approver.",
            http_status=409,
        )
    count = len(given) + 1
    if count < policy.quorum:
        # One approval of several: a history row, the effect still awaits the others.
        note = f"approval {count} of {policy.quorum}" + (f": {reason}" if reason else "")
        EffectTransition.objects.using(store.using).record(
            effect_id=row.pk,
            from_status=RA,
            to_status=RA,
            actor_label=actor.label,
            actor_user_id=actor.user_id,
            actor_name=actor.name or "",
            reason=note,
        )
        EffectRow.objects.using(store.using).filter(pk=row.pk).update(updated_at=Now())
        return DecisionRecord(_effect(row), True, approvals=count, quorum=policy.quorum)
    if policy.quorum > 1:
        request["reason"] = f"approval {count} of {policy.quorum}" + (
            f": {reason}" if reason else ""
        )
    record = store.transition_sync(row.idem_key, **request)
    return DecisionRecord(record.effect, record.changed, approvals=count, quorum=policy.quorum)


def _approve_edited(
    store: DjangoStore,
    row: EffectRow,
    policy: ToolPolicy,
    actor: Actor,
    reason: str | None,
    args: Any,
) -> DecisionRecord:
    """Supersede the effect with a copy carrying ``args``, approved: one transaction."""
    if not policy.allow_edit:
        raise DecisionRefusedError(
            "edit_not_allowed", f"The policy of {row.tool} does not allow editing arguments."
        )
    if policy.quorum > 1:
        # The other approvers approved other arguments; they must see the edited ones.
        raise DecisionRefusedError(
            "edit_not_allowed", "Arguments can be edited only where one approval suffices."
        )
    if not isinstance(args, dict):
        raise EffectLedgerValidationError("must be a JSON object", field="args")
    call = ToolCall(workflow_id=row.workflow_id, tool=row.tool, args=args)
    canonical = _canonical(args)
    if len(canonical.encode()) > ledger_settings.MAX_ARGS_SIZE_BYTES:
        raise EffectLedgerValidationError("are larger than MAX_ARGS_SIZE_BYTES", field="args")
    new_key = keys.idem_key(call, canonical)
    using = store.using
    if EffectRow.objects.using(using).filter(idem_key=new_key).exists():
        raise DecisionRefusedError(
            "edit_conflict", "An effect with these arguments exists already.", http_status=409
        )
    who = actor.name or actor.label
    diff = describe_diff(json.loads(row.args_canonical), args)
    asker = (requesters(row.pk, using) or [SYSTEM])[0]
    new_id = str(uuid.uuid4())
    created = store.begin_sync(
        NewEffect(
            id=new_id,
            idem_key=new_key,
            workflow_id=row.workflow_id,
            call_id=row.call_id,
            tool=row.tool,
            status=Status.REQUIRES_APPROVAL,
            args_canonical=canonical,
            resource_id_canonical=None,
            actor=asker,
            continuation=row.continuation,
        )
    )
    if not created.created:  # raced by an insert since the check: roll the whole edit back
        raise DecisionRefusedError(
            "edit_conflict", "An effect with these arguments exists already.", http_status=409
        )
    EffectTransition.objects.using(using).filter(effect_id=new_id).update(
        reason=f"arguments edited by {who} from effect {row.pk}: {diff}"
    )
    EffectRow.objects.using(using).filter(pk=row.pk).update(superseded_by=uuid.UUID(new_id))
    closed = store.transition_sync(
        row.idem_key,
        from_statuses={Status.REQUIRES_APPROVAL},
        to_status=Status.CANCELED,
        actor=actor,
        reason=f"superseded by effect {new_id}, arguments edited by {who}: {diff}",
        error=EffectError(f"superseded by effect {new_id} (edited arguments)", code="superseded"),
    )
    approved = store.transition_sync(
        new_key,
        from_statuses={Status.REQUIRES_APPROVAL},
        to_status=Status.READY,
        actor=actor,
        reason=reason or f"approved with arguments edited by {who}",
    )
    return DecisionRecord(closed.effect, True, approvals=1, edited=approved.effect)


def describe_diff(old: Any, new: Any) -> str:
    """``amount: 4500 -> 450; note: added "x"``: top-level keys that changed, compactly."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return "arguments replaced"
    parts = []
    for key in sorted(set(old) | set(new)):
        if key not in new:
            parts.append(f"{key}: removed")
        elif key not in old:
            parts.append(f"{key}: added {_short(new[key])}")
        elif old[key] != new[key]:
            parts.append(f"{key}: {_short(old[key])} -> {_short(new[key])}")
    return "; ".join(parts) or "no change"


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _canonical(args: Any) -> str:
    return keys.canonical_json(args, "args")


def _effect(row: EffectRow) -> Effect:
    return effect_from_columns(row.__dict__)
