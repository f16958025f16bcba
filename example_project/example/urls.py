from django.conf import settings
from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
    path("admin/", admin.site.urls),
    path("api/ledger/", include("agent_ledger.api.urls")),
]

if settings.HAVE_SPECTACULAR:
    from drf_spectacular.views import SpectacularSwaggerView

    urlpatterns.append(
        path(
            "api/ledger/docs/",
            SpectacularSwaggerView.as_view(url_name="agent_ledger_api:schema"),
            name="api-docs",
        )
    )
