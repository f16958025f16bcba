"""``agent_ledger.keys``: RFC 8785 canonical JSON and the idempotency key."""

from __future__ import annotations

import hashlib
import json
import math
import random
import struct
from typing import Any

import pytest
import rfc8785
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agent_ledger import (
    EffectLedger,
    EffectLedgerOptions,
    MemoryStore,
    ResourceDescriptor,
    ToolCall,
)
from agent_ledger.errors import EffectLedgerValidationError
from agent_ledger.keys import MAX_SAFE_INTEGER, canonical_json, check_json, idem_key

# -- numbers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1e21, "1e+21"),
        (1e-7, "1e-7"),
        (0.000001, "0.000001"),
        (-0.0, "0"),
        (0.0, "0"),
        (333333333.33333329, "333333333.3333333"),
        (1e30, "1e+30"),
        (4.50, "4.5"),
        (2e-3, "0.002"),
        (0.000000000000000000000000001, "1e-27"),
        (100.0, "100"),
        (1e20, "100000000000000000000"),
        (-1.5, "-1.5"),
        (123456789.0, "123456789"),
    ],
)
def test_rfc8785_number_examples(value: float, expected: str) -> None:
    assert canonical_json(value) == expected


# RFC 8785 appendix B: IEEE-754 bit patterns and their canonical spelling.
APPENDIX_B = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize(("bits", "expected"), APPENDIX_B, ids=[b for b, _ in APPENDIX_B])
def test_rfc8785_appendix_b_numbers(bits: str, expected: str) -> None:
    (value,) = struct.unpack(">d", bytes.fromhex(bits))
    assert canonical_json(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "0"),
        (-7, "-7"),
        (MAX_SAFE_INTEGER, "9007199254740991"),
        (-MAX_SAFE_INTEGER, "-9007199254740991"),
    ],
)
def test_integers(value: int, expected: str) -> None:
    assert canonical_json(value) == expected


def test_int_and_equal_float_are_the_same_number() -> None:
    """JSON has one number type: 1 and 1.0 are the same argument, so the same key."""
    assert canonical_json({"n": 1}) == canonical_json({"n": 1.0}) == '{"n":1}'


# -- the RFC's sample object, strings and ordering ---------------------------------------------

RFC_SAMPLE_INPUT = r"""{
  "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
  "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
  "literals": [null, true, false]
}"""
RFC_SAMPLE_OUTPUT = (
    r'{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
    '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
)


def test_rfc8785_sample_object() -> None:
    assert canonical_json(json.loads(RFC_SAMPLE_INPUT)) == RFC_SAMPLE_OUTPUT


def test_keys_sort_by_utf16_code_units() -> None:
    """RFC 8785 section 3.2.3: the emoji (a surrogate pair) sorts before U+FB33."""
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }

    text = canonical_json(value)

    assert list(json.loads(text)) == [
        "\r",
        "1",
        "\u0080",
        "\u00f6",
        "\u20ac",
        "\U0001f600",
        "\ufb33",
    ]
    assert text.startswith('{"\\r":"Carriage Return","1":"One","\u0080":"Control",')
    assert text.endswith(
        '"\U0001f600":"Emoji: Grinning Face","\ufb33":"Hebrew Letter Dalet With Dagesh"}'
    )


def test_nested_objects_are_sorted_and_arrays_keep_order() -> None:
    value = {"b": [3, 1, {"z": 1, "a": 2}], "a": {"y": None, "x": True}}
    assert canonical_json(value) == '{"a":{"x":true,"y":null},"b":[3,1,{"a":2,"z":1}]}'


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", '"plain"'),
        ('quote " and backslash \\', '"quote \\" and backslash \\\\"'),
        ("\b\t\n\f\r", '"\\b\\t\\n\\f\\r"'),
        ("\x00\x01\x1f", '"\\u0000\\u0001\\u001f"'),
        ("\x7f", '"\x7f"'),
        ("slash /", '"slash /"'),
        ("caf\u00e9 \u20ac \U0001f600", '"caf\u00e9 \u20ac \U0001f600"'),
        ("\u2028\u2029", '"\u2028\u2029"'),
    ],
    ids=["plain", "quote", "short escapes", "control", "del", "slash", "non-ascii", "separators"],
)
def test_string_escaping(value: str, expected: str) -> None:
    assert canonical_json(value) == expected
    assert canonical_json(value) == rfc8785.dumps(value).decode()


def test_tuples_are_arrays() -> None:
    assert canonical_json({"t": (1, "a")}) == canonical_json({"t": [1, "a"]}) == '{"t":[1,"a"]}'


