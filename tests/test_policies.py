"""``AGENT_LEDGER["TOOLS"]``: matching, precedence, checks E030-E038, the explanation line."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from agent_ledger import EffectLedger, EffectLedgerOptions, MemoryStore, RunOptions, ToolCall
from agent_ledger.checks import check_approval_settings
from agent_ledger.policies import approval_policy, expires_after, explain, policy_for


def big_refund(args: Any) -> bool:
    return args.get("amount", 0) > 1000


def not_bool(args: Any) -> Any:
    return "yes"


NOT_CALLABLE = 3


def with_tools(table: dict[str, Any], **more: Any) -> Any:
    return override_settings(AGENT_LEDGER={"TOOLS": table, **more})


def test_most_specific_pattern_wins() -> None:
    table = {
        "*": {"quorum": 1},
        "stripe.*": {"quorum": 2},
        "stripe.refund.*": {"quorum": 3},
        "stripe.refund": {"quorum": 4},
    }
    with with_tools(table):
        assert policy_for("stripe.refund").quorum == 4  # exact beats every pattern
        assert policy_for("stripe.refund.partial").quorum == 3  # more literal characters
        assert policy_for("stripe.charge").quorum == 2
        assert policy_for("github.merge").quorum == 1
    with with_tools({"stripe.*": {"quorum": 2}}):
        assert policy_for("github.merge").quorum == 1  # no match: the defaults
        assert policy_for("github.merge").pattern is None


def test_tie_goes_to_the_pattern_declared_first() -> None:
    with with_tools({"stripe.?efund": {"quorum": 2}, "stripe.r?fund": {"quorum": 3}}):
        assert policy_for("stripe.refund").quorum == 2


def test_precedence_call_then_tools_then_approval_policy_then_defaults() -> None:
    """A call's explicit requires_approval > TOOLS > the ledger's approval_policy > defaults."""
    calls = {
        "refund_big": ToolCall(workflow_id="w", tool="stripe.refund", args={"amount": 4500}),
        "refund_small": ToolCall(workflow_id="w", tool="stripe.refund", args={"amount": 25}),
        "other": ToolCall(workflow_id="w", tool="mail.send", args={}),
    }
    table = {"stripe.refund": {"requires_approval": "tests.test_policies.big_refund"}}
    with with_tools(table):
        policy = approval_policy(fallback=lambda call: call.tool == "mail.send")
        assert policy(calls["refund_big"]) is True
        assert policy(calls["refund_small"]) is False  # TOOLS said no: the fallback is not asked
        assert policy(calls["other"]) is True  # TOOLS has no say: the fallback decides
        assert approval_policy()(calls["other"]) is None  # nobody says: the defaults decide
        ledger = EffectLedger(
            EffectLedgerOptions(
                store=MemoryStore(),
                approval_policy=approval_policy(),
                defaults=RunOptions(requires_approval=True),
            )
        )
        gated = ledger.requires_approval
        assert gated(calls["refund_small"]) is False  # TOOLS beats the defaults
        assert gated(calls["other"]) is True  # defaults
        explicit = RunOptions(requires_approval=True)
        assert gated(calls["refund_small"], explicit) is True  # the call's own say wins


def test_requires_approval_callable_must_return_a_bool() -> None:
    call = ToolCall(workflow_id="w", tool="x.y", args={})
    rule = {"x.*": {"requires_approval": "tests.test_policies.not_bool"}}
    with with_tools(rule), pytest.raises(Exception, match="must return a bool"):
        approval_policy()(call)


def test_expires_after_from_timedelta_or_seconds() -> None:
    call = ToolCall(workflow_id="w", tool="stripe.refund", args={})
    with with_tools({"stripe.*": {"expires_after": timedelta(hours=3)}}):
        assert expires_after(call) == 3 * 3600
    with with_tools({"stripe.*": {"expires_after": 90}}):
        assert expires_after(call) == 90
    with with_tools({}):
        assert expires_after(call) is None


def test_explain() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with with_tools({"stripe.*": {"group": "Finance", "quorum": 2}}):
        line = explain(
            policy_for("stripe.refund"), approvals=1, expires_at=now + timedelta(hours=3), now=now
        )
    assert line == "needs 2 of group Finance (1 of 2 so far); not the requester; expires in 3 h"
    with with_tools({}):
        assert explain(policy_for("a.b"), expires_at=now, now=now) == (
            "needs 1 approver; not the requester; expired"
        )


BAD = [
    ([], "E030"),
    ({"": {}}, "E030"),
    ({"stripe.*": "yes"}, "E030"),
    ({"stripe.*": {"quorom": 2}}, "E031"),
    ({"stripe.*": {"requires_approval": "no.such.module"}}, "E032"),
    ({"stripe.*": {"requires_approval": "tests.test_policies.NOT_CALLABLE"}}, "E032"),
    ({"stripe.*": {"requires_approval": 1}}, "E032"),
    ({"stripe.*": {"permission": "refund"}}, "E033"),
    ({"stripe.*": {"group": ""}}, "E033"),
    ({"stripe.*": {"quorum": 0}}, "E034"),
    ({"stripe.*": {"quorum": True}}, "E034"),
    ({"stripe.*": {"expires_after": -5}}, "E035"),
    ({"stripe.*": {"expires_after": timedelta(0)}}, "E035"),
    ({"stripe.*": {"notify_before": "1h"}}, "E035"),
    ({"stripe.*": {"allow_edit": "yes"}}, "E036"),
    ({"stripe.*": {"allow_self_approval": 1}}, "E036"),
]


@pytest.mark.parametrize(("table", "code"), BAD)
def test_bad_tools_settings_are_named_errors(table: Any, code: str) -> None:
    with with_tools(table):
        ids = {error.id for error in check_approval_settings()}
        assert ids == {f"agent_ledger.{code}"}
        with pytest.raises(ImproperlyConfigured, match=code):
            policy_for("stripe.refund")  # fails closed at call time too


@pytest.mark.parametrize(
    ("more", "code"),
    [
        ({"EXPIRING_NOTICE_BEFORE": 0}, "E035"),
        ({"SLACK_SIGNING_SECRET": "short"}, "E037"),
        ({"SLACK_SIGNING_SECRET": 12345}, "E037"),
        ({"SLACK_USER_LOOKUP": "no.such.lookup"}, "E038"),
        ({"SLACK_USER_LOOKUP": "tests.test_policies.NOT_CALLABLE"}, "E038"),
        ({"SLACK_USER_LOOKUP": 5}, "E038"),
    ],
)
def test_bad_expiry_and_slack_settings(more: dict[str, Any], code: str) -> None:
    with with_tools({}, **more):
        assert {error.id for error in check_approval_settings()} == {f"agent_ledger.{code}"}


def test_good_settings_pass() -> None:
    table = {
        "stripe.*": {
            "requires_approval": "tests.test_policies.big_refund",
            "permission": "agent_ledger.approve_effect",
            "group": "Finance",
            "quorum": 2,
            "expires_after": timedelta(hours=3),
            "notify_before": 600,
            "allow_edit": False,
            "allow_self_approval": False,
            "redact": None,
        }
    }
    with with_tools(
        table,
        SLACK_SIGNING_SECRET="s" * 32,
        SLACK_USER_LOOKUP="agent_ledger.slack.by_email",
    ):
        assert check_approval_settings() == []
