"""Signed one-click links: GET shows, POST decides; refused once used, expired, tampered, for
another effect's arguments, without a login or the right to decide."""

from __future__ import annotations

import time
from unittest import mock

import pytest
from django.core import signing

from agent_ledger.links import approval_link
from agent_ledger.models import Effect, EffectStatus, EffectTransition
from tests.approval_rows import approver, pending
from tests.ledger_rows import make_user
from tests.surfaces import logged_in, settings_with

pytestmark = pytest.mark.django_db
RA = EffectStatus.REQUIRES_APPROVAL


def unchanged(effect: Effect) -> bool:
    return (
        Effect.objects.get(pk=effect.pk).status == RA
        and EffectTransition.objects.filter(effect=effect).count() == 1
    )


def test_get_shows_and_never_decides() -> None:
    bob = approver("bob")
    effect = pending(args={"amount": 4500})
    response = logged_in(bob).get(approval_link(effect))
    assert response.status_code == 200
    assert "4500" in response.content.decode() and 'value="approve"' in response.content.decode()
    assert unchanged(effect)


def test_post_approves_once_and_the_history_names_the_link() -> None:
    bob = approver("bob")
    effect = pending()
    link = approval_link(effect)
    with settings_with():
        assert logged_in(bob).post(link, {"decision": "approve"}).status_code == 200
    last = EffectTransition.objects.filter(effect=effect).order_by("id").last()
    assert last.actor_label.startswith("link:") and last.actor_user_id == bob.pk


def test_a_used_link_is_refused() -> None:
    alice, bob = approver("alice"), approver("bob")
    effect = pending()
    link = approval_link(effect)
    with settings_with({"stripe.*": {"quorum": 2}}):
        assert logged_in(alice).post(link, {"decision": "approve"}).status_code == 200
        response = logged_in(bob).post(link, {"decision": "approve"})
    assert response.status_code == 409 and "used already" in response.content.decode()
    assert Effect.objects.get(pk=effect.pk).status == RA
    assert EffectTransition.objects.filter(effect=effect).count() == 2


def test_an_expired_link_is_refused() -> None:
    bob = approver("bob")
    effect = pending()
    link = approval_link(effect, expires_in=60)
    with mock.patch("agent_ledger.links.time.time", return_value=time.time() + 61):
        response = logged_in(bob).post(link, {"decision": "approve"})
    assert response.status_code == 410 and unchanged(effect)


def test_a_tampered_link_is_refused() -> None:
    bob = approver("bob")
    effect = pending()
    link = approval_link(effect)
    token = link.rstrip("/").rsplit("/", 1)[1]
    forged = link.replace(token, token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB"))
    assert logged_in(bob).post(forged, {"decision": "approve"}).status_code == 400
    assert unchanged(effect)


def test_a_link_for_other_arguments_is_refused() -> None:
    bob = approver("bob")
    effect = pending(args={"amount": 4500})
    claims = {"e": str(effect.pk), "h": "0" * 32, "x": int(time.time()) + 60, "n": "ab"}
    token = signing.dumps(claims, salt="agent_ledger.approval_link", compress=True)
    response = logged_in(bob).post(f"/ledger/approve/{token}/", {"decision": "approve"})
    assert response.status_code == 409 and unchanged(effect)


def test_anonymous_users_are_sent_to_log_in() -> None:
    from django.test import Client

    effect = pending()
    response = Client().post(approval_link(effect), {"decision": "approve"})
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert unchanged(effect)


def test_viewers_without_approve_effect_are_refused() -> None:
    viewer = make_user("viewer", "agent_ledger.view_effect")
    effect = pending()
    assert logged_in(viewer).post(approval_link(effect), {"decision": "approve"}).status_code == 403
    assert unchanged(effect)


def test_an_unknown_decision_is_a_400() -> None:
    bob = approver("bob")
    effect = pending()
    assert logged_in(bob).post(approval_link(effect), {"decision": "maybe"}).status_code == 400
    assert unchanged(effect)