# -- errors name the path -----------------------------------------------------------------------


class Opaque:
    pass


def _deep(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"a": math.nan}, "args.a"),
        ({"a": [1, {"b": math.inf}]}, "args.a[1].b"),
        ({"a": -math.inf}, "args.a"),
        ({"a": {1, 2}}, "args.a"),
        ({"a": b"x"}, "args.a"),
        ({"a": Opaque()}, "args.a"),
        ({"a": {1: "x"}}, "args.a"),
        ({"a": [MAX_SAFE_INTEGER + 1]}, "args.a[0]"),
        ({"a": -(2**60)}, "args.a"),
        ({"a": "x\ud800"}, "args.a"),
        ({"a": {"\udfff": 1}}, "args.a"),
    ],
    ids=[
        "nan",
        "nested inf",
        "-inf",
        "set",
        "bytes",
        "object",
        "int key",
        "big int",
        "big negative int",
        "surrogate value",
        "surrogate key",
    ],
)
def test_bad_values_raise_validation_error_naming_the_path(value: Any, field: str) -> None:
    with pytest.raises(EffectLedgerValidationError) as raised:
        canonical_json(value)
    assert raised.value.field == field
    assert field in str(raised.value)


@pytest.mark.parametrize("value", [_deep(5_000), None], ids=["deep list", "circular dict"])
def test_pathological_nesting_is_a_validation_error_not_a_crash(value: Any) -> None:
    if value is None:
        value = {}
        value["self"] = value
    with pytest.raises(EffectLedgerValidationError) as raised:
        canonical_json({"a": value})
    assert raised.value.field is not None
    assert raised.value.field.startswith("args.a")


def test_reasonable_nesting_is_fine() -> None:
    assert canonical_json({"a": _deep(30)}) == '{"a":' + "[" * 31 + "]" * 31 + "}"


# -- the key ------------------------------------------------------------------------------------


def test_key_formula_is_pinned() -> None:
    call = ToolCall(
        workflow_id="order-123", tool="stripe.charge", args={"currency": "usd", "amount": 1000}
    )
    material = b'order-123|stripe.charge|{"amount":1000,"currency":"usd"}'

    assert idem_key(call) == hashlib.sha256(material).hexdigest()
    assert idem_key(call) == "62e4e85778aaf14f501a4737980621d707a0316b814e4b2094bed1aaaf2107cb"


def test_resource_descriptor_replaces_args_in_the_key() -> None:
    resource = ResourceDescriptor(
        namespace="github", type="issue", id={"repo": "app", "owner": "acme"}
    )
    call = ToolCall(
        workflow_id="order-123",
        tool="github.create_issue",
        args={"title": "Bug report", "body": "Details..."},
        resource=resource,
    )
    reworded = ToolCall(
        workflow_id="order-123",
        tool="github.create_issue",
        args={"title": "Bug report (retry)", "body": "More details"},
        resource=resource,
    )
    material = b'order-123|github.create_issue|github/issue/{"owner":"acme","repo":"app"}'

    assert idem_key(call) == hashlib.sha256(material).hexdigest()
    assert idem_key(call) == "35e3133897294dd5c1b0a1af6db9065d9fe4d95095558696994aa0a116d694f0"
    assert idem_key(reworded) == idem_key(call)


def test_other_resource_gives_other_key() -> None:
    def call(repo: str) -> ToolCall:
        return ToolCall(
            workflow_id="w",
            tool="t",
            args={},
            resource=ResourceDescriptor(namespace="github", type="issue", id={"repo": repo}),
        )

    assert idem_key(call("app")) != idem_key(call("web"))


def test_idempotency_keys_choose_the_args_in_the_key() -> None:
    def call(**args: Any) -> ToolCall:
        return ToolCall(
            workflow_id="w", tool="mail.send", args=args, idempotency_keys=["to", "subject"]
        )

    base = call(to="a@example.com", subject="Hi", trace_id="t-1")
    material = b'w|mail.send|{"subject":"Hi","to":"a@example.com"}'

    assert idem_key(base) == hashlib.sha256(material).hexdigest()
    assert idem_key(call(to="a@example.com", subject="Hi", trace_id="t-2")) == idem_key(base)
    assert idem_key(call(to="b@example.com", subject="Hi", trace_id="t-1")) != idem_key(base)


def test_resource_wins_over_idempotency_keys() -> None:
    resource = ResourceDescriptor(namespace="crm", type="contact", id={"id": 5})
    with_keys = ToolCall(
        workflow_id="w", tool="t", args={"a": 1}, resource=resource, idempotency_keys=["a"]
    )
    material = b'w|t|crm/contact/{"id":5}'

    assert idem_key(with_keys) == hashlib.sha256(material).hexdigest()


