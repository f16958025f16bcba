"""django-agent-ledger: idempotency, approval and audit for AI agent tool calls.

Everything here imports without Django settings; the Django parts live in ``models``,
``stores.django``, ``admin`` and ``api`` and are imported only when used.
"""

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
)
from .ledger import EffectLedger, EffectLedgerOptions
from .redaction import Redactor
from .stores.base import EffectStore
from .stores.memory import MemoryStore
from .types import (
    Actor,
    BeginResult,
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

__all__ = [
    "Actor",
    "ApprovalPendingError",
    "BeginResult",
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
    "MemoryStore",
    "Redactor",
    "ResourceDescriptor",
    "RunOptions",
    "StaleOptions",
    "ToolCall",
    "Transition",
]
