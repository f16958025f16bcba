"""Every rule of a tool's policy on every surface: API, admin, webhook, signed link, Slack.

Each refusal is a 4xx (the admin: an error message) with nothing changed.
"""

from __future__ import annotations

from typing import Any

import pytest

from agent_ledger import services
from agent_ledger.errors import DecisionRefusedError
from agent_ledger.models import Effect, EffectStatus, EffectTransition
from agent_ledger.types import Actor
from tests.approval_rows import approver, expire_now, pending
from tests.ledger_rows import make_user
from tests.surfaces import SURFACES, decide_via, settings_with

pytestmark = pytest.mark.django_db

RA = EffectStatus.REQUIRES_APPROVAL


def rows(effect: Effect) -> int:
    return EffectTransition.objects.filter(effect=effect).count()


def status(effect: Effect) -> str:
    return Effect.objects.get(pk=effect.pk).status


# -- four eyes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("surface", SURFACES)
def test_nobody_approves_their_own_request(surface: str) -> None:
    alice = approver("alice")
    effect = pending(requester=alice)
    if surface == "webhook":  # no user there: the same label and name is the same requester
        EffectTransition.objects.filter(effect=effect).update(
            actor_label="webhook:primary", actor_user_id=None, actor_name="alice"
        )
    with settings_with():
        assert decide_via(surface, effect, alice) == 403
    assert status(effect) == RA and rows(effect) == 1


def test_superusers_too() -> None:
    root = make_user("root", is_superuser=True)
    effect = pending(requester=root)
    with settings_with(), pytest.raises(DecisionRefusedError) as refused:
        services.approve(effect.idem_key, actor=Actor("admin", root.pk, "root"))
    assert refused.value.code == "self_approval"


@pytest.mark.parametrize("surface", ["api", "link", "slack"])
def test_self_approval_where_the_policy_allows_it(surface: str) -> None:
    alice = approver("alice")
    effect = pending(requester=alice)
    with settings_with({"stripe.*": {"allow_self_approval": True}}):
        assert decide_via(surface, effect, alice) == 200
    assert status(effect) == EffectStatus.READY


@pytest.mark.parametrize("surface", SURFACES)
def test_the_requester_may_deny_and_another_may_approve(surface: str) -> None:
    alice, bob = approver("alice"), approver("bob")
    first, second = pending(requester=alice), pending(requester=alice)
    with settings_with():
        assert decide_via(surface, first, bob) == 200
        assert decide_via(surface, second, alice, "deny") == 200
    assert status(first) == EffectStatus.READY
    assert status(second) == EffectStatus.DENIED


# -- who may decide --------------------------------------------------------------------------------


@pytest.mark.parametrize("surface", SURFACES)
def test_only_the_policy_group_decides(surface: str) -> None:
    outsider, member = approver("bob"), approver("fiona", "Finance")
    effect = pending()
    with settings_with({"stripe.*": {"group": "Finance"}}):
        assert decide_via(surface, effect, outsider) == 403
        assert status(effect) == RA and rows(effect) == 1
        if surface != "webhook":  # a webhook names no user: a group policy refuses it always
            assert decide_via(surface, effect, member) == 200
            assert status(effect) == EffectStatus.READY


@pytest.mark.parametrize("surface", ["api", "admin", "link", "slack"])
def test_only_holders_of_the_policy_permission_decide(surface: str) -> None:
    bob = approver("bob")
    boss = make_user(
        "boss",
        "agent_ledger.view_effect",
        "agent_ledger.approve_effect",
        "agent_ledger.change_effect",
    )
    effect = pending()
    with settings_with({"stripe.*": {"permission": "agent_ledger.change_effect"}}):
        assert decide_via(surface, effect, bob, "deny") == 403
        assert status(effect) == RA
        assert decide_via(surface, effect, boss, "deny") == 200
    assert status(effect) == EffectStatus.DENIED


@pytest.mark.parametrize("surface", ["link", "slack"])
def test_users_without_approve_effect_decide_nothing(surface: str) -> None:
    viewer = make_user("viewer", "agent_ledger.view_effect")
    effect = pending()
    with settings_with():
        assert decide_via(surface, effect, viewer) == 403
    assert status(effect) == RA and rows(effect) == 1


