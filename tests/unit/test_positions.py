"""The position fold: FIFO lots and WAC basis, flips, busts, corrections, late fills."""

from __future__ import annotations

import ast
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from ledger.events import FillBusted, FillCorrected, FillRecorded
from ledger.values import Side
from projections.positions import (
    FillInput,
    FoldError,
    Lot,
    OffTickPrice,
    OutOfOrderFill,
    PositionState,
    StreamEvent,
    UnknownExecution,
    apply_fill,
    effective_fills,
    is_in_order,
    new_state,
    replay,
    unrealized,
)

T0 = datetime(2024, 3, 4, 14, 30, tzinfo=UTC)
D = Decimal


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def fill(
    exec_id: str, side: str, qty: str | int, price: str, t: int, pos: int, fee: str = "0"
) -> FillInput:
    return FillInput(
        exec_id=exec_id,
        side=Side(side),
        qty=D(qty),
        price=D(price),
        fee=D(fee),
        occurred_at=at(t),
        position=pos,
    )


def rec(
    exec_id: str, side: str, qty: str | int, price: str, t: int, fee: str = "0"
) -> FillRecorded:
    return FillRecorded(
        account="ACC1",
        contract="ES",
        exec_id=exec_id,
        side=Side(side),
        qty=D(qty),
        price=D(price),
        fee=D(fee),
        occurred_at=at(t),
    )


def bust(exec_id: str, t: int) -> FillBusted:
    return FillBusted(account="ACC1", contract="ES", exec_id=exec_id, occurred_at=at(t))


def correct(exec_id: str, qty: str | int, price: str, t: int, fee: str = "0") -> FillCorrected:
    return FillCorrected(
        account="ACC1",
        contract="ES",
        exec_id=exec_id,
        qty=D(qty),
        price=D(price),
        fee=D(fee),
        occurred_at=at(t),
    )


def es() -> PositionState:
    return new_state("ACC1", "ES", D(50), D("0.25"))


def equity() -> PositionState:
    return new_state("ACC1", "XYZ", D(1), D("0.01"))


def test_new_state_is_flat() -> None:
    state = es()
    assert state.side == "FLAT"
    assert state.signed_qty == 0
    assert state.avg_open_price("fifo") is None
    assert state.avg_open_price("wac") is None
    assert unrealized(state, D("5000"), "fifo") == 0
    assert unrealized(state, D("5000"), "wac") == 0
    assert is_in_order(state, T0, 0)


def test_partial_close_consumes_oldest_lot_first() -> None:
    state = equity()
    apply_fill(state, fill("A", "BUY", 100, "10.00", 1, 1))
    apply_fill(state, fill("B", "BUY", 100, "12.00", 2, 2))
    effect = apply_fill(state, fill("C", "SELL", 150, "15.00", 3, 3))

    assert effect.qty_before == D(200)
    assert effect.qty_after == D(50)
    assert effect.closed_lots == (("A", D(100), D("10.00")), ("B", D(50), D("12.00")))
    assert str(effect.realized_fifo) == "650.00"
    # WAC: removes 2200 x 150/200 = 1650.00 of basis; 150 x 15 - 1650 = 600.
    assert str(effect.realized_wac) == "600.00"
    assert str(state.wac_basis) == "550.00"
    assert state.lots == [Lot("B", D(50), D("12.00"), at(2))]
    assert state.side == "LONG"
    assert state.avg_open_price("fifo") == D("12.00")
    assert state.avg_open_price("wac") == D(11)
    assert state.opened_at == at(1)


