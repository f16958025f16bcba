"""The thin sync service that admin views, DRF views and management commands call.

Sync on purpose: these callers run inside a request (maybe under ``ATOMIC_REQUESTS``) or a
command, and must stay on that thread's connection and transaction, which ``async_to_sync``
would leave. The rules (which statuses a decision applies to, reason length) come from
``ledger.decision_request``, the same function the async ledger uses.
"""

from __future__ import annotations

import threading
from typing import Any

from django.core.signals import setting_changed
from django.dispatch import receiver

from . import keys, policies
from .approvals import DecisionRecord, decide
from .conf import ledger_settings
from .errors import EffectLedgerValidationError
from .ledger import EffectLedger, EffectLedgerOptions, decision_request
from .stores.base import TransitionRecord
from .stores.django import DjangoStore
from .types import Actor, CommitOutcome, CommitSucceeded

__all__ = ["approve", "cancel", "deny", "get_ledger", "resolve", "retry"]

_ledger: EffectLedger | None = None
_ledger_lock = threading.Lock()


def get_ledger() -> EffectLedger:
    """The process-wide ledger on ``DjangoStore``, built on first use (after settings load)."""
    global _ledger
    if _ledger is None:
        with _ledger_lock:
            if _ledger is None:
                _ledger = EffectLedger(
                    EffectLedgerOptions(
                        store=DjangoStore(),
                        max_args_size_bytes=ledger_settings.MAX_ARGS_SIZE_BYTES,
                        # AGENT_LEDGER["TOOLS"]: which calls need approval, and for how long.
                        approval_policy=policies.approval_policy(),
                        expires_after=policies.expires_after,
                    )
                )
    return _ledger


@receiver(setting_changed)
def _forget_ledger(*, setting: str, **kwargs: Any) -> None:
    """Rebuild on next use after ``override_settings(AGENT_LEDGER=...)`` (it was built from it)."""
    global _ledger
    if setting == "AGENT_LEDGER":
        _ledger = None


def approve(
    idem_key: str, *, actor: Actor, reason: str | None = None, args: Any = None
) -> DecisionRecord:
    """``requires_approval -> ready`` under the tool's policy (``agent_ledger.approvals``):
    ``changed`` is False when it was already decided; an approval short of the quorum is
    recorded (``changed``) and leaves it waiting. ``args``: approve edited arguments.
    Raises ``DecisionRefusedError`` when the policy refuses this decider."""
    _no_nul(reason)
    return decide("approve", idem_key, actor=actor, reason=reason, args=args)


def deny(idem_key: str, *, actor: Actor, reason: str | None = None) -> DecisionRecord:
    """``requires_approval -> denied`` under the tool's policy; ``changed`` is False when it
    was already decided. Raises ``DecisionRefusedError`` when the policy refuses this decider."""
    _no_nul(reason)
    return decide("deny", idem_key, actor=actor, reason=reason)


def cancel(idem_key: str, *, actor: Actor, reason: str | None = None) -> TransitionRecord:
    """Stop an unfinished effect; ``changed`` is False when it had already finished."""
    return _decide("cancel", idem_key, actor, reason)


def _no_nul(reason: str | None) -> None:
    if reason is not None and "\x00" in reason:
        # PostgreSQL text cannot hold NUL: refuse it here rather than fail in the INSERT.
        raise EffectLedgerValidationError("must not contain NUL characters", field="reason")


def _decide(name: str, idem_key: str, actor: Actor, reason: str | None) -> TransitionRecord:
    _no_nul(reason)
    request = decision_request(name, idem_key, actor=actor, reason=reason)
    return DjangoStore().transition_sync(idem_key, **request)


def retry(idem_key: str, *, actor: Actor, reason: str) -> TransitionRecord:
    """An operator reopens a failed effect (``failed -> ready``; see ``agent_ledger.operator``);
    ``changed`` is False when it was not failed. Permission: ``agent_ledger.retry_effect``."""
    from .operator import require_reason
    from .stores.django_operator import reopen_sync

    return reopen_sync(
        DjangoStore().using, _key(idem_key), actor=actor, reason=require_reason(reason)
    )


def resolve(
    idem_key: str, outcome: CommitOutcome, *, actor: Actor, reason: str
) -> TransitionRecord:
    """An operator records what really happened to a processing effect whose owner is gone;
    ``changed`` is False when it was not processing. The result is redacted by
    ``AGENT_LEDGER["REDACT"]``. Permission: ``agent_ledger.resolve_effect``."""
    from .operator import require_outcome, require_reason
    from .stores.django_operator import resolve_sync

    idem_key = _key(idem_key)
    reason = require_reason(reason)
    outcome = require_outcome(outcome)
    if isinstance(outcome, CommitSucceeded):
        keys.check_json(outcome.result, "result", hashed=False)
    store = DjangoStore()
    redactor = store.redactor
    if redactor:
        effect = store.get_by_idem_key_sync(idem_key)
        if effect is not None:
            outcome = redactor.outcome(effect, outcome)
    return resolve_sync(store.using, idem_key, outcome, actor=actor, reason=reason)


def _key(idem_key: object) -> str:
    if not isinstance(idem_key, str) or not idem_key.strip():
        raise EffectLedgerValidationError("must be a non-empty string", field="idem_key")
    return idem_key
