"""Canonical JSON (RFC 8785, JCS) and the idempotency key.

The key must not depend on dict order, float spelling or the JSON library in use, so every
value is checked to be plain JSON first and then written in the one canonical form.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from .errors import EffectLedgerValidationError

if TYPE_CHECKING:
    from .types import ResourceDescriptor, ToolCall

#: RFC 8785 numbers are IEEE-754 doubles: larger integers would lose digits and two different
#: amounts could share a key, so they are refused instead.
MAX_SAFE_INTEGER = 2**53 - 1
#: Deeper nesting (or a cycle) is refused instead of hitting Python's recursion limit.
MAX_DEPTH = 100

_escape = json.encoder.encode_basestring


def check_json(value: Any, field: str, depth: int = 0, *, hashed: bool = True) -> bool:
    """Raise a validation error naming the path of the first value that is not plain JSON.

    ``hashed``: the value goes into a key, so integers must be exact as doubles; results are
    stored, not hashed, and may hold any integer (a 64-bit message id, say).

    Returns whether ``json.dumps(sort_keys=True)`` would already write the value exactly as
    RFC 8785 does (no floats, ASCII keys, plain dicts, lists and ints): ``canonical_json`` then
    lets the C encoder do the writing, which matters on every call's hot path.
    """
    if depth > MAX_DEPTH:
        raise EffectLedgerValidationError(
            f"nested deeper than {MAX_DEPTH} levels (or contains itself)", field=field
        )
    if value is None or value is True or value is False:
        return True
    if isinstance(value, str):
        _check_str(value, field)
        return True
    if isinstance(value, int):
        if hashed and abs(value) > MAX_SAFE_INTEGER:
            raise EffectLedgerValidationError(
                f"integer {value} is outside +/-(2**53-1) and cannot be canonicalised exactly",
                field=field,
            )
        return type(value) is int
    if isinstance(value, float):
        if not math.isfinite(value):
            raise EffectLedgerValidationError(f"{value} is not valid JSON", field=field)
        return False
    if isinstance(value, Mapping):
        plain = isinstance(value, dict)
        for key, item in value.items():
            if not isinstance(key, str):
                raise EffectLedgerValidationError(
                    f"object keys must be strings, got {type(key).__name__} {key!r}", field=field
                )
            _check_str(key, field)
            plain = check_json(item, f"{field}.{key}", depth + 1, hashed=hashed) and plain
            plain = plain and key.isascii()
        return plain
    if isinstance(value, (list, tuple)):
        plain = True
        for index, item in enumerate(value):
            plain = check_json(item, f"{field}[{index}]", depth + 1, hashed=hashed) and plain
        return plain
    raise EffectLedgerValidationError(
        f"{type(value).__name__} is not JSON (use str, int, float, bool, None, list or dict)",
        field=field,
    )


def _check_str(value: str, field: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EffectLedgerValidationError(
            "string contains a lone surrogate and is not valid Unicode", field=field
        ) from exc


def canonical_json(value: Any, field: str = "args") -> str:
    """Serialise ``value`` as RFC 8785 canonical JSON, validating it on the way."""
    if check_json(value, field):
        # Same bytes as _write for such values (a test compares the two on generated data).
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    parts: list[str] = []
    _write(value, parts)
    return "".join(parts)


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_escape(value))
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, Mapping):
        out.append("{")
        # JCS sorts member names by their UTF-16 code units, not by code points.
        for index, key in enumerate(sorted(value, key=lambda k: k.encode("utf-16-be"))):
            if index:
                out.append(",")
            out.append(_escape(key))
            out.append(":")
            _write(value[key], out)
        out.append("}")
    else:
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _write(item, out)
        out.append("]")


def _number(value: float) -> str:
    """ECMAScript Number.prototype.toString, which RFC 8785 adopts for every number."""
    if value == 0:
        return "0"
    # Below 2**53 every integer is exact and is its own shortest spelling; above it, str(int())
    # would print digits the double does not hold (2**68 -> "...825856", not "...830000").
    if value.is_integer() and abs(value) <= MAX_SAFE_INTEGER:
        return str(int(value))
    sign = "-" if value < 0 else ""
    # repr() gives the shortest digits that round-trip, which is what ECMAScript uses too.
    _, digit_tuple, exponent = Decimal(repr(abs(value))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    k = len(digits)
    n = int(exponent) + k  # value == 0.digits * 10**n
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        mantissa = digits if k == 1 else f"{digits[0]}.{digits[1:]}"
        text = f"{mantissa}e{'+' if n - 1 >= 0 else '-'}{abs(n - 1)}"
    return sign + text


def resource_canonical(resource: ResourceDescriptor) -> str:
    """``namespace/type/<JCS of id>``: the same spelling the upstream package hashes."""
    return f"{resource.namespace}/{resource.type}/{canonical_json(resource.id, 'resource.id')}"


def key_material(call: ToolCall, args_canonical: str) -> str:
    """The key's third part: the resource, else the chosen args, else all args."""
    if call.resource is not None:
        return resource_canonical(call.resource)
    if call.idempotency_keys:
        chosen = {name: call.args[name] for name in call.idempotency_keys}
        return canonical_json(chosen)
    return args_canonical


def idem_key(call: ToolCall, args_canonical: str | None = None) -> str:
    """Hex SHA-256 of ``workflow_id | tool | canonical JSON``."""
    if args_canonical is None:
        args_canonical = canonical_json(call.args)
    material = key_material(call, args_canonical)
    if call.key_scope == "call" and call.call_id is not None:
        # Length-prefixed, so no call id can be confused with the material after it.
        material = f"call:{len(call.call_id)}:{call.call_id}|{material}"
    return hashlib.sha256(f"{call.workflow_id}|{call.tool}|{material}".encode()).hexdigest()
