"""Model permissions, the same ones the admin checks; never ``is_staff``."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.utils.http import is_same_domain
from rest_framework.authentication import (
    BasicAuthentication,
    RemoteUserAuthentication,
    SessionAuthentication,
)
from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request

VIEW_PERMISSION = "agent_ledger.view_effect"
APPROVE_PERMISSION = "agent_ledger.approve_effect"


class _HasPermission(BasePermission):
    permission = ""

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        return bool(user and user.is_authenticated and user.has_perm(self.permission))


class CanViewEffects(_HasPermission):
    """List and retrieve effects and their history."""

    permission = VIEW_PERMISSION
    message = "You need the agent_ledger.view_effect permission."


class CanApproveEffects(_HasPermission):
    """Approve or deny an effect awaiting approval."""

    permission = APPROVE_PERMISSION
    message = "You need the agent_ledger.approve_effect permission."


#: Credentials a browser attaches by itself to any request, a cross-site one included.
AMBIENT_AUTHENTICATION = (BasicAuthentication, SessionAuthentication, RemoteUserAuthentication)


class SameSiteForAmbientCredentials(BasePermission):
    """Refuses unsafe requests from another site when the browser supplied the credentials.

    A browser that once answered a Basic challenge (or holds a session) sends those credentials
    with a cross-site form POST too, even ``text/plain`` with an empty body, which needs no CORS
    preflight. Session authentication has CSRF; Basic has nothing. So for ambient credentials
    ``Origin`` must be this site or in ``CSRF_TRUSTED_ORIGINS``, and ``Sec-Fetch-Site`` must not
    say cross-site. A request with neither header (curl, a server) is not a browser's and passes.
    """

    message = "Cross-site request refused: its Origin is not this site or a trusted origin."
    code = "cross_site_request"

    def has_permission(self, request: Request, view: Any) -> bool:
        if request.method in SAFE_METHODS:
            return True
        if not isinstance(request.successful_authenticator, AMBIENT_AUTHENTICATION):
            return True
        origin = request.headers.get("Origin")
        if origin is not None:
            return _trusted_origin(request, origin)
        fetch_site = request.headers.get("Sec-Fetch-Site")
        return fetch_site is None or fetch_site in ("same-origin", "none")


def _trusted_origin(request: Request, origin: str) -> bool:
    """Django's own rule (``CsrfViewMiddleware``): the request's host, or a trusted origin."""
    if origin == "null":
        return False
    if origin == f"{request.scheme}://{request.get_host()}":
        return True
    if origin in settings.CSRF_TRUSTED_ORIGINS:
        return True
    parts = urlsplit(origin)
    wildcards = [urlsplit(trusted) for trusted in settings.CSRF_TRUSTED_ORIGINS if "*" in trusted]
    return any(
        parts.scheme == trusted.scheme and is_same_domain(parts.netloc, trusted.netloc[1:])
        for trusted in wildcards
        if trusted.netloc.startswith("*.")
    )


class IsSignedWebhook(BasePermission):
    """The request carried a valid signature (``WebhookSignatureAuthentication`` said so)."""

    def has_permission(self, request: Request, view: Any) -> bool:
        from .authentication import WebhookSender

        return isinstance(request.user, WebhookSender)
