"""What ``DjangoStore`` adds for the data issue, kept apart so ``stores/django.py`` stays small:
the settings' redactor and the operator actions (ORM code in ``django_operator``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..redaction import Redactor, settings_redactor
from ..types import Actor, CommitOutcome
from ._process import in_thread
from ._tombstones import purged

if TYPE_CHECKING:
    from .base import TransitionRecord


def refuse_tombstoned(using: str, idem_key: str) -> None:
    """The ORM ``begin``, just after its insert and in a statement of its own: raise
    ``EffectPurgedError`` (undoing the caller's savepoint) when ``idem_key`` has a tombstone. A
    prune that deleted this key's effect (the insert waited for it) committed its tombstone
    before, so this statement sees it."""
    from ..models import EffectTombstone

    tombstone = EffectTombstone.objects.using(using).filter(idem_key=idem_key).first()
    if tombstone is not None:
        raise purged(idem_key, {"status": tombstone.status})


class DjangoDataMixin:
    """Mixed into ``DjangoStore`` (which provides ``using``)."""

    @property
    def redactor(self) -> Redactor | None:
        """``AGENT_LEDGER["REDACT"]``: what every ledger on this store redacts by default."""
        return settings_redactor()

    async def reopen(self, idem_key: str, *, actor: Actor, reason: str) -> TransitionRecord:
        from .django_operator import reopen_sync

        using = self.using  # type: ignore[attr-defined]
        return await in_thread(reopen_sync, using, idem_key, actor=actor, reason=reason)

    async def resolve(
        self, idem_key: str, outcome: CommitOutcome, *, actor: Actor, reason: str
    ) -> TransitionRecord:
        from .django_operator import resolve_sync

        using = self.using  # type: ignore[attr-defined]
        return await in_thread(resolve_sync, using, idem_key, outcome, actor=actor, reason=reason)
