"""Per-tool approval policies: ``AGENT_LEDGER["TOOLS"]``, parsed, matched and explained.

::

    AGENT_LEDGER = {
        "TOOLS": {
            "stripe.*": {"requires_approval": True, "group": "Finance", "quorum": 2,
                         "expires_after": timedelta(hours=3)},
            "stripe.refund": {"requires_approval": "myapp.policies.refund_over_1000",
                              "permission": "myapp.refund", "allow_edit": True},
            "*": {"expires_after": 24 * 3600},
        },
    }

Matching (most specific wins): a pattern equal to the tool name beats every wildcard pattern;
among ``fnmatch`` patterns (``*``, ``?``, ``[...]``) the one with the most literal characters
wins (``stripe.refund.*`` beats ``stripe.*`` beats ``*``), and a tie goes to the one declared
first. Exactly one policy applies to a tool; keys it leaves out take the defaults below, they
are not inherited from less specific patterns.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from .conf import ledger_settings
from .errors import EffectLedgerValidationError
from .types import ToolCall

__all__ = ["ToolPolicy", "approval_policy", "expires_after", "explain", "policy_for"]

#: Every key a tool's policy may have, with its default.
KEYS: dict[str, Any] = {
    "requires_approval": None,  # None: the policy has no say (approval_policy / defaults decide)
    "permission": None,  # "app_label.codename" a decider needs, on top of approve_effect
    "group": None,  # name of a group a decider must belong to
    "quorum": 1,  # distinct approvers needed
    "expires_after": None,  # timedelta or seconds; None: never expires
    "notify_before": None,  # approval_expiring this long before; else EXPIRING_NOTICE_BEFORE
    "allow_edit": False,  # an approver may approve with edited arguments
    "allow_self_approval": False,  # the requester may approve their own request
    "redact": None,  # reserved for the redaction rules of the data issue
}
_WILDCARD = re.compile(r"[*?\[\]]")


@dataclasses.dataclass(frozen=True)
class ToolPolicy:
    """One tool's rules (the defaults when no pattern matches it)."""

    pattern: str | None = None
    requires_approval: bool | str | None = None
    permission: str | None = None
    group: str | None = None
    quorum: int = 1
    expires_after: timedelta | None = None
    notify_before: timedelta | None = None
    allow_edit: bool = False
    allow_self_approval: bool = False
    redact: Any = None

    def needs_approval(self, args: Mapping[str, Any]) -> bool | None:
        """The policy's say for these arguments; None when it has none."""
        rule = self.requires_approval
        if rule is None or isinstance(rule, bool):
            return rule
        decided = import_string(rule)(args)
        if not isinstance(decided, bool):
            raise EffectLedgerValidationError(
                f"{rule} must return a bool, returned {type(decided).__name__}",
                field="requires_approval",
            )
        return decided


DEFAULT = ToolPolicy()


def problems(value: Any) -> list[tuple[str, str]]:
    """What is wrong with a ``TOOLS`` value, as ``(check id, message)`` pairs (``checks.py``)."""
    if not isinstance(value, Mapping):
        return [
            ("E030", f"must be a dict of tool patterns to policies, got {type(value).__name__}")
        ]
    found: list[tuple[str, str]] = []
    for pattern, policy in value.items():
        where = f"TOOLS[{pattern!r}]"
        if not isinstance(pattern, str) or not pattern.strip():
            found.append(("E030", f"{where}: a pattern must be a non-empty string"))
            continue
        if not isinstance(policy, Mapping):
            found.append(("E030", f"{where} must be a dict, got {type(policy).__name__}"))
            continue
        for key in sorted(set(policy) - set(KEYS)):
            found.append(("E031", f"{where} has an unknown key {key!r}"))
        found.extend(_value_problems(where, policy))
    return found


