"""Processes the PostgreSQL tests spawn (``python -m tests.workers.<name>``): real OS processes
for cross-process races, SIGKILL and Django configured against a throwaway schema."""
