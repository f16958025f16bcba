"""The spec's value types and options, validated where they are built.

Plain dataclasses (no Django, no pydantic) so ``import agent_ledger`` works anywhere. Every
option class refuses unknown fields and bad values with ``EffectLedgerValidationError``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from .errors import EffectLedgerValidationError

JsonValue = Any
IdempotencyStatus = Literal["fresh", "replayed"]
KeyScope = Literal["args", "call"]

#: Longest workflow id, tool name and call id; the database columns have the same width.
MAX_NAME_LENGTH = 255
DEFAULT_MAX_ARGS_SIZE_BYTES = 1024 * 1024

_T = TypeVar("_T")


class EffectStatus(str, enum.Enum):
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REQUIRES_APPROVAL = "requires_approval"
    READY = "ready"
    DENIED = "denied"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    def __str__(self) -> str:
        return self.value


TERMINAL_STATUSES = frozenset(
    {EffectStatus.SUCCEEDED, EffectStatus.FAILED, EffectStatus.DENIED, EffectStatus.CANCELED}
)
ACTIVE_STATUSES = frozenset(EffectStatus) - TERMINAL_STATUSES


def strict(cls: type[_T]) -> type[_T]:
    """Turn a dataclass's TypeError for an unknown keyword into a validation error naming it,
    and remember which fields the caller gave (``fields_set``), so that options merge field by
    field: a caller's explicit ``requires_approval=False`` wins over a ledger default of True."""
    ordered = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    names = set(ordered)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise EffectLedgerValidationError(
                f"unknown field for {cls.__name__}; known fields: {', '.join(sorted(names))}",
                field=unknown[0],
            )
        init(self, *args, **kwargs)
        object.__setattr__(self, "_fields_set", frozenset(ordered[: len(args)]) | set(kwargs))

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def fields_set(options: object) -> frozenset[str]:
    """The fields the caller passed when building ``options`` (an option class instance)."""
    given: frozenset[str] = getattr(options, "_fields_set", frozenset())
    return given


def _require_str(
    value: object, field: str, *, optional: bool = False, separator: str | None = None
) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise EffectLedgerValidationError(
            f"must be a string, got {type(value).__name__}", field=field
        )
    if not value.strip():
        raise EffectLedgerValidationError("must not be empty", field=field)
    if len(value) > MAX_NAME_LENGTH:
        raise EffectLedgerValidationError(
            f"must be at most {MAX_NAME_LENGTH} characters, got {len(value)}", field=field
        )
    if separator is not None and separator in value:
        # Key parts are joined with a separator: ("a|b", "c") and ("a", "b|c") would collide.
        raise EffectLedgerValidationError(
            f"must not contain {separator!r}, a separator of the idempotency key", field=field
        )


