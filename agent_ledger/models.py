"""The ledger's tables: one row per effect, and an append-only row per status change.

``stores.postgres.SCHEMA_SQL`` creates these same tables for workers outside Django; a test
keeps the two in step, so change both together (and add a migration).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import ExpressionWrapper, Value
from django.db.models.functions import Now
from django.utils.translation import gettext_lazy as _

from .types import ACTIVE_STATUSES, MAX_NAME_LENGTH, TERMINAL_STATUSES
from .types import EffectStatus as CoreStatus


class EffectStatus(models.TextChoices):
    """The statuses and the one label each is shown with: list, page title, badge, history, API.

    The labels say what a person needs to know: a ``ready`` effect was approved but has not run
    (it runs when the agent calls again); ``processing`` is the tool running.
    """

    PROCESSING = CoreStatus.PROCESSING.value, _("running")
    SUCCEEDED = CoreStatus.SUCCEEDED.value, _("succeeded")
    FAILED = CoreStatus.FAILED.value, _("failed")
    REQUIRES_APPROVAL = CoreStatus.REQUIRES_APPROVAL.value, _("awaiting approval")
    READY = CoreStatus.READY.value, _("approved, runs when the agent calls again")
    DENIED = CoreStatus.DENIED.value, _("denied")
    CANCELED = CoreStatus.CANCELED.value, _("canceled")


def status_label(status: str) -> str:
    """The label of a status value (the value itself for one this version does not know)."""
    try:
        return str(EffectStatus(status).label)
    except ValueError:
        return status


_ACTIVE = sorted(s.value for s in ACTIVE_STATUSES)
_TERMINAL = sorted(s.value for s in TERMINAL_STATUSES)


class EffectQuerySet(models.QuerySet["Effect"]):
    """The audit vocabulary; each filter is served by an index on ``Effect``."""

    def pending_approval(self) -> EffectQuerySet:
        """Waiting for a human (``agent_ledger_active``)."""
        return self.filter(status=EffectStatus.REQUIRES_APPROVAL)

    def for_workflow(self, workflow_id: str) -> EffectQuerySet:
        """One workflow's calls (``agent_ledger_workflow``)."""
        return self.filter(workflow_id=workflow_id)

    def terminal(self) -> EffectQuerySet:
        """Finished for good: succeeded, failed, denied or canceled."""
        return self.filter(status__in=_TERMINAL)

    def active(self) -> EffectQuerySet:
        """Not finished yet (``agent_ledger_active``, a partial index on exactly these)."""
        return self.filter(status__in=_ACTIVE)

    def stale(self, older_than: timedelta) -> EffectQuerySet:
        """Processing with no sign of life for ``older_than``, by the database clock (like
        ``DjangoStore.claim``), so app servers with drifting clocks agree on the answer."""
        cutoff = ExpressionWrapper(
            Now() - Value(older_than, output_field=models.DurationField()),
            output_field=models.DateTimeField(),
        )
        return self.filter(status=EffectStatus.PROCESSING, updated_at__lte=cutoff)

    def by_tool(self, tool: str) -> EffectQuerySet:
        """One tool's calls (``agent_ledger_tool``)."""
        return self.filter(tool=tool)

    def in_period(self, start: datetime | None, end: datetime | None) -> EffectQuerySet:
        """Created in ``[start, end)``; either bound may be None (``agent_ledger_created``)."""
        qs = self
        if start is not None:
            qs = qs.filter(created_at__gte=start)
        if end is not None:
            qs = qs.filter(created_at__lt=end)
        return qs

    def with_resuming(self) -> EffectQuerySet:
        """Annotate ``resuming``: a pending or running resumption (``Effect.shown_status``)."""
        live = Resumption.objects.filter(effect=models.OuterRef("pk")).live()
        return self.annotate(resuming=models.Exists(live))

    def with_history(self) -> EffectQuerySet:
        """Prefetch each effect's transitions, oldest first, in one extra query."""
        return self.prefetch_related(
            models.Prefetch("transitions", queryset=EffectTransition.objects.order_by("at", "id"))
        )


