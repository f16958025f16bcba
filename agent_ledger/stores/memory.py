"""An in-process store for development and tests: one lock and immediate wake-ups.

Safe under asyncio concurrency and across threads: every operation takes ``_lock`` for its
whole read-check-write, and waiters on any event loop are woken through ``ChangeNotifier``.
Nothing survives the process.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Collection
from datetime import datetime, timedelta, timezone

from ..errors import EffectNotFoundError, EffectPurgedError
from ..operator import reopen_reason
from ..types import (
    TERMINAL_STATUSES,
    Actor,
    CommitOutcome,
    CommitSucceeded,
    Effect,
    EffectError,
    EffectStatus,
    PruneReport,
    Transition,
    parse_duration,
)
from .base import BeginRecord, ChangeNotifier, NewEffect, TransitionRecord, claimable


def _now() -> datetime:
    return datetime.now(timezone.utc)


class MemoryStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, Effect] = {}
        self._id_by_key: dict[str, str] = {}
        self._history: dict[str, list[Transition]] = {}
        #: Pruned keys: key -> (the effect's status, its created_at); see ``prune``.
        self._tombstones: dict[str, tuple[EffectStatus, datetime]] = {}
        self._notifier = ChangeNotifier()

    # -- writes; each holds the lock for its whole read-check-write ---------------------------

    async def begin(self, new: NewEffect) -> BeginRecord:
        with self._lock:
            existing_id = self._id_by_key.get(new.idem_key)
            if existing_id is not None:
                effect = self._by_id[existing_id]
                effect = dataclasses.replace(effect, dedup_count=effect.dedup_count + 1)
                self._by_id[effect.id] = effect
                return BeginRecord(effect, created=False)
            if new.idem_key in self._tombstones:
                raise EffectPurgedError(new.idem_key, self._tombstones[new.idem_key][0].value)
            effect = new.created(_now())
            self._by_id[effect.id] = effect
            self._id_by_key[effect.idem_key] = effect.id
            self._history[effect.id] = []
            self._record(effect, None, new.actor, None)
            return BeginRecord(effect, created=True)

    async def commit(
        self, effect_id: str, outcome: CommitOutcome, *, fence: int | None, actor: Actor
    ) -> Effect | None:
        with self._lock:
            effect = self._by_id.get(effect_id)
            if effect is None or effect.status is not EffectStatus.PROCESSING:
                return None
            if fence is not None and effect.fence != fence:
                return None
            now = _now()
            if isinstance(outcome, CommitSucceeded):
                changes = {
                    "status": EffectStatus.SUCCEEDED,
                    "result": outcome.result,
                    "error": None,
                }
            else:
                changes = {"status": EffectStatus.FAILED, "error": outcome.error}
            updated = dataclasses.replace(effect, updated_at=now, completed_at=now, **changes)
            self._by_id[effect_id] = updated
            self._record(updated, effect.status, actor, None)
        self._notifier.notify(effect_id, updated)
        return updated

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
        with self._lock:
            effect_id = self._id_by_key.get(idem_key)
            if effect_id is None:
                raise EffectNotFoundError(idem_key)
            effect = self._by_id[effect_id]
            if effect.status not in from_statuses:
                return TransitionRecord(effect, changed=False)
            now = _now()
            terminal = to_status in TERMINAL_STATUSES
            updated = dataclasses.replace(
                effect,
                status=to_status,
                updated_at=now,
                error=error if error is not None else effect.error,
                completed_at=now if terminal else None,
            )
            self._by_id[effect_id] = updated
            self._record(updated, effect.status, actor, reason)
        self._notifier.notify(effect_id, updated)
        return TransitionRecord(updated, changed=True)

    async def release(
        self,
        effect_id: str,
        *,
        fence: int,
        actor: Actor,
        reason: str,
        error: EffectError | None = None,
    ) -> Effect | None:
        with self._lock:
            effect = self._by_id.get(effect_id)
            if effect is None or effect.status is not EffectStatus.PROCESSING:
                return None
            if effect.fence != fence:
                return None
            released = dataclasses.replace(
                effect, status=EffectStatus.READY, updated_at=_now(), error=error
            )
            self._by_id[effect_id] = released
            self._record(released, effect.status, actor, reason)
        self._notifier.notify(effect_id, released)
        return released

    async def claim(self, effect_id: str, *, stale_after_ms: float, actor: Actor) -> Effect | None:
        with self._lock:
            effect = self._by_id.get(effect_id)
            now = _now()
            if effect is None or not claimable(effect, stale_after_ms=stale_after_ms, now=now):
                return None
            reason = "stale takeover" if effect.status is EffectStatus.PROCESSING else None
            claimed = dataclasses.replace(
                effect,
                status=EffectStatus.PROCESSING,
                fence=effect.fence + 1,
                attempts=effect.attempts + 1,
                updated_at=now,
            )
            self._by_id[effect_id] = claimed
            self._record(claimed, effect.status, actor, reason)
        self._notifier.notify(effect_id, claimed)
        return claimed

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, effect_id: str) -> Effect | None:
        with self._lock:
            return self._by_id.get(effect_id)

    async def get_by_idem_key(self, idem_key: str) -> Effect | None:
        with self._lock:
            effect_id = self._id_by_key.get(idem_key)
            return None if effect_id is None else self._by_id[effect_id]

    async def history(self, effect_id: str) -> list[Transition]:
        with self._lock:
            return list(self._history.get(effect_id, ()))

    async def wait_for_change(
        self, effect_id: str, timeout_s: float, since: float
    ) -> Effect | None:
        return await self._notifier.wait(effect_id, timeout_s, since)

    # -- operator actions (``agent_ledger.operator``) -------------------------------------------

    async def reopen(self, idem_key: str, *, actor: Actor, reason: str) -> TransitionRecord:
        """``failed -> ready``, the error cleared into the history row's reason."""
        with self._lock:
            effect = self._by_key(idem_key)
            if effect.status is not EffectStatus.FAILED:
                return TransitionRecord(effect, changed=False)
            updated = dataclasses.replace(
                effect,
                status=EffectStatus.READY,
                error=None,
                result=None,
                completed_at=None,
                updated_at=_now(),
            )
            self._by_id[effect.id] = updated
            self._record(updated, effect.status, actor, reopen_reason(reason, effect.error))
        self._notifier.notify(effect.id, updated)
        return TransitionRecord(updated, changed=True)

    async def resolve(
        self, idem_key: str, outcome: CommitOutcome, *, actor: Actor, reason: str
    ) -> TransitionRecord:
        """``processing -> succeeded|failed`` with the operator's outcome; the fence rises."""
        with self._lock:
            effect = self._by_key(idem_key)
            if effect.status is not EffectStatus.PROCESSING:
                return TransitionRecord(effect, changed=False)
            now = _now()
            if isinstance(outcome, CommitSucceeded):
                status, result, error = EffectStatus.SUCCEEDED, outcome.result, None
            else:
                status, result, error = EffectStatus.FAILED, None, outcome.error
            updated = dataclasses.replace(
                effect,
                status=status,
                result=result,
                error=error,
                fence=effect.fence + 1,
                updated_at=now,
                completed_at=now,
            )
            self._by_id[effect.id] = updated
            self._record(updated, effect.status, actor, reason)
        self._notifier.notify(effect.id, updated)
        return TransitionRecord(updated, changed=True)

    def _by_key(self, idem_key: str) -> Effect:
        effect_id = self._id_by_key.get(idem_key)
        if effect_id is None:
            raise EffectNotFoundError(idem_key)
        return self._by_id[effect_id]

    # -- retention (the Django tables have ``agent_ledger.retention``) --------------------------

    async def prune(
        self, older_than: timedelta | str, *, key_lifetime: timedelta | str | None = None
    ) -> PruneReport:
        """Drop effects finished before ``older_than`` ago and their history, keeping their
        keys closed (``begin`` raises ``EffectPurgedError``) until ``key_lifetime`` after the
        effect's creation (None: forever)."""
        older_than = parse_duration(older_than, "older_than")
        if key_lifetime is not None:
            key_lifetime = parse_duration(key_lifetime, "key_lifetime")
        report = PruneReport()
        with self._lock:
            now = _now()
            for effect in list(self._by_id.values()):
                done = effect.completed_at
                if effect.status in TERMINAL_STATUSES and done and done < now - older_than:
                    del self._by_id[effect.id], self._id_by_key[effect.idem_key]
                    report.transitions += len(self._history.pop(effect.id, ()))
                    report.effects += 1
                    self._tombstones[effect.idem_key] = (effect.status, effect.created_at)
            if key_lifetime is not None:
                for key, (_, created_at) in list(self._tombstones.items()):
                    if created_at < now - key_lifetime:
                        del self._tombstones[key]
                        report.tombstones_expired += 1
        return report

    # -- helpers (call with the lock held) ------------------------------------------------------

    def _record(
        self, effect: Effect, from_status: EffectStatus | None, actor: Actor, reason: str | None
    ) -> None:
        self._history[effect.id].append(
            Transition(effect.id, from_status, effect.status, effect.updated_at, actor, reason)
        )
