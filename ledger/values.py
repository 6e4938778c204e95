"""Value types: exact decimals for price, quantity and money, and typed identifiers.

Every numeric field on the money path is a ``Decimal``. Validators run where a value
is built (the edge), so everything inside the ledger can trust its inputs:

- a JSON number arrives as ``Decimal`` (the parsers use ``parse_float=Decimal``) or as
  a decimal string; a Python ``float`` is refused outright, so a binary approximation
  can never sneak onto the money path;
- NaN, Infinity and numbers outside the ledger's bounds are refused (see below);
- identifiers are short tokens of ``[A-Za-z0-9._-]`` — never free text, never with a
  trailing newline or blank (the whole string must match, ``re.fullmatch``).

Bounds. Every number at the edge has at most :data:`MAX_INTEGER_DIGITS` digits before
the decimal point (``|x| < 10**15``) and at most :data:`MAX_SCALE` after it, as
written; an instrument's point value (tick value / tick size) must be exact and below
:data:`MAX_POINT_VALUE`. Within these bounds a fill's P&L (quantity x price difference
x point value) has at most 42 + 36 digits, and a sum of a billion of them fewer than
:data:`LEDGER_PRECISION`: the ledger widens the ``decimal`` context to that precision
(never narrows it) on import, so the folds never round and never raise.
"""

from __future__ import annotations

import decimal
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Context, Decimal, Inexact, InvalidOperation
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, PlainSerializer

__all__ = [
    "ID_PATTERN",
    "LEDGER_PRECISION",
    "MAX_INTEGER_DIGITS",
    "MAX_POINT_VALUE",
    "MAX_SCALE",
    "SIDE_OF_TEXT",
    "AccountId",
    "ContractId",
    "ExecId",
    "Money",
    "MoneyAmount",
    "NonNegativeDecimal",
    "OrderId",
    "PositiveDecimal",
    "Price",
    "Quantity",
    "Side",
    "SignedQuantity",
    "check_point_value",
    "is_multiple",
    "is_on_tick",
    "point_value",
    "to_decimal",
]

ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""An identifier: use with ``fullmatch`` (``match`` would let ``"T-9\\n"`` through)."""
MAX_INTEGER_DIGITS = 15
"""Digits before the decimal point of any number at the edge: ``|x| < 10**15``."""
MAX_SCALE = 12
"""Digits after the decimal point of any number at the edge, as written."""
MAX_POINT_VALUE = Decimal(10) ** 12
"""An instrument's point value (tick value / tick size) must be below this."""
LEDGER_PRECISION = 120
"""Significant digits of the ``decimal`` context the ledger computes in (see Bounds)."""
_LIMIT = Decimal(10) ** MAX_INTEGER_DIGITS
# Wide enough to divide any two admitted numbers and see whether the result is exact.
_EXACT = Context(prec=LEDGER_PRECISION, traps=[InvalidOperation])
_ZERO = Decimal(0)  # (compared with, rather than the int 0: decimal converts an int each time)


def _widen(context: Context) -> None:
    if context.prec < LEDGER_PRECISION:
        context.prec = LEDGER_PRECISION


# Threads and tasks created later start from DefaultContext; this thread's own
# context exists already. Precision only grows: a caller's wider context is kept.
_widen(decimal.DefaultContext)
_widen(decimal.getcontext())


class Side(StrEnum):
    """The side of a fill."""

    BUY = "BUY"
    SELL = "SELL"

    @property
    def sign(self) -> int:
        """Return +1 for BUY and -1 for SELL."""
        return 1 if self is Side.BUY else -1


SIDE_OF_TEXT: dict[str, Side] = {"BUY": Side.BUY, "SELL": Side.SELL}
"""A side by its text: faster than calling the enum (about a microsecond a call)."""


