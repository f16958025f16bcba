"""The admin: a read-only audit browser, and the approval dashboard for effects awaiting a human.

Nobody edits an effect here. The only writes are approve and deny (and the operator actions of
``admin_operator``: retry, resolve), which are POST-only views
(and bulk actions) that check ``agent_ledger.approve_effect`` and go through
``agent_ledger.services`` so the history row names the user, and "Retry resume" (the same
permission: whoever may decide may push a decision's resumption through again). The changelist
is built to stay fast on a large table: no full ``COUNT(*)``, no facet counts, no full-table
``DISTINCT``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime, timedelta
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.utils import quote, unquote
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import Q, QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    HttpResponseRedirect,
)
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import dateformat, timezone
from django.utils.decorators import method_decorator
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext
from django.views.decorators.http import require_POST

from . import resume, services
from .admin_operator import OperatorAdminMixin
from .approvals import describe_diff
from .errors import DecisionRefusedError, EffectLedgerValidationError, EffectNotFoundError
from .models import (
    RESUMING_LABEL,
    Effect,
    EffectStatus,
    EffectTransition,
    Resumption,
    ResumptionStatus,
    effect_timing,
    last_decision,
    status_label,
)
from .policies import explain, policy_for
from .types import Actor

#: Longest JSON text the detail page shows in full; larger values are cut with a note.
JSON_DISPLAY_LIMIT = 50_000
#: Longest arguments summary in the list (one line per effect).
SUMMARY_LENGTH = 80
#: Effects named one by one in a bulk action's "already decided" messages.
NAMED_IN_MESSAGES = 10
#: Resumptions an operator may retry: waiting for their backoff, or out of attempts.
RETRYABLE = (ResumptionStatus.PENDING, ResumptionStatus.FAILED)


_IDEM_KEY = re.compile(r"[0-9a-fA-F]{64}")


class CappedCountPaginator(Paginator):  # type: ignore[type-arg]
    """Counts at most ``count_limit`` rows, so a page of a huge table never waits on COUNT(*).

    Past the cap, an unfiltered list on PostgreSQL uses the planner's row estimate (free); any
    other list stops at the cap and the page says so (``count_is_capped``).
    """

    count_limit = 10_000

    @cached_property
    def count(self) -> int:
        queryset: QuerySet[Any] = self.object_list  # type: ignore[assignment]
        # COUNT(*) over a LIMITed subquery: bounded work whatever the filters are.
        counted: int = queryset.order_by()[: self.count_limit + 1].count()
        if counted <= self.count_limit:
            return counted
        self.count_is_capped = True
        estimate = _estimated_rows(queryset)
        return max(estimate, self.count_limit) if estimate else self.count_limit

    count_is_capped = False


def _estimated_rows(queryset: QuerySet[Any]) -> int:
    """PostgreSQL's row estimate for an unfiltered table; 0 when unavailable."""
    connection = connections[queryset.db]
    if connection.vendor != "postgresql" or queryset.query.where:
        return 0
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
            [queryset.model._meta.db_table],
        )
        row = cursor.fetchone()
    return max(int(row[0]), 0) if row else 0


