"""Operator actions, the rules every surface shares: retry a failed effect, resolve one whose
outcome is unknown.

- **Retry** (``agent_ledger.retry_effect``): ``failed -> ready``. The next run of the key runs
  the handler again as a new attempt (``ready -> processing``, fence + 1); the effect's error is
  cleared and kept in the history row of the reopening, with who reopened it and why.
- **Resolve** (``agent_ledger.resolve_effect``, a permission of its own: recording that a
  payment went through is a stronger claim than asking to try again): ``processing ->
  succeeded|failed`` with the result or error the operator found out, for an effect whose owner
  is gone and whose outcome nobody recorded. The fence rises, so a late commit of the old owner
  is refused (it then reports the recorded outcome); waiting callers receive it at once.

Both need a reason, and lock the row for their check-then-write like every decision.
"""

from __future__ import annotations

from typing import Any

from .errors import EffectLedgerValidationError
from .types import CommitFailed, CommitOutcome, CommitSucceeded, EffectError

MAX_REASON_LENGTH = 2_000
MAX_ERROR_MESSAGE_LENGTH = 10_000


def require_reason(reason: object) -> str:
    """A non-empty reason of at most ``MAX_REASON_LENGTH`` characters, stripped."""
    if not isinstance(reason, str):
        raise EffectLedgerValidationError(
            f"must be a string, got {type(reason).__name__}", field="reason"
        )
    reason = reason.strip()
    if not reason:
        raise EffectLedgerValidationError("an operator action needs a reason", field="reason")
    if len(reason) > MAX_REASON_LENGTH:
        raise EffectLedgerValidationError(
            f"must be at most {MAX_REASON_LENGTH} characters", field="reason"
        )
    return reason


def reopen_reason(reason: str, previous: EffectError | None) -> str:
    """The reopening's history row: the operator's reason and the error it clears."""
    if previous is None:
        return reason
    code = f"[{previous.code}] " if previous.code else ""
    return f"{reason} (previous error: {code}{previous.message})"


def require_outcome(outcome: object) -> CommitOutcome:
    if not isinstance(outcome, (CommitSucceeded, CommitFailed)):
        raise EffectLedgerValidationError(
            f"must be CommitSucceeded or CommitFailed, got {type(outcome).__name__}",
            field="outcome",
        )
    if isinstance(outcome, CommitFailed):
        message = outcome.error.message
        if not isinstance(message, str) or not message.strip():
            raise EffectLedgerValidationError("must be a non-empty string", field="error.message")
        if len(message) > MAX_ERROR_MESSAGE_LENGTH:
            raise EffectLedgerValidationError(
                f"must be at most {MAX_ERROR_MESSAGE_LENGTH} characters", field="error.message"
            )
        code = outcome.error.code
        if code is not None and (not isinstance(code, str) or len(code) > 100):
            raise EffectLedgerValidationError(
                "must be a string of at most 100 characters", field="error.code"
            )
    return outcome


def outcome_of(
    status: str, *, result: Any = None, error_message: str = "", error_code: str | None = None
) -> CommitOutcome:
    """``CommitSucceeded(result)`` or ``CommitFailed(EffectError(...))`` from form or API input."""
    if status == "succeeded":
        if error_message:
            raise EffectLedgerValidationError(
                "give an error only when the effect failed", field="error.message"
            )
        return CommitSucceeded(result=result)
    if status == "failed":
        if result is not None:
            raise EffectLedgerValidationError(
                "give a result only when the effect succeeded", field="result"
            )
        return require_outcome(CommitFailed(EffectError(error_message, error_code or None)))
    raise EffectLedgerValidationError(
        f"must be 'succeeded' or 'failed', got {status!r}", field="outcome"
    )