def _value_problems(where: str, policy: Mapping[str, Any]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    rule = policy.get("requires_approval")
    if rule is not None and not isinstance(rule, bool):
        if not isinstance(rule, str):
            found.append(("E032", f"{where}['requires_approval'] must be a bool or a dotted path"))
        else:
            try:
                target = import_string(rule)
            except ImportError as exc:
                found.append(("E032", f"{where}['requires_approval']: cannot import {rule}: {exc}"))
            else:
                if not callable(target):
                    found.append(("E032", f"{where}['requires_approval']: {rule} is not callable"))
    permission = policy.get("permission")
    if permission is not None and (
        not isinstance(permission, str) or not re.fullmatch(r"[\w]+\.[\w]+", permission)
    ):
        found.append(("E033", f"{where}['permission'] must be 'app_label.codename'"))
    group = policy.get("group")
    if group is not None and (not isinstance(group, str) or not group.strip()):
        found.append(("E033", f"{where}['group'] must be a group's name"))
    quorum = policy.get("quorum", 1)
    if isinstance(quorum, bool) or not isinstance(quorum, int) or not 1 <= quorum <= 20:
        found.append(("E034", f"{where}['quorum'] must be an int from 1 to 20, got {quorum!r}"))
    for key in ("expires_after", "notify_before"):
        if policy.get(key) is not None and as_timedelta(policy[key]) is None:
            found.append(
                ("E035", f"{where}[{key!r}] must be a positive timedelta or number of seconds")
            )
    for key in ("allow_edit", "allow_self_approval"):
        if not isinstance(policy.get(key, False), bool):
            found.append(("E036", f"{where}[{key!r}] must be a bool"))
    return found


def as_timedelta(value: Any) -> timedelta | None:
    """A positive duration from a ``timedelta`` or seconds; None when it is neither."""
    if isinstance(value, timedelta):
        return value if value > timedelta(0) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return None
    try:
        return timedelta(seconds=value)
    except OverflowError:
        return None


def policies() -> list[ToolPolicy]:
    """``TOOLS`` parsed, in declaration order; bad settings fail closed (``checks.py`` says
    which at startup; a process that skipped the checks refuses to guess at call time)."""
    value = ledger_settings.TOOLS
    found = problems(value)
    if found:
        raise ImproperlyConfigured(
            "AGENT_LEDGER['TOOLS']: " + "; ".join(f"{message} ({i})" for i, message in found)
        )
    parsed = []
    for pattern, given in value.items():
        fields = {**KEYS, **given}
        for key in ("expires_after", "notify_before"):
            if fields[key] is not None:
                fields[key] = as_timedelta(fields[key])
        parsed.append(ToolPolicy(pattern=pattern, **fields))
    return parsed


def policy_for(tool: str) -> ToolPolicy:
    """The one policy that applies to ``tool`` (see the module's docstring), or the defaults."""
    best: tuple[int, int, ToolPolicy] | None = None
    for order, policy in enumerate(policies()):
        pattern = policy.pattern or ""
        if pattern == tool:
            return policy
        if _WILDCARD.search(pattern) and fnmatch.fnmatchcase(tool, pattern):
            literal = len(_WILDCARD.sub("", pattern))
            if best is None or literal > best[0]:
                best = (literal, order, policy)
    return best[2] if best is not None else DEFAULT


def approval_policy(
    fallback: Callable[[ToolCall], bool | None] | None = None,
) -> Callable[[ToolCall], bool | None]:
    """An ``EffectLedgerOptions.approval_policy``: the tool's ``TOOLS`` policy, else
    ``fallback`` (your own), else no say (the ledger's defaults decide). A call's own
    ``RunOptions(requires_approval=...)`` wins over all of them."""

    def decide(call: ToolCall) -> bool | None:
        decided = policy_for(call.tool).needs_approval(call.args)
        if decided is None and fallback is not None:
            return fallback(call)
        return decided

    return decide


def expires_after(call: ToolCall) -> float | None:
    """An ``EffectLedgerOptions.expires_after``: the tool's ``expires_after`` in seconds."""
    after = policy_for(call.tool).expires_after
    return None if after is None else after.total_seconds()


def notify_before(policy: ToolPolicy) -> timedelta:
    """How long before expiry ``approval_expiring`` is sent for this tool's effects."""
    if policy.notify_before is not None:
        return policy.notify_before
    return as_timedelta(ledger_settings.EXPIRING_NOTICE_BEFORE) or timedelta(hours=1)


def explain(
    policy: ToolPolicy, *, approvals: int = 0, expires_at: datetime | None, now: datetime
) -> str:
    """What a decider must know, in one line: "needs 2 of group Finance (1 of 2 so far);
    expires in 3 h"."""
    who = []
    if policy.group:
        who.append(f"group {policy.group}")
    if policy.permission:
        who.append(f"permission {policy.permission}")
    parts = [
        f"needs {policy.quorum}"
        + (" of " + " with ".join(who) if who else " approver" + ("s" if policy.quorum > 1 else ""))
    ]
    if policy.quorum > 1:
        parts[0] += f" ({approvals} of {policy.quorum} so far)"
    if not policy.allow_self_approval:
        parts.append("not the requester")
    if policy.allow_edit:
        parts.append("arguments may be edited")
    if expires_at is not None:
        left = expires_at - now
        parts.append("expired" if left <= timedelta(0) else f"expires in {_span(left)}")
    return "; ".join(parts)


def _span(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    if seconds >= 86400:
        return f"{seconds // 86400} d {seconds % 86400 // 3600} h"
    if seconds >= 3600:
        return f"{seconds // 3600} h" + (
            f" {seconds % 3600 // 60} min" if seconds % 3600 >= 60 else ""
        )
    if seconds >= 60:
        return f"{seconds // 60} min"
    return f"{seconds} s"