# -- expiry ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("surface", SURFACES)
def test_nobody_approves_an_expired_request_even_before_the_sweep(surface: str) -> None:
    bob = approver("bob")
    effect = pending()
    expire_now(effect)
    with settings_with():
        assert decide_via(surface, effect, bob) in (409, 403)
    fresh = Effect.objects.get(pk=effect.pk)
    assert fresh.status == EffectStatus.DENIED
    assert fresh.error == {"message": fresh.error["message"], "code": "expired"}
    last = EffectTransition.objects.filter(effect=effect).order_by("id").last()
    assert (last.actor_label, last.to_status, last.reason) == (
        "system",
        "denied",
        "approval expired",
    )


# -- quorum --------------------------------------------------------------------------------------


@pytest.mark.parametrize("surface", SURFACES)
def test_quorum_needs_distinct_approvers(surface: str) -> None:
    alice, bob = approver("alice"), approver("bob")
    effect = pending()
    with settings_with({"stripe.*": {"quorum": 2}}):
        assert decide_via(surface, effect, alice) == 200
        assert status(effect) == RA and rows(effect) == 2
        assert decide_via(surface, effect, alice) == (409 if surface != "admin" else 403)
        assert rows(effect) == 2
        assert decide_via(surface, effect, bob) == 200
    assert status(effect) == EffectStatus.READY
    history = list(EffectTransition.objects.filter(effect=effect).order_by("id"))
    assert [(r.from_status, r.to_status) for r in history[1:]] == [(RA, RA), (RA, "ready")]
    assert history[1].reason.startswith("approval 1 of 2")
    assert history[2].reason.startswith("approval 2 of 2")


def test_one_deny_ends_a_quorum() -> None:
    alice, bob = approver("alice"), approver("bob")
    effect = pending()
    with settings_with({"stripe.*": {"quorum": 3}}):
        record = services.approve(effect.idem_key, actor=Actor("api", alice.pk, "alice"))
        assert (record.changed, record.approvals, record.quorum) == (True, 1, 3)
        services.deny(effect.idem_key, actor=Actor("api", bob.pk, "bob"), reason="no")
    assert status(effect) == EffectStatus.DENIED


def test_api_reports_quorum_progress() -> None:
    from tests.surfaces import logged_in

    alice = approver("alice")
    effect = pending()
    with settings_with({"stripe.*": {"quorum": 2}}):
        response = logged_in(alice).post(
            f"/api/ledger/effects/{effect.pk}/approve/", {}, content_type="application/json"
        )
    assert response.json()["approvals"] == {"given": 1, "needed": 2}
    assert response.json()["status"] == RA


def test_admin_page_explains_the_policy() -> None:
    from tests.surfaces import logged_in

    alice, bob = approver("alice", "Finance"), approver("bob", "Finance")
    effect = pending()
    with settings_with({"stripe.*": {"quorum": 2, "group": "Finance", "expires_after": 10800}}):
        Effect.objects.filter(pk=effect.pk).update(
            expires_at=effect.created_at.replace(microsecond=0)
            + __import__("datetime").timedelta(hours=3, minutes=1)
        )
        services.approve(effect.idem_key, actor=Actor("admin", alice.pk, "alice"))
        html = logged_in(bob).get(f"/admin/agent_ledger/effect/{effect.pk}/change/").content
    text = html.decode()
    assert "needs 2 of group Finance (1 of 2 so far); not the requester; expires in 3 h" in text
    assert "1 of 2 approvals: admin: alice" in text


# -- edit on approve -------------------------------------------------------------------------------


def test_edit_needs_allow_edit_api() -> None:
    from tests.surfaces import logged_in

    bob = approver("bob")
    effect = pending(args={"amount": 4500})
    with settings_with():
        response = logged_in(bob).post(
            f"/api/ledger/effects/{effect.pk}/approve/",
            {"args": {"amount": 450}},
            content_type="application/json",
        )
    assert (response.status_code, response.json()["code"]) == (403, "edit_not_allowed")
    assert status(effect) == RA and Effect.objects.count() == 1


