"""The admin: a read-only audit browser and the approval dashboard (Django test client)."""

from __future__ import annotations

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
    assert '<pre class="agent-ledger-json">{\n  &quot;channel&quot;: &quot;#ops&quot;' in html
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


def test_deleting_needs_its_own_permission(viewer: Client) -> None:
    effect = make_effect()
    assert viewer.post(url("delete", effect), {"post": "yes"}).status_code == 403
    assert Effect.objects.filter(pk=effect.pk).exists()
    deleter = client_for(make_user("deleter", VIEW, DELETE))
    response = deleter.post(url("delete", effect), {"post": "yes"})
    assert response.status_code == 302
    assert not Effect.objects.filter(pk=effect.pk).exists()


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
    assert any("Approved" in text and "ready" in text for text in texts(response))
    assert LogEntry.objects.filter(object_id=str(effect.pk), user=approver_user).exists()


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
    response = approver.post(url("approve", effect), follow=True)
    effect.refresh_from_db()
    assert effect.status == EffectStatus.DENIED
    assert any("Already decided" in text and "denied" in text for text in texts(response))
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


def test_bulk_approve(approver: Client) -> None:
    pending = [make_effect(status=EffectStatus.REQUIRES_APPROVAL) for _ in range(2)]
    done = make_effect(status=EffectStatus.SUCCEEDED)
    response = run_action(approver, "approve_selected", [*pending, done])
    assert {e.status for e in Effect.objects.filter(pk__in=[p.pk for p in pending])} == {"ready"}
    done.refresh_from_db()
    assert done.status == EffectStatus.SUCCEEDED
    messages = texts(response)
    assert "Approved 2 effects." in messages
    assert any("1 effect was not awaiting approval" in text for text in messages)


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
