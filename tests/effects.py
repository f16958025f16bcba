"""``NewEffect`` for tests that talk to a store directly (no ledger in between)."""

from __future__ import annotations

import secrets
import uuid
from typing import Any

from agent_ledger import EffectStatus
from agent_ledger.stores.base import NewEffect
from agent_ledger.types import SYSTEM


def new_effect(status: EffectStatus = EffectStatus.PROCESSING, **fields: Any) -> NewEffect:
    """A new effect under a key of its own; ``fields`` override any attribute."""
    values: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "idem_key": secrets.token_hex(32),
        "workflow_id": "wf-1",
        "call_id": str(uuid.uuid4()),
        "tool": "mail.send",
        "status": status,
        "args_canonical": '{"to":"a@example.com"}',
        "resource_id_canonical": None,
        "actor": SYSTEM,
    }
    values.update(fields)
    return NewEffect(**values)
