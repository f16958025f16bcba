"""The admin: a read-only audit browser and the approval dashboard (Django test client)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from agent_ledger import admin as ledger_admin
from agent_ledger import services
from agent_ledger.errors import EffectLedgerValidationError
from agent_ledger.models import Effect, EffectStatus
from agent_ledger.types import Actor
from tests.ledger_rows import make_effect, make_user

pytestmark = pytest.mark.django_db

VIEW = "agent_ledger.view_effect"
APPROVE = "agent_ledger.approve_effect"
DELETE = "agent_ledger.delete_effect"
CHANGELIST = "admin:agent_ledger_effect_changelist"


def url(name: str, effect: Effect | str) -> str:
    pk = effect.pk if isinstance(effect, Effect) else effect
    return reverse(f"admin:agent_ledger_effect_{name}", args=[pk])


def client_for(user: Any, **kwargs: Any) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


def texts(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


@pytest.fixture
def viewer() -> Client:
    return client_for(make_user("viewer", VIEW))


@pytest.fixture
def approver_user() -> Any:
    return make_user("alice", VIEW, APPROVE)


@pytest.fixture
def approver(approver_user: Any) -> Client:
    return client_for(approver_user)


# -- the audit browser -----------------------------------------------------------------------


def test_changelist_columns_badge_and_duration(viewer: Client) -> None:
    now = timezone.now()
    make_effect(
        status=EffectStatus.SUCCEEDED,
        tool="slack.send_message",
        workflow_id="ticket-42",
        dedup_count=3,
        completed_at=now + timedelta(seconds=2),
        created_at=now,
    )
    response = viewer.get(reverse(CHANGELIST))
    assert response.status_code == 200
    html = response.content.decode()
    assert "ticket-42" in html
    assert "slack.send_message" in html
    assert 'class="agent-ledger-badge agent-ledger-badge--succeeded"' in html
    assert "2.0 s" in html
    assert "agent_ledger/admin.css" in html
    assert reverse("admin:agent_ledger_effect_add") not in html


def test_status_filter_uses_a_short_parameter(viewer: Client) -> None:
    pending = make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    make_effect(status=EffectStatus.SUCCEEDED)
    response = viewer.get(reverse(CHANGELIST), {"status": "requires_approval"})
    assert [e.pk for e in response.context["cl"].result_list] == [pending.pk]
    assert "awaiting approval" in response.content.decode()


def test_tool_filter_lists_recent_tools_and_filters(viewer: Client) -> None:
    make_effect(tool="github.create_issue")
    stripe = make_effect(tool="stripe.charge")
    response = viewer.get(reverse(CHANGELIST))
    html = response.content.decode()
    assert "?tool=github.create_issue" in html and "?tool=stripe.charge" in html
    response = viewer.get(reverse(CHANGELIST), {"tool": "stripe.charge"})
    assert [e.pk for e in response.context["cl"].result_list] == [stripe.pk]


def test_tool_filter_is_bounded(viewer: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_admin.ToolFilter, "recent_rows", 1)
    make_effect(tool="old.tool", created_at=timezone.now() - timedelta(days=1))
    make_effect(tool="new.tool")
    html = viewer.get(reverse(CHANGELIST)).content.decode()
    assert "?tool=new.tool" in html
    assert "?tool=old.tool" not in html
    # Still reachable by URL, and then listed so the filter shows what is selected.
    response = viewer.get(reverse(CHANGELIST), {"tool": "old.tool"})
    assert len(response.context["cl"].result_list) == 1
    assert "?tool=old.tool" in response.content.decode()


@pytest.mark.parametrize(
    ("field", "term", "matches"),
    [
        ("idem_key", "exact", True),
        ("idem_key", "upper", True),
        ("idem_key", "prefix", False),
        ("workflow_id", "exact", True),
        ("call_id", "exact", True),
        ("tool", "prefix", True),
        ("tool", "middle", False),
    ],
)
def test_search_uses_exact_or_prefix_lookups(
    viewer: Client, field: str, term: str, matches: bool
) -> None:
    target = make_effect(workflow_id="order-7731", tool="stripe.charge", call_id="call-xyz-1")
    make_effect(workflow_id="other", tool="email.send", call_id="call-other")
    value = getattr(target, field)
    query = {"exact": value, "upper": value.upper(), "prefix": value[:5], "middle": value[2:7]}[
        term
    ]
    response = viewer.get(reverse(CHANGELIST), {"q": query})
    found = [e.pk for e in response.context["cl"].result_list]
    assert found == ([target.pk] if matches else [])


def test_date_hierarchy_offers_years_without_a_distinct_scan(viewer: Client) -> None:
    make_effect(created_at=timezone.now().replace(year=2023))
    make_effect(created_at=timezone.now().replace(year=2025))
    with CaptureQueriesContext(connection) as queries:
        response = viewer.get(reverse(CHANGELIST))
    html = response.content.decode()
    for year in (2023, 2024, 2025):
        assert f"created_at__year={year}" in html
    effect_queries = [q["sql"] for q in queries if "agent_ledger_effect" in q["sql"]]
    assert not [sql for sql in effect_queries if "DISTINCT" in sql.upper()]


def test_date_hierarchy_drills_down_to_a_day(viewer: Client) -> None:
    when = timezone.now().replace(year=2024, month=3, day=15, hour=12)
    make_effect(created_at=when)
    make_effect(created_at=when.replace(year=2023))
    html = viewer.get(reverse(CHANGELIST), {"created_at__year": 2024}).content.decode()
    assert "created_at__month=3" in html and "created_at__month=4" not in html
    html = viewer.get(
        reverse(CHANGELIST), {"created_at__year": 2024, "created_at__month": 3}
    ).content.decode()
    assert "created_at__day=15" in html and "created_at__day=16" not in html
    response = viewer.get(
        reverse(CHANGELIST),
        {"created_at__year": 2024, "created_at__month": 3, "created_at__day": 15},
    )
    assert len(response.context["cl"].result_list) == 1


def test_changelist_never_counts_the_whole_table(viewer: Client) -> None:
    for _ in range(3):
        make_effect()
    with CaptureQueriesContext(connection) as queries:
        response = viewer.get(reverse(CHANGELIST))
    assert response.status_code == 200
    counts = [q["sql"] for q in queries if "COUNT(" in q["sql"].upper()]
    effect_counts = [sql for sql in counts if "agent_ledger_effect" in sql]
    # Every count of effects is bounded: over a LIMITed subquery, or of pending ones only.
    assert effect_counts
    for sql in effect_counts:
        assert "LIMIT" in sql.upper() or "requires_approval" in sql, sql


def test_count_is_capped_and_the_page_says_so(
    viewer: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_admin.CappedCountPaginator, "count_limit", 3)
    for _ in range(5):
        make_effect()
    response = viewer.get(reverse(CHANGELIST))
    assert response.context["cl"].result_count == 3
    assert "More than 3 effects match" in response.content.decode()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's planner estimate")
def test_an_unfiltered_list_past_the_cap_uses_the_planner_estimate(
    viewer: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_admin.CappedCountPaginator, "count_limit", 3)
    for _ in range(6):
        make_effect()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE agent_ledger_effect")
    assert viewer.get(reverse(CHANGELIST)).context["cl"].result_count == 6
    filtered = viewer.get(reverse(CHANGELIST), {"tool": "k8s.deploy"})
    assert filtered.context["cl"].result_count == 3  # filtered: no estimate, the cap


def test_detail_shows_json_and_history(viewer: Client) -> None:
    effect = make_effect(
        status=EffectStatus.FAILED,
        args={"channel": "#ops", "text": "<b>hi</b>"},
        result=None,
        error={"message": "rate limited", "code": "429"},
    )
    effect.transitions.create(
        from_status="processing", to_status="failed", actor_label="admin", actor_name="bob"
    )
    response = viewer.get(url("change", effect))
    assert response.status_code == 200
    html = response.content.decode()
    assert (
        '<dt>channel</dt><dd class="agent-ledger-value"><pre class="agent-ledger-line">#ops' in html
    )
    assert "&lt;b&gt;hi&lt;/b&gt;" in html  # escaped, never rendered
    assert "rate limited" in html
    assert "admin: bob" in html
    assert 'name="_save"' not in html  # read-only: no save buttons


def test_detail_of_an_effect_with_a_result(viewer: Client) -> None:
    effect = make_effect(status=EffectStatus.SUCCEEDED, result={"id": 7, "ok": True})
    html = viewer.get(url("change", effect)).content.decode()
    assert "&quot;ok&quot;: true" in html


def test_nobody_can_add_or_edit(approver_user: Any) -> None:
    superuser = make_user("root", is_superuser=True)
    effect = make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    for user in (approver_user, superuser):
        client = client_for(user)
        assert client.get(reverse("admin:agent_ledger_effect_add")).status_code == 403
        response = client.post(url("change", effect), {"status": "succeeded", "tool": "x"})
        assert response.status_code == 403
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL
    assert effect.tool == "k8s.deploy"


def test_nobody_deletes_an_effect_superusers_included() -> None:
    """Deleting an effect would free its key and let the agent's retry run the tool again."""
    effect = make_effect(status=EffectStatus.SUCCEEDED)
    for user in (make_user("deleter", VIEW, DELETE), make_user("root", is_superuser=True)):
        client = client_for(user)
        assert client.post(url("delete", effect), {"post": "yes"}).status_code == 403
        html = client.get(reverse(CHANGELIST)).content.decode()
        assert 'value="delete_selected"' not in html
        assert url("delete", effect) not in client.get(url("change", effect)).content.decode()
        client.post(
            reverse(CHANGELIST),
            {"action": "delete_selected", "_selected_action": [str(effect.pk)], "post": "yes"},
        )
    assert Effect.objects.filter(pk=effect.pk).exists()
    assert effect.transitions.count() == 1


