"""The admin's operator panel: **Retry** a failed effect, **Resolve** a processing one whose
outcome is unknown (``agent_ledger.operator``). POST-only views added with ``get_urls()``,
CSRF-protected, each checking its own permission (``agent_ledger.retry_effect``,
``agent_ledger.resolve_effect``) inside the view, going through ``agent_ledger.services`` so the
history row names the user. ``EffectAdmin`` mixes this in."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import messages
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import URLPattern, path, reverse
from django.utils.decorators import method_decorator
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from . import services
from .errors import EffectLedgerValidationError, EffectNotFoundError
from .operator import outcome_of
from .types import Actor


class OperatorAdminMixin:
    """Retry and resolve views and the permissions the change form asks about."""

    def has_retry_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm("agent_ledger.retry_effect")

    def has_resolve_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm("agent_ledger.resolve_effect")

    def operator_urls(self) -> list[URLPattern]:
        admin: Any = self
        info = admin.opts.app_label, admin.opts.model_name
        return [
            path(
                "<path:object_id>/retry/",
                admin.admin_site.admin_view(self.retry_view),
                name="{}_{}_retry".format(*info),
            ),
            path(
                "<path:object_id>/resolve/",
                admin.admin_site.admin_view(self.resolve_view),
                name="{}_{}_resolve".format(*info),
            ),
        ]

    def operator_context(self, request: HttpRequest) -> dict[str, bool]:
        return {
            "has_retry_permission": self.has_retry_permission(request),
            "has_resolve_permission": self.has_resolve_permission(request),
        }

    @method_decorator(require_POST)
    def retry_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if not self.has_retry_permission(request):
            raise PermissionDenied
        effect, here = self._operator_target(request, object_id)
        reason = request.POST.get("reason", "")

        def act() -> Any:
            return services.retry(effect.idem_key, actor=self._operator(request), reason=reason)

        done = _("Reopened: the next run of this call runs the tool again.")
        refused = _("Not reopened: only a failed effect can be retried (status: %s).")
        return self._operate(request, effect, here, act, done, refused, f"Retried: {reason}")

    @method_decorator(require_POST)
    def resolve_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if not self.has_resolve_permission(request):
            raise PermissionDenied
        effect, here = self._operator_target(request, object_id)
        form = request.POST
        reason = form.get("reason", "")
        try:
            result_text = form.get("result", "").strip()
            result = json.loads(result_text) if result_text else None
        except ValueError as exc:
            admin: Any = self
            admin.message_user(request, _("The result is not JSON: %s") % exc, messages.ERROR)
            return here

        def act() -> Any:
            outcome = outcome_of(
                form.get("outcome", ""),
                result=result,
                error_message=form.get("error_message", "").strip(),
                error_code=form.get("error_code", "").strip() or None,
            )
            return services.resolve(
                effect.idem_key, outcome, actor=self._operator(request), reason=reason
            )

        done = _("Resolved: the recorded outcome is now the effect's, for every caller.")
        refused = _("Not resolved: only a processing effect can be resolved (status: %s).")
        return self._operate(request, effect, here, act, done, refused, f"Resolved: {reason}")

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _operator(request: HttpRequest) -> Actor:
        return Actor("admin", user_id=request.user.pk, name=request.user.get_username())

    def _operator_target(self, request: HttpRequest, object_id: str) -> tuple[Any, HttpResponse]:
        admin: Any = self
        effect = admin.get_object(request, unquote(object_id))
        if effect is None:
            raise Http404(_("No effect with that id."))
        change = f"{admin.admin_site.name}:{admin.opts.app_label}_{admin.opts.model_name}_change"
        return effect, HttpResponseRedirect(reverse(change, args=(quote(effect.pk),)))

    def _operate(
        self,
        request: HttpRequest,
        effect: Any,
        here: HttpResponse,
        act: Any,
        done: str,
        refused: str,
        log: str,
    ) -> HttpResponse:
        admin: Any = self
        try:
            record = act()
        except EffectNotFoundError:
            admin.message_user(request, _("That effect no longer exists."), messages.ERROR)
            return here
        except EffectLedgerValidationError as exc:
            admin.message_user(request, str(exc), messages.ERROR)
            return here
        if record.changed:
            admin.log_change(request, effect, log)
            admin.message_user(request, done, messages.SUCCESS)
        else:
            admin.message_user(request, refused % record.effect.status.value, messages.WARNING)
        return here
