"""``path("api/ledger/", include("agent_ledger.api.urls"))``.

- ``effects/``: list (filters, ordering, cursor pages); ``effects/<id>/``: one with its history
- ``effects/<id>/approve/``, ``effects/<id>/deny/``: POST ``{"reason": ...}``
- ``webhook/``: signed decisions from external approvers
- ``effects/<id>/retry/``, ``effects/<id>/resolve/``: operator actions (``api.operator``)
- ``export/``: the audit trail as JSON Lines or CSV (``api.export``)
- ``schema/``: the OpenAPI schema, when drf-spectacular is installed
"""

from __future__ import annotations

from typing import Any

from django.urls import URLPattern, URLResolver, path
from rest_framework.routers import SimpleRouter

from .export import ExportView
from .operator import ResolveView, RetryView
from .schema import HAVE_SPECTACULAR
from .views import EffectViewSet, WebhookView

app_name = "agent_ledger_api"

router = SimpleRouter()
router.register("effects", EffectViewSet, basename="effect")

urlpatterns: list[URLPattern | URLResolver] = [
    *router.urls,
    path("webhook/", WebhookView.as_view(), name="webhook"),
    path("effects/<uuid:pk>/retry/", RetryView.as_view(), name="effect-retry"),
    path("effects/<uuid:pk>/resolve/", ResolveView.as_view(), name="effect-resolve"),
    path("export/", ExportView.as_view(), name="export"),
]

if HAVE_SPECTACULAR:
    from django.urls import reverse
    from drf_spectacular.views import SpectacularAPIView

    class LedgerSchemaView(SpectacularAPIView):
        """This API's schema alone (paths relative to where it is mounted), not the project's."""

        urlconf = __name__
        schema = None  # not an endpoint of the API it describes
        custom_settings = {
            "TITLE": "Agent ledger API",
            "ENUM_NAME_OVERRIDES": {"EffectStatusEnum": "agent_ledger.models.EffectStatus"},
        }

        def get(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            base = reverse(f"{request.resolver_match.namespace}:effect-list")
            base = base[: -len("effects/")]
            self.custom_settings = {**self.custom_settings, "SERVERS": [{"url": base}]}
            return super().get(request, *args, **kwargs)  # type: ignore[no-untyped-call]

    urlpatterns.append(path("schema/", LedgerSchemaView.as_view(), name="schema"))
