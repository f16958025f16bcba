"""Redaction before storage: secrets in a call's arguments and results never reach the tables.

A ``Redactor`` holds rules; the ledger applies them to what it stores, after the idempotency key
was computed from the raw arguments (so replays still dedupe):

- the arguments (``args_canonical``) and the handler's result: every value under a key path a
  rule matches becomes ``"[redacted]"`` (or ``"[redacted:<hash>]"``, a keyed hash so equal
  secrets can be matched without being revealed);
- the error message of a handler that raised: every string found under a redacted path of the
  arguments is cut out of it (``"card 4242... declined"`` -> ``"card [redacted] declined"``).

What the store holds is what the admin, the API, signals, exports and logs show. The handler
itself is given the raw arguments (``effect.args``); every caller, fresh or replay, gets the
redacted result back, so a fresh run returns exactly what a replay will.

Rules (``paths``) are key-path patterns, matched case-insensitively against the *end* of a
value's path (dict keys joined with dots; list items keep their parent's path), with ``*`` and
``?`` globs inside one segment:

- ``"authorization"``: any key named so, at any depth;
- ``"card.number"``: ``number`` inside any ``card``; ``"*.api_key"``: ``api_key`` one level
  below anything (not a top-level ``api_key``);
- ``"$.token"``: anchored at the root: only the top-level ``token``.

``tools`` adds rules for tools whose names match a glob (``{"stripe.*": ["customer.email"]}``);
the per-tool policies (``AGENT_LEDGER["TOOLS"]``) plug in here. ``function(value, tool=, part=)``
runs last on the redacted copy (``part`` is ``"args"`` or ``"result"``) and returns what to
store. In a Django project, ``AGENT_LEDGER["REDACT"]`` configures the redactor every ledger on
``DjangoStore`` uses (``settings_redactor``); elsewhere pass ``EffectLedgerOptions(redact=...)``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from . import keys
from .errors import EffectLedgerValidationError
from .types import CommitFailed, CommitOutcome, CommitSucceeded, Effect, EffectError

__all__ = ["REDACTED", "Redactor", "settings_redactor"]

REDACTED = "[redacted]"
#: Hex digits of the keyed hash shown with ``hash_key`` (48 bits: enough to match, not to guess).
HASH_DIGITS = 12
#: Shorter strings are not cut out of error messages (too likely to hit innocent text).
MIN_SECRET_LENGTH = 4

RedactFunction = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class _Rule:
    segments: tuple[str, ...]
    anchored: bool

    def matches(self, path: Sequence[str]) -> bool:
        size = len(self.segments)
        if len(path) < size or (self.anchored and len(path) != size):
            return False
        tail = path[len(path) - size :]
        return all(
            fnmatch.fnmatchcase(key, seg) for key, seg in zip(tail, self.segments, strict=True)
        )


def _rule(pattern: object, field: str) -> _Rule:
    if not isinstance(pattern, str) or not pattern.strip():
        raise EffectLedgerValidationError(
            f"rules must be non-empty strings, got {pattern!r}", field=field
        )
    text = pattern.strip().lower()
    anchored = text.startswith("$.")
    segments = tuple(text[2:].split(".") if anchored else text.split("."))
    if any(not segment for segment in segments):
        raise EffectLedgerValidationError(f"{pattern!r} has an empty segment", field=field)
    return _Rule(segments, anchored)


def _rules(patterns: object, field: str) -> tuple[_Rule, ...]:
    if isinstance(patterns, str) or not isinstance(patterns, Iterable):
        raise EffectLedgerValidationError(
            f"must be a list of key-path patterns, got {type(patterns).__name__}", field=field
        )
    return tuple(_rule(pattern, field) for pattern in patterns)


class Redactor:
    """Rules for what must not be stored; see the module docstring. Immutable and thread-safe."""

    def __init__(
        self,
        paths: Iterable[str] = (),
        *,
        tools: Mapping[str, Iterable[str]] | None = None,
        function: RedactFunction | None = None,
        hash_key: bytes | str | None = None,
    ) -> None:
        self._rules = _rules(paths, "redact.paths")
        if tools is not None and not isinstance(tools, Mapping):
            raise EffectLedgerValidationError(
                f"must map tool-name globs to rules, got {type(tools).__name__}",
                field="redact.tools",
            )
        self._tools: tuple[tuple[str, tuple[_Rule, ...]], ...] = tuple(
            (_tool_glob(glob), _rules(rules, f"redact.tools[{glob!r}]"))
            for glob, rules in (tools or {}).items()
        )
        if function is not None and not callable(function):
            raise EffectLedgerValidationError("must be callable", field="redact.function")
        self._function = function
        if hash_key is not None and not isinstance(hash_key, (bytes, str)):
            raise EffectLedgerValidationError("must be bytes or str", field="redact.hash_key")
        if isinstance(hash_key, str):
            hash_key = hash_key.encode()
        if hash_key is not None and len(hash_key) < 16:
            raise EffectLedgerValidationError("must be at least 16 bytes", field="redact.hash_key")
        self._hash_key = hash_key

    def __bool__(self) -> bool:
        """Whether there is anything to redact (the ledger skips all work otherwise)."""
        return bool(self._rules or self._tools or self._function)

    def __repr__(self) -> str:
        return f"Redactor({len(self._rules)} rules, {len(self._tools)} tool globs)"

    # -- what the ledger calls -----------------------------------------------------------------

    def redact(self, value: Any, *, tool: str, part: str) -> tuple[Any, list[str]]:
        """A redacted copy of ``value`` (the args or a result of ``tool``), and the strings it
        took out (to cut from error messages)."""
        rules = self.rules_for(tool)
        found: list[str] = []
        redacted = self._walk(value, (), rules, found) if rules else value
        if self._function is not None:
            redacted = self._function(redacted, tool=tool, part=part)
        return redacted, found

    def args_canonical(self, tool: str, args: Mapping[str, Any]) -> str:
        """The canonical JSON of the redacted arguments: what the store keeps."""
        redacted, _ = self.redact(args, tool=tool, part="args")
        return keys.canonical_json(redacted, "args")

    def error(self, error: EffectError, secrets: Iterable[str]) -> EffectError:
        """``error`` with every one of ``secrets`` cut out of its message."""
        message = error.message
        for secret in sorted(set(secrets), key=len, reverse=True):
            if len(secret) >= MIN_SECRET_LENGTH:
                message = message.replace(secret, REDACTED)
        return error if message == error.message else EffectError(message, error.code)

    def outcome(self, effect: Effect, outcome: CommitOutcome) -> CommitOutcome:
        """What the store keeps of ``effect``'s outcome: the result with the rules applied, an
        error message without the strings redacted from ``effect``'s arguments (the handler's
        raw ones, when the ledger has them). A redaction that fails stores a failure (code
        ``redaction_failed``), never the unredacted result."""
        try:
            secrets = self.redact(effect.args, tool=effect.tool, part="args")[1]
            if isinstance(outcome, CommitSucceeded):
                result = self.redact(outcome.result, tool=effect.tool, part="result")[0]
                keys.check_json(result, "result", hashed=False)
                return CommitSucceeded(result=json.loads(json.dumps(result, default=dict)))
            return CommitFailed(self.error(outcome.error, secrets))
        except Exception as exc:
            # Never store what could not be redacted, and never leave the effect processing.
            message = f"redaction failed ({type(exc).__name__}); the outcome was not stored"
            return CommitFailed(EffectError(message, code="redaction_failed"))

    def rules_for(self, tool: str) -> tuple[_Rule, ...]:
        """The global rules plus those of every tool glob ``tool`` matches."""
        rules = self._rules
        for glob, extra in self._tools:
            if fnmatch.fnmatchcase(tool, glob):
                rules = rules + extra
        return rules

    # -- internals -----------------------------------------------------------------------------

    def _walk(
        self, value: Any, path: tuple[str, ...], rules: tuple[_Rule, ...], found: list[str]
    ) -> Any:
        if isinstance(value, Mapping):
            copy = {}
            for key, item in value.items():
                here = (*path, str(key).lower())
                if any(rule.matches(here) for rule in rules):
                    _collect(item, found)
                    copy[key] = self._mask(item)
                else:
                    copy[key] = self._walk(item, here, rules, found)
            return copy
        if isinstance(value, (list, tuple)):
            return [self._walk(item, path, rules, found) for item in value]
        return value

    def _mask(self, value: Any) -> str:
        if self._hash_key is None:
            return REDACTED
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
        digest = hmac.new(self._hash_key, text.encode(), hashlib.sha256).hexdigest()
        return f"[redacted:{digest[:HASH_DIGITS]}]"


def _tool_glob(glob: object) -> str:
    if not isinstance(glob, str) or not glob:
        raise EffectLedgerValidationError(
            f"tool globs must be non-empty strings, got {glob!r}", field="redact.tools"
        )
    return glob


def _collect(value: Any, found: list[str]) -> None:
    """Every scalar under a redacted path, as text (error messages quote them that way)."""
    if isinstance(value, Mapping):
        for item in value.values():
            _collect(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect(item, found)
    elif isinstance(value, str):
        found.append(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        found.append(str(value))


# -- Django settings ------------------------------------------------------------------------------

#: The keys ``AGENT_LEDGER["REDACT"]`` may have when it is a dict.
SETTING_KEYS = frozenset({"paths", "tools", "function", "hash", "hash_key"})


def settings_redactor() -> Redactor | None:
    """The ``Redactor`` of ``AGENT_LEDGER["REDACT"]``, read at call time (None when unset)::

    "REDACT": ["authorization", "*.api_key", "card.number"]      # or, in full:
    "REDACT": {"paths": [...], "tools": {"stripe.*": [...]}, "function": "pkg.mod.fn",
               "hash": True, "hash_key": None}  # hash_key default: derived from SECRET_KEY
    """
    from django.conf import settings

    from .conf import ledger_settings

    value = ledger_settings.REDACT
    if value is None:
        return None
    try:
        key = json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise EffectLedgerValidationError(
            f"must hold only lists, dicts, strings and bools: {exc}", field="REDACT"
        ) from exc
    return _build(key, str(getattr(settings, "SECRET_KEY", "")))


@lru_cache(maxsize=8)
def _build(setting: str, secret_key: str) -> Redactor:
    """Built once per distinct setting (the ledger asks on every call)."""
    return redactor_from_setting(json.loads(setting), secret_key)


def redactor_from_setting(value: Any, secret_key: str) -> Redactor:
    """Validate ``AGENT_LEDGER["REDACT"]`` and build its ``Redactor`` (checks E011/E012 use it)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise EffectLedgerValidationError(
            f"must hold only lists, dicts, strings and bools: {exc}", field="REDACT"
        ) from exc
    if isinstance(value, (list, tuple)):
        value = {"paths": value}
    if not isinstance(value, Mapping):
        raise EffectLedgerValidationError(
            f"must be a list of rules or a dict, got {type(value).__name__}", field="REDACT"
        )
    unknown = sorted(set(value) - SETTING_KEYS)
    if unknown:
        raise EffectLedgerValidationError(
            f"unknown keys {unknown}; known: {sorted(SETTING_KEYS)}", field="REDACT"
        )
    function = value.get("function")
    if function is not None:
        function = _import_function(function)
    hashed = value.get("hash", False)
    if not isinstance(hashed, bool):
        raise EffectLedgerValidationError("must be a bool", field="REDACT['hash']")
    hash_key = value.get("hash_key")
    if hashed and hash_key is None:
        hash_key = hashlib.sha256(f"agent_ledger.redaction:{secret_key}".encode()).digest()
    return Redactor(
        value.get("paths", ()),
        tools=value.get("tools"),
        function=function,
        hash_key=hash_key if hashed else None,
    )


def _import_function(path: object) -> RedactFunction:
    from django.utils.module_loading import import_string

    if not isinstance(path, str):
        raise EffectLedgerValidationError(
            "must be a dotted path to a function", field="REDACT['function']"
        )
    try:
        function = import_string(path)
    except ImportError as exc:
        raise EffectLedgerValidationError(
            f"cannot import {path!r}: {exc}", field="REDACT['function']"
        ) from exc
    if not callable(function):
        raise EffectLedgerValidationError(f"{path!r} is not callable", field="REDACT['function']")
    return function  # type: ignore[no-any-return]
