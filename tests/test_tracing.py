"""OpenTelemetry spans for ``run`` and its waits and claims (``otel`` extra)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent_ledger import (
    ConcurrencyOptions,
    EffectLedger,
    EffectLedgerOptions,
    MemoryStore,
    RunOptions,
    ToolCall,
)

_exporter = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider() -> None:
    """The global provider can be set once per process; the exporter is cleared per test."""
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(_exporter))
    trace.set_tracer_provider(tracer_provider)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    _exporter.clear()
    yield _exporter


def attributes(span: object) -> dict[str, object]:
    return {k.removeprefix("agent_ledger."): v for k, v in span.attributes.items()}  # type: ignore[attr-defined]


async def test_a_run_is_a_span_with_tool_workflow_key_and_replay(
    spans: InMemorySpanExporter,
) -> None:
    ledger = EffectLedger(EffectLedgerOptions(store=MemoryStore()))
    call = ToolCall(workflow_id="wf-1", tool="mail.send", args={"to": "a"})
    await ledger.run(call, lambda effect: "sent")
    await ledger.run(call, lambda effect: "sent")
    runs = [s for s in spans.get_finished_spans() if s.name == "agent_ledger.run"]
    assert [attributes(s) for s in runs] == [
        {"tool": "mail.send", "workflow": "wf-1", "idem_key": ledger.idem_key(call), "replay": r}
        for r in (False, True)
    ]


async def test_waits_and_claims_are_spans_too(spans: InMemorySpanExporter) -> None:
    ledger = EffectLedger(EffectLedgerOptions(store=MemoryStore()))
    call = ToolCall(workflow_id="wf-2", tool="k8s.deploy", args={})
    options = RunOptions(
        requires_approval=True, concurrency=ConcurrencyOptions(initial_interval_ms=5)
    )
    waiting = asyncio.ensure_future(ledger.run(call, lambda effect: "deployed", options))
    while await ledger.find_by_idem_key(ledger.idem_key(call)) is None:
        await asyncio.sleep(0.001)
    await ledger.approve(ledger.idem_key(call))
    assert await waiting == "deployed"
    names = [s.name for s in spans.get_finished_spans()]
    assert "agent_ledger.wait" in names
    claims = [s for s in spans.get_finished_spans() if s.name == "agent_ledger.claim"]
    assert [attributes(s)["claimed"] for s in claims] == [True]
    run = next(s for s in spans.get_finished_spans() if s.name == "agent_ledger.run")
    # The wait and the claim belong to the run.
    assert all(s.parent is not None and s.parent.span_id == run.context.span_id for s in claims)


def test_without_opentelemetry_nothing_is_traced() -> None:
    """The extra is optional: with the API missing, ``span`` yields None and costs nothing."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import asyncio\n"
        "from agent_ledger import EffectLedger, EffectLedgerOptions, MemoryStore, ToolCall\n"
        "from agent_ledger import tracing\n"
        "assert tracing._trace is None\n"
        "ledger = EffectLedger(EffectLedgerOptions(store=MemoryStore()))\n"
        "call = ToolCall(workflow_id='w', tool='t', args={})\n"
        "print(asyncio.run(ledger.run(call, lambda e: 'ok')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