class StatusFilter(admin.SimpleListFilter):
    """``?status=requires_approval``: the short URL the admin index links to."""

    title = _("status")
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        # Awaiting approval first: it is the queue people come here for.
        waiting = EffectStatus.REQUIRES_APPROVAL
        return [(waiting.value, waiting.label)] + [
            (value, label) for value, label in EffectStatus.choices if value != waiting
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value in EffectStatus.values:
            return queryset.filter(status=value)
        return queryset


class ToolFilter(admin.SimpleListFilter):
    """Tools seen in the newest effects: a bounded index read, not a DISTINCT over the table.

    Any tool can still be filtered by URL (``?tool=name``) or found with the search box.
    """

    title = _("tool")
    parameter_name = "tool"
    recent_rows = 1_000

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        recent = model_admin.get_queryset(request).order_by("-created_at")
        tools = set(recent.values_list("tool", flat=True)[: self.recent_rows])
        if self.value():
            tools.add(self.value())
        return [(tool, tool) for tool in sorted(tools)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value():
            return queryset.filter(tool=self.value())
        return queryset


class TransitionInline(admin.TabularInline):  # type: ignore[type-arg]
    """The effect's append-only history, oldest first; never editable."""

    model = EffectTransition
    fields = ("when", "from_status", "to_status", "actor", "reason")
    readonly_fields = fields
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = False
    verbose_name = _("transition")
    verbose_name_plural = _("history")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The history is part of the effect: whoever may view the effect sees it.
        opts = Effect._meta
        return any(
            request.user.has_perm(f"{opts.app_label}.{get_permission_codename(action, opts)}")
            for action in ("view", "change")
        )

    @admin.display(description=_("at"))
    def when(self, obj: EffectTransition) -> str:
        return format_when(obj.at)

    @admin.display(description=_("by"))
    def actor(self, obj: EffectTransition) -> str:
        return obj.actor_display


class TimestampColumns:
    """The ``created`` and ``updated`` columns, with seconds and time zone, of any row that
    has ``created_at`` and ``updated_at`` (effects, resumptions)."""

    @admin.display(description=_("created"), ordering="created_at")
    def created(self, obj: Effect | Resumption) -> str:
        return format_when(obj.created_at)

    @admin.display(description=_("updated"))
    def updated(self, obj: Effect | Resumption) -> str:
        return format_when(obj.updated_at)


@admin.register(Effect)
class EffectAdmin(OperatorAdminMixin, TimestampColumns, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "created",
        "workflow_id",
        "tool",
        "args_summary",
        "status_badge",
        "dedup_count",
        "duration",
        "human_wait",
    )
    #: The pending queue (``?status=requires_approval``): what is asked, and for how long.
    queue_display = (
        "created",
        "workflow_id",
        "tool",
        "args_summary",
        "waiting_for",
        "status_badge",
    )
    list_display_links = ("created",)
    list_filter = (StatusFilter, ToolFilter, ("created_at", admin.DateFieldListFilter))
    date_hierarchy = "created_at"
    # Exact and prefix lookups only: each can use an index, none scans the table with LIKE %x%.
    search_fields = ("=idem_key", "=workflow_id", "^tool", "=call_id")
    search_help_text = _("Exact idempotency key, workflow id or call id, or the start of a tool.")

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Effect], search_term: str
    ) -> tuple[QuerySet[Effect], bool]:
        """Case-sensitive lookups the indexes can serve (the admin's ``=field`` means
        ``iexact``, which scans a million-row table), and an idempotency key alone when the
        term is one, so that search is a single unique-index probe."""
        term = search_term.strip()
        if not term:
            return queryset, False
        if _IDEM_KEY.fullmatch(term):
            return queryset.filter(idem_key=term.lower()), False
        matches = Q(workflow_id=term) | Q(call_id=term) | Q(tool__startswith=term)
        return queryset.filter(matches), False

    # Sorting by other columns would sort the whole (filtered) table for one page.
    sortable_by = ("created",)
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    paginator = CappedCountPaginator
    list_per_page = 50
    actions = ("approve_selected", "deny_selected")
    inlines = (TransitionInline,)
    change_list_template = "agent_ledger/admin/effect_change_list.html"
    change_form_template = "agent_ledger/admin/effect_change_form.html"
    fieldsets = (
        (None, {"fields": ("status_badge", "workflow_id", "tool")}),
        (_("Call"), {"fields": ("args_json", "resource_json")}),
        (_("Outcome"), {"fields": ("result_json", "error_json")}),
        (
            _("Timing"),
            {"fields": ("created", "updated", "completed", "duration", "human_wait")},
        ),
        (_("Keys"), {"fields": ("idem_key", "call_id", "fence", "dedup_count")}),
    )
    # Everything shown is read-only: nobody edits args, results or status by hand.
    readonly_fields = tuple(str(name) for _, options in fieldsets for name in options["fields"])

    class Media:
        css = {"all": ("agent_ledger/admin.css",)}

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None or obj.status != EffectStatus.REQUIRES_APPROVAL:
            return self.fieldsets
        # The decision panel above already shows the arguments: once on the page.
        return [
            (name, {**options, "fields": [f for f in options["fields"] if f != "args_json"]})
            for name, options in self.fieldsets
        ]

    # -- read-only, and nothing is ever deleted ------------------------------------------------

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The ledger is an audit record: status changes go through approve/deny, never a form.
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Deleting an effect frees its key: the agent's next retry would run the tool again.
        # Superusers included; this also removes the bulk "delete selected" action.
        return False

    def has_approve_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.approve_{opts.model_name}")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Effect]:
        # The history rows give each row's run time and human wait: one query per page; the
        # resuming flag ("approved, resuming") is a subquery on the same one.
        queryset: QuerySet[Effect] = super().get_queryset(request)
        return queryset.with_history().with_resuming()  # type: ignore[attr-defined,no-any-return]

    # -- the list: only its own filters, the queue oldest first --------------------------------

    def lookup_allowed(self, lookup: str, value: str, request: Any = None) -> bool:
        """Only the declared filters and the date drill-down: no ``?args_canonical__contains=``
        (any field lookup by URL would be a full-table scan, and a way to probe the data)."""
        field = self.date_hierarchy
        allowed = {f"{field}__{part}" for part in ("year", "month", "day", "gte", "lt", "isnull")}
        allowed |= {StatusFilter.parameter_name, ToolFilter.parameter_name}
        return lookup in allowed

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if _has_nul(request.GET):
            # PostgreSQL cannot compare text with NUL in it; the query would fail with a 500.
            return HttpResponseBadRequest(_("Filter values must not contain NUL characters."))
        if request.method == "POST" and _has_nul(request.POST):
            return HttpResponseBadRequest(_("Values must not contain NUL characters."))
        return super().changelist_view(request, extra_context)

    def _is_queue(self, request: HttpRequest) -> bool:
        return request.GET.get(StatusFilter.parameter_name) == EffectStatus.REQUIRES_APPROVAL

    def get_list_display(self, request: HttpRequest) -> Any:
        return self.queue_display if self._is_queue(request) else self.list_display

    def get_ordering(self, request: HttpRequest) -> Any:
        # Whoever has waited longest is decided first.
        return ("created_at",) if self._is_queue(request) else ("-created_at",)

    # -- columns -----------------------------------------------------------------------------

    @admin.display(description=_("completed"))
    def completed(self, obj: Effect) -> str:
        return format_when(obj.completed_at)

    @admin.display(description=_("status"), ordering="status")
    def status_badge(self, obj: Effect) -> str:
        return status_badge(obj.status, obj.shown_status())

    @admin.display(description=_("arguments"))
    def args_summary(self, obj: Effect) -> str:
        return format_html('<span class="agent-ledger-summary">{}</span>', summarize(obj.args))

    @admin.display(description=_("duration"))
    def duration(self, obj: Effect) -> str:
        """The tool's own run, claim to commit; time waiting for a human is not in it."""
        ran = effect_timing(obj, timezone.now()).ran
        return "-" if ran is None else format_duration(ran)

    @admin.display(description=_("waited for a human"))
    def human_wait(self, obj: Effect) -> str:
        timing = effect_timing(obj, timezone.now())
        if timing.waited is None:
            return "-"
        text = format_duration(timing.waited)
        return _("%s so far") % text if timing.waiting else text

    @admin.display(description=_("waiting for"))
    def waiting_for(self, obj: Effect) -> str:
        waited = effect_timing(obj, timezone.now()).waited
        return "-" if waited is None else format_duration(waited)

    @admin.display(description=_("arguments"))
    def args_json(self, obj: Effect) -> str:
        return render_args(obj.args)

    @admin.display(description=_("resource"))
    def resource_json(self, obj: Effect) -> str:
        resource = obj.resource
        return "-" if resource is None else _json_block(resource)

    @admin.display(description=_("result"))
    def result_json(self, obj: Effect) -> str:
        return "-" if obj.result is None else _json_block(obj.result)

    @admin.display(description=_("error"))
    def error_json(self, obj: Effect) -> str:
        return "-" if obj.error is None else _json_block(obj.error)

    # -- the effect's page: the decision first -------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        info = self.opts.app_label, self.opts.model_name
        # Before the defaults: their "<path:object_id>/" catch-all would swallow these.
        return [
            path(
                "<path:object_id>/approve/",
                self.admin_site.admin_view(self.approve_view),
                name="{}_{}_approve".format(*info),
            ),
            path(
                "<path:object_id>/deny/",
                self.admin_site.admin_view(self.deny_view),
                name="{}_{}_deny".format(*info),
            ),
            path(
                "<path:object_id>/resumptions/<int:resumption_id>/retry/",
                self.admin_site.admin_view(self.retry_resume_view),
                name="{}_{}_retry_resume".format(*info),
            ),
            # After the line above: "<path:object_id>/retry/" would swallow it.
            *self.operator_urls(),
            *super().get_urls(),
        ]

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        extra_context = {
            **(extra_context or {}),
            **self._desk_context(request, object_id),
            **self.operator_context(request),
        }
        return super().change_view(request, object_id, form_url, extra_context)

    def _desk_context(self, request: HttpRequest, object_id: str) -> dict[str, Any]:
        """What the decision panel shows: the call, who asked and how long it has waited."""
        context: dict[str, Any] = {"has_approve_permission": self.has_approve_permission(request)}
        effect = self.get_object(request, unquote(object_id))
        if effect is None:
            return context
        if effect.status == EffectStatus.REQUIRES_APPROVAL:
            rows = list(effect.transitions.all())
            asked = next(
                (r for r in reversed(rows) if r.to_status == EffectStatus.REQUIRES_APPROVAL),
                None,
            )
            since = asked.at if asked is not None else effect.created_at
            context["desk"] = {
                "args": render_args(effect.args),
                "requested_by": asked.actor_display if asked is not None else "-",
                "since": format_when(since),
                "waited": format_duration(timezone.now() - since),
                **_policy_desk(effect, rows),
            }
        elif effect.superseded_by is not None:
            context["superseded"] = _superseded(effect, self)
        elif effect.status == EffectStatus.READY:
            decision = last_decision(effect)
            context["next_step"] = {
                "by": decision.actor_display if decision else "-",
                "at": format_when(decision.at) if decision else "-",
                "resuming": effect.shown_status() == str(RESUMING_LABEL),
            }
        context["resumptions"] = [
            {
                "row": row,
                "status": row.get_status_display(),
                "updated": format_when(row.updated_at),
                "next_try": format_when(row.run_after)
                if row.status == ResumptionStatus.PENDING
                else "-",
                "retryable": row.status in RETRYABLE,
            }
            for row in Resumption.objects.filter(effect_id=effect.pk).order_by("created_at", "id")
        ]
        return context

    @method_decorator(require_POST)
    def retry_resume_view(
        self, request: HttpRequest, object_id: str, resumption_id: int
    ) -> HttpResponse:
        """Make a pending or failed resumption of this effect run now (one more attempt)."""
        if not self.has_approve_permission(request):
            raise PermissionDenied
        effect = self.get_object(request, unquote(object_id))
        if effect is None:
            raise Http404(_("No effect with that id."))
        if not Resumption.objects.filter(pk=resumption_id, effect_id=effect.pk).exists():
            raise Http404(_("No such resumption of this effect."))
        if resume.retry(resumption_id):
            self.log_change(request, effect, _("Retried resume"))
            row = Resumption.objects.get(pk=resumption_id)
            self.message_user(
                request,
                _("Resume retried; it is now %s.") % row.get_status_display(),
                messages.SUCCESS,
            )
        else:
            self.message_user(
                request, _("That resumption is running or done: nothing to retry."), messages.INFO
            )
        return HttpResponseRedirect(
            reverse(
                f"{self.admin_site.name}:{self.opts.app_label}_{self.opts.model_name}_change",
                args=(quote(effect.pk),),
            )
        )

    # -- approve / deny views ----------------------------------------------------------------

    @staticmethod
    def actor(request: HttpRequest) -> Actor:
        return Actor("admin", user_id=request.user.pk, name=request.user.get_username())

    @method_decorator(require_POST)
    def approve_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self._decision_view(request, object_id, "approve")

    @method_decorator(require_POST)
    def deny_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self._decision_view(request, object_id, "deny")

    def _decision_view(self, request: HttpRequest, object_id: str, decision: str) -> HttpResponse:
        if not self.has_approve_permission(request):
            raise PermissionDenied
        if _has_nul(request.POST):
            return HttpResponseBadRequest(_("The reason must not contain NUL characters."))
        effect = self.get_object(request, unquote(object_id))
        if effect is None:
            raise Http404(_("No effect with that id."))
        here = HttpResponseRedirect(
            reverse(
                f"{self.admin_site.name}:{self.opts.app_label}_{self.opts.model_name}_change",
                args=(quote(effect.pk),),
            )
        )
        reason = request.POST.get("reason", "").strip() or None
        if decision == "deny" and reason is None:
            self.message_user(request, _("Give a reason to deny an effect."), messages.ERROR)
            return here
        args = None
        if decision == "approve" and request.POST.get("args", "").strip():
            try:
                args = json.loads(request.POST["args"])
            except ValueError:
                self.message_user(request, _("The arguments are not valid JSON."), messages.ERROR)
                return here
        outcome = self._decide(request, effect, decision, reason, args)
        if outcome is None:
            return here
        if outcome.note:
            self.message_user(request, outcome.note, messages.SUCCESS)
        elif outcome.changed:
            done = _("Approved") if decision == "approve" else _("Denied")
            # Read again: an approval with a resumer reads "approved, resuming" until it ran.
            now = Effect.objects.get(pk=effect.pk).shown_status()
            self.message_user(
                request,
                f"{done} {effect.tool} in {effect.workflow_id}; it is now {now}.",
                messages.SUCCESS,
            )
        else:
            self.message_user(request, already_decided(effect, outcome), messages.WARNING)
        return here

    def _decide(
        self,
        request: HttpRequest,
        effect: Effect,
        decision: str,
        reason: str | None,
        args: Any = None,
    ) -> Outcome | None:
        """Apply one decision through the service (the tool's policy applies); None (and a
        message) on error or refusal."""
        try:
            if decision == "approve":
                record = services.approve(
                    effect.idem_key, actor=self.actor(request), reason=reason, args=args
                )
            else:
                record = services.deny(effect.idem_key, actor=self.actor(request), reason=reason)
        except EffectNotFoundError:
            self.message_user(request, _("That effect no longer exists."), messages.ERROR)
            return None
        except EffectLedgerValidationError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return None
        except DecisionRefusedError as exc:
            self.message_user(
                request, f"{effect.tool} in {effect.workflow_id}: {exc}", messages.ERROR
            )
            return None
        status = record.effect.status.value
        if record.changed:
            # Logged with the state after the decision, so Recent actions shows the new status.
            effect.status = status
            message = (_("Approved") if decision == "approve" else _("Denied")) + (
                f": {reason}" if reason else ""
            )
            self.log_change(request, effect, message)
        note = ""
        if record.short_of_quorum:
            note = _("Your approval of %(tool)s is recorded: %(given)d of %(needed)d.") % {
                "tool": effect.tool,
                "given": record.approvals,
                "needed": record.quorum,
            }
        elif record.edited is not None:
            note = _("Approved %(tool)s with edited arguments (effect %(id)s).") % {
                "tool": effect.tool,
                "id": record.edited.id,
            }
        return Outcome(record.changed, status, note)

    # -- bulk actions: both confirm first ------------------------------------------------------

    @admin.action(permissions=["approve"], description=_("Approve selected effects…"))
    def approve_selected(
        self, request: HttpRequest, queryset: QuerySet[Effect]
    ) -> HttpResponse | None:
        return self._confirm_many(request, queryset, "approve")

    @admin.action(permissions=["approve"], description=_("Deny selected effects…"))
    def deny_selected(
        self, request: HttpRequest, queryset: QuerySet[Effect]
    ) -> HttpResponse | None:
        return self._confirm_many(request, queryset, "deny")

    def _confirm_many(
        self, request: HttpRequest, queryset: QuerySet[Effect], decision: str
    ) -> HttpResponse | None:
        """A page listing each selected effect's tool and arguments; the decision is made only
        when it is sent back (``post=yes``), with a reason that deny requires."""
        error = None
        reason = request.POST.get("reason", "").strip()
        if request.POST.get("post") == "yes":
            if reason or decision == "approve":
                self._decide_many(request, queryset, decision, reason or None)
                return None
            error = _("Give a reason to deny these effects.")
        shown = list(queryset.order_by("created_at")[:100])
        context = {
            **self.admin_site.each_context(request),
            "title": _("Approve effects") if decision == "approve" else _("Deny effects"),
            "decision": decision,
            "opts": self.opts,
            "effects": [
                {
                    "effect": effect,
                    "args": render_args(effect.args),
                    "badge": status_badge(effect.status),
                }
                for effect in shown
            ],
            "count": queryset.count(),
            "select_across": request.POST.get("select_across", "0"),
            "selected": request.POST.getlist(ACTION_CHECKBOX_NAME),
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
            "action": f"{decision}_selected",
            "error": error,
            "reason": reason,
        }
        return TemplateResponse(request, "agent_ledger/admin/decide_selected.html", context)

    def _decide_many(
        self, request: HttpRequest, queryset: QuerySet[Effect], decision: str, reason: str | None
    ) -> None:
        changed = 0
        already: list[str] = []
        for effect in queryset.order_by("created_at"):
            outcome = self._decide(request, effect, decision, reason)
            if outcome is None:
                continue
            if outcome.note:
                self.message_user(request, outcome.note, messages.SUCCESS)
            elif outcome.changed:
                changed += 1
            else:
                already.append(already_decided(effect, outcome))
        if changed:
            text = (
                ngettext("Approved %d effect.", "Approved %d effects.", changed)
                if decision == "approve"
                else ngettext("Denied %d effect.", "Denied %d effects.", changed)
            )
            self.message_user(request, text % changed, messages.SUCCESS)
        for text in already[:NAMED_IN_MESSAGES]:
            self.message_user(request, text, messages.WARNING)
        if len(already) > NAMED_IN_MESSAGES:
            rest = len(already) - NAMED_IN_MESSAGES
            self.message_user(
                request,
                ngettext(
                    "%d more effect was not awaiting approval and was left alone.",
                    "%d more effects were not awaiting approval and were left alone.",
                    rest,
                )
                % rest,
                messages.WARNING,
            )


