"""One exception hierarchy: catching ``EffectLedgerError`` catches all the ledger raises."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .types import EffectError, EffectStatus


class EffectLedgerError(Exception):
    """Root of every error the ledger raises on purpose."""


class EffectLedgerValidationError(EffectLedgerError, ValueError):
    """Bad input at a public entry point; nothing was written.

    ``field`` names the offending input (``"args.items[2]"``, ``"wait_timeout_ms"``) so callers
    and API layers can point at it without parsing the message.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class EffectNotFoundError(EffectLedgerError, LookupError):
    """No effect has that idempotency key or id."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"no effect with key {key!r}")


class EffectDeniedError(EffectLedgerError):
    """The effect was denied by a human or canceled; the tool never ran (or must not run again)."""

    def __init__(
        self,
        idem_key: str,
        reason: str | None = None,
        *,
        status: EffectStatus | None = None,
        code: str | None = None,
    ) -> None:
        self.idem_key = idem_key
        self.reason = reason
        self.status = status
        #: The stored error's code: "denied", "canceled", "expired" (an approval nobody gave
        #: in time), "superseded" (replaced by an edited call that could not be followed).
        self.code = code
        what = status.value if status is not None else "denied"
        super().__init__(f"effect {idem_key} was {what}" + (f": {reason}" if reason else ""))


class EffectFailedError(EffectLedgerError):
    """A replay of an effect whose tool call failed: the stored error, not a second attempt."""

    def __init__(self, idem_key: str, error: EffectError) -> None:
        self.idem_key = idem_key
        self.error = error
        self.code = error.code
        super().__init__(f"effect {idem_key} failed: {error.message}")


class EffectTimeoutError(EffectLedgerError, TimeoutError):
    """Another caller holds the effect and did not finish within ``wait_timeout_ms``."""

    def __init__(self, idem_key: str, timeout_ms: float) -> None:
        self.idem_key = idem_key
        self.timeout_ms = timeout_ms
        super().__init__(f"effect {idem_key} did not finish within {timeout_ms:g} ms")


class ApprovalPendingError(EffectLedgerError):
    """Nobody decided in time; the effect keeps waiting and a later run picks the decision up.

    ``effect_id`` and ``idem_key`` are the handle to show a person or a model (see
    ``agent_ledger.links.urls_for``)."""

    def __init__(self, idem_key: str, timeout_ms: float, *, effect_id: str | None = None) -> None:
        self.idem_key = idem_key
        self.effect_id = effect_id
        self.timeout_ms = timeout_ms
        super().__init__(
            f"effect {idem_key} is still awaiting approval after {timeout_ms:g} ms; "
            "approve or deny it, then run the same call again"
        )


class EffectStoreError(EffectLedgerError):
    """The store (database) failed; the driver's exception is chained as ``__cause__``."""

    def __init__(self, message: str, *, operation: str | None = None) -> None:
        self.operation = operation
        super().__init__(f"{operation}: {message}" if operation else message)


class SyncCallInEventLoopError(EffectLedgerError, RuntimeError):
    """A ``*_sync`` method was called from a thread that runs an event loop, where it would
    block every other coroutine: await the async method instead."""

    def __init__(self, method: str) -> None:
        self.method = method
        async_name = method.removesuffix("_sync")
        super().__init__(
            f"{method}() was called from a running event loop; use 'await ledger.{async_name}(...)'"
        )


class DecisionRefusedError(EffectLedgerError):
    """A decision the effect's policy does not allow (``agent_ledger.approvals``): nothing was
    changed, except that an expired approval is recorded as denied. ``code`` names the rule
    (``expired``, ``self_approval``, ``not_permitted``, ``already_approved``, ``edit_not_allowed``,
    ``link_used`` ...); ``http_status`` is what a view answers (403 or 409)."""

    def __init__(self, code: str, message: str, *, http_status: int = 403) -> None:
        self.code = code
        self.http_status = http_status
        super().__init__(message)


class EffectPurgedError(EffectLedgerError):
    """The key's effect was pruned by retention: its tombstone keeps the key closed, so the
    call is not run again (until the tombstone expires after ``AGENT_LEDGER["KEY_LIFETIME"]``)."""

    def __init__(self, idem_key: str, status: str | None = None) -> None:
        self.idem_key = idem_key
        self.status = status
        what = f" ({status} when pruned)" if status else ""
        super().__init__(
            f"effect {idem_key} was pruned{what}; its key stays closed and the call is not run"
        )
