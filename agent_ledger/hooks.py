"""Callbacks for what happens to effects, on every store (Django's signals cover Django only).

A worker outside Django (``MemoryStore``, ``PostgresStore``) can announce a pending approval to
a chat channel, or record that a decision was made, through ``EffectLedgerOptions(hooks=...)``.
Hooks run after the change is stored; one that raises is logged and never undoes the change or
fails the call that made it (the agent would retry a step that was recorded).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from typing import Any

from .errors import EffectLedgerValidationError
from .types import Actor, Effect, strict

logger = logging.getLogger("agent_ledger")

#: ``hook(effect)``, sync or async.
EffectHook = Callable[[Effect], Any]
#: ``hook(effect, decision, actor)``: decision is "approve", "deny" or "cancel".
DecisionHook = Callable[[Effect, str, Actor], Any]


@strict
@dataclasses.dataclass(frozen=True)
class LedgerHooks:
    #: An effect now waits for a human (a run or ``propose`` that needs approval).
    approval_requested: EffectHook | None = None
    #: A decision went through this ledger (approve, deny, cancel).
    decided: DecisionHook | None = None
    #: A tool call this ledger ran finished (succeeded or failed).
    finished: EffectHook | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and not callable(value):
                raise EffectLedgerValidationError("must be callable", field=field.name)


async def call_hook(hook: Callable[..., Any] | None, *args: Any) -> None:
    if hook is None:
        return
    try:
        value = hook(*args)
        if inspect.isawaitable(value):
            await value
    except Exception:
        logger.exception("agent_ledger hook %r failed", hook)
