from collections.abc import AsyncIterator

import pytest

from agent_ledger import MemoryStore


async def make(request: pytest.FixtureRequest) -> AsyncIterator[MemoryStore]:
    yield MemoryStore()
