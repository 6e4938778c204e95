"""How numbers are shown to a reader (tables, the HTML report): ledger.display."""

from __future__ import annotations

from decimal import Decimal

import pytest

from ledger.display import (
    AVERAGE_EXTRA_PLACES,
    EXEC_IDS_SHOWN,
    Kind,
    at_least,
    exec_ids_shown,
    minor_units,
    show,
    tick_places,
)


@pytest.mark.parametrize(
    ("tick", "places"),
    [("0.25", 2), ("0.03125", 5), ("1", 0), ("0.5", 1), ("0.010", 2), ("5", 0), ("0.0001", 4)],
)
def test_tick_places_are_the_places_of_the_tick_size(tick: str, places: int) -> None:
    assert tick_places(Decimal(tick)) == places


def test_money_is_shown_in_its_currencys_minor_units_without_losing_zeros() -> None:
    assert show(Decimal("350.00"), Kind.MONEY, currency="USD") == "350.00"
    assert show(Decimal("350"), Kind.MONEY, currency="USD") == "350.00"
    assert show(Decimal("1E+3"), Kind.MONEY, currency="EUR") == "1000.00"
    assert show(Decimal("0.125"), Kind.MONEY, currency="USD") == "0.12"  # half-even
    assert show(Decimal("0.135"), Kind.MONEY, currency="USD") == "0.14"
    assert show(Decimal("1234.5"), Kind.MONEY, currency="JPY") == "1234"
    assert show(Decimal("1.5"), Kind.MONEY, currency="KWD") == "1.500"
    assert (minor_units("usd"), minor_units("JPY"), minor_units(None)) == (2, 0, 2)
    # no currency known: exactly as it is
    assert show(Decimal("0.125"), Kind.MONEY) == "0.125"


def test_prices_take_the_tick_precision_and_averages_four_more_places() -> None:
    assert AVERAGE_EXTRA_PLACES == 4
    assert show(Decimal("5000"), Kind.PRICE, tick_size=Decimal("0.25")) == "5000.00"
    assert show(Decimal("110.03125"), Kind.PRICE, tick_size=Decimal("0.03125")) == "110.03125"
    assert show(Decimal("110"), Kind.PRICE, tick_size=Decimal("0.03125")) == "110.00000"
    avg = Decimal("15000.5") / 3  # 5000.1666...
    assert show(avg, Kind.AVERAGE, tick_size=Decimal("0.25")) == "5000.166667"
    assert show(avg, Kind.AVERAGE, tick_size=Decimal("0.03125")) == "5000.166666667"
    # no instrument known: exact
    assert show(Decimal("5000.50"), Kind.PRICE) == "5000.50"


def test_at_least_pads_and_never_rounds() -> None:
    assert at_least(Decimal("825"), 2) == "825.00"
    assert at_least(Decimal("0.125"), 2) == "0.125"
    assert at_least(Decimal("-2.5"), 2) == "-2.50"
    assert at_least(Decimal("1E+2"), 0) == "100"


def test_a_long_list_of_execution_ids_shows_a_few_and_counts_the_rest() -> None:
    ids = " ".join(f"X-{i}" for i in range(20))
    assert exec_ids_shown(ids) == "X-0 X-1 X-2 X-3 X-4 X-5 and 14 more"
    assert exec_ids_shown("A B C") == "A B C"
    assert exec_ids_shown(" ".join(f"X-{i}" for i in range(EXEC_IDS_SHOWN))).count("more") == 0