def require_number(
    value: object,
    field: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EffectLedgerValidationError(
            f"must be a number, got {type(value).__name__}", field=field
        )
    if not math.isfinite(value):
        raise EffectLedgerValidationError(f"must be finite, got {value}", field=field)
    if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
        relation = ">" if exclusive_minimum else ">="
        raise EffectLedgerValidationError(
            f"must be {relation} {minimum:g}, got {value}", field=field
        )
    if maximum is not None and value > maximum:
        raise EffectLedgerValidationError(f"must be <= {maximum:g}, got {value}", field=field)


def require_instance(value: object, kind: type, field: str) -> None:
    if value is not None and not isinstance(value, kind):
        raise EffectLedgerValidationError(
            f"must be a {kind.__name__}, got {type(value).__name__}", field=field
        )


@strict
@dataclasses.dataclass(frozen=True)
class ResourceDescriptor:
    """Names the thing a call acts on, so retries with reworded args still share one key."""

    namespace: str
    type: str
    id: Mapping[str, Any]

    def __post_init__(self) -> None:
        _require_str(self.namespace, "resource.namespace", separator="/")
        _require_str(self.type, "resource.type", separator="/")
        if not isinstance(self.id, Mapping) or not self.id:
            raise EffectLedgerValidationError("must be a non-empty dict", field="resource.id")


@strict
@dataclasses.dataclass(frozen=True)
class ToolCall:
    workflow_id: str
    tool: str
    args: Mapping[str, Any]
    resource: ResourceDescriptor | None = None
    call_id: str | None = None
    idempotency_keys: Sequence[str] | None = None
    #: "args" (the spec's rule): the same arguments are the same call. "call": ``call_id`` is
    #: part of the key too, so a framework's retries and resumes of one tool call dedupe while
    #: the same arguments asked for again later (a new call id) run again.
    key_scope: KeyScope = "args"

    def __post_init__(self) -> None:
        if self.key_scope not in ("args", "call"):
            raise EffectLedgerValidationError(
                f'must be "args" or "call", got {self.key_scope!r}', field="key_scope"
            )
        if self.key_scope == "call" and self.call_id is None:
            raise EffectLedgerValidationError(
                'is required when key_scope is "call"', field="call_id"
            )
        _require_str(self.workflow_id, "workflow_id", separator="|")
        _require_str(self.tool, "tool", separator="|")
        _require_str(self.call_id, "call_id", optional=True)
        if not isinstance(self.args, Mapping):
            raise EffectLedgerValidationError(
                f"must be a dict, got {type(self.args).__name__}", field="args"
            )
        require_instance(self.resource, ResourceDescriptor, "resource")
        keys = self.idempotency_keys
        if keys is not None:
            if isinstance(keys, str) or not isinstance(keys, Sequence) or not keys:
                raise EffectLedgerValidationError(
                    "must be a non-empty list of argument names", field="idempotency_keys"
                )
            for name in keys:
                if not isinstance(name, str) or not name:
                    raise EffectLedgerValidationError(
                        f"names must be non-empty strings, got {name!r}", field="idempotency_keys"
                    )
                if name not in self.args:
                    raise EffectLedgerValidationError(
                        f"names {name!r}, which is not in args", field="idempotency_keys"
                    )
            if len(set(keys)) != len(keys):
                raise EffectLedgerValidationError("names repeat", field="idempotency_keys")


@strict
@dataclasses.dataclass(frozen=True)
class ConcurrencyOptions:
    """How long and how often a caller waits for another caller's outcome or a human's decision."""

    wait_timeout_ms: float = 30_000
    initial_interval_ms: float = 50
    max_interval_ms: float = 1_000
    backoff_multiplier: float = 1.5
    jitter_factor: float = 0.3

    def __post_init__(self) -> None:
        require_number(self.wait_timeout_ms, "wait_timeout_ms", minimum=0)
        require_number(
            self.initial_interval_ms, "initial_interval_ms", minimum=0, exclusive_minimum=True
        )
        require_number(self.max_interval_ms, "max_interval_ms", minimum=0, exclusive_minimum=True)
        require_number(self.backoff_multiplier, "backoff_multiplier", minimum=1)
        require_number(self.jitter_factor, "jitter_factor", minimum=0, maximum=1)
        if self.initial_interval_ms > self.max_interval_ms:
            raise EffectLedgerValidationError(
                f"must be <= max_interval_ms ({self.max_interval_ms}), "
                f"got {self.initial_interval_ms}",
                field="initial_interval_ms",
            )


@strict
@dataclasses.dataclass(frozen=True)
class StaleOptions:
    """An effect left processing longer than ``after_ms`` may be taken over; 0 disables."""

    after_ms: float = 60_000

    def __post_init__(self) -> None:
        require_number(self.after_ms, "after_ms", minimum=0)


@strict
@dataclasses.dataclass(frozen=True)
class RunOptions:
    requires_approval: bool = False
    concurrency: ConcurrencyOptions | None = None
    stale: StaleOptions | None = None
    #: Exceptions the tool raises on purpose *before* it acts (LangGraph's ``GraphInterrupt``):
    #: they propagate unchanged and release the effect, which the next call may claim at once.
    passthrough: tuple[type[BaseException], ...] = ()
    #: Transient failures (a 429): the attempt is recorded and the key stays runnable, instead
    #: of failing for good. The exception still propagates to this caller.
    retry_on: tuple[type[BaseException], ...] = ()
    #: Turns the handler's value into JSON and back, so fresh runs and replays return one type.
    codec: Codec | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.requires_approval, bool):
            raise EffectLedgerValidationError(
                f"must be a bool, got {type(self.requires_approval).__name__}",
                field="requires_approval",
            )
        require_instance(self.concurrency, ConcurrencyOptions, "concurrency")
        require_instance(self.stale, StaleOptions, "stale")
        for name in ("passthrough", "retry_on"):
            object.__setattr__(self, name, exception_types(getattr(self, name), name))
        if self.codec is not None and not isinstance(self.codec, Codec):
            raise EffectLedgerValidationError(
                "must have encode(value) and decode(json) methods", field="codec"
            )


@runtime_checkable
class Codec(Protocol):
    """Turns a handler's value into plain JSON for the ledger, and stored JSON back."""

    def encode(self, value: Any) -> Any: ...

    def decode(self, data: Any) -> Any: ...


