"""OpenTelemetry spans for ``run`` and its waits and claims, when ``opentelemetry-api`` is
installed (the ``otel`` extra); without it every call here costs one attribute check."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

try:
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - exercised by the suite without the extra
    _trace = None  # type: ignore[assignment]


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A span named ``name`` (``None`` attributes are left out), or nothing."""
    if _trace is None:
        yield None
        return
    tracer = _trace.get_tracer("agent_ledger")
    clean = {f"agent_ledger.{key}": value for key, value in attributes.items() if value is not None}
    with tracer.start_as_current_span(name, attributes=clean) as current:
        yield current


def annotate(current: Any, **attributes: Any) -> None:
    """Add attributes to a span from ``span`` (a no-op without OpenTelemetry)."""
    if current is not None:
        for key, value in attributes.items():
            if value is not None:
                current.set_attribute(f"agent_ledger.{key}", value)
