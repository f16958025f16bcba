"""The admin: a read-only audit browser, and the approval dashboard for effects awaiting a human.

Nobody edits an effect here. The only writes are approve and deny (and the operator actions of
``admin_operator``: retry, resolve), which are POST-only views
(and bulk actions) that check ``agent_ledger.approve_effect`` and go through
``agent_ledger.services`` so the history row names the user. The changelist is built to stay
fast on a large table: no full ``COUNT(*)``, no facet counts, no full-table ``DISTINCT``.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.utils import quote, unquote
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.decorators import method_decorator
from django.utils.functional import cached_property
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext
from django.views.decorators.http import require_POST

from . import services
from .admin_operator import OperatorAdminMixin
from .errors import EffectLedgerValidationError, EffectNotFoundError
from .models import Effect, EffectStatus, EffectTransition
from .types import Actor

#: Longest JSON text the detail page shows in full; larger values are cut with a note.
JSON_DISPLAY_LIMIT = 50_000


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
        awaiting = [(EffectStatus.REQUIRES_APPROVAL, _("awaiting approval"))]
        return awaiting + [
            (value, label)
            for value, label in EffectStatus.choices
            if value != EffectStatus.REQUIRES_APPROVAL
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
    fields = ("at", "from_status", "to_status", "actor", "reason")
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

    @admin.display(description=_("by"))
    def actor(self, obj: EffectTransition) -> str:
        who = obj.actor_name or (f"user #{obj.actor_user_id}" if obj.actor_user_id else "")
        return f"{obj.actor_label}: {who}" if who else obj.actor_label


@admin.register(Effect)
class EffectAdmin(OperatorAdminMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "created_at",
        "workflow_id",
        "tool",
        "status_badge",
        "dedup_count",
        "duration",
    )
    list_display_links = ("created_at",)
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
    sortable_by = ("created_at",)
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    paginator = CappedCountPaginator
    list_per_page = 50
    actions = ("approve_selected", "deny_selected")
    inlines = (TransitionInline,)
    change_list_template = "agent_ledger/admin/effect_change_list.html"
    change_form_template = "agent_ledger/admin/effect_change_form.html"
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "status_badge",
                    "workflow_id",
                    "tool",
                    "call_id",
                    "idem_key",
                    "dedup_count",
                    "fence",
                )
            },
        ),
        (_("Timing"), {"fields": ("created_at", "updated_at", "completed_at", "duration")}),
        (_("Call"), {"fields": ("args_json", "resource_json")}),
        (_("Outcome"), {"fields": ("result_json", "error_json")}),
    )
    # Everything shown is read-only: nobody edits args, results or status by hand.
    readonly_fields = tuple(str(name) for _, options in fieldsets for name in options["fields"])

    class Media:
        css = {"all": ("agent_ledger/admin.css",)}

    # -- read-only ---------------------------------------------------------------------------

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The ledger is an audit record: status changes go through approve/deny, never a form.
        return False

    def has_approve_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.approve_{opts.model_name}")

    # -- columns -----------------------------------------------------------------------------

    @admin.display(description=_("status"), ordering="status")
    def status_badge(self, obj: Effect) -> str:
        return format_html(
            '<span class="agent-ledger-badge agent-ledger-badge--{}">{}</span>',
            obj.status,
            obj.get_status_display(),
        )

    @admin.display(description=_("duration"))
    def duration(self, obj: Effect) -> str:
        if obj.completed_at is None or obj.created_at is None:
            return "-"
        return format_duration(obj.completed_at - obj.created_at)

    @admin.display(description=_("arguments"))
    def args_json(self, obj: Effect) -> str:
        return _json_block(_loads(obj.args_canonical))

    @admin.display(description=_("resource id"))
    def resource_json(self, obj: Effect) -> str:
        if obj.resource_id_canonical is None:
            return "-"
        return _json_block(_loads(obj.resource_id_canonical))

    @admin.display(description=_("result"))
    def result_json(self, obj: Effect) -> str:
        return "-" if obj.result is None else _json_block(obj.result)

    @admin.display(description=_("error"))
    def error_json(self, obj: Effect) -> str:
        return "-" if obj.error is None else _json_block(obj.error)

    # -- approve / deny views ----------------------------------------------------------------

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
            "has_approve_permission": self.has_approve_permission(request),
            **self.operator_context(request),
        }
        return super().change_view(request, object_id, form_url, extra_context)

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
        outcome = self._decide(request, effect, decision, reason)
        if outcome is None:
            return here
        changed, status = outcome
        if changed:
            done = _("Approved") if decision == "approve" else _("Denied")
            self.message_user(
                request,
                f"{done} {effect.tool} in {effect.workflow_id}; its status is now {status}.",
                messages.SUCCESS,
            )
        else:
            self.message_user(
                request,
                _("Already decided: this effect is no longer awaiting approval (status: %s).")
                % status,
                messages.WARNING,
            )
        return here

    def _decide(
        self, request: HttpRequest, effect: Effect, decision: str, reason: str | None
    ) -> tuple[bool, str] | None:
        """Apply one decision through the service; ``(changed, new status)`` or None on error."""
        decide = services.approve if decision == "approve" else services.deny
        try:
            record = decide(effect.idem_key, actor=self.actor(request), reason=reason)
        except EffectNotFoundError:
            self.message_user(request, _("That effect no longer exists."), messages.ERROR)
            return None
        except EffectLedgerValidationError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return None
        if record.changed:
            message = f"{decision.capitalize()}d" + (f": {reason}" if reason else "")
            self.log_change(request, effect, message)
        return record.changed, record.effect.status.value

    # -- bulk actions ------------------------------------------------------------------------

    @admin.action(permissions=["approve"], description=_("Approve selected effects"))
    def approve_selected(self, request: HttpRequest, queryset: QuerySet[Effect]) -> None:
        self._decide_many(request, queryset, "approve", None)

    @admin.action(permissions=["approve"], description=_("Deny selected effects…"))
    def deny_selected(
        self, request: HttpRequest, queryset: QuerySet[Effect]
    ) -> TemplateResponse | None:
        error = None
        if request.POST.get("post") == "yes":
            reason = request.POST.get("reason", "").strip()
            if reason:
                self._decide_many(request, queryset, "deny", reason)
                return None
            error = _("Give a reason to deny these effects.")
        context = {
            **self.admin_site.each_context(request),
            "title": _("Deny effects"),
            "opts": self.opts,
            "queryset": queryset[:100],
            "count": queryset.count(),
            "select_across": request.POST.get("select_across", "0"),
            "selected": request.POST.getlist(ACTION_CHECKBOX_NAME),
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
            "error": error,
            "reason": request.POST.get("reason", ""),
        }
        return TemplateResponse(request, "agent_ledger/admin/deny_selected.html", context)

    def _decide_many(
        self, request: HttpRequest, queryset: QuerySet[Effect], decision: str, reason: str | None
    ) -> None:
        changed = unchanged = 0
        for effect in queryset.order_by():
            outcome = self._decide(request, effect, decision, reason)
            if outcome is None:
                continue
            if outcome[0]:
                changed += 1
            else:
                unchanged += 1
        if changed:
            text = (
                ngettext("Approved %d effect.", "Approved %d effects.", changed)
                if decision == "approve"
                else ngettext("Denied %d effect.", "Denied %d effects.", changed)
            )
            self.message_user(request, text % changed, messages.SUCCESS)
        if unchanged:
            self.message_user(
                request,
                ngettext(
                    "%d effect was not awaiting approval (already decided) and was left alone.",
                    "%d effects were not awaiting approval (already decided) and were left alone.",
                    unchanged,
                )
                % unchanged,
                messages.WARNING,
            )


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


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _json_block(value: Any) -> str:
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    if len(text) > JSON_DISPLAY_LIMIT:
        text = text[:JSON_DISPLAY_LIMIT] + f"\n… ({len(text) - JSON_DISPLAY_LIMIT} more characters)"
    return format_html('<pre class="agent-ledger-json">{}</pre>', text)


# "Awaiting approval (N)" on the default site's index. A template named admin/index.html in this
# app would only win if the app came before django.contrib.admin in INSTALLED_APPS; setting the
# site's index_template works in any order, and a project's own choice is left alone.
if admin.site.index_template is None:
    admin.site.index_template = "agent_ledger/admin/index.html"