# -- the dashboard ---------------------------------------------------------------------------


def test_index_links_to_effects_awaiting_approval(viewer: Client) -> None:
    make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    make_effect(status=EffectStatus.SUCCEEDED)
    html = viewer.get(reverse("admin:index")).content.decode()
    assert "Awaiting approval (2)" in html
    assert f'href="{reverse(CHANGELIST)}?status=requires_approval"' in html
    html = viewer.get(reverse("admin:app_list", args=["agent_ledger"])).content.decode()
    assert "Awaiting approval (2)" in html


def test_index_hides_the_box_without_view_permission() -> None:
    make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    client = client_for(make_user("stranger"))
    html = client.get(reverse("admin:index")).content.decode()
    assert "Awaiting approval" not in html


def test_approver_sees_buttons_on_a_pending_effect(approver: Client) -> None:
    effect = make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    html = approver.get(url("change", effect)).content.decode()
    assert f'action="{url("approve", effect)}"' in html
    assert f'action="{url("deny", effect)}"' in html
    assert 'name="reason"' in html


def test_viewer_sees_no_buttons(viewer: Client) -> None:
    effect = make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    html = viewer.get(url("change", effect)).content.decode()
    assert url("approve", effect) not in html
    assert "You do not have permission to approve or deny" in html


def test_no_buttons_once_decided(approver: Client) -> None:
    effect = make_effect(status=EffectStatus.SUCCEEDED)
    html = approver.get(url("change", effect)).content.decode()
    assert url("approve", effect) not in html
    assert "agent-ledger-decision" not in html