def test_wac_partial_close_rounds_half_even_to_cents() -> None:
    state = equity()
    # Basis 3 x 0.05 = 0.15; closing 1 of 3 removes 0.05 exactly, closing 1 of 2 then
    # removes 0.10 / 2 = 0.05.
    apply_fill(state, fill("A", "BUY", 3, "0.05", 1, 1))
    e1 = apply_fill(state, fill("B", "SELL", 1, "0.05", 2, 2))
    assert str(state.wac_basis) == "0.10"
    assert e1.realized_wac == 0
    # Basis 0.10 + 0.01 = 0.11 over 3; closing 2 removes 0.0733.. -> 0.07.
    apply_fill(state, fill("C", "BUY", 1, "0.01", 3, 3))
    e2 = apply_fill(state, fill("D", "SELL", 2, "0.10", 4, 4))
    assert str(e2.realized_wac) == "0.13"  # 0.20 - 0.07
    assert str(state.wac_basis) == "0.04"
    # A half cent goes to the even cent: basis 0.05 over 2, closing 1 removes 0.025 -> 0.02.
    state2 = equity()
    apply_fill(state2, fill("A", "BUY", 1, "0.02", 1, 1))
    apply_fill(state2, fill("B", "BUY", 1, "0.03", 2, 2))
    e3 = apply_fill(state2, fill("C", "SELL", 1, "0.00", 3, 3))
    assert str(e3.realized_wac) == "-0.02"
    assert str(state2.wac_basis) == "0.03"
    # ... and 0.07 over 2 -> 0.035 -> 0.04.
    state3 = equity()
    apply_fill(state3, fill("A", "BUY", 1, "0.03", 1, 1))
    apply_fill(state3, fill("B", "BUY", 1, "0.04", 2, 2))
    e4 = apply_fill(state3, fill("C", "SELL", 1, "0.00", 3, 3))
    assert str(e4.realized_wac) == "-0.04"
    # Full close removes the whole remaining basis: cash P&L is exact over the cycle.
    e5 = apply_fill(state3, fill("D", "SELL", 1, "0.00", 4, 4))
    assert str(e5.realized_wac) == "-0.03"
    assert state3.realized_wac == state3.realized_fifo == D("-0.07")


def test_flip_long_to_short_opens_remainder_at_fill_price() -> None:
    state = es()
    apply_fill(state, fill("A", "BUY", 2, "5000.00", 1, 1))
    effect = apply_fill(state, fill("B", "SELL", 5, "5002.50", 2, 2))

    assert (effect.qty_before, effect.qty_after) == (D(2), D(-3))
    assert effect.closed_lots == (("A", D(2), D("5000.00")),)
    assert str(effect.realized_fifo) == "250.00"
    assert str(effect.realized_wac) == "250.00"
    assert state.lots == [Lot("B", D(-3), D("5002.50"), at(2))]
    assert state.side == "SHORT"
    assert str(state.wac_basis) == "750375.00"
    assert state.avg_open_price("fifo") == D("5002.50")
    assert state.avg_open_price("wac") == D("5002.50")
    assert state.opened_at == at(2)
    assert state.closed_at is None


def test_short_flip_to_long() -> None:
    state = es()
    apply_fill(state, fill("A", "SELL", 1, "5000.00", 1, 1))
    apply_fill(state, fill("B", "SELL", 2, "5001.00", 2, 2))
    effect = apply_fill(state, fill("C", "BUY", 4, "4999.00", 3, 3))

    assert (effect.qty_before, effect.qty_after) == (D(-3), D(1))
    assert effect.closed_lots == (("A", D(1), D("5000.00")), ("B", D(2), D("5001.00")))
    # FIFO: 1 x 1.00 x 50 + 2 x 2.00 x 50 = 250.
    assert str(effect.realized_fifo) == "250.00"
    # WAC: basis 750200.00; -(3 x 4999 x 50 - 750200.00) = 250.
    assert str(effect.realized_wac) == "250.00"
    assert state.lots == [Lot("C", D(1), D("4999.00"), at(3))]
    assert str(state.wac_basis) == "249950.00"
    assert state.side == "LONG"
    assert state.opened_at == at(3)
    assert unrealized(state, D("5000.00"), "fifo") == D(50)
    assert unrealized(state, D("5000.00"), "wac") == D(50)


