"""Where a person (or a model, in a tool message) can see and decide an effect."""

from __future__ import annotations

from typing import Any

from .types import Effect

__all__ = ["urls_for"]


def urls_for(effect: Effect | str, *, request: Any = None) -> dict[str, str]:
    """The admin page and the API resource of an effect (or an effect id): paths, or absolute
    URLs when ``request`` is given. An URL whose app is not installed is left out (no API
    without ``agent_ledger.api.urls`` included)."""
    from django.urls import NoReverseMatch, reverse

    effect_id = effect.id if isinstance(effect, Effect) else str(effect)
    names = {
        "admin": "admin:agent_ledger_effect_change",
        "api": "agent_ledger_api:effect-detail",
    }
    urls: dict[str, str] = {}
    for key, name in names.items():
        try:
            path = reverse(name, args=[effect_id])
        except NoReverseMatch:
            continue
        urls[key] = request.build_absolute_uri(path) if request is not None else path
    return urls
