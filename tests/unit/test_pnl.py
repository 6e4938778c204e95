"""Trading days and exact P&L aggregation."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from ledger.values import Side
from projections.pnl import PnlRow, aggregate, pnl_rows, trading_day
from projections.positions import FillInput, apply_fill, new_state

D = Decimal
CHICAGO = ZoneInfo("America/Chicago")
CME_OPEN = time(17, 0)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def test_trading_day_defaults_to_the_utc_date() -> None:
    assert trading_day(utc(2024, 3, 4, 0, 0)) == date(2024, 3, 4)
    assert trading_day(utc(2024, 3, 4, 23, 59, 59, 999999)) == date(2024, 3, 4)
    # 20:00 in New York on the 4th is 01:00 UTC on the 5th.
    new_york = timezone(timedelta(hours=-5))
    assert trading_day(datetime(2024, 3, 4, 20, 0, tzinfo=new_york)) == date(2024, 3, 5)


def test_trading_day_in_a_zone_without_boundary_is_the_local_date() -> None:
    assert trading_day(utc(2024, 3, 5, 3, 0), tz=CHICAGO) == date(2024, 3, 4)


def test_fill_at_or_after_the_session_boundary_belongs_to_the_next_day() -> None:
    # Winter: 17:00 CST is 23:00 UTC.
    assert trading_day(utc(2024, 3, 4, 22, 59, 59), CME_OPEN, CHICAGO) == date(2024, 3, 4)
    assert trading_day(utc(2024, 3, 4, 23, 0, 0), CME_OPEN, CHICAGO) == date(2024, 3, 5)
    assert trading_day(utc(2024, 3, 5, 3, 0), CME_OPEN, CHICAGO) == date(2024, 3, 5)
    # Summer (after 2024-03-10): 17:00 CDT is 22:00 UTC.
    assert trading_day(utc(2024, 3, 12, 21, 59, 59), CME_OPEN, CHICAGO) == date(2024, 3, 12)
    assert trading_day(utc(2024, 3, 12, 22, 0, 0), CME_OPEN, CHICAGO) == date(2024, 3, 13)


def test_session_boundary_without_zone_is_in_utc() -> None:
    assert trading_day(utc(2024, 3, 4, 21, 59), time(22, 0)) == date(2024, 3, 4)
    assert trading_day(utc(2024, 3, 4, 22, 0), time(22, 0)) == date(2024, 3, 5)


def test_naive_timestamp_is_refused() -> None:
    with pytest.raises(ValueError, match="occurred_at 2024-03-04T10:00:00 has no time zone"):
        trading_day(datetime(2024, 3, 4, 10, 0))


def test_pnl_rows_and_aggregation_sum_exactly() -> None:
    state = new_state("ACC1", "ES", D(50), D("0.25"))
    t = utc(2024, 3, 4, 22, 0)
    fills = [
        ("A", Side.BUY, 2, "5000.00", t),
        ("B", Side.SELL, 1, "5001.25", t + timedelta(minutes=30)),  # 22:30 UTC: still the 4th
        ("C", Side.SELL, 3, "4999.75", t + timedelta(hours=1)),  # 23:00 UTC: the 5th
        ("D", Side.BUY, 2, "4998.00", t + timedelta(hours=2)),
    ]
    effects = [
        apply_fill(
            state,
            FillInput(e, side, D(q), D(p), D("2.25") * q, at, position=i),
        )
        for i, (e, side, q, p, at) in enumerate(fills, start=1)
    ]
    rows = pnl_rows("ACC1", "ES", effects, session_start=CME_OPEN, tz=CHICAGO)
    assert [(r.exec_id, r.day, str(r.realized_fifo), str(r.fees)) for r in rows] == [
        ("A", date(2024, 3, 4), "0", "4.50"),
        ("B", date(2024, 3, 4), "62.50", "2.25"),
        ("C", date(2024, 3, 5), "-12.50", "6.75"),
        ("D", date(2024, 3, 5), "175.00", "4.50"),
    ]
    assert aggregate(rows, "fill") == rows

    days = aggregate(rows, "day")
    assert [(r.day, r.exec_id, str(r.realized_fifo), str(r.fees), r.fills) for r in days] == [
        (date(2024, 3, 4), None, "62.50", "6.75", 2),
        (date(2024, 3, 5), None, "162.50", "11.25", 2),
    ]
    assert str(days[1].net_realized("fifo")) == "151.25"

    other = PnlRow("ACC1", "NQ", date(2024, 3, 5), "X", D("10.01"), D("10.00"), D("1"), 1)
    euro = PnlRow("ACC1", "FESX", date(2024, 3, 5), "Y", D("7"), D("7"), D("0"), 1, "EUR")
    per_day = aggregate([*rows, other, euro], "account_day")
    assert [(r.day, r.contract, r.currency, str(r.realized_fifo)) for r in per_day] == [
        (date(2024, 3, 4), None, "USD", "62.50"),
        (date(2024, 3, 5), None, "USD", "172.51"),
        (date(2024, 3, 5), None, "EUR", "7"),
    ]
    totals = aggregate([*rows, other, euro], "account")
    assert [
        (r.day, r.currency, str(r.realized_fifo), str(r.realized_wac), r.fills) for r in totals
    ] == [
        (None, "USD", "235.01", "235.00", 5),
        (None, "EUR", "7", "7", 1),
    ]
    assert totals[0].realized_fifo == state.realized_fifo + D("10.01")
    assert totals[0].fees == state.fees + 1


def test_aggregate_refuses_an_unknown_grouping() -> None:
    with pytest.raises(ValueError, match=r"by: expected .* got 'week'"):
        aggregate([], "week")  # type: ignore[arg-type]