def test_close_to_flat_records_closed_at_and_clears_basis() -> None:
    state = es()
    apply_fill(state, fill("A", "SELL", 2, "5000.00", 1, 1))
    apply_fill(state, fill("B", "BUY", 2, "4999.75", 2, 2, fee="4.50"))
    assert state.side == "FLAT"
    assert state.lots == []
    assert state.wac_basis == 0
    assert state.opened_at is None
    assert state.closed_at == at(2)
    assert state.last_fill_at == at(2)
    assert state.last_key == (at(2), 2)
    assert state.fill_count == 2
    assert str(state.realized_fifo) == "25.00"
    assert str(state.net_realized("fifo")) == "20.50"
    assert str(state.net_realized("wac")) == "20.50"


def test_bust_of_a_flip_turns_a_later_close_into_an_open() -> None:
    events: list[tuple[int, StreamEvent]] = [
        (1, rec("A", "BUY", 2, "5000.00", 1)),
        (2, rec("B", "SELL", 3, "5001.00", 2)),  # flips to -1
        (3, rec("C", "BUY", 1, "4999.00", 3)),  # closes the short
    ]
    state, effects = replay("ACC1", "ES", D(50), D("0.25"), events)
    assert state.signed_qty == 0
    assert effects[2].qty_before == D(-1)
    assert str(state.realized_fifo) == "200.00"  # 2 x 1.00 x 50 + 1 x 2.00 x 50

    events.append((4, bust("B", 10)))
    state, effects = replay("ACC1", "ES", D(50), D("0.25"), events)
    assert [e.exec_id for e in effects] == ["A", "C"]
    assert (effects[1].qty_before, effects[1].qty_after) == (D(2), D(3))
    assert effects[1].closed_lots == ()
    assert effects[1].realized_fifo == 0
    assert effects[1].realized_wac == 0
    assert state.signed_qty == D(3)
    assert state.realized_fifo == 0
    assert state.realized_wac == 0
    assert state.lots == [
        Lot("A", D(2), D("5000.00"), at(1)),
        Lot("C", D(1), D("4999.00"), at(3)),
    ]
    assert str(state.wac_basis) == "749950.00"


def test_correction_restates_pnl() -> None:
    events: list[tuple[int, StreamEvent]] = [
        (1, rec("A", "BUY", 2, "5000.00", 1, fee="4.50")),
        (2, rec("B", "SELL", 2, "5001.00", 2, fee="4.50")),
    ]
    state, _ = replay("ACC1", "ES", D(50), D("0.25"), events)
    assert str(state.realized_fifo) == "100.00"

    # The buy was really 1 lot at 4999.50: the sell now flips to short 1.
    events.append((3, correct("A", 1, "4999.50", 5, fee="2.25")))
    state, effects = replay("ACC1", "ES", D(50), D("0.25"), events)
    assert effects[0].qty == D(1)
    assert effects[0].price == D("4999.50")
    assert effects[0].position == 1  # the original fill's place in the order
    assert str(effects[1].realized_fifo) == "75.00"
    assert str(effects[1].realized_wac) == "75.00"
    assert state.signed_qty == D(-1)
    assert str(state.fees) == "6.75"


def test_latest_correction_wins_whatever_the_arrival_order() -> None:
    base: list[tuple[int, StreamEvent]] = [(1, rec("A", "BUY", 1, "100.00", 1))]
    first: tuple[int, StreamEvent] = (2, correct("A", 1, "101.00", 5))
    later: tuple[int, StreamEvent] = (3, correct("A", 2, "102.00", 6))
    tie: tuple[int, StreamEvent] = (4, correct("A", 3, "103.00", 6))  # log position decides
    order: list[tuple[int, StreamEvent]]
    for order in ([first, later, tie], [tie, later, first], [later, tie, first]):
        (only,) = effective_fills(base + order)
        assert (only.qty, only.price) == (D(3), D("103.00"))


def test_bust_removes_even_after_a_correction_and_is_not_revived() -> None:
    events: list[tuple[int, StreamEvent]] = [
        (1, rec("A", "BUY", 1, "100.00", 1)),
        (2, rec("B", "BUY", 1, "100.00", 2)),
        (3, correct("A", 2, "101.00", 3)),
        (4, bust("A", 4)),
        (5, correct("A", 5, "105.00", 5)),
    ]
    assert [f.exec_id for f in effective_fills(events)] == ["B"]


