"""The store protocol: what a store must do, and do atomically, for the ledger to be correct.

The ledger (``agent_ledger.ledger``) owns the rules of the status flow, waiting and fencing; a
store owns persistence. Every method below is one atomic step: either all of it happens
(the status change *and* its history row) or none of it does. Stores raise
``EffectStoreError`` (with the driver's exception chained) when their backend fails, and never
decide a call is fresh by reading first and inserting after: the unique idempotency key decides.

Adding a store: implement this protocol, then add a fixture to ``tests/contract`` so the whole
contract suite runs against it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Collection, Mapping
from datetime import datetime, timezone
from typing import Any, Protocol, runtime_checkable

from ..errors import EffectLedgerValidationError
from ..types import Actor, CommitOutcome, Effect, EffectError, EffectStatus, Transition

#: The LISTEN/NOTIFY channel PostgreSQL stores announce changes on (payload: the effect id).
CHANNEL = "agent_ledger"


@dataclasses.dataclass(frozen=True)
class NewEffect:
    """What the ledger asks a store to insert when a key is seen for the first time."""

    id: str
    idem_key: str
    workflow_id: str
    call_id: str
    tool: str
    status: EffectStatus
    args_canonical: str
    resource_id_canonical: str | None
    actor: Actor
    continuation: Any = None

    def created(self, created_at: datetime, updated_at: datetime | None = None) -> Effect:
        """The effect as inserted: what was asked for, at the store's clock."""
        return Effect(
            id=self.id,
            idem_key=self.idem_key,
            workflow_id=self.workflow_id,
            call_id=self.call_id,
            tool=self.tool,
            status=self.status,
            args_canonical=self.args_canonical,
            resource_id_canonical=self.resource_id_canonical,
            dedup_count=0,
            created_at=created_at,
            updated_at=updated_at or created_at,
            fence=1,
            attempts=1 if self.status is EffectStatus.PROCESSING else 0,
            continuation=self.continuation,
        )


@dataclasses.dataclass(frozen=True)
class BeginRecord:
    effect: Effect
    #: True when this call inserted the row; False when the key existed (a replay).
    created: bool


@dataclasses.dataclass(frozen=True)
class TransitionRecord:
    effect: Effect
    #: False when the effect was not in one of the ``from_statuses`` (nothing was written).
    changed: bool


@runtime_checkable
class EffectStore(Protocol):
    async def begin(self, new: NewEffect) -> BeginRecord:
        """Insert ``new`` (fence 1, dedup_count 0, a history row ``None -> new.status``) unless
        its ``idem_key`` exists; if it exists, add 1 to that row's ``dedup_count`` and return it."""
        ...

    async def get(self, effect_id: str) -> Effect | None: ...

    async def get_by_idem_key(self, idem_key: str) -> Effect | None: ...

    async def commit(
        self, effect_id: str, outcome: CommitOutcome, *, fence: int | None, actor: Actor
    ) -> Effect | None:
        """``processing -> succeeded|failed`` if the effect is processing and, when ``fence`` is
        given, its fence still equals it. Sets ``completed_at``. Returns the committed effect, or
        None when refused (nothing written)."""
        ...

    async def transition(
        self,
        idem_key: str,
        *,
        from_statuses: Collection[EffectStatus],
        to_status: EffectStatus,
        actor: Actor,
        reason: str | None = None,
        error: EffectError | None = None,
    ) -> TransitionRecord:
        """Move an effect found by key from one of ``from_statuses`` to ``to_status`` (storing
        ``error`` and ``completed_at`` when the target is terminal). Lock, check, change, history
        row, in one transaction. Raises ``EffectNotFoundError`` for an unknown key."""
        ...

    async def release(
        self,
        effect_id: str,
        *,
        fence: int,
        actor: Actor,
        reason: str,
        error: EffectError | None = None,
    ) -> Effect | None:
        """``processing -> ready`` if the fence still matches: the owner hands the effect back
        unfinished (it stopped before acting, or failed in a way worth retrying), so the next
        call claims it at once. ``error`` (the failed attempt's) is stored on the effect, the
        reason on the history row. Returns the released effect, or None when refused."""
        ...

    async def claim(self, effect_id: str, *, stale_after_ms: float, actor: Actor) -> Effect | None:
        """Take ownership: ``ready -> processing``, or, when ``stale_after_ms > 0``, a processing
        effect whose ``updated_at`` is older than that (by the store's clock) is taken over.
        Either way the fence and ``attempts`` rise by one and ``updated_at`` is now. Returns the
        claimed effect, or None when another caller was first or the effect is not claimable."""
        ...

    async def history(self, effect_id: str) -> list[Transition]:
        """The effect's transitions, oldest first."""
        ...

    async def wait_for_change(
        self, effect_id: str, timeout_s: float, since: float
    ) -> Effect | None:
        """Return once the effect may have changed after ``since`` (a ``time.monotonic()``
        taken before the caller last read it), or after ``timeout_s``.

        Returns the effect's new state when the store knows it (a change committed in this
        process), else None and the caller re-reads. Sleeping is always correct (see
        ``PollingMixin``); stores that can hear commits (LISTEN/NOTIFY, in-process events; see
        ``ChangeNotifier``) return early so waiters learn of results at once.
        """
        ...


