"""Adapters for agent frameworks and task engines, one module per framework.

Each module imports its framework and is installed with the extra of the same name
(``pip install "django-agent-ledger[langgraph]"``); nothing here is imported by
``agent_ledger`` itself.
"""
