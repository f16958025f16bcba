"""django-agent-ledger: idempotency, approval and audit for AI agent tool calls.

Everything here imports without Django settings; the Django parts live in ``models``,
``stores.django``, ``admin`` and ``api`` and are imported only when used.
"""

from .decorators import ledgered, workflow
from .errors import (
    ApprovalPendingError,
    EffectDeniedError,
    EffectFailedError,
    EffectLedgerError,
    EffectLedgerValidationError,
    EffectNotFoundError,
    EffectPurgedError,
    EffectStoreError,
    EffectTimeoutError,
    SyncCallInEventLoopError,
)
from .hooks import LedgerHooks
from .ledger import EffectLedger, EffectLedgerOptions
from .redaction import Redactor
from .requester import requested_by
from .stores.base import EffectStore
from .stores.memory import MemoryStore
from .types import (
    Actor,
    BeginResult,
    Codec,
    CommitFailed,
    CommitOutcome,
    CommitSucceeded,
    ConcurrencyOptions,
    Effect,
    EffectError,
    EffectStatus,
    ResourceDescriptor,
    RunOptions,
    StaleOptions,
    ToolCall,
    Transition,
)

__version__ = "0.1.0"


def urls_for(effect: Effect | str, *, request: object = None) -> dict[str, str]:
    """The admin and API URLs of an effect (needs Django; see ``agent_ledger.links``)."""
    from .links import urls_for as urls

    return urls(effect, request=request)


__all__ = [
    "Actor",
    "ApprovalPendingError",
    "BeginResult",
    "Codec",
    "CommitFailed",
    "CommitOutcome",
    "CommitSucceeded",
    "ConcurrencyOptions",
    "Effect",
    "EffectDeniedError",
    "EffectError",
    "EffectFailedError",
    "EffectLedger",
    "EffectLedgerError",
    "EffectLedgerOptions",
    "EffectLedgerValidationError",
    "EffectNotFoundError",
    "EffectPurgedError",
    "EffectStatus",
    "EffectStore",
    "EffectStoreError",
    "EffectTimeoutError",
    "LedgerHooks",
    "MemoryStore",
    "Redactor",
    "ResourceDescriptor",
    "RunOptions",
    "StaleOptions",
    "SyncCallInEventLoopError",
    "ToolCall",
    "Transition",
    "ledgered",
    "requested_by",
    "urls_for",
    "workflow",
]
