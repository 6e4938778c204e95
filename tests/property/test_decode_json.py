"""decode_json's orjson fast path gives what ``json`` with Decimal numbers gives.

The reference is the standard library's decoder with ``parse_float=Decimal`` (and
NaN/Infinity refused): the same value, of the same types, digit for digit, and an error
exactly where the reference has one.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.events import decode_json


def _reference(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(name)

    return json.loads(text, parse_float=Decimal, parse_constant=refuse)


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (1 is not 1.0, Decimal('1.0') keeps
    its exponent)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Decimal):
        return a.as_tuple() == b.as_tuple()
    return bool(a == b)


_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.decimals(allow_nan=False, allow_infinity=False, places=None).map(str),
    st.sampled_from(
        ["0.0", "-0", "-0.0", "1e5", "1E-3", "5000.250", "18446744073709551616", "1e400"]
    ),
)
_scalars = st.one_of(
    _numbers,
    st.text(max_size=8).map(lambda t: json.dumps(t)),
    st.sampled_from(["true", "false", "null"]),
)


def _document(leaves: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
            st.dictionaries(st.text(max_size=5), inner, max_size=4).map(
                lambda d: "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in d.items()) + "}"
            ),
        ),
        max_leaves=12,
    )


@settings(max_examples=400, deadline=None)
@given(_document(_scalars))
def test_documents_decode_as_the_reference_does(text: str) -> None:
    try:
        expected = _reference(text)
    except (ValueError, ArithmeticError):
        with pytest.raises(ValueError):
            decode_json(text)
        return
    got = decode_json(text)
    assert _same(got, expected), (text, got, expected)
    assert _same(decode_json(text.encode()), expected)


@pytest.mark.parametrize(
    "text",
    [
        '{"price": 5000.25, "qty": 1}',  # a float: never through a float
        '{"qty": 18446744073709551616}',  # beyond 64 bits: orjson makes it a float
        '{"a": 1, "a": 2.50}',  # duplicate keys: the last wins, as a Decimal
        "[[[[1.5]]]]",
        '{"price": NaN}',
        '{"price": Infinity}',
        '{"x": "\\ud800"}',  # a lone surrogate: json takes it, orjson does not
        '{"x": 1} trailing',
        "",
    ],
)
def test_edge_cases_decode_as_the_reference_does(text: str) -> None:
    try:
        expected = _reference(text)
    except ValueError:
        with pytest.raises(ValueError):
            decode_json(text)
        return
    assert _same(decode_json(text), expected)


def test_a_deeply_nested_document_decodes_as_the_reference_does() -> None:
    text = "[" * 300 + "1.5" + "]" * 300
    assert _same(decode_json(text), _reference(text))