class PollingMixin:
    """``wait_for_change`` for stores that cannot be told of changes: just sleep."""

    async def wait_for_change(
        self, effect_id: str, timeout_s: float, since: float
    ) -> Effect | None:
        await asyncio.sleep(timeout_s)
        return None


class ChangeNotifier:
    """Wakes waiters of an effect when a change is heard, from any thread or event loop.

    It remembers when each effect last changed, so a waiter that read the effect just before a
    change but registers just after it returns at once instead of sleeping a whole interval.
    """

    #: Changes are remembered this long, and at most this many (the oldest go first): a waiter
    #: needs only those since it last read, a poll interval ago.
    _REMEMBER_S = 30.0
    _REMEMBER_MAX = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[
            str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Effect | None]]]
        ] = {}
        # Oldest first, so forgetting is O(1) per change however busy the process is.
        self._changed: OrderedDict[str, tuple[float, Effect | None]] = OrderedDict()

    def notify(self, effect_id: str, effect: Effect | None = None) -> None:
        """``effect``: the committed state, when the notifier's caller has it."""
        now = time.monotonic()
        with self._lock:
            changed = self._changed
            changed[effect_id] = (now, effect)
            changed.move_to_end(effect_id)
            cutoff = now - self._REMEMBER_S
            while len(changed) > self._REMEMBER_MAX or next(iter(changed.values()))[0] < cutoff:
                changed.popitem(last=False)
            waiters = self._waiters.pop(effect_id, [])
        for loop, future in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, future, effect)

    async def wait(self, effect_id: str, timeout_s: float, since: float) -> Effect | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Effect | None] = loop.create_future()
        entry = (loop, future)
        with self._lock:
            at, effect = self._changed.get(effect_id, (float("-inf"), None))
            if at >= since:
                return effect
            self._waiters.setdefault(effect_id, []).append(entry)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            return None
        finally:
            with self._lock:
                waiters = self._waiters.get(effect_id)
                if waiters is not None and entry in waiters:
                    waiters.remove(entry)
                    if not waiters:
                        del self._waiters[effect_id]


def _resolve(future: asyncio.Future[Effect | None], effect: Effect | None) -> None:
    if not future.done():
        future.set_result(effect)