def test_approve_records_the_user(approver: Client, approver_user: Any) -> None:
    effect = make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    response = approver.post(url("approve", effect), follow=True)
    assert response.redirect_chain[-1][0] == url("change", effect)
    effect.refresh_from_db()
    assert effect.status == EffectStatus.READY
    last = effect.transitions.order_by("at", "id").last()
    assert (last.from_status, last.to_status) == ("requires_approval", "ready")
    assert last.actor_label == "admin"
    assert last.actor_user_id == approver_user.pk
    assert last.actor_name == "alice"
    ready = EffectStatus.READY.label
    assert any("Approved" in text and str(ready) in text for text in texts(response))
    assert LogEntry.objects.filter(object_id=str(effect.pk), user=approver_user).exists()


def test_approve_with_an_optional_comment(approver: Client) -> None:
    effect = make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    approver.post(url("approve", effect), {"reason": "checked the diff"})
    last = effect.transitions.order_by("at", "id").last()
    assert (last.to_status, last.reason) == ("ready", "checked the diff")


def test_deny_with_a_reason(approver: Client) -> None:
    effect = make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    response = approver.post(url("deny", effect), {"reason": "  not on a Friday  "}, follow=True)
    effect.refresh_from_db()
    assert effect.status == EffectStatus.DENIED
    assert effect.error == {"message": "not on a Friday", "code": "denied"}
    last = effect.transitions.order_by("at", "id").last()
    assert (last.to_status, last.reason, last.actor_name) == ("denied", "not on a Friday", "alice")
    assert any("Denied" in text for text in texts(response))