@admin.register(Resumption)
class ResumptionAdmin(TimestampColumns, admin.ModelAdmin):  # type: ignore[type-arg]
    """Every decision's resumption, newest first: read-only, with "Retry" for the stuck ones."""

    list_display = (
        "created",
        "effect_link",
        "decision",
        "resumer",
        "status",
        "attempts",
        "error_summary",
        "next_try",
    )
    list_display_links = ("created",)
    list_filter = ("status", "decision")
    search_fields = ("=resumer",)
    list_select_related = ("effect",)
    sortable_by = ("created",)
    show_full_result_count = False
    paginator = CappedCountPaginator
    list_per_page = 50
    actions = ("retry_selected",)
    fields = (
        "effect_link",
        "decision",
        "resumer",
        "status",
        "attempts",
        "last_error",
        "next_try",
        "created",
        "updated",
    )
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_retry_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """The decision's permission: retrying a resume pushes a decision through again."""
        return request.user.has_perm(f"{Effect._meta.app_label}.approve_effect")

    @admin.display(description=_("effect"))
    def effect_link(self, obj: Resumption) -> str:
        url = reverse(
            f"{self.admin_site.name}:agent_ledger_effect_change", args=(quote(obj.effect_id),)
        )
        return format_html(
            '<a href="{}">{}</a>', url, f"{obj.effect.tool} in {obj.effect.workflow_id}"
        )

    @admin.display(description=_("last error"))
    def error_summary(self, obj: Resumption) -> str:
        return summarize(obj.last_error) if obj.last_error else "-"

    @admin.display(description=_("next try"))
    def next_try(self, obj: Resumption) -> str:
        return format_when(obj.run_after) if obj.status == ResumptionStatus.PENDING else "-"

    @admin.action(permissions=["retry"], description=_("Retry selected resumptions now"))
    def retry_selected(self, request: HttpRequest, queryset: QuerySet[Resumption]) -> None:
        retried = sum(resume.retry(pk) for pk in queryset.values_list("pk", flat=True))
        skipped = queryset.count() - retried
        if retried:
            self.message_user(
                request,
                ngettext("Retried %d resumption.", "Retried %d resumptions.", retried) % retried,
                messages.SUCCESS,
            )
        if skipped:
            self.message_user(
                request,
                ngettext(
                    "%d resumption was running or done and was left alone.",
                    "%d resumptions were running or done and were left alone.",
                    skipped,
                )
                % skipped,
                messages.WARNING,
            )


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one decision did: whether it changed the effect, and its status afterwards."""

    changed: bool
    status: str
    #: What to tell the decider instead of "Approved": quorum progress, an edit.
    note: str = ""

    @property
    def status_label(self) -> str:
        return status_label(self.status)


def _policy_desk(effect: Effect, rows: list[EffectTransition]) -> dict[str, Any]:
    """The tool's policy for the decider: "needs 2 of group Finance; expires in 3 h", the
    approvals given so far, the edit box, and where an edited effect came from."""
    policy = policy_for(effect.tool)
    given = [
        r
        for r in rows
        if r.from_status == EffectStatus.REQUIRES_APPROVAL
        and r.to_status == EffectStatus.REQUIRES_APPROVAL
    ]
    desk: dict[str, Any] = {
        "policy": explain(
            policy, approvals=len(given), expires_at=effect.expires_at, now=timezone.now()
        ),
        "quorum": policy.quorum,
        "approvals": given,
        "approvers": ", ".join(r.actor_display for r in given),
    }
    if policy.allow_edit and policy.quorum == 1:
        desk["editable_args"] = json.dumps(effect.args, indent=2, ensure_ascii=False)
    origin = Effect.objects.filter(superseded_by=effect.pk).first()
    if origin is not None:
        desk["edited_from"] = _("Arguments edited from effect %(id)s: %(diff)s") % {
            "id": origin.pk,
            "diff": describe_diff(origin.args, effect.args),
        }
    return desk


def _superseded(effect: Effect, model_admin: Any) -> dict[str, Any]:
    """The superseded effect's pointer to the edited one, with who edited what."""
    new_pk = effect.superseded_by
    assert new_pk is not None
    edited = Effect.objects.filter(pk=new_pk).first()
    decision = last_decision(effect)
    opts = model_admin.opts
    return {
        "by": decision.actor_display if decision else "-",
        "diff": describe_diff(effect.args, edited.args) if edited else "-",
        "url": reverse(
            f"{model_admin.admin_site.name}:{opts.app_label}_{opts.model_name}_change",
            args=(quote(new_pk),),
        ),
    }


