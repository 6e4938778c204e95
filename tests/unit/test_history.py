"""History rows and retention compaction."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from ledger.values import Side
from projections.history import HistoryRow, compact, history_rows
from projections.pnl import trading_day
from projections.positions import FillInput, PositionState, apply_fill, new_state

D = Decimal
DAY1 = datetime(2024, 3, 4, 14, 0, tzinfo=UTC)

# (exec_id, side, qty, price, fee, occurred_at): three trading days (UTC dates).
FILLS = [
    ("A", Side.BUY, 2, "5000.00", "4.50", DAY1),
    ("B", Side.BUY, 1, "5001.25", "2.25", DAY1 + timedelta(hours=1)),
    ("C", Side.SELL, 2, "5003.50", "4.50", DAY1 + timedelta(hours=2)),
    ("D", Side.SELL, 3, "4999.75", "6.75", DAY1 + timedelta(days=1)),
    ("E", Side.BUY, 1, "4998.00", "2.25", DAY1 + timedelta(days=1, hours=3)),
    ("F", Side.SELL, 2, "5010.00", "4.50", DAY1 + timedelta(days=2)),
    ("G", Side.BUY, 3, "5000.00", "6.75", DAY1 + timedelta(days=2, hours=1)),
]


def fold(
    fills: list[tuple[str, Side, int, str, str, datetime]],
) -> tuple[PositionState, list[HistoryRow]]:
    state = new_state("ACC1", "ES", D(50), D("0.25"))
    effects = [
        apply_fill(state, FillInput(e, side, D(q), D(p), D(fee), at, position=10 * i))
        for i, (e, side, q, p, fee, at) in enumerate(fills, start=1)
    ]
    return state, history_rows("ACC1", "ES", effects)


def test_history_rows_carry_running_cumulative_pnl() -> None:
    state, rows = fold(FILLS)
    assert [r.kind for r in rows] == ["detail"] * 7
    assert [r.position for r in rows] == [10, 20, 30, 40, 50, 60, 70]
    assert [str(r.qty_after) for r in rows] == ["2", "3", "1", "-2", "-1", "-3", "0"]
    assert [str(r.cum_realized_fifo) for r in rows] == [
        "0", "0", "350.00", "275.00", "362.50", "362.50", "1350.00",
    ]  # fmt: skip
    assert [str(r.cum_realized_wac) for r in rows] == [
        "0", "0", "308.33", "275.00", "362.50", "362.50", "1350.00",
    ]  # fmt: skip
    assert rows[-1].cum_realized_fifo == state.realized_fifo
    assert rows[-1].cum_realized_wac == state.realized_wac
    assert [r.day for r in rows] == [date(2024, 3, 4)] * 3 + [date(2024, 3, 5)] * 2 + [
        date(2024, 3, 6)
    ] * 2


def test_history_rows_continue_from_a_cumulative_start() -> None:
    _, rows = fold(FILLS)
    state = new_state("ACC1", "ES", D(50), D("0.25"))
    effects = [
        apply_fill(state, FillInput(e, side, D(q), D(p), D(fee), at, position=10 * i))
        for i, (e, side, q, p, fee, at) in enumerate(FILLS, start=1)
    ]
    tail = history_rows(
        "ACC1",
        "ES",
        effects[3:],
        cum_realized_fifo=rows[2].cum_realized_fifo,
        cum_realized_wac=rows[2].cum_realized_wac,
    )
    assert tail == rows[3:]


def test_history_days_follow_the_session_boundary() -> None:
    chicago = ZoneInfo("America/Chicago")
    state = new_state("ACC1", "ES", D(50), D("0.25"))
    at = datetime(2024, 3, 4, 23, 0, tzinfo=UTC)  # 17:00 CST
    effect = apply_fill(state, FillInput("A", Side.BUY, D(1), D(5000), D(0), at, position=1))
    (row,) = history_rows("ACC1", "ES", [effect], session_start=time(17), tz=chicago)
    assert row.day == date(2024, 3, 5)


def test_compaction_keeps_one_eod_row_per_day_equal_to_folding_that_days_prefix() -> None:
    _, rows = fold(FILLS)
    cutoff = datetime(2024, 3, 6, 0, 0, tzinfo=UTC)
    compacted = compact(rows, cutoff)

    assert [(r.kind, r.day, r.exec_id, r.position) for r in compacted] == [
        ("eod", date(2024, 3, 4), "C", 30),
        ("eod", date(2024, 3, 5), "E", 50),
        ("detail", date(2024, 3, 6), "F", 60),
        ("detail", date(2024, 3, 6), "G", 70),
    ]
    assert compacted[2:] == rows[5:]

    previous: PositionState | None = None
    for eod in compacted[:2]:
        prefix = [f for f in FILLS if trading_day(f[5]) <= eod.day]
        state, _ = fold(prefix)
        assert eod.qty_after == state.signed_qty
        assert eod.cum_realized_fifo == state.realized_fifo
        assert eod.cum_realized_wac == state.realized_wac
        before_fifo = previous.realized_fifo if previous else D(0)
        before_wac = previous.realized_wac if previous else D(0)
        before_fees = previous.fees if previous else D(0)
        before_qty = previous.signed_qty if previous else D(0)
        assert eod.realized_fifo == state.realized_fifo - before_fifo
        assert eod.realized_wac == state.realized_wac - before_wac
        assert eod.fees == state.fees - before_fees
        assert eod.qty_before == before_qty
        assert eod.occurred_at == prefix[-1][5]
        previous = state

    day2 = compacted[1]
    assert (str(day2.qty_before), str(day2.qty_after)) == ("1", "-1")
    assert str(day2.realized_fifo) == "12.50"  # -75.00 + 87.50
    assert str(day2.realized_wac) == "54.17"  # -33.33 + 87.50
    assert str(day2.fees) == "9.00"
    assert str(day2.cum_realized_wac) == "362.50"


def test_compaction_is_idempotent() -> None:
    _, rows = fold(FILLS)
    for cutoff in (
        DAY1 - timedelta(days=1),
        DAY1 + timedelta(hours=1, minutes=30),  # inside a day: a partial eod row
        datetime(2024, 3, 5, 0, 0, tzinfo=UTC),
        datetime(2024, 3, 6, 0, 0, tzinfo=UTC),
        DAY1 + timedelta(days=30),
    ):
        once = compact(rows, cutoff)
        assert compact(once, cutoff) == once
        assert compact(list(reversed(once)), cutoff) == once


def test_compaction_with_a_later_cutoff_merges_partial_days() -> None:
    _, rows = fold(FILLS)
    early = DAY1 + timedelta(hours=1, minutes=30)
    late = datetime(2024, 3, 6, 0, 0, tzinfo=UTC)
    partial = compact(rows, early)
    assert [(r.kind, r.exec_id) for r in partial[:2]] == [("eod", "B"), ("detail", "C")]
    assert compact(partial, late) == compact(rows, late)


def test_nothing_before_the_cutoff_leaves_rows_untouched() -> None:
    _, rows = fold(FILLS)
    assert compact(rows, DAY1) == rows


def test_compaction_keeps_positions_apart() -> None:
    _, rows = fold(FILLS[:3])
    other = [replace(r, contract="NQ") for r in rows]
    compacted = compact(rows + other, datetime(2024, 3, 5, tzinfo=UTC))
    assert [(r.contract, r.kind, r.exec_id) for r in compacted] == [
        ("ES", "eod", "C"),
        ("NQ", "eod", "C"),
    ]


def test_naive_cutoff_is_refused() -> None:
    with pytest.raises(ValueError, match="cutoff 2024-03-05T00:00:00 has no time zone"):
        compact([], datetime(2024, 3, 5))