def to_decimal(value: object) -> Decimal:
    """Convert a JSON value to an exact ``Decimal``.

    Args:
        value: a ``Decimal``, an ``int`` or a decimal string. Floats are refused.

    Raises:
        ValueError: the value is a float, a bool, not numeric, non-finite or absurdly
            large; the message names the value.
    """
    kind = type(value)
    # the common cases first, with the checks and messages of _checked_general; a plain
    # decimal string's exponent is read off its text (``as_tuple()`` builds a tuple of
    # every digit: about half of what a conversion cost)
    if kind is str:
        return _from_text(value)  # type: ignore[arg-type]
    if kind is Decimal:
        return _checked(value, value)  # type: ignore[arg-type]
    return _checked_general(value)


def _from_text(value: str) -> Decimal:
    result, text = _parse_text(value)
    # the digits after the point, as written; at least the exponent's (an underscore
    # only adds a character), so a text within the bound is a number within it
    point = text.find(".")
    if (
        "e" in text
        or "E" in text
        or not result.is_finite()
        or (point >= 0 and len(text) - point - 1 > MAX_SCALE)
        or abs(result) >= _LIMIT
    ):
        return _checked(result, value)  # (an exponent to read, or a check that fails)
    return result


def _parse_text(value: str) -> tuple[Decimal, str]:
    """Return ``Decimal(value)`` and the stripped text it was read from."""
    text = value.strip()
    if not text or len(text) > 64:
        raise ValueError(f"expected a decimal number, got {_short(value)}")
    try:
        return Decimal(text), text
    except InvalidOperation:
        raise ValueError(f"expected a decimal number, got {_short(value)}") from None


def _checked_general(value: object) -> Decimal:
    """:func:`to_decimal` for any input: the reference its fast paths agree with."""
    if isinstance(value, bool):
        raise ValueError(f"expected a decimal number, got boolean {value!r}")
    if isinstance(value, float):
        raise ValueError(
            f"expected an exact decimal (string or JSON number), got binary float {value!r}"
        )
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, str):
        result, _ = _parse_text(value)
    else:
        raise ValueError(f"expected a decimal number, got {type(value).__name__} {_short(value)}")
    return _checked(result, value)


def _checked(result: Decimal, value: object) -> Decimal:
    """Return ``result`` if it is finite and within the bounds; else raise, naming
    ``value`` (what was given)."""
    if not result.is_finite():
        raise ValueError(f"expected a finite decimal number, got {_short(value)}")
    exponent = result.as_tuple().exponent
    assert isinstance(exponent, int)
    if exponent < -MAX_SCALE:
        raise ValueError(
            f"decimal number out of range: {_short(value)} has more than {MAX_SCALE} "
            "digits after the decimal point"
        )
    if exponent > MAX_INTEGER_DIGITS or abs(result) >= _LIMIT:
        raise ValueError(
            f"decimal number out of range: {_short(value)} is not below 10^{MAX_INTEGER_DIGITS} "
            "in magnitude"
        )
    return result


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _positive(value: Decimal) -> Decimal:
    if value <= _ZERO:
        raise ValueError(f"must be greater than 0, got {value}")
    return value


def _non_negative(value: Decimal) -> Decimal:
    if value < _ZERO:
        raise ValueError(f"must not be negative, got {value}")
    return value


def _token(value: object) -> str:
    if type(value) is not str:  # (a plain str, the common case, skips both checks)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # brokers send numeric account and trade ids
        if not isinstance(value, str):
            raise ValueError(f"expected an identifier string, got {type(value).__name__}")
    if not ID_PATTERN.fullmatch(value):
        raise ValueError(
            f"identifier {_short(value)} must be 1-64 characters of letters, digits, '.', '_', '-'"
        )
    return value


_decimal_str = PlainSerializer(lambda d: str(d), return_type=str, when_used="json")
_exact = BeforeValidator(to_decimal)