def already_decided(effect: Effect, outcome: Outcome) -> str:
    """Who decided, when and what, for the approver who came second."""
    decision = last_decision(effect)
    now = status_label(outcome.status)
    if decision is None:
        return _(
            "Not awaiting approval: %(tool)s in %(workflow)s is %(status)s; nobody decided it."
        ) % {"tool": effect.tool, "workflow": effect.workflow_id, "status": now}
    what = _("approved") if decision.to_status == EffectStatus.READY else decision.to_status
    text = _("Already decided: %(who)s %(what)s %(tool)s in %(workflow)s at %(when)s") % {
        "who": decision.actor_display,
        "what": what,
        "tool": effect.tool,
        "workflow": effect.workflow_id,
        "when": format_when(decision.at),
    }
    if decision.reason:
        text += f" ({decision.reason})"
    return text + (_("; it is now %s.") % now)


def status_badge(status: str, label: str | None = None) -> str:
    return format_html(
        '<span class="agent-ledger-badge agent-ledger-badge--{}">{}</span>',
        status,
        status_label(status) if label is None else label,
    )


def format_when(value: datetime | None) -> str:
    """``2025-06-01 14:03:07 UTC``: seconds and the time zone, so operators can line up logs."""
    if value is None:
        return "-"
    return dateformat.format(timezone.localtime(value), "Y-m-d H:i:s T")