def test_edit_on_approve_supersedes_and_approves_a_linked_effect_api() -> None:
    from tests.surfaces import logged_in

    bob = approver("bob")
    effect = pending(args={"amount": 4500, "order": 7})
    with settings_with({"stripe.*": {"allow_edit": True}}):
        response = logged_in(bob).post(
            f"/api/ledger/effects/{effect.pk}/approve/",
            {"args": {"amount": 450, "order": 7}, "reason": "too much"},
            content_type="application/json",
        )
        assert response.status_code == 200, response.content
        new = Effect.objects.get(pk=response.json()["edited_effect_id"])
        old = Effect.objects.get(pk=effect.pk)
        assert old.status == EffectStatus.CANCELED and old.error["code"] == "superseded"
        assert old.superseded_by == new.pk
        assert new.status == EffectStatus.READY and new.args == {"amount": 450, "order": 7}
        old_last = old.transitions.order_by("id").last()
        assert "amount: 4500 -> 450" in old_last.reason and old_last.actor_name == "bob"
        new_rows = list(new.transitions.order_by("id"))
        assert "amount: 4500 -> 450" in new_rows[0].reason
        assert (new_rows[1].to_status, new_rows[1].actor_name) == ("ready", "bob")
        page = logged_in(bob).get(f"/admin/agent_ledger/effect/{new.pk}/change/").content.decode()
        assert "amount: 4500 -&gt; 450" in page or "amount: 4500 -> 450" in page


def test_edit_refused_with_a_quorum_and_on_conflict() -> None:
    bob = approver("bob")
    effect = pending(args={"amount": 4500})
    other = pending(args={"amount": 1})
    bob_api = Actor("api", bob.pk, "bob")
    with (
        settings_with({"stripe.*": {"allow_edit": True, "quorum": 2}}),
        pytest.raises(DecisionRefusedError, match="one approval"),
    ):
        services.approve(effect.idem_key, actor=bob_api, args={"amount": 2})
    from agent_ledger import ToolCall, keys

    key = keys.idem_key(ToolCall(workflow_id="wf-1", tool="stripe.refund", args={"amount": 1}))
    Effect.objects.filter(pk=other.pk).update(idem_key=key)
    with (
        settings_with({"stripe.*": {"allow_edit": True}}),
        pytest.raises(DecisionRefusedError, match="exists already"),
    ):
        services.approve(effect.idem_key, actor=bob_api, args={"amount": 1})
    assert status(effect) == RA and Effect.objects.count() == 2


def test_admin_edit_box_approves_edited_arguments() -> None:
    from tests.surfaces import logged_in

    bob = approver("bob")
    effect = pending(args={"amount": 4500})
    with settings_with({"stripe.*": {"allow_edit": True}}):
        page = logged_in(bob).get(f"/admin/agent_ledger/effect/{effect.pk}/change/")
        assert 'name="args"' in page.content.decode()
        logged_in(bob).post(
            f"/admin/agent_ledger/effect/{effect.pk}/approve/", {"args": '{"amount": 99}'}
        )
    assert Effect.objects.get(pk=effect.pk).status == EffectStatus.CANCELED
    assert Effect.objects.get(args_canonical='{"amount":99}').status == EffectStatus.READY


def test_admin_bulk_approve_applies_four_eyes() -> None:
    from tests.surfaces import logged_in

    alice = approver("alice")
    mine, theirs = pending(requester=alice), pending()
    with settings_with():
        response = logged_in(alice).post(
            "/admin/agent_ledger/effect/",
            {"action": "approve_selected", "_selected_action": [mine.pk, theirs.pk], "post": "yes"},
            follow=True,
        )
    texts = [str(m) for m in response.context["messages"]]
    assert any("four eyes" in t for t in texts)
    assert status(mine) == RA and status(theirs) == EffectStatus.READY


def test_requested_by_context_records_the_user(django_user_model: Any) -> None:
    from agent_ledger import ToolCall, requested_by
    from agent_ledger.ledger import EffectLedger
    from agent_ledger.stores.base import NewEffect

    alice = approver("alice")
    ledger = EffectLedger(services.get_ledger()._options)
    with requested_by(alice):
        new: NewEffect = ledger._prepare(ToolCall(workflow_id="w", tool="t.x", args={}))
    assert (new.actor.label, new.actor.user_id, new.actor.name) == ("user", alice.pk, "alice")
    assert ledger._prepare(ToolCall(workflow_id="w", tool="t.x", args={})).actor.label == "system"