def test_deny_without_a_reason_changes_nothing(approver: Client) -> None:
    effect = make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    response = approver.post(url("deny", effect), {"reason": "   "}, follow=True)
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL
    assert any("Give a reason" in text for text in texts(response))


def test_deny_with_a_reason_too_long_changes_nothing(approver: Client) -> None:
    effect = make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    response = approver.post(url("deny", effect), {"reason": "x" * 2001}, follow=True)
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL
    assert any("reason" in text and "2000" in text for text in texts(response))


def test_already_decided_by_someone_faster(approver: Client) -> None:
    effect = make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    services.deny(effect.idem_key, actor=Actor("api", name="bob"), reason="no")
    decided_at = effect.transitions.get(to_status="denied").at
    response = approver.post(url("approve", effect), follow=True)
    effect.refresh_from_db()
    assert effect.status == EffectStatus.DENIED
    (text,) = [t for t in texts(response) if "Already decided" in t]
    # Who, what, when (to the second, with the zone) and why.
    assert "api: bob denied k8s.deploy" in text
    assert decided_at.strftime("%Y-%m-%d %H:%M:%S UTC") in text
    assert "(no)" in text
    assert effect.transitions.count() == 2  # the first row and bob's; nothing from alice


@pytest.mark.parametrize("decision", ["approve", "deny"])
def test_get_changes_nothing(approver: Client, decision: str) -> None:
    effect = make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    response = approver.get(url(decision, effect), {"reason": "x"})
    assert response.status_code == 405
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL


@pytest.mark.parametrize("decision", ["approve", "deny"])
def test_post_without_permission_is_forbidden(viewer: Client, decision: str) -> None:
    effect = make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    response = viewer.post(url(decision, effect), {"reason": "x"})
    assert response.status_code == 403
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL


def test_staff_flag_alone_is_not_enough() -> None:
    effect = make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    client = client_for(make_user("staff-only"))
    assert client.post(url("approve", effect)).status_code == 403
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL


def test_post_without_csrf_token_is_refused(approver_user: Any) -> None:
    effect = make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    client = client_for(approver_user, enforce_csrf_checks=True)
    assert client.post(url("approve", effect)).status_code == 403
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL


def test_anonymous_post_goes_to_login() -> None:
    effect = make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    response = Client().post(url("approve", effect))
    assert response.status_code == 302
    assert reverse("admin:login") in response["Location"]
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL


@pytest.mark.parametrize("pk", ["00000000-0000-0000-0000-000000000000", "not-a-uuid"])
def test_unknown_effect_is_404(approver: Client, pk: str) -> None:
    assert approver.post(url("approve", pk)).status_code == 404


# -- bulk actions ----------------------------------------------------------------------------


def run_action(client: Client, action: str, effects: list[Effect], **data: Any) -> Any:
    return client.post(
        reverse(CHANGELIST),
        {"action": action, "_selected_action": [str(e.pk) for e in effects], **data},
        follow=True,
    )


def test_bulk_approve_confirms_first_listing_each_effect(approver: Client) -> None:
    pending = [
        make_effect(tool="stripe.refund", args={"charge": "ch_1", "amount": 4999}),
        make_effect(tool="k8s.deploy", args={"image": "app:v2.4.0"}),
    ]
    done = make_effect(status=EffectStatus.SUCCEEDED)
    page = run_action(approver, "approve_selected", [*pending, done])
    html = page.content.decode()
    assert page.status_code == 200
    assert 'value="approve_selected"' in html and 'name="post" value="yes"' in html
    for text in ("stripe.refund", "ch_1", "4999", "k8s.deploy", "app:v2.4.0"):
        assert text in html
    assert {e.status for e in Effect.objects.all()} == {"requires_approval", "succeeded"}

    response = run_action(approver, "approve_selected", [*pending, done], post="yes", reason="")
    assert {e.status for e in Effect.objects.filter(pk__in=[p.pk for p in pending])} == {"ready"}
    done.refresh_from_db()
    assert done.status == EffectStatus.SUCCEEDED
    messages = texts(response)
    assert "Approved 2 effects." in messages
    assert any("Not awaiting approval" in text and "nobody decided" in text for text in messages)


def test_bulk_deny_asks_for_a_reason(approver: Client) -> None:
    pending = [make_effect(status=EffectStatus.REQUIRES_APPROVAL) for _ in range(2)]
    page = run_action(approver, "deny_selected", pending)
    assert page.status_code == 200
    assert 'name="reason"' in page.content.decode()
    assert {e.status for e in Effect.objects.all()} == {"requires_approval"}

    again = run_action(approver, "deny_selected", pending, post="yes", reason="")
    assert "Give a reason" in again.content.decode()
    assert {e.status for e in Effect.objects.all()} == {"requires_approval"}

    response = run_action(approver, "deny_selected", pending, post="yes", reason="too risky")
    assert {e.status for e in Effect.objects.all()} == {"denied"}
    assert "Denied 2 effects." in texts(response)
    assert set(Effect.objects.values_list("transitions__reason", flat=True)) == {
        None,
        "too risky",
    }


def test_bulk_actions_need_the_permission(viewer: Client) -> None:
    effect = make_effect(status=EffectStatus.REQUIRES_APPROVAL)
    html = viewer.get(reverse(CHANGELIST)).content.decode()
    assert "approve_selected" not in html and "deny_selected" not in html
    for action in ("approve_selected", "deny_selected"):
        run_action(viewer, action, [effect], post="yes", reason="x")
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL


def test_approver_sees_the_bulk_actions(approver: Client) -> None:
    make_effect()
    html = approver.get(reverse(CHANGELIST)).content.decode()
    assert 'value="approve_selected"' in html and 'value="deny_selected"' in html


# -- hostile input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"args_canonical__contains": "secret"},
        {"result__isnull": "False"},
        {"idem_key__startswith": "a"},
        {"transitions__reason__contains": "x"},
    ],
)
def test_filtering_by_any_other_field_lookup_is_400(viewer: Client, params: dict[str, str]) -> None:
    make_effect(args={"token": "secret"})
    assert viewer.get(reverse(CHANGELIST), params).status_code == 400