def summarize(value: Any) -> str:
    """One line for the list: ``key=value, ...`` cut at ``SUMMARY_LENGTH`` characters."""
    if isinstance(value, dict):
        text = ", ".join(f"{key}={_compact(item)}" for key, item in value.items())
    else:
        text = _compact(value)
    text = " ".join(text.split())
    return text if len(text) <= SUMMARY_LENGTH else text[: SUMMARY_LENGTH - 1] + "…"


def _compact(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def render_args(value: Any) -> SafeString:
    """Arguments for a person: one row per top-level key; strings as text (a multi-line one
    as a text block, never ``\\n``-escaped JSON), other values as indented JSON. Each value
    sits in a box that scrolls when it is long."""
    if not isinstance(value, dict) or not value:
        return _json_block(value)
    return format_html(
        '<dl class="agent-ledger-args">{}</dl>',
        format_html_join(
            "",
            '<dt>{}</dt><dd class="agent-ledger-value">{}</dd>',
            ((key, _value_html(item)) for key, item in value.items()),
        ),
    )


def _value_html(value: Any) -> SafeString:
    if isinstance(value, str):
        text = _cut(value)
        css = "agent-ledger-text" if "\n" in value else "agent-ledger-line"
        return format_html('<pre class="{}">{}</pre>', css, text)
    return _json_block(value)


def _has_nul(query: Any) -> bool:
    return any("\x00" in key or any("\x00" in v for v in query.getlist(key)) for key in query)


def format_duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _cut(text: str) -> str:
    if len(text) > JSON_DISPLAY_LIMIT:
        return text[:JSON_DISPLAY_LIMIT] + f"\n… ({len(text) - JSON_DISPLAY_LIMIT} more characters)"
    return text


def _json_block(value: Any) -> SafeString:
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    return format_html('<pre class="agent-ledger-json">{}</pre>', _cut(text))


# "Awaiting approval (N)" on the default site's index. A template named admin/index.html in this
# app would only win if the app came before django.contrib.admin in INSTALLED_APPS; setting the
# site's index_template works in any order, and a project's own choice is left alone.
if admin.site.index_template is None:
    admin.site.index_template = "agent_ledger/admin/index.html"