def exception_types(value: object, field: str) -> tuple[type[BaseException], ...]:
    """An exception class or a tuple of them, as ``except`` accepts."""
    if isinstance(value, type):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(kind, type) and issubclass(kind, BaseException) for kind in value
    ):
        raise EffectLedgerValidationError(
            f"must be an exception class or a tuple of them, got {value!r}", field=field
        )
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class EffectError:
    message: str
    code: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"message": self.message, "code": self.code}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> EffectError | None:
        if data is None:
            return None
        return cls(message=str(data.get("message", "")), code=data.get("code"))


@dataclasses.dataclass(frozen=True)
class Actor:
    """Who caused a transition; kept on every history row.

    ``label`` says through what ("admin", "api", "webhook:<secret name>", "cli", "system");
    ``user_id`` and ``name`` say who, when a person is known.
    """

    label: str
    user_id: int | str | None = None
    name: str = ""

    @classmethod
    def coerce(cls, value: Actor | str | None, default: str = "system") -> Actor:
        if value is None:
            return cls(default)
        if isinstance(value, str):
            _require_str(value, "actor")
            return cls(value)
        if isinstance(value, Actor):
            return value
        raise EffectLedgerValidationError(
            f"must be an Actor or a str, got {type(value).__name__}", field="actor"
        )


SYSTEM = Actor("system")


@dataclasses.dataclass(frozen=True)
class Effect:
    """One tool call's record. ``fence`` rises on every claim so a stale owner's commit fails."""

    id: str
    idem_key: str
    workflow_id: str
    call_id: str
    tool: str
    status: EffectStatus
    args_canonical: str
    resource_id_canonical: str | None
    dedup_count: int
    created_at: datetime
    updated_at: datetime
    result: JsonValue = None
    error: EffectError | None = None
    completed_at: datetime | None = None
    fence: int = 1
    #: How many times the tool was started (claims, the first run included).
    attempts: int = 0
    #: What resumes the agent when a human decides (``{"resumer": name, ...}``), or None.
    continuation: JsonValue = None
    #: When a pending approval of this effect expires (denied, code ``expired``), or None.
    expires_at: datetime | None = None
    #: The id of the effect that replaced this one when an approver edited its arguments.
    superseded_by: str | None = None

    @property
    def args(self) -> Any:
        return json.loads(self.args_canonical)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclasses.dataclass(frozen=True)
class Transition:
    """One row of an effect's append-only history."""

    effect_id: str
    from_status: EffectStatus | None
    to_status: EffectStatus
    at: datetime
    actor: Actor
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class CommitSucceeded:
    result: JsonValue = None
    status: Literal["succeeded"] = dataclasses.field(default="succeeded", init=False)


@dataclasses.dataclass(frozen=True)
class CommitFailed:
    error: EffectError
    status: Literal["failed"] = dataclasses.field(default="failed", init=False)

    def __post_init__(self) -> None:
        require_instance(self.error, EffectError, "error")
        if self.error is None:
            raise EffectLedgerValidationError("is required", field="error")


CommitOutcome = CommitSucceeded | CommitFailed


@dataclasses.dataclass(frozen=True)
class BeginResult:
    effect: Effect
    cached: bool
    cached_result: JsonValue = None
    idempotency_status: IdempotencyStatus = "fresh"
    #: True when this caller now owns the effect and must run the tool and commit.
    claimed: bool = False


Handler = Callable[[Effect], Any]


_DURATION = re.compile(r"(\d+)\s*(s|m|h|d|w)")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(value: object, field: str = "duration") -> timedelta:
    """``"90d"``, ``"12h"``, ``"30m"``, ``"45s"``, ``"2w"`` (or a ``timedelta``) as a positive
    ``timedelta``; anything else is an ``EffectLedgerValidationError`` naming ``field``."""
    if isinstance(value, timedelta):
        duration = value
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match is None:
            raise EffectLedgerValidationError(
                f"{value!r} is not a duration; write a number and a unit: 45s, 30m, 12h, 90d, 2w",
                field=field,
            )
        number = int(match.group(1))
        if number > 100_000:
            raise EffectLedgerValidationError(f"{value!r} is too long", field=field)
        duration = timedelta(**{_UNITS[match.group(2)]: number})
    else:
        raise EffectLedgerValidationError(
            f"must be a duration such as '90d' or a timedelta, got {type(value).__name__}",
            field=field,
        )
    if duration <= timedelta(0):
        raise EffectLedgerValidationError(f"must be positive, got {value!r}", field=field)
    return duration


@dataclasses.dataclass
class PruneReport:
    """What a retention run did (or, with ``dry_run``, would do)."""

    effects: int = 0
    transitions: int = 0
    tombstones_expired: int = 0
    batches: int = 0
    dry_run: bool = False
