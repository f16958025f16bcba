"""LangGraph's PostgreSQL checkpointer and the ledger's PostgresStore in one database (and one
schema): the stock tool node runs a finished sibling again on resume; with the ledger it does
not. Uses ``TEST_POSTGRES_URL`` whatever ``DATABASE_URL`` says."""

from __future__ import annotations

from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.prebuilt import ToolNode
from langgraph.types import Command
from psycopg.rows import dict_row

from agent_ledger import EffectLedger, EffectLedgerOptions
from agent_ledger.contrib.langgraph import resume_command, tool_node
from agent_ledger.stores.postgres import PostgresStore
from tests.contrib.test_langgraph import Runs, graph, start, tools_for
from tests.stores.postgres import ledger_schema, schema_pool


async def test_on_the_postgres_checkpointer_a_finished_sibling_runs_once() -> None:
    async with (
        ledger_schema() as schema,
        schema_pool(schema) as store_pool,
        schema_pool(
            schema, kwargs={"autocommit": True, "row_factory": dict_row, "prepare_threshold": 0}
        ) as saver_pool,
    ):
        saver = AsyncPostgresSaver(saver_pool)  # type: ignore[arg-type]
        await saver.setup()
        config = {"configurable": {"thread_id": "pg-1"}}

        stock_runs = Runs()
        stock = graph(ToolNode(tools_for(stock_runs, deploy_interrupts=True)), saver)
        await stock.ainvoke(start("pg-1"), config)
        await stock.ainvoke(Command(resume=True), config)
        assert stock_runs.finished.count("send_email") == 2  # without the ledger

        ledger = EffectLedger(EffectLedgerOptions(store=PostgresStore(pool=store_pool)))
        runs = Runs()
        app = graph(tool_node(tools_for(runs), ledger=ledger, requires_approval={"deploy"}), saver)
        config = {"configurable": {"thread_id": "pg-2"}}
        paused = await app.ainvoke(start("pg-2"), config)
        payload = paused["__interrupt__"][0].value
        assert payload["urls"] == {} or "admin" in payload["urls"]
        await app.ainvoke(resume_command(await app.aget_state(config)), config)  # early
        await ledger.approve(payload["idem_key"], actor="admin")
        done = await app.ainvoke(resume_command(await app.aget_state(config)), config)
        assert done["messages"][-1].content == "done"
        assert sorted(runs.finished) == ["deploy", "send_email"]
        async with store_pool.connection() as conn:
            rows = await (
                await conn.execute(
                    "SELECT tool, status FROM agent_ledger_effect WHERE workflow_id = 'pg-2'"
                )
            ).fetchall()
        assert sorted(rows) == [("deploy", "succeeded"), ("send_email", "succeeded")]