def worth_waking(effect: Effect, from_status: EffectStatus | None) -> bool:
    """Whether other processes must hear of this change (NOTIFY): always, but for a new
    processing effect (nobody can be waiting for a key that did not exist; a new approval
    request is announced, for whoever watches them) and a commit nobody counted themselves
    waiting for (every waiter's ``begin`` adds to ``dedup_count`` before it waits, and a commit
    and that count take the same row lock, so either the commit sees it or the waiter sees the
    outcome). NOTIFY is not free: PostgreSQL serialises the commits of notifying transactions."""
    if from_status is None:
        return effect.status is EffectStatus.REQUIRES_APPROVAL
    if from_status is EffectStatus.PROCESSING and effect.status in (
        EffectStatus.SUCCEEDED,
        EffectStatus.FAILED,
    ):
        return effect.dedup_count > 0
    return True


def parse_uuid(value: str) -> uuid.UUID | None:
    """Ids that are not UUIDs cannot name an effect: unknown, not an error, for every store."""
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def claimable(effect: Effect, *, stale_after_ms: float, now: datetime) -> bool:
    """The claim rule every store applies, kept in one place so stores cannot drift apart."""
    if effect.status is EffectStatus.READY:
        return True
    idle_ms = (now - effect.updated_at).total_seconds() * 1000
    return effect.status is EffectStatus.PROCESSING and 0 < stale_after_ms <= idle_ms


_INT4_MAX = 2**31 - 1


def int_user_id(actor: Actor) -> int | None:
    """``actor.user_id`` as the history table's integer column, checked before any write (for
    stores without Django, which cannot ask the user model)."""
    user_id = actor.user_id
    if user_id is None:
        return None
    if isinstance(user_id, str) and user_id.strip().lstrip("-").isdigit():
        user_id = int(user_id)
    if isinstance(user_id, bool) or not isinstance(user_id, int):
        raise EffectLedgerValidationError(
            f"{actor.user_id!r} is not a valid user id", field="actor.user_id"
        )
    if not -_INT4_MAX - 1 <= user_id <= _INT4_MAX:
        raise EffectLedgerValidationError(
            f"{actor.user_id!r} is out of range for a user id", field="actor.user_id"
        )
    return user_id


def effect_from_columns(row: Mapping[str, Any], *, json_as_text: bool = False) -> Effect:
    """An ``Effect`` from the table's columns (a row as a dict, or a model's ``__dict__``): the
    one mapping every database store uses. ``json_as_text``: the cursor hands jsonb over as
    text (Django's do, for its JSONField to parse), so parse ``result`` and ``error`` here."""
    completed_at = row["completed_at"]
    result, error, continuation = row["result"], row["error"], row["continuation"]
    if json_as_text:
        result = None if result is None else json.loads(result)
        error = None if error is None else json.loads(error)
        continuation = None if continuation is None else json.loads(continuation)
    return Effect(
        id=str(row["id"]),
        idem_key=row["idem_key"],
        workflow_id=row["workflow_id"],
        call_id=row["call_id"],
        tool=row["tool"],
        status=EffectStatus(row["status"]),
        args_canonical=row["args_canonical"],
        resource_id_canonical=row["resource_id_canonical"],
        dedup_count=row["dedup_count"],
        created_at=utc(row["created_at"]),
        updated_at=utc(row["updated_at"]),
        result=result,
        error=EffectError.from_dict(error),
        completed_at=None if completed_at is None else utc(completed_at),
        fence=row["fence"],
        attempts=row["attempts"],
        continuation=continuation,
    )


def transition_from_columns(row: Mapping[str, Any]) -> Transition:
    return Transition(
        effect_id=str(row["effect_id"]),
        from_status=EffectStatus(row["from_status"]) if row["from_status"] else None,
        to_status=EffectStatus(row["to_status"]),
        at=utc(row["at"]),
        actor=Actor(row["actor_label"], row["actor_user_id"], row["actor_name"]),
        reason=row["reason"],
    )


def utc(value: datetime) -> datetime:
    """In UTC whatever the session's TimeZone, like the other stores' timestamps."""
    return value.astimezone(timezone.utc)