def test_the_declared_filters_still_work(viewer: Client) -> None:
    make_effect()
    now = timezone.now()
    for params in (
        {"status": "requires_approval", "tool": "k8s.deploy"},
        {"created_at__year": now.year, "created_at__month": now.month},
        {
            "created_at__gte": (now - timedelta(days=1)).isoformat(),
            "created_at__lt": (now + timedelta(days=1)).isoformat(),
        },
    ):
        response = viewer.get(reverse(CHANGELIST), params)
        assert response.status_code == 200, params
        assert len(response.context["cl"].result_list) == 1, params


@pytest.mark.parametrize("params", [{"tool": "\x00"}, {"q": "a\x00b"}, {"status": "\x00"}])
def test_a_nul_byte_in_a_filter_is_400(viewer: Client, params: dict[str, str]) -> None:
    make_effect()
    assert viewer.get(reverse(CHANGELIST), params).status_code == 400


def test_a_nul_byte_in_a_deny_reason_is_400(approver: Client) -> None:
    effect = make_effect()
    assert approver.post(url("deny", effect), {"reason": "no\x00way"}).status_code == 400
    response = approver.post(
        reverse(CHANGELIST),
        {
            "action": "deny_selected",
            "_selected_action": [str(effect.pk)],
            "post": "yes",
            "reason": "no\x00way",
        },
    )
    assert response.status_code == 400
    effect.refresh_from_db()
    assert effect.status == EffectStatus.REQUIRES_APPROVAL
    assert effect.transitions.count() == 1


def test_the_service_refuses_a_nul_in_a_reason() -> None:
    effect = make_effect()
    with pytest.raises(EffectLedgerValidationError, match="NUL"):
        services.deny(effect.idem_key, actor=Actor("cli"), reason="a\x00b")


# -- the desk ----------------------------------------------------------------------------------


def test_a_pending_page_leads_with_the_decision(approver: Client) -> None:
    effect = make_effect(
        tool="stripe.refund",
        workflow_id="order-7731",
        args={"charge": "ch_3PqR7731", "note": "line one\nline two"},
        created_at=timezone.now() - timedelta(minutes=5),
    )
    html = approver.get(url("change", effect)).content.decode()
    panel = html.index('id="agent-ledger-decision"')
    # What is asked, who asked and for how long, then the buttons; keys and fence below.
    order = [
        'class="agent-ledger-tool">stripe.refund',
        'class="agent-ledger-workflow">order-7731',
        "Requested by system",
        "waiting 5 min",
        "<dt>charge</dt>",
        '<pre class="agent-ledger-text">line one\nline two</pre>',
        'id="agent-ledger-approve-comment"',
        'id="agent-ledger-deny-reason"',
        "field-idem_key",
        "field-call_id",
        "field-fence",
    ]
    positions = [html.index(text, panel) for text in order]
    assert positions == sorted(positions)
    assert "line one\\nline two" not in html  # never \n-escaped JSON


def test_the_pending_queue_is_oldest_first_with_summary_and_wait(viewer: Client) -> None:
    now = timezone.now()
    newer = make_effect(args={"image": "app:v2"}, created_at=now - timedelta(minutes=2))
    older = make_effect(args={"charge": "ch_1"}, created_at=now - timedelta(hours=3))
    make_effect(status=EffectStatus.SUCCEEDED)
    response = viewer.get(reverse(CHANGELIST), {"status": "requires_approval"})
    assert [e.pk for e in response.context["cl"].result_list] == [older.pk, newer.pk]
    html = response.content.decode()
    assert "Waiting for" in html
    assert "charge=ch_1" in html and "image=app:v2" in html
    assert "3 h 0 min" in html and "2 min" in html


def test_timestamps_have_seconds_and_the_time_zone(viewer: Client) -> None:
    when = timezone.now().replace(year=2024, month=3, day=15, hour=9, minute=4, second=7)
    effect = make_effect(status=EffectStatus.SUCCEEDED, created_at=when)
    assert "2024-03-15 09:04:07 UTC" in viewer.get(reverse(CHANGELIST)).content.decode()
    assert "2024-03-15 09:04:07 UTC" in viewer.get(url("change", effect)).content.decode()


