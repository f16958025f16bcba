"""Model permissions, the same ones the admin checks; never ``is_staff``."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission
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


class IsSignedWebhook(BasePermission):
    """The request carried a valid signature (``WebhookSignatureAuthentication`` said so)."""

    def has_permission(self, request: Request, view: Any) -> bool:
        from .authentication import WebhookSender

        return isinstance(request.user, WebhookSender)
