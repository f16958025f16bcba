"""Admin template tags: the "awaiting approval" box and a date hierarchy that never scans."""

from __future__ import annotations

import calendar
import datetime
from typing import Any

from django import template
from django.contrib.admin.views.main import ChangeList
from django.db.models import Max, Min
from django.urls import NoReverseMatch, reverse
from django.utils import formats, timezone
from django.utils.text import capfirst
from django.utils.translation import gettext as _

from ..models import Effect, EffectStatus

register = template.Library()


@register.inclusion_tag("agent_ledger/admin/pending_box.html", takes_context=True)
def agent_ledger_pending_box(context: template.Context) -> dict[str, Any]:
    """How many effects await a decision, linking to exactly those; hidden without view access."""
    request = context.get("request")
    if request is None or not request.user.has_perm("agent_ledger.view_effect"):
        return {"show": False}
    site = getattr(request, "current_app", None) or "admin"
    try:
        changelist = reverse(f"{site}:agent_ledger_effect_changelist")
    except NoReverseMatch:
        return {"show": False}
    # Served by the partial index on active statuses: cheap however large the table is.
    count = Effect.objects.pending_approval().count()
    return {
        "show": True,
        "count": count,
        "url": f"{changelist}?status={EffectStatus.REQUIRES_APPROVAL}",
        "can_approve": request.user.has_perm("agent_ledger.approve_effect"),
    }


@register.inclusion_tag("admin/date_hierarchy.html")
def agent_ledger_date_hierarchy(cl: ChangeList) -> dict[str, Any]:
    """Django's date drill-down, with choices from MIN/MAX instead of ``QuerySet.dates()``.

    ``dates()`` is a DISTINCT over every matching row; MIN and MAX of an indexed column are two
    index probes. The cost: a year, month or day inside the range may turn out to be empty.
    """
    field = cl.date_hierarchy
    if not field:
        return {"show": False}
    year_field, month_field, day_field = f"{field}__year", f"{field}__month", f"{field}__day"
    year = _int(cl.params.get(year_field))
    month = _int(cl.params.get(month_field))
    day = _int(cl.params.get(day_field))

    def link(filters: dict[str, Any]) -> str:
        return cl.get_query_string(filters, [f"{field}__"])

    first = last = None
    if not (year and month and day):
        bounds = cl.queryset.aggregate(first=Min(field), last=Max(field))
        first, last = bounds["first"], bounds["last"]
        if first is None or last is None:
            if not year:
                return {"show": False}
            back = {"link": link({}), "title": _("All dates")}
            return {"show": True, "back": back, "choices": []}
        first, last = (timezone.localtime(v) if timezone.is_aware(v) else v for v in (first, last))
        if not year and first.year == last.year:
            year = first.year
            if first.month == last.month:
                month = first.month

    if year and month and day:
        when = _date(year, month, day)
        if when is None:
            return {"show": False}
        return {
            "show": True,
            "back": {
                "link": link({year_field: year, month_field: month}),
                "title": capfirst(formats.date_format(when, "YEAR_MONTH_FORMAT")),
            },
            "choices": [{"title": capfirst(formats.date_format(when, "MONTH_DAY_FORMAT"))}],
        }
    assert first is not None and last is not None
    if year and month:
        days_in_month = calendar.monthrange(year, month)[1]
        low = first.day if (first.year, first.month) == (year, month) else 1
        high = last.day if (last.year, last.month) == (year, month) else days_in_month
        days = [d for d in (_date(year, month, n) for n in range(low, high + 1)) if d]
        return {
            "show": True,
            "back": {"link": link({year_field: year}), "title": str(year)},
            "choices": [
                {
                    "link": link({year_field: year, month_field: month, day_field: d.day}),
                    "title": capfirst(formats.date_format(d, "MONTH_DAY_FORMAT")),
                }
                for d in days
            ],
        }
    if year:
        low = first.month if first.year == year else 1
        high = last.month if last.year == year else 12
        months = [d for d in (_date(year, m, 1) for m in range(low, high + 1)) if d]
        return {
            "show": True,
            "back": {"link": link({}), "title": _("All dates")},
            "choices": [
                {
                    "link": link({year_field: year, month_field: d.month}),
                    "title": capfirst(formats.date_format(d, "YEAR_MONTH_FORMAT")),
                }
                for d in months
            ],
        }
    return {
        "show": True,
        "back": None,
        "choices": [
            {"link": link({year_field: y}), "title": str(y)}
            for y in range(first.year, last.year + 1)
        ],
    }


def _int(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[-1] if value else None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _date(year: int, month: int, day: int) -> datetime.date | None:
    try:
        return datetime.date(year, month, day)
    except ValueError:
        return None