def test_unknown_execution_is_ignored_or_raises_when_strict() -> None:
    events: list[tuple[int, StreamEvent]] = [
        (1, rec("A", "BUY", 1, "100.00", 1)),
        (2, bust("ZZ", 2)),
        (3, correct("YY", 1, "1.00", 3)),
    ]
    assert [f.exec_id for f in effective_fills(events)] == ["A"]
    with pytest.raises(UnknownExecution, match="exec_id 'YY'"):
        effective_fills(events, strict=True)
    assert issubclass(UnknownExecution, FoldError)


def test_late_fill_in_event_order_equals_on_time_result() -> None:
    on_time: list[tuple[int, StreamEvent]] = [
        (1, rec("A", "BUY", 2, "5000.00", 1)),
        (2, rec("B", "SELL", 1, "5001.00", 2)),
        (3, rec("C", "SELL", 2, "5003.00", 3)),
        (4, rec("D", "BUY", 1, "4990.00", 4)),
    ]
    # B arrives last (highest log position) though it happened second.
    late: list[tuple[int, StreamEvent]] = [
        (1, rec("A", "BUY", 2, "5000.00", 1)),
        (2, rec("C", "SELL", 2, "5003.00", 3)),
        (3, rec("D", "BUY", 1, "4990.00", 4)),
        (9, rec("B", "SELL", 1, "5001.00", 2)),
    ]
    s1, e1 = replay("ACC1", "ES", D(50), D("0.25"), on_time)
    s2, e2 = replay("ACC1", "ES", D(50), D("0.25"), list(reversed(late)))
    assert [e.exec_id for e in e2] == ["A", "B", "C", "D"]
    assert [(e.qty_after, e.realized_fifo, e.realized_wac) for e in e1] == [
        (e.qty_after, e.realized_fifo, e.realized_wac) for e in e2
    ]
    assert str(s2.realized_fifo) == "850.00"  # 1 x 1 x 50 + 1 x 3 x 50 + 1 x 13 x 50
    assert s1.signed_qty == s2.signed_qty == D(0)
    assert s1.realized_wac == s2.realized_wac


def test_late_fill_cannot_be_folded_incrementally() -> None:
    state = es()
    apply_fill(state, fill("A", "BUY", 1, "5000.00", 5, 10))
    assert not is_in_order(state, at(4), 11)  # earlier broker time
    assert not is_in_order(state, at(5), 10)  # the same fill again
    assert not is_in_order(state, at(5), 9)  # tie on time, earlier position
    assert is_in_order(state, at(5), 11)
    assert is_in_order(state, at(6), 1)
    with pytest.raises(OutOfOrderFill, match=r"execution B .*position=11"):
        apply_fill(state, fill("B", "SELL", 1, "5000.00", 4, 11))
    assert state.fill_count == 1


def test_json_round_trip_is_exact() -> None:
    state = es()
    apply_fill(state, fill("A", "BUY", 2, "5000.00", 1, 1, fee="4.50"))
    apply_fill(state, fill("B", "BUY", 1, "5001.25", 2, 2))
    apply_fill(state, fill("C", "SELL", 2, "5003.50", 3, 3))
    data = json.loads(json.dumps(state.to_json()))
    restored = PositionState.from_json(data)
    assert restored == state
    assert repr(restored) == repr(state)  # exponents too: Decimal('0.00') is not '0'
    assert restored.to_json() == state.to_json()
    assert data["wac_basis"] == "250020.83"
    assert data["realized_wac"] == "308.33"
    assert data["lots"] == [
        {"exec_id": "B", "qty": "1", "price": "5001.25", "opened_at": at(2).isoformat()}
    ]
    assert data["last_key"] == [at(3).isoformat(), 3]
    # The restored state keeps folding exactly like the original.
    nxt = fill("D", "SELL", 3, "4999.75", 4, 4)
    assert apply_fill(restored, nxt) == apply_fill(state, nxt)
    assert restored.to_json() == state.to_json()


