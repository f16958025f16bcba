"""HMAC-signed webhook requests, for approvers outside Django (chat bots, ticket systems).

The sender signs ``f"{timestamp}.".encode() + raw_body`` with a shared secret from
``AGENT_LEDGER["WEBHOOK_SECRETS"]`` and sends::

    X-Agent-Ledger-Timestamp: 1718000000
    X-Agent-Ledger-Signature: sha256=<hex HMAC-SHA256>

Several secrets may be configured (rotation): each is tried, the one that matches names the
actor (``webhook:<name>``). The timestamp bounds replays to ``WEBHOOK_TOLERANCE_SECONDS``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import time
from typing import Any

from rest_framework import status
from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import APIException, AuthenticationFailed
from rest_framework.request import Request

from ..conf import MIN_WEBHOOK_SECRET_LENGTH, ledger_settings

logger = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-Agent-Ledger-Timestamp"
SIGNATURE_HEADER = "X-Agent-Ledger-Signature"
SIGNATURE_SCHEME = "sha256"


@dataclasses.dataclass(frozen=True)
class WebhookSender:
    """``request.user`` for a signed webhook: who signed, not a Django user."""

    secret_name: str
    is_authenticated = True
    is_anonymous = False
    pk = None

    def get_username(self) -> str:
        return f"webhook:{self.secret_name}"

    def has_perm(self, perm: str, obj: Any = None) -> bool:
        return False


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header value for ``body`` sent at ``timestamp`` (for senders and tests)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SIGNATURE_SCHEME}={digest.hexdigest()}"


class WebhookNotConfigured(APIException):
    """No usable secret: the server's fault, not the sender's, so 503 rather than 401."""

    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The approval webhook is not configured."
    default_code = "not_configured"


def usable_secrets() -> dict[str, str]:
    """The configured secrets long enough to sign with; the others are never used.

    The system check (agent_ledger.E005) refuses short ones, but checks do not run under
    gunicorn or uwsgi: a missing environment variable (an empty secret) must not open the
    webhook to anyone who signs with the empty key.
    """
    secrets = ledger_settings.WEBHOOK_SECRETS
    if not isinstance(secrets, dict):
        return {}
    return {
        name: secret
        for name, secret in secrets.items()
        if isinstance(name, str)
        and isinstance(secret, str)
        and len(secret) >= MIN_WEBHOOK_SECRET_LENGTH
    }


class WebhookSignatureAuthentication(BaseAuthentication):
    """Authenticates a request by its HMAC signature; every failure is a 401 with a reason."""

    def authenticate(self, request: Request) -> tuple[WebhookSender, str]:
        secrets = usable_secrets()
        if not secrets:
            logger.error(
                "Approval webhook refused a request: AGENT_LEDGER['WEBHOOK_SECRETS'] has no "
                "secret of %d+ characters.",
                MIN_WEBHOOK_SECRET_LENGTH,
            )
            raise WebhookNotConfigured()
        timestamp = request.headers.get(TIMESTAMP_HEADER, "").strip()
        signature = request.headers.get(SIGNATURE_HEADER, "").strip()
        if not signature:
            raise AuthenticationFailed(f"Missing {SIGNATURE_HEADER} header.", "missing_signature")
        if not timestamp:
            raise AuthenticationFailed(f"Missing {TIMESTAMP_HEADER} header.", "missing_timestamp")
        try:
            sent_at = int(timestamp)
        except ValueError:
            raise AuthenticationFailed(
                f"{TIMESTAMP_HEADER} must be a Unix time in whole seconds.", "bad_timestamp"
            ) from None
        tolerance = ledger_settings.WEBHOOK_TOLERANCE_SECONDS
        skew = time.time() - sent_at
        if abs(skew) > tolerance:
            raise AuthenticationFailed(
                f"Stale timestamp: {TIMESTAMP_HEADER} is {abs(skew):.0f} s "
                f"{'old' if skew > 0 else 'in the future'}; the tolerance is {tolerance} s.",
                "stale_timestamp",
            )
        scheme, _, given = signature.partition("=")
        if scheme != SIGNATURE_SCHEME or not given:
            raise AuthenticationFailed(
                f"{SIGNATURE_HEADER} must look like '{SIGNATURE_SCHEME}=<hex>'.", "bad_signature"
            )
        body = request.body  # the raw bytes, read before DRF parses them
        given_bytes = given.strip().lower().encode()
        matched = None
        # Every secret is compared (constant time each), whichever matches first.
        for name, secret in secrets.items():
            expected = sign(secret, timestamp, body).partition("=")[2].encode()
            if hmac.compare_digest(expected, given_bytes) and matched is None:
                matched = name
        if matched is None:
            raise AuthenticationFailed(
                "Bad signature: it matches none of the configured webhook secrets.",
                "bad_signature",
            )
        return WebhookSender(matched), matched

    def authenticate_header(self, request: Request) -> str:
        return 'HMAC-SHA256 realm="agent-ledger"'
