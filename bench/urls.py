"""The admin and, when it imports, the REST API, mounted the way a project would mount them.

Either may not exist yet while the app is being written: ``API_ERROR`` / ``ADMIN_ERROR`` then
say why, and ``bench/audit_scale.py`` skips those measurements with that message.
"""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [path("admin/", admin.site.urls)]

ADMIN_ERROR: str | None = None
API_ERROR: str | None = None

try:
    import agent_ledger.admin  # noqa: F401  (registers the ModelAdmins)
except Exception as exc:
    ADMIN_ERROR = f"agent_ledger.admin does not import: {type(exc).__name__}: {exc}"

try:
    urlpatterns.append(path("api/ledger/", include("agent_ledger.api.urls")))
except Exception as exc:
    API_ERROR = f"agent_ledger.api.urls does not import: {type(exc).__name__}: {exc}"