def test_json_round_trip_of_a_flat_state() -> None:
    state = es()
    assert repr(PositionState.from_json(state.to_json())) == repr(state)
    apply_fill(state, fill("A", "BUY", 2, "5000.00", 1, 1))
    apply_fill(state, fill("B", "SELL", 2, "5000.00", 2, 2))
    assert str(state.wac_basis) == "0.00"
    assert str(state.realized_fifo) == "0.00"
    restored = PositionState.from_json(json.loads(json.dumps(state.to_json())))
    assert repr(restored) == repr(state)
    assert restored.closed_at == at(2)


def test_from_json_names_the_bad_key() -> None:
    data = es().to_json()
    data["wac_basis"] = 1.5
    with pytest.raises(ValueError, match=r"wac_basis: expected a decimal string, got 1\.5"):
        PositionState.from_json(data)
    with pytest.raises(ValueError, match="format"):
        PositionState.from_json({**es().to_json(), "format": 99})


def test_off_tick_message_names_price_and_tick_size() -> None:
    state = es()
    with pytest.raises(OffTickPrice) as info:
        apply_fill(state, fill("X1", "BUY", 1, "5000.10", 1, 1))
    message = str(info.value)
    assert "price 5000.10" in message
    assert "tick_size 0.25" in message
    assert "X1" in message
    assert isinstance(info.value, FoldError)


def test_non_positive_quantity_is_refused() -> None:
    with pytest.raises(FoldError, match="qty of execution Z must be greater than 0, got 0"):
        apply_fill(es(), fill("Z", "BUY", 0, "5000.00", 1, 1))


def test_realized_plus_unrealized_agree_across_methods() -> None:
    state = es()
    for f in [
        fill("A", "BUY", 3, "5000.00", 1, 1),
        fill("B", "BUY", 4, "5001.25", 2, 2),
        fill("C", "SELL", 2, "5003.50", 3, 3),
    ]:
        apply_fill(state, f)
    mark = D("4998.75")
    fifo = state.realized_fifo + unrealized(state, mark, "fifo")
    wac = state.realized_wac + unrealized(state, mark, "wac")
    assert fifo == wac
    # Cash: -3 x 5000 - 4 x 5001.25 + 2 x 5003.50 + 5 x 4998.75, times 50.
    assert fifo == D("-212.50")


def test_folds_import_no_io() -> None:
    root = Path(__file__).resolve().parents[2] / "projections"
    forbidden = ("sqlalchemy", "asyncio", "asyncpg", "psycopg", "ledger.store", "ledger.db")
    for name in ("positions.py", "pnl.py", "history.py"):
        tree = ast.parse((root / name).read_text(encoding="utf-8"))
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        imported |= {
            node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
        }
        bad = sorted(m for m in imported if m.startswith(forbidden))
        assert bad == [], f"{name} imports {bad}"


def test_a_copy_is_unchanged_by_folding_the_original() -> None:
    """A copy (what a restatement mark keeps) shares the original's lots, and nothing the
    fold does to the original reaches it: a partial close replaces its lot, a full close
    drops it, an opening appends, a flip does both."""
    state = es()
    for f in (fill("A", "BUY", 3, "5000.00", 1, 1), fill("B", "BUY", 2, "5001.00", 2, 2)):
        apply_fill(state, f)
    mark = state.copy()
    kept = json.dumps(mark.to_json())
    assert [id(lot) for lot in mark.lots] == [id(lot) for lot in state.lots]
    for f in (
        fill("C", "SELL", 1, "5002.00", 3, 3),  # partial close of A
        fill("D", "SELL", 3, "5003.00", 4, 4),  # closes the rest of A, part of B
        fill("E", "SELL", 4, "5004.00", 5, 5),  # closes B, flips short
        fill("F", "BUY", 1, "5003.00", 6, 6),  # partial close of the short lot
    ):
        apply_fill(state, f)
        assert json.dumps(mark.to_json()) == kept
    assert [(lot.exec_id, lot.qty) for lot in mark.lots] == [("A", D(3)), ("B", D(2))]
    assert [(lot.exec_id, lot.qty) for lot in state.lots] == [("E", D(-2))]
