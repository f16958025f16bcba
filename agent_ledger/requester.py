"""Who asked for a call: ``with agent_ledger.requested_by(request.user): ...``.

The ledger records the requester as the actor of an effect's first history row (and so as its
``requested_by``): an approval policy refuses that person's own approval (four eyes). A context
variable, so a Django view running a tool (``run_sync``, ``@ledgered``, ``propose``) passes its
user without threading it through the agent's code; it follows ``async_to_sync`` and tasks.
Django-free: ``user`` is anything with ``pk`` and ``get_username()``, or an ``Actor``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

from .errors import EffectLedgerValidationError
from .types import Actor

__all__ = ["current_requester", "requested_by"]

_requester: contextvars.ContextVar[Actor | None] = contextvars.ContextVar(
    "agent_ledger_requester", default=None
)


def as_actor(who: Any, label: str = "user") -> Actor:
    """An ``Actor`` for ``who``: an ``Actor`` as is, a user as ``label`` with its pk and name."""
    if isinstance(who, Actor):
        return who
    pk = getattr(who, "pk", None)
    if pk is None or not callable(getattr(who, "get_username", None)):
        raise EffectLedgerValidationError(
            f"must be an Actor or a saved user, got {type(who).__name__}", field="requested_by"
        )
    return Actor(label, user_id=pk, name=who.get_username())


@contextlib.contextmanager
def requested_by(who: Any, *, label: str = "user") -> Iterator[Actor]:
    """Effects created inside the block record ``who`` as their requester."""
    actor = as_actor(who, label)
    token = _requester.set(actor)
    try:
        yield actor
    finally:
        _requester.reset(token)


def current_requester() -> Actor | None:
    return _requester.get()