def test_ledger_key_is_the_module_key() -> None:
    ledger = EffectLedger(EffectLedgerOptions(store=MemoryStore()))
    call = ToolCall(workflow_id="w", tool="t", args={"b": [1.0, 2.5], "a": "x"})

    assert ledger.idem_key(call) == idem_key(call)
    assert ledger.idem_key(call) == hashlib.sha256(b'w|t|{"a":"x","b":[1,2.5]}').hexdigest()


def test_key_is_lowercase_sha256_hex() -> None:
    key = idem_key(ToolCall(workflow_id="w", tool="t", args={}))
    assert len(key) == 64
    assert set(key) <= set("0123456789abcdef")


# -- properties ---------------------------------------------------------------------------------

text = st.text(st.characters(codec="utf-8"), max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(text, json_values, max_size=5)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_canonical_json_matches_rfc8785_reference(value: Any) -> None:
    assert canonical_json(value) == rfc8785.dumps(value).decode()


ascii_text = st.text(st.characters(codec="ascii"), max_size=12)
#: Values canonical_json writes with the C encoder: no floats, ASCII keys (any string values).
encoder_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER)
    | text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(ascii_text, children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(encoder_values)
def test_the_encoder_fast_path_matches_rfc8785_reference(value: Any) -> None:
    assert check_json(value, "args") is True
    assert canonical_json(value) == rfc8785.dumps(value).decode()


@pytest.mark.parametrize(
    "value",
    [{"a": 1.5}, {"é": 1}, [{"k": {"\U0001f600": 1, "\ufb01": 2}}], {"n": 10.0}],
    ids=["float", "non-ascii key", "utf16 order", "integral float"],
)
def test_values_json_dumps_would_spell_differently_take_the_jcs_writer(value: Any) -> None:
    assert check_json(value, "args") is False
    assert canonical_json(value) == rfc8785.dumps(value).decode()


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_every_finite_float_matches_rfc8785_reference(value: float) -> None:
    assert canonical_json(value) == rfc8785.dumps(value).decode()


def _reordered(value: Any, rng: random.Random) -> Any:
    """The same JSON value with every dict's insertion order shuffled."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _reordered(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_reordered(v, rng) for v in value]
    return value


@settings(max_examples=60, deadline=None)
@given(json_objects, st.randoms(use_true_random=False))
def test_key_does_not_depend_on_dict_order(args: dict[str, Any], rng: random.Random) -> None:
    shuffled = _reordered(args, rng)
    assert shuffled == args

    first = ToolCall(workflow_id="w", tool="t", args=args)
    second = ToolCall(workflow_id="w", tool="t", args=shuffled)
    assert idem_key(first) == idem_key(second)


def test_key_does_not_depend_on_dict_order_example() -> None:
    one = ToolCall(workflow_id="w", tool="t", args={"a": 1, "b": {"c": 2, "d": 3}})
    two = ToolCall(workflow_id="w", tool="t", args={"b": {"d": 3, "c": 2}, "a": 1})
    assert idem_key(one) == idem_key(two)


@settings(max_examples=60, deadline=None)
@given(json_objects, json_objects)
def test_different_args_give_different_keys(a: dict[str, Any], b: dict[str, Any]) -> None:
    assume(canonical_json(a) != canonical_json(b))
    assert idem_key(ToolCall(workflow_id="w", tool="t", args=a)) != idem_key(
        ToolCall(workflow_id="w", tool="t", args=b)
    )


@settings(max_examples=30, deadline=None)
@given(json_objects)
def test_workflow_and_tool_are_part_of_the_key(args: dict[str, Any]) -> None:
    base = idem_key(ToolCall(workflow_id="w", tool="t", args=args))
    assert idem_key(ToolCall(workflow_id="w2", tool="t", args=args)) != base
    assert idem_key(ToolCall(workflow_id="w", tool="t2", args=args)) != base


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"n": 1}, {"n": "1"}),
        ({"n": 1}, {"n": True}),
        ({"n": 0}, {"n": False}),
        ({"n": None}, {}),
        ({"n": []}, {"n": {}}),
        ({"n": [1, 2]}, {"n": [2, 1]}),
        ({"n": "a"}, {"N": "a"}),
    ],
)
def test_values_that_differ_as_json_give_different_keys(
    a: dict[str, Any], b: dict[str, Any]
) -> None:
    assert idem_key(ToolCall(workflow_id="w", tool="t", args=a)) != idem_key(
        ToolCall(workflow_id="w", tool="t", args=b)
    )
