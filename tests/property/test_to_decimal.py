"""to_decimal's fast paths give what its general path gives.

A plain ``str`` or ``Decimal`` takes a fast path (the exponent of a decimal string read
off its text); ``_checked_general``, the path every other input takes, is the
reference: the same Decimal, exponent and sign included, or a ValueError with the same
message, on strings built to hit the edges (signs, points, exponents, underscores,
non-ASCII digits, surrounding blanks, NaN and Infinity, 12 and 13 decimals, 15 and 16
integer digits).
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.values import _checked_general, to_decimal

_PIECES = st.sampled_from(
    [
        "0",
        "1",
        "5",
        "9",
        "00",
        "000000",
        "123456789",
        "999999999999999",
        "1000000000000000",
        ".",
        ".",
        "-",
        "+",
        "e",
        "E",
        "e-13",
        "E+3",
        "_",
        " ",
        "\t",
        "\u00a0",
        "\u0665",
        "\uff15",
        "NaN",
        "nan",
        "sNaN",
        "Infinity",
        "-inf",
        "x",
        "1e",
        "0.000000000001",
        "0.0000000000001",
        "5000.25",
        "4.50",
    ]
)
_TEXTS = st.one_of(
    st.lists(_PIECES, max_size=6).map("".join),
    st.text(alphabet="0123456789.-+eE_ ", max_size=70),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
)


def _outcome(convert: object, value: object) -> tuple[str, str]:
    try:
        result = convert(value)  # type: ignore[operator]
    except ValueError as exc:
        return ("error", str(exc))
    assert type(result) is Decimal
    return ("value", repr(result.as_tuple()))


@settings(max_examples=3000, deadline=None)
@given(_TEXTS)
def test_a_string_converts_as_the_general_path_converts_it(text: str) -> None:
    assert _outcome(to_decimal, text) == _outcome(_checked_general, text)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(_TEXTS, st.decimals(allow_nan=True, allow_infinity=True).map(str)))
def test_a_decimal_converts_as_the_general_path_converts_it(text: str) -> None:
    try:
        value = Decimal(text.strip())
    except ArithmeticError:
        return
    assert _outcome(to_decimal, value) == _outcome(_checked_general, value)


@pytest.mark.parametrize(
    ("text", "exponent"),
    [("5000.25", -2), ("4.50", -2), ("2", 0), ("-.5", -1), ("5.", 0), ("\u0665.\u0662", -1)],
)
def test_the_exponent_is_the_one_written(text: str, exponent: int) -> None:
    assert to_decimal(text).as_tuple().exponent == exponent


@pytest.mark.parametrize(
    "text", ["0.0000000000001", "1.0_0000000000000", "1e-13", "1000000000000000", "NaN", ""]
)
def test_the_fast_path_refuses_what_the_general_path_refuses(text: str) -> None:
    with pytest.raises(ValueError) as fast:
        to_decimal(text)
    with pytest.raises(ValueError) as general:
        _checked_general(text)
    assert str(fast.value) == str(general.value)
