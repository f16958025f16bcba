"""The Slack interactivity endpoint: signed requests only, users mapped, message replaced."""

from __future__ import annotations

import json
import time

import pytest
from django.test import override_settings

from agent_ledger import slack
from agent_ledger.models import Effect, EffectStatus, EffectTransition
from tests.approval_rows import approver, pending
from tests.surfaces import SLACK_SECRET, settings_with, slack_body, slack_post, slack_signature

pytestmark = pytest.mark.django_db
RA = EffectStatus.REQUIRES_APPROVAL


def unchanged(effect: Effect) -> bool:
    return (
        Effect.objects.get(pk=effect.pk).status == RA
        and EffectTransition.objects.filter(effect=effect).count() == 1
    )


def test_approve_button_records_the_team_and_user_and_replaces_the_message() -> None:
    bob = approver("bob")
    effect = pending()
    with settings_with():
        response = slack_post(effect, "bob")
    assert response.status_code == 200
    body = response.json()
    assert body["replace_original"] is True and "approved by bob" in body["text"]
    assert "actions" not in json.dumps(body["blocks"])
    last = EffectTransition.objects.filter(effect=effect).order_by("id").last()
    assert (last.actor_label, last.actor_user_id, last.to_status) == (
        "slack:T0001",
        bob.pk,
        "ready",
    )


def test_deny_button() -> None:
    approver("bob")
    effect = pending()
    with settings_with():
        response = slack_post(effect, "bob", "deny")
    assert response.status_code == 200 and "denied by bob" in response.json()["text"]
    row = Effect.objects.get(pk=effect.pk)
    assert row.status == EffectStatus.DENIED and "Slack" in row.error["message"]


def test_quorum_keeps_the_buttons() -> None:
    approver("bob")
    effect = pending()
    with settings_with({"stripe.*": {"quorum": 2}}):
        body = slack_post(effect, "bob").json()
    assert "approval 1 of 2" in json.dumps(body) and slack.APPROVE in json.dumps(body)


@pytest.mark.parametrize(
    ("stamp", "signature", "code"),
    [
        (None, "v0=" + "0" * 64, 401),  # forged
        (str(int(time.time()) - 3600), None, 401),  # stale (signed correctly, an hour old)
        ("", "", 401),  # missing
        ("soon", None, 401),  # not a timestamp
    ],
)
def test_forged_stale_or_missing_signatures_are_refused(
    stamp: str | None, signature: str | None, code: int
) -> None:
    approver("bob")
    effect = pending()
    with settings_with():
        body = slack_body(effect, "bob")
        sig = signature
        if sig is None and stamp is not None and stamp.isdigit():
            sig = slack_signature(body, stamp)
        assert (
            slack_post(effect, "bob", stamp=stamp, signature=sig or "", body=body).status_code
            == code
        )
    assert unchanged(effect)


def test_signed_with_another_secret_is_refused() -> None:
    approver("bob")
    effect = pending()
    body = slack_body(effect, "bob")
    stamp = str(int(time.time()))
    with settings_with():
        other = slack_signature(body, stamp, secret="another-secret-0123456789")
        assert slack_post(effect, "bob", stamp=stamp, signature=other, body=body).status_code == 401
    assert unchanged(effect)


def test_without_a_signing_secret_the_endpoint_is_closed() -> None:
    effect = pending()
    with override_settings(AGENT_LEDGER={"SLACK_SIGNING_SECRET": ""}):
        assert slack_post(effect, "bob").status_code == 503
    assert unchanged(effect)


def test_unknown_slack_users_are_refused() -> None:
    effect = pending()
    with settings_with():
        assert slack_post(effect, "nobody-here").status_code == 403
    assert unchanged(effect)


def test_bad_payloads_are_400s() -> None:
    effect = pending()
    with settings_with():
        assert slack_post(effect, "bob", body=b"payload=%7B%7D").status_code == 400
        assert slack_post(effect, "bob", body=b"payload=not-json").status_code == 400
        assert slack_post("not-a-uuid", "bob").status_code == 404
    assert unchanged(effect)


def test_approval_message_has_two_buttons_and_the_policy() -> None:
    effect = pending(args={"amount": 4500})
    with settings_with({"stripe.*": {"quorum": 2, "group": "Finance"}}):
        message = slack.approval_message(effect)
    actions = next(b for b in message["blocks"] if b["type"] == "actions")
    assert [e["action_id"] for e in actions["elements"]] == [slack.APPROVE, slack.DENY]
    assert {e["value"] for e in actions["elements"]} == {str(effect.pk)}
    assert "needs 2 of group Finance" in json.dumps(message)


def test_secret_is_long_enough() -> None:
    assert len(SLACK_SECRET) >= 16
