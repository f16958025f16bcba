"""``ChangeNotifier``: waking waiters of an effect, from any thread, without growing forever."""

from __future__ import annotations

import asyncio
import threading

from agent_ledger.stores.base import ChangeNotifier


async def test_a_change_wakes_the_waiters_of_that_effect_with_its_state() -> None:
    notifier = ChangeNotifier()
    waiters = [asyncio.ensure_future(notifier.wait("a", 5, since=1e18)) for _ in range(3)]
    other = asyncio.ensure_future(notifier.wait("b", 0.2, since=1e18))
    await asyncio.sleep(0.01)
    threading.Thread(target=notifier.notify, args=("a", None)).start()  # from another thread
    assert await asyncio.gather(*waiters) == [None, None, None]
    assert await other is None  # timed out: nobody changed "b"


async def test_a_change_just_before_the_wait_is_not_missed() -> None:
    notifier = ChangeNotifier()
    notifier.notify("a")
    # A waiter that read the effect before that change (since = long ago) returns at once.
    assert await asyncio.wait_for(notifier.wait("a", 30, since=0), 1) is None


def test_memory_stays_bounded_under_sustained_load_oldest_forgotten_first() -> None:
    """Every change is remembered for late waiters, but never more than a fixed number: a busy
    process (thousands of effects a second) must not pay more per change as it runs."""
    notifier = ChangeNotifier()
    total = ChangeNotifier._REMEMBER_MAX + 5_000
    for index in range(total):
        notifier.notify(f"effect-{index}")
    remembered = notifier._changed
    assert len(remembered) == ChangeNotifier._REMEMBER_MAX
    assert "effect-0" not in remembered and f"effect-{total - 1}" in remembered
    assert next(iter(remembered)) == f"effect-{total - ChangeNotifier._REMEMBER_MAX}"
    notifier.notify("effect-0")  # a change of a forgotten effect is remembered again, newest
    assert next(reversed(remembered)) == "effect-0"