def test_duration_is_the_run_apart_from_the_wait_for_a_human(viewer: Client) -> None:
    start = timezone.now() - timedelta(hours=2)
    effect = make_effect(created_at=start, completed_at=start + timedelta(minutes=30, seconds=2))
    effect.transitions.update(at=start)
    for minutes, (before, after) in (
        (20, ("requires_approval", "ready")),
        (30, ("ready", "processing")),
    ):
        effect.transitions.create(
            from_status=before, to_status=after, at=start + timedelta(minutes=minutes)
        )
    effect.transitions.create(
        from_status="processing", to_status="succeeded", at=start + timedelta(minutes=30, seconds=2)
    )
    Effect.objects.filter(pk=effect.pk).update(status=EffectStatus.SUCCEEDED)
    html = viewer.get(url("change", effect)).content.decode()
    assert '<div class="readonly">2.0 s</div>' in html  # claim to commit: the tool's own run
    assert '<div class="readonly">20 min 0 s</div>' in html  # waiting for a human
    row = viewer.get(reverse(CHANGELIST)).content.decode()
    assert "2.0 s" in row and "20 min 0 s" in row


def test_the_admin_log_records_the_decision_and_the_state_after(approver: Client) -> None:
    effect = make_effect(tool="stripe.refund", workflow_id="order-7731")
    approver.post(url("deny", effect), {"reason": "needs a second look"})
    entry = LogEntry.objects.get(object_id=str(effect.pk))
    assert entry.get_change_message() == "Denied: needs a second look"
    assert entry.object_repr == "stripe.refund in order-7731 (denied)"
    history = approver.get(url("history", effect)).content.decode()
    assert "Denied: needs a second look" in history and "Denyd" not in history
    other = make_effect()
    approver.post(url("approve", other))
    assert LogEntry.objects.get(object_id=str(other.pk)).get_change_message() == "Approved"
    assert (
        f"({EffectStatus.READY.label})" in LogEntry.objects.get(object_id=str(other.pk)).object_repr
    )


def test_an_approved_effect_says_what_happens_next(approver: Client) -> None:
    effect = make_effect()
    approver.post(url("approve", effect))
    html = approver.get(url("change", effect)).content.decode()
    assert "approved, runs when the agent calls again" in html
    assert 'id="agent-ledger-next"' in html and "Approved by admin: alice" in html
    Effect.objects.filter(pk=effect.pk).update(status=EffectStatus.PROCESSING)  # claimed
    html = approver.get(url("change", effect)).content.decode()
    assert 'id="agent-ledger-next"' not in html
    assert '<span class="agent-ledger-badge agent-ledger-badge--processing">running</span>' in html


def test_one_label_per_status_in_list_title_badge_and_history(viewer: Client) -> None:
    for status in EffectStatus:
        effect = make_effect(status=status, tool=f"t.{status.value}")
        label = str(status.label)
        page = viewer.get(url("change", effect)).content.decode()
        assert f"<title>t.{status.value} in wf-1 ({label})" in page
        badge = f'agent-ledger-badge--{status.value}">{label}</span>'
        assert badge in page
        assert re.search(rf'<td class="field-to_status">\s*<p>{re.escape(label)}</p>', page)
        listing = viewer.get(reverse(CHANGELIST), {"status": status.value}).content.decode()
        assert badge in listing


def test_an_effect_keyed_by_a_resource_shows_it(viewer: Client) -> None:
    effect = make_effect(resource_id_canonical='billing/invoice/{"number":42}')
    html = viewer.get(url("change", effect)).content.decode()
    assert "&quot;namespace&quot;: &quot;billing&quot;" in html
    assert "&quot;number&quot;: 42" in html