class Effect(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    idem_key = models.CharField(_("idempotency key"), max_length=64)
    workflow_id = models.CharField(max_length=MAX_NAME_LENGTH)
    call_id = models.CharField(max_length=MAX_NAME_LENGTH)
    tool = models.CharField(max_length=MAX_NAME_LENGTH)
    status = models.CharField(max_length=32, choices=EffectStatus.choices)
    args_canonical = models.TextField(_("arguments (canonical JSON)"))
    resource_id_canonical = models.TextField(null=True, blank=True)
    result = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    dedup_count = models.IntegerField(_("replays"), default=0, db_default=0)
    #: Rises on every claim; a commit must carry the current value (fencing token).
    fence = models.IntegerField(default=1, db_default=1)
    #: How many times the tool was started: the first run and every claim.
    attempts = models.IntegerField(default=0, db_default=0)
    #: What resumes the agent when a human decides: ``{"resumer": name, ...}``.
    continuation = models.JSONField(null=True, blank=True)
    #: A pending approval past this (database clock) is denied with code ``expired``
    #: (``agent_ledger.expiry``); set from the tool's policy when the effect is created.
    expires_at = models.DateTimeField(null=True, blank=True)
    #: When ``approval_expiring`` was sent for this effect (it is sent once).
    expiring_notified_at = models.DateTimeField(null=True, blank=True)
    #: The effect that replaced this one when an approver edited its arguments.
    superseded_by = models.UUIDField(null=True, blank=True)
    created_at = models.DateTimeField(db_default=Now())
    updated_at = models.DateTimeField(db_default=Now())
    completed_at = models.DateTimeField(null=True, blank=True)

    objects = EffectQuerySet.as_manager()

    class Meta:
        verbose_name = _("effect")
        verbose_name_plural = _("effects")
        ordering = ["-created_at"]
        permissions = [
            ("approve_effect", _("Can approve or deny effects")),
            ("retry_effect", _("Can reopen a failed effect to run it again")),
            ("resolve_effect", _("Can record the outcome of an effect whose outcome is unknown")),
        ]
        indexes = [
            models.Index(fields=["-created_at"], name="agent_ledger_created"),
            models.Index(fields=["workflow_id", "-created_at"], name="agent_ledger_workflow"),
            models.Index(fields=["tool", "-created_at"], name="agent_ledger_tool"),
            models.Index(fields=["status", "-created_at"], name="agent_ledger_status"),
            # The hot queries (pending approval, stale processing) only look at live rows.
            models.Index(
                fields=["status", "updated_at"],
                name="agent_ledger_active",
                condition=models.Q(status__in=_ACTIVE),
            ),
            # The expiry sweep's query: pending approvals that can expire, soonest first.
            models.Index(
                fields=["expires_at"],
                name="agent_ledger_expiring",
                condition=models.Q(status="requires_approval", expires_at__isnull=False),
            ),
            # Retention finds what to prune by completion time, among finished rows only.
            models.Index(
                fields=["completed_at"],
                name="agent_ledger_completed",
                condition=models.Q(status__in=_TERMINAL),
            ),
        ]
        constraints = [
            # A constraint, not unique=True: no extra LIKE index, and it is what ON CONFLICT uses.
            models.UniqueConstraint(fields=["idem_key"], name="agent_ledger_effect_idem_key_uniq"),
            models.CheckConstraint(
                condition=models.Q(status__in=[s.value for s in CoreStatus]),
                name="agent_ledger_effect_status_valid",
            ),
            models.CheckConstraint(
                condition=models.Q(dedup_count__gte=0), name="agent_ledger_effect_dedup_gte_0"
            ),
            models.CheckConstraint(
                condition=models.Q(fence__gte=1), name="agent_ledger_effect_fence_gte_1"
            ),
            models.CheckConstraint(
                condition=models.Q(attempts__gte=0), name="agent_ledger_effect_attempts_gte_0"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tool} in {self.workflow_id} ({self.shown_status()})"

    def shown_status(self) -> str:
        """The status label; "approved, resuming" for a ready effect while a resumption
        (``agent_ledger.resume``) is bringing its agent back. Reads ``resuming`` when the
        queryset annotated it (``EffectQuerySet.with_resuming``), else asks the database."""
        if self.status == EffectStatus.READY and self.continuation is not None:
            resuming = getattr(self, "resuming", None)
            if resuming is None:
                resuming = Resumption.objects.filter(effect_id=self.pk).live().exists()
            if resuming:
                return str(RESUMING_LABEL)
        return status_label(self.status)

    @property
    def args(self) -> Any:
        """The arguments as JSON values (stored as canonical JSON text)."""
        return json.loads(self.args_canonical)

    @property
    def resource(self) -> dict[str, Any] | None:
        """The ``ResourceDescriptor`` the key was made from, or None.

        Stored as ``namespace/type/<canonical JSON of id>`` (``keys.resource_canonical``), which
        is not JSON itself; neither namespace nor type may contain ``/``.
        """
        text = self.resource_id_canonical
        if text is None:
            return None
        namespace, _sep, rest = text.partition("/")
        kind, _sep, id_json = rest.partition("/")
        try:
            return {"namespace": namespace, "type": kind, "id": json.loads(id_json)}
        except ValueError:
            return {"namespace": "", "type": "", "id": text}


@dataclasses.dataclass(frozen=True)
class Timing:
    """How long the tool ran and how long a human kept it waiting, told apart.

    ``ran`` is claim to commit (the tool's own run); ``waited`` is from the request for approval
    to the decision, or to ``now`` while ``waiting``. Derived from the history rows.
    """

    ran: timedelta | None
    waited: timedelta | None
    waiting: bool


def effect_timing(effect: Effect, now: datetime) -> Timing:
    """``Timing`` from ``effect.transitions.all()`` (prefetch them for a list of effects)."""
    asked = decided = claimed = None
    for row in effect.transitions.all():
        if row.to_status == EffectStatus.REQUIRES_APPROVAL:
            # requires_approval -> requires_approval is one approval of a quorum: still asking.
            if row.from_status != EffectStatus.REQUIRES_APPROVAL:
                asked, decided = row.at, None
        elif row.from_status == EffectStatus.REQUIRES_APPROVAL:
            decided = row.at
        if row.to_status == EffectStatus.PROCESSING:
            claimed = row.at
    waiting = effect.status == EffectStatus.REQUIRES_APPROVAL
    waited = None
    if waiting:
        waited = now - (asked or effect.created_at)
    elif asked is not None and decided is not None:
        waited = decided - asked
    ran = None
    if effect.status in (EffectStatus.SUCCEEDED, EffectStatus.FAILED) and effect.completed_at:
        # Claimed by a run after approval, else it ran from its creation (no approval asked).
        start = claimed or (effect.created_at if asked is None else None)
        if start is not None:
            ran = effect.completed_at - start
    return Timing(ran=ran, waited=waited, waiting=waiting)


def last_decision(effect: Effect) -> EffectTransition | None:
    """The newest row that took the effect out of ``requires_approval`` (who decided, when)."""
    return (
        EffectTransition.objects.filter(
            effect_id=effect.pk, from_status=EffectStatus.REQUIRES_APPROVAL
        )
        .exclude(to_status=EffectStatus.REQUIRES_APPROVAL)
        .order_by("-at", "-id")
        .first()
    )


class EffectTransitionQuerySet(models.QuerySet["EffectTransition"]):
    def of_effect(self, effect_id: uuid.UUID) -> EffectTransitionQuerySet:
        """One effect's history, oldest first (``agent_ledger_trans_effect``)."""
        return self.filter(effect_id=effect_id).order_by("at", "id")

    def record(self, **fields: Any) -> EffectTransition:
        """Append a history row: the one way the ORM writes history, inside the transaction
        of the change it records (``PostgresStore``'s statements write the same columns)."""
        return self.create(**fields)


class EffectTransition(models.Model):
    """One status change, written in the same transaction as the change itself."""

    id = models.BigAutoField(primary_key=True)
    # Indexed by agent_ledger_trans_effect (effect, at), so no index of its own.
    effect = models.ForeignKey(
        Effect, on_delete=models.CASCADE, related_name="transitions", db_index=False
    )
    from_status = models.CharField(
        max_length=32, choices=EffectStatus.choices, null=True, blank=True
    )
    to_status = models.CharField(max_length=32, choices=EffectStatus.choices)
    at = models.DateTimeField(db_default=Now())
    #: Through what the change came: "admin", "api", "webhook:<secret>", "cli", "system".
    actor_label = models.CharField(max_length=100)
    # No database constraint: PostgresStore workers write this table without auth_user, and a
    # deleted user must not delete or block the audit trail (actor_name keeps the name).
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        db_constraint=False,
        related_name="+",
    )
    actor_name = models.CharField(max_length=150, blank=True, default="", db_default="")
    reason = models.TextField(null=True, blank=True)

    objects = EffectTransitionQuerySet.as_manager()

    class Meta:
        verbose_name = _("transition")
        verbose_name_plural = _("transitions")
        ordering = ["at", "id"]
        indexes = [
            models.Index(fields=["effect", "at"], name="agent_ledger_trans_effect"),
            models.Index(fields=["-at"], name="agent_ledger_trans_at"),
        ]

    def __str__(self) -> str:
        return f"{self.from_status or '-'} -> {self.to_status} by {self.actor_label}"

    @property
    def actor_display(self) -> str:
        """``label: name`` (``admin: alice``), or the label alone for the system."""
        who = self.actor_name or (f"user #{self.actor_user_id}" if self.actor_user_id else "")
        return f"{self.actor_label}: {who}" if who else self.actor_label


#: What a ready effect is shown as while a resumption is bringing the agent back to run it.
RESUMING_LABEL = _("approved, resuming")


class ResumptionStatus(models.TextChoices):
    """A resumption waits (``pending``, maybe until ``run_after`` after a failure), runs, and
    ends ``done``, or ``failed`` once its attempts are used up (an operator may retry it)."""

    PENDING = "pending", _("pending")
    RUNNING = "running", _("running")
    DONE = "done", _("done")
    FAILED = "failed", _("failed")


class Decision(models.TextChoices):
    """The decisions that resume an agent (a cancel does not: it stops the work)."""

    APPROVE = "approve", _("approve")
    DENY = "deny", _("deny")


#: The effect status each decision leaves behind.
DECISION_OF_STATUS = {
    EffectStatus.READY.value: Decision.APPROVE,
    EffectStatus.DENIED.value: Decision.DENY,
}

_LIVE_RESUMPTION = [ResumptionStatus.PENDING.value, ResumptionStatus.RUNNING.value]


class ResumptionQuerySet(models.QuerySet["Resumption"]):
    def live(self) -> ResumptionQuerySet:
        """Not finished: pending or running (``agent_ledger_resume_due``)."""
        return self.filter(status__in=_LIVE_RESUMPTION)

    def due(self) -> ResumptionQuerySet:
        """Pending and due by the database clock, oldest first."""
        return self.filter(status=ResumptionStatus.PENDING, run_after__lte=Now()).order_by(
            "run_after", "id"
        )


class Resumption(models.Model):
    """One decision's call of the effect's resumer: written in the decision's own transaction
    (so a committed decision always has one, and a rolled-back one none), run after commit."""

    id = models.BigAutoField(primary_key=True)
    # Indexed by agent_ledger_resumption_effect (effect, created_at), so no index of its own.
    effect = models.ForeignKey(
        Effect, on_delete=models.CASCADE, related_name="resumptions", db_index=False
    )
    #: The history row of the decision; unique, so one decision yields one resumption.
    transition = models.ForeignKey(
        EffectTransition, on_delete=models.CASCADE, related_name="+", db_index=False
    )
    decision = models.CharField(max_length=16, choices=Decision.choices)
    #: The name registered with ``agent_ledger.resume.register`` (``continuation["resumer"]``).
    resumer = models.CharField(max_length=MAX_NAME_LENGTH)
    status = models.CharField(
        max_length=16,
        choices=ResumptionStatus.choices,
        default=ResumptionStatus.PENDING,
        db_default=ResumptionStatus.PENDING.value,
    )
    attempts = models.IntegerField(default=0, db_default=0)
    last_error = models.TextField(blank=True, default="", db_default="")
    #: Not before this (the database clock): now at first, later after each failure's backoff.
    run_after = models.DateTimeField(db_default=Now())
    created_at = models.DateTimeField(db_default=Now())
    updated_at = models.DateTimeField(db_default=Now())

    objects = ResumptionQuerySet.as_manager()

    class Meta:
        verbose_name = _("resumption")
        verbose_name_plural = _("resumptions")
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["effect", "created_at"], name="agent_ledger_resumption_effect"),
            # The sweep's query: due pending rows, and running rows gone stale.
            models.Index(
                fields=["status", "run_after"],
                name="agent_ledger_resume_due",
                condition=models.Q(status__in=_LIVE_RESUMPTION),
            ),
        ]
        constraints = [
            models.UniqueConstraint(fields=["transition"], name="agent_ledger_resumption_once"),
            models.CheckConstraint(
                condition=models.Q(status__in=ResumptionStatus.values),
                name="agent_ledger_resumption_status_valid",
            ),
            models.CheckConstraint(
                condition=models.Q(attempts__gte=0), name="agent_ledger_resumption_attempts_gte_0"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.resumer} on {self.decision} ({self.get_status_display()})"


class EffectTombstoneQuerySet(models.QuerySet["EffectTombstone"]):
    def expired(self, key_lifetime: timedelta) -> EffectTombstoneQuerySet:
        """Keys first used longer than ``key_lifetime`` ago, by the database clock: these may
        run anew (``agent_ledger_tomb_created``)."""
        cutoff = ExpressionWrapper(
            Now() - Value(key_lifetime, output_field=models.DurationField()),
            output_field=models.DateTimeField(),
        )
        return self.filter(created_at__lt=cutoff)


class EffectTombstone(models.Model):
    """What is left of a pruned effect: its key, so a retried call never silently runs again.

    Every store's ``begin`` refuses a key with a tombstone (``EffectPurgedError``). No payload
    (arguments, result, error, history) is kept; only what says which call it was and how it
    ended. Removed by retention once the key's lifetime (``KEY_LIFETIME``) has passed.
    """

    #: The pruned effect's id (the key is unique too, by a constraint: no extra LIKE index).
    effect_id = models.UUIDField(primary_key=True)
    idem_key = models.CharField(_("idempotency key"), max_length=64)
    workflow_id = models.CharField(max_length=MAX_NAME_LENGTH)
    tool = models.CharField(max_length=MAX_NAME_LENGTH)
    #: The effect's final status when it was pruned.
    status = models.CharField(max_length=32, choices=EffectStatus.choices)
    #: When the key was first used (the effect's ``created_at``): key lifetimes count from it.
    created_at = models.DateTimeField()
    completed_at = models.DateTimeField(null=True, blank=True)
    pruned_at = models.DateTimeField(db_default=Now())

    objects = EffectTombstoneQuerySet.as_manager()

    class Meta:
        verbose_name = _("pruned key")
        verbose_name_plural = _("pruned keys")
        indexes = [models.Index(fields=["created_at"], name="agent_ledger_tomb_created")]
        constraints = [
            models.UniqueConstraint(fields=["idem_key"], name="agent_ledger_tomb_idem_key_uniq")
        ]

    def __str__(self) -> str:
        return f"{self.tool} [{self.status}, pruned] {self.workflow_id}"
