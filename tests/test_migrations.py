"""Migrations match the models, and the tables they make are the ones the models describe."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection

from agent_ledger.models import Effect, EffectTransition


@pytest.mark.django_db
def test_no_pending_migrations() -> None:
    out = StringIO()
    try:
        call_command("makemigrations", "--check", "--dry-run", stdout=out)
    except SystemExit:
        pytest.fail(f"models changed without a migration:\n{out.getvalue()}")


@pytest.mark.django_db
def test_migrated_tables_have_every_model_column_and_index() -> None:
    with connection.cursor() as cursor:
        for model in (Effect, EffectTransition):
            table = model._meta.db_table
            description = connection.introspection.get_table_description(cursor, table)
            columns = {column.name for column in description}
            assert columns == {f.column for f in model._meta.concrete_fields}
            constraints = connection.introspection.get_constraints(cursor, table)
            wanted = {i.name for i in model._meta.indexes} | {
                c.name for c in model._meta.constraints
            }
            missing = wanted - set(constraints)
            if connection.vendor == "sqlite":
                # SQLite's introspection does not report CHECK constraints by name.
                missing = {n for n in missing if "_gte_" not in n and "_valid" not in n}
            assert not missing


@pytest.mark.django_db
def test_the_active_index_is_partial_where_the_database_supports_it() -> None:
    if not connection.features.supports_partial_indexes:
        pytest.skip("no partial indexes on this database")
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT indexdef FROM pg_indexes WHERE indexname = %s", ["agent_ledger_active"]
            )
        else:
            cursor.execute("SELECT sql FROM sqlite_master WHERE name = %s", ["agent_ledger_active"])
        (definition,) = cursor.fetchone()
    assert "WHERE" in definition.upper()
    assert "requires_approval" in definition