Price = Annotated[Decimal, _exact, AfterValidator(_non_negative), _decimal_str]
"""A price: exact, finite, not negative. Tick alignment is checked against the instrument."""
Quantity = Annotated[Decimal, _exact, AfterValidator(_positive), _decimal_str]
"""A fill quantity: exact and strictly positive; the side carries the sign."""
SignedQuantity = Annotated[Decimal, _exact, _decimal_str]
"""A position size: negative is short."""
MoneyAmount = Annotated[Decimal, _exact, _decimal_str]
"""An amount of money in the instrument's currency (P&L may be negative)."""
NonNegativeDecimal = Annotated[Decimal, _exact, AfterValidator(_non_negative), _decimal_str]
PositiveDecimal = Annotated[Decimal, _exact, AfterValidator(_positive), _decimal_str]

AccountId = Annotated[str, BeforeValidator(_token)]
ContractId = Annotated[str, BeforeValidator(_token)]
ExecId = Annotated[str, BeforeValidator(_token)]
OrderId = Annotated[str, BeforeValidator(_token)]


def point_value(tick_value: Decimal, tick_size: Decimal) -> Decimal:
    """Return tick value / tick size, exactly, with no positive exponent.

    Decimal division keeps the "ideal" exponent, so 15.625 / 0.015625 is ``1E+3``; P&L
    computed with that would read ``15.625`` instead of ``15.625000`` (golden case
    ``zn_sub_cent_tick_value``). An integral point value is written with exponent 0.
    Computed in the ledger's wide context, whatever the caller's.
    """
    value = _EXACT.divide(tick_value, tick_size)
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent > 0:
        value = value.quantize(Decimal(1), context=_EXACT)
    return value


def instrument_grid_of(payload: Mapping[str, Any]) -> tuple[Decimal, Decimal]:
    """Return (point value, tick size) of an instrument event's stored payload."""
    tick_size = Decimal(payload["tick_size"])
    return point_value(Decimal(payload["tick_value"]), tick_size), tick_size


def check_point_value(tick_value: Decimal, tick_size: Decimal) -> Decimal:
    """Return the point value, or raise when the folds could not carry it exactly.

    Raises:
        ValueError: tick value / tick size does not terminate (e.g. 10 / 0.03), or is not
            below :data:`MAX_POINT_VALUE`; the message names both values.
    """
    context = _EXACT.copy()
    context.clear_flags()
    value = context.divide(tick_value, tick_size)
    if context.flags[Inexact]:
        raise ValueError(
            f"point value tick_value / tick_size = {tick_value} / {tick_size} is not an exact "
            "decimal"
        )
    if abs(value) >= MAX_POINT_VALUE:
        raise ValueError(
            f"point value tick_value / tick_size = {tick_value} / {tick_size} is not below "
            f"{MAX_POINT_VALUE:.0E}"
        )
    return point_value(tick_value, tick_size)


def is_on_tick(price: Decimal, tick_size: Decimal) -> bool:
    """Return whether ``price`` is an exact multiple of ``tick_size`` (never rounds).

    Computed in the ledger's wide context: at 28 digits, ``1E+28 % 0.25`` raises.
    """
    return _EXACT.remainder(price, tick_size) == _ZERO


def is_multiple(quantity: Decimal, increment: Decimal) -> bool:
    """Return whether ``quantity`` is a whole number of ``increment`` (never rounds)."""
    return _EXACT.remainder(quantity, increment) == _ZERO


@dataclass(frozen=True, slots=True)
class Money:
    """An exact amount in one currency; arithmetic across currencies raises."""

    amount: Decimal
    currency: str

    def _check(self, other: Any) -> Money:
        if not isinstance(other, Money):
            return NotImplemented  # type: ignore[no-any-return]
        if other.currency != self.currency:
            raise ValueError(
                f"cannot combine money in {self.currency} with money in {other.currency}"
            )
        return other

    def __add__(self, other: Money) -> Money:
        return Money(self.amount + self._check(other).amount, self.currency)

    def __sub__(self, other: Money) -> Money:
        return Money(self.amount - self._check(other).amount, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.amount, self.currency)

    def __str__(self) -> str:
        return f"{self.amount} {self.currency}"
