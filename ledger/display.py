"""How numbers are shown to a reader: tables on the terminal and the HTML report.

JSON and CSV carry the exact values (every digit and every trailing zero the value has:
``350.00`` stays ``350.00``). A table or a page is for reading, so there:

- **money** is shown in its currency's minor units (cents: 2 places; JPY 0; KWD 3),
  rounded half-even, and the currency is named (a ``currency`` column, or a suffix);
- **a price** (a fill's price, a mark) to the instrument's tick precision: the places
  of the tick size (tick 0.25: 2 places; tick 0.03125: 5 places);
- **an average** (average open price, a broker's average price) to the tick precision
  plus :data:`AVERAGE_EXTRA_PLACES` places (tick 0.25: 6 places), since an average of
  prices on the grid is not on the grid (``5000.166666`` for lots at 5000.00, 5000.25
  and 5000.25);
- **a quantity** exactly as it is;
- **a break's execution ids**: the first :data:`EXEC_IDS_SHOWN` and how many more (the
  files and JSON hold them all).

Where the instrument is not known (no tick size, no currency), a number is shown
exactly. Nothing here uses a float: the rounding is ``Decimal.quantize``.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_HALF_EVEN, Decimal
from enum import StrEnum

__all__ = [
    "AVERAGE_EXTRA_PLACES",
    "COLUMN_KINDS",
    "EXEC_IDS_SHOWN",
    "Kind",
    "at_least",
    "exec_ids_shown",
    "fixed",
    "minor_units",
    "show",
    "show_row",
    "tick_places",
]

AVERAGE_EXTRA_PLACES = 4
"""Places an average shows beyond its instrument's tick precision."""

# ISO 4217 minor units of the currencies that do not use cents; every other has 2.
_MINOR_UNITS: Mapping[str, int] = {
    "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "ISK": 0, "JPY": 0, "KMF": 0, "KRW": 0,
    "PYG": 0, "RWF": 0, "UGX": 0, "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0,
    "XPF": 0, "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3,
    "CLF": 4, "UYW": 4,
}  # fmt: skip


class Kind(StrEnum):
    """What a number is, which decides how it is shown."""

    MONEY = "money"
    PRICE = "price"
    AVERAGE = "average"
    QUANTITY = "quantity"


COLUMN_KINDS: Mapping[str, Kind] = {
    # money
    "realized_pnl": Kind.MONEY,
    "fees": Kind.MONEY,
    "fee": Kind.MONEY,
    "net_realized_pnl": Kind.MONEY,
    "unrealized_pnl": Kind.MONEY,
    "realized_pnl_day": Kind.MONEY,
    "fees_day": Kind.MONEY,
    "realized_fifo": Kind.MONEY,
    "realized_wac": Kind.MONEY,
    "cum_realized_fifo": Kind.MONEY,
    "cum_realized_wac": Kind.MONEY,
    "cum_realized_pnl": Kind.MONEY,
    "cum_realized_pnl_account": Kind.MONEY,
    "cum_realized_pnl_total": Kind.MONEY,
    # prices on the tick grid
    "price": Kind.PRICE,
    "mark_price": Kind.PRICE,
    # averages
    "avg_open_price": Kind.AVERAGE,
    "avg_price": Kind.AVERAGE,
}
"""The kind of each number column the CLI and the report print (others: as they are)."""


def minor_units(currency: str | None) -> int:
    """Return the places of ``currency``'s minor unit (2 unless ISO 4217 says otherwise)."""
    return _MINOR_UNITS.get((currency or "").upper(), 2)


def tick_places(tick_size: Decimal) -> int:
    """Return the places a price on a grid of ``tick_size`` needs (0.25: 2; 0.03125: 5)."""
    exponent = tick_size.normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def fixed(value: Decimal, places: int) -> str:
    """Return ``value`` rounded half-even to exactly ``places`` places, trailing zeros kept."""
    return f"{value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN):f}"


def at_least(value: Decimal, places: int) -> str:
    """Return ``value`` exactly, with at least ``places`` places (zeros added, never cut)."""
    exponent = value.as_tuple().exponent
    have = max(0, -exponent) if isinstance(exponent, int) else 0
    return fixed(value, max(places, have))


def show(
    value: Decimal,
    kind: Kind | None,
    *,
    currency: str | None = None,
    tick_size: Decimal | None = None,
) -> str:
    """Return a number as a reader sees it (see the module docstring for the rules)."""
    if kind is Kind.MONEY and currency is not None:
        return fixed(value, minor_units(currency))
    if kind is Kind.PRICE and tick_size is not None:
        return fixed(value, tick_places(tick_size))
    if kind is Kind.AVERAGE and tick_size is not None:
        return fixed(value, tick_places(tick_size) + AVERAGE_EXTRA_PLACES)
    return f"{value:f}"


def show_row(
    row: Mapping[str, object],
    *,
    currency: str | None = None,
    tick_size: Decimal | None = None,
) -> dict[str, object]:
    """Return ``row`` with each number column shown by its kind (other cells unchanged)."""
    return {
        k: show(v, COLUMN_KINDS.get(k), currency=currency, tick_size=tick_size)
        if isinstance(v, Decimal)
        else v
        for k, v in row.items()
    }


EXEC_IDS_SHOWN = 6
"""Execution ids a break shows in a table or on the page; files and JSON hold them all."""


def exec_ids_shown(ids: str) -> str:
    """Return space-separated execution ids as a reader sees them: the first few and
    "and K more" (a break after a busy day can name hundreds)."""
    listed = ids.split()
    if len(listed) <= EXEC_IDS_SHOWN:
        return " ".join(listed)
    return f"{' '.join(listed[:EXEC_IDS_SHOWN])} and {len(listed) - EXEC_IDS_SHOWN} more"
