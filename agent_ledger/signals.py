"""Signals for the moments people act on: a human is needed, a human decided, a tool finished.

Every signal is sent with ``sender=agent_ledger.models.Effect`` (the model class) and two
keyword arguments: ``effect`` (an ``agent_ledger.types.Effect``, the state after the change)
and ``actor`` (the ``agent_ledger.types.Actor`` who caused it). ``DjangoStore`` sends them with
``transaction.on_commit``: only once the change is committed, never for a rolled-back one, and
a receiver that raises is logged rather than undoing or failing the change.

    from django.dispatch import receiver
    from agent_ledger.signals import approval_requested

    @receiver(approval_requested)
    def ask_on_slack(sender, effect, actor, **kwargs):
        ...
"""

from django.dispatch import Signal

__all__ = [
    "approval_expiring",
    "approval_requested",
    "effect_approved",
    "effect_canceled",
    "effect_denied",
    "effect_failed",
    "effect_reopened",
    "effect_succeeded",
    "resume_done",
    "resume_failed",
]

#: An effect entered ``requires_approval`` (on ``begin`` or ``request_approval``).
approval_requested = Signal()
#: ``requires_approval -> ready``: the waiting (or next) run of the key will run the tool.
effect_approved = Signal()
#: ``requires_approval -> denied``.
effect_denied = Signal()
#: An unfinished effect was canceled.
effect_canceled = Signal()
#: The tool ran and its result was stored.
effect_succeeded = Signal()
#: The tool ran and raised (or returned something that is not JSON); the error was stored.
effect_failed = Signal()

# Resumptions (``agent_ledger.resume``) send theirs with ``sender=agent_ledger.models.Resumption``
# and ``resumption`` (the row) and ``effect`` (an ``agent_ledger.types.Effect``), as they happen
# (no transaction is open around a resumer).

#: A resumer ran and returned.
resume_done = Signal()
#: A resumer raised; also ``error`` (text) and ``final`` (True when no retry is scheduled).
resume_failed = Signal()

#: A pending approval expires soon (``notify_before`` of its tool's policy, or
#: ``EXPIRING_NOTICE_BEFORE``): sent once per effect by ``agent_ledger.expiry``, for escalation.
approval_expiring = Signal()

#: ``failed -> ready`` by an operator (``agent_ledger.retry_effect``): the next run runs again.
effect_reopened = Signal()
