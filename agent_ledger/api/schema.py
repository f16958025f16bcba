"""OpenAPI descriptions for drf-spectacular (the ``spectacular`` extra); no-ops without it."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])

HAVE_SPECTACULAR = importlib.util.find_spec("drf_spectacular") is not None


def view_schema() -> Any:
    """A view's ``schema``: spectacular's ``AutoSchema`` when installed, so this API's own
    schema view works whatever the project's ``DEFAULT_SCHEMA_CLASS`` is; else DRF's default."""
    if HAVE_SPECTACULAR:
        from drf_spectacular.openapi import AutoSchema

        return AutoSchema()
    from rest_framework.schemas import DefaultSchema

    return DefaultSchema()


def document(**kwargs: Any) -> Callable[[_F], _F]:
    """``extend_schema(**kwargs)`` when drf-spectacular is installed, else nothing."""
    if not HAVE_SPECTACULAR:
        return lambda func: func
    from drf_spectacular.openapi import AutoSchema
    from drf_spectacular.utils import extend_schema

    def decorate(func: _F) -> _F:
        # extend_schema builds on the method's schema class, else on DEFAULT_SCHEMA_CLASS.
        extra = getattr(func, "kwargs", None)
        if extra is None:
            extra = {}
            func.kwargs = extra  # type: ignore[attr-defined]
        extra.setdefault("schema", AutoSchema)
        return extend_schema(**kwargs)(func)

    return decorate


def response(serializer: Any, description: str) -> Any:
    """An ``OpenApiResponse`` for ``document(responses=...)``."""
    if not HAVE_SPECTACULAR:
        return None
    from drf_spectacular.utils import OpenApiResponse

    return OpenApiResponse(response=serializer, description=description)


if HAVE_SPECTACULAR:
    from drf_spectacular.extensions import OpenApiAuthenticationExtension

    class WebhookSignatureScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
        """Describes ``WebhookSignatureAuthentication`` (registered by being defined)."""

        target_class = "agent_ledger.api.authentication.WebhookSignatureAuthentication"
        name = "agentLedgerWebhookSignature"

        def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
            return {
                "type": "apiKey",
                "in": "header",
                "name": "X-Agent-Ledger-Signature",
                "description": (
                    "sha256=<hex HMAC-SHA256 of f'{timestamp}.' + raw body>, with the Unix "
                    "time in X-Agent-Ledger-Timestamp, keyed by a secret from "
                    "AGENT_LEDGER['WEBHOOK_SECRETS']."
                ),
            }
