"""Where a person (or a model, in a tool message) can see and decide an effect."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from .types import Effect

__all__ = ["LinkError", "approval_link", "read_link", "urls_for"]

_SALT = "agent_ledger.approval_link"


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


def approval_link(effect: Any, *, expires_in: float = 24 * 3600, request: Any = None) -> str:
    """A one-click URL for email or chat: signed (``django.core.signing``, keyed by
    ``SECRET_KEY``), bound to the effect's id, its arguments' hash and an expiry, usable once.
    It opens a confirmation page (GET shows, POST decides) for a logged-in user who may decide.
    Needs ``path("ledger/", include("agent_ledger.urls"))``. ``effect``: an ``Effect`` or a row."""
    from django.core import signing
    from django.urls import reverse

    if not expires_in > 0:
        raise ValueError("expires_in must be positive")
    token = signing.dumps(
        {
            "e": str(effect.id if isinstance(effect, Effect) else effect.pk),
            "h": args_hash(effect.args_canonical),
            "x": int(time.time() + expires_in),
            "n": secrets.token_hex(8),  # the link's own id: "link:<n>" in the history
        },
        salt=_SALT,
        compress=True,
    )
    path = reverse("agent_ledger:approval-link", args=[token])
    return request.build_absolute_uri(path) if request is not None else path


class LinkError(Exception):
    """A link that must be refused, with the status a view answers."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def read_link(token: str) -> dict[str, Any]:
    """The link's claims, or ``LinkError`` (400 forged or mangled, 410 expired)."""
    from django.core import signing

    try:
        claims = signing.loads(token, salt=_SALT)
    except signing.BadSignature:
        raise LinkError("This link is not valid.", 400) from None
    if not isinstance(claims, dict) or not {"e", "h", "x", "n"} <= set(claims):
        raise LinkError("This link is not valid.", 400)
    if time.time() > claims["x"]:
        raise LinkError("This link has expired.", 410)
    return claims


def args_hash(args_canonical: str) -> str:
    return hashlib.sha256(args_canonical.encode()).hexdigest()[:32]
