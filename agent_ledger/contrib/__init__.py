"""Adapters for agent frameworks and task engines, one module each, behind an extra of its name.

Each module imports its framework (and only it does), so ``import agent_ledger.contrib.celery``
without Celery installed fails with that ImportError; nothing else in the app needs them.
"""
