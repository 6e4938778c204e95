"""Properties of the position fold over random fill sequences (Hypothesis)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.events import FillBusted, FillCorrected, FillRecorded
from ledger.values import Side
from projections.positions import (
    FillEffect,
    FillInput,
    PositionState,
    StreamEvent,
    apply_fill,
    new_state,
    replay,
    unrealized,
)

T0 = datetime(2024, 3, 4, 14, 0, tzinfo=UTC)
# (tick size, point value, lowest price): ES, an equity, ZN.
INSTRUMENTS = [
    (Decimal("0.25"), Decimal(50), Decimal("4900.00")),
    (Decimal("0.01"), Decimal(1), Decimal("10.00")),
    (Decimal("0.015625"), Decimal(1000), Decimal("109.000000")),
]

instruments = st.sampled_from(INSTRUMENTS)
sides = st.sampled_from([Side.BUY, Side.SELL])
sizes = st.integers(min_value=1, max_value=10)
ticks = st.integers(min_value=0, max_value=400)
# Few distinct sizes and a narrow price band make flips and exact closes common.
raw_fills = st.lists(st.tuples(sides, sizes, ticks), min_size=1, max_size=30)


def _price(instrument: tuple[Decimal, Decimal, Decimal], tick: int) -> Decimal:
    tick_size, _, low = instrument
    return low + tick * tick_size


def _inputs(
    instrument: tuple[Decimal, Decimal, Decimal], raw: list[tuple[Side, int, int]]
) -> list[FillInput]:
    return [
        FillInput(
            exec_id=f"E{i}",
            side=side,
            qty=Decimal(qty),
            price=_price(instrument, tick),
            fee=Decimal("1.25") * qty,
            occurred_at=T0 + timedelta(seconds=i),
            position=i + 1,
        )
        for i, (side, qty, tick) in enumerate(raw)
    ]


def _state(instrument: tuple[Decimal, Decimal, Decimal]) -> PositionState:
    tick_size, point_value, _ = instrument
    return new_state("ACC1", "C1", point_value, tick_size)


def _fold(state: PositionState, fills: list[FillInput]) -> list[FillEffect]:
    return [apply_fill(state, fill) for fill in fills]


@settings(max_examples=200, deadline=None)
@given(instrument=instruments, raw=raw_fills, mark_tick=ticks)
def test_realized_plus_unrealized_is_the_cash_total_under_both_methods(
    instrument: tuple[Decimal, Decimal, Decimal],
    raw: list[tuple[Side, int, int]],
    mark_tick: int,
) -> None:
    state = _state(instrument)
    pv = state.point_value
    mark = _price(instrument, mark_tick)
    cash = Decimal(0)
    for fill in _inputs(instrument, raw):
        apply_fill(state, fill)
        cash -= fill.side.sign * fill.qty * fill.price * pv
        total = cash + state.signed_qty * mark * pv
        fifo = state.realized_fifo + unrealized(state, mark, "fifo")
        wac = state.realized_wac + unrealized(state, mark, "wac")
        assert fifo == total
        assert wac == total
        if state.signed_qty == 0:
            # Every open-to-flat cycle sums exactly to the cash P&L under both methods.
            assert state.realized_fifo == state.realized_wac == cash


@settings(max_examples=200, deadline=None)
@given(instrument=instruments, raw=raw_fills, split=st.integers(min_value=0, max_value=30))
def test_checkpoint_then_rest_equals_folding_everything(
    instrument: tuple[Decimal, Decimal, Decimal],
    raw: list[tuple[Side, int, int]],
    split: int,
) -> None:
    fills = _inputs(instrument, raw)
    split = min(split, len(fills))
    whole = _state(instrument)
    whole_effects = _fold(whole, fills)

    head = _state(instrument)
    head_effects = _fold(head, fills[:split])
    checkpoint = PositionState.from_json(json.loads(json.dumps(head.to_json())))
    # Exact down to each decimal's exponent: repr shows Decimal('500000.00'), not 5E+5.
    assert repr(checkpoint) == repr(head)
    rest_effects = _fold(checkpoint, fills[split:])

    assert head_effects + rest_effects == whole_effects
    assert repr(checkpoint) == repr(whole)


@st.composite
def stream_events(
    draw: st.DrawFn,
) -> tuple[tuple[Decimal, Decimal, Decimal], list[tuple[int, StreamEvent]]]:
    instrument = draw(instruments)
    raw = draw(raw_fills)
    events: list[tuple[int, StreamEvent]] = []
    for i, (side, qty, tick) in enumerate(raw):
        at = T0 + timedelta(seconds=draw(st.integers(min_value=0, max_value=10)))  # ties
        fill = FillRecorded(
            account="ACC1",
            contract="C1",
            exec_id=f"E{i}",
            side=side,
            qty=Decimal(qty),
            price=_price(instrument, tick),
            fee=Decimal("0.50") * qty,
            occurred_at=at,
        )
        events.append((i + 1, fill))
    adjustments = draw(
        st.lists(
            st.tuples(
                st.booleans(),  # bust or correction
                st.integers(min_value=0, max_value=len(raw) - 1),
                sizes,
                ticks,
                st.integers(min_value=0, max_value=20),
            ),
            max_size=6,
        )
    )
    position = len(raw)
    for is_bust, target, qty, tick, offset in adjustments:
        position += 1
        at = T0 + timedelta(seconds=offset)
        adjustment: StreamEvent
        if is_bust:
            adjustment = FillBusted(
                account="ACC1", contract="C1", exec_id=f"E{target}", occurred_at=at
            )
        else:
            adjustment = FillCorrected(
                account="ACC1",
                contract="C1",
                exec_id=f"E{target}",
                qty=Decimal(qty),
                price=_price(instrument, tick),
                fee=Decimal(0),
                occurred_at=at,
            )
        events.append((position, adjustment))
    return instrument, events


@settings(max_examples=200, deadline=None)
@given(case=stream_events(), data=st.data())
def test_any_arrival_order_gives_the_same_result(
    case: tuple[tuple[Decimal, Decimal, Decimal], list[tuple[int, StreamEvent]]],
    data: st.DataObject,
) -> None:
    instrument, events = case
    tick_size, point_value, _ = instrument
    arrived = data.draw(st.permutations(events))
    state_a, effects_a = replay("ACC1", "C1", point_value, tick_size, events)
    state_b, effects_b = replay("ACC1", "C1", point_value, tick_size, arrived)
    assert effects_a == effects_b
    assert state_a.to_json() == state_b.to_json()
    keys = [(e.occurred_at, e.position) for e in effects_a]
    assert keys == sorted(keys)


@settings(max_examples=200, deadline=None)
@given(instrument=instruments, raw=raw_fills)
def test_signed_quantity_is_the_sum_of_signed_fills(
    instrument: tuple[Decimal, Decimal, Decimal], raw: list[tuple[Side, int, int]]
) -> None:
    state = _state(instrument)
    total = Decimal(0)
    fees = Decimal(0)
    for count, fill in enumerate(_inputs(instrument, raw), start=1):
        effect = apply_fill(state, fill)
        total += fill.side.sign * fill.qty
        fees += fill.fee
        assert effect.qty_after - effect.qty_before == fill.side.sign * fill.qty
        assert state.signed_qty == total
        assert sum((lot.qty for lot in state.lots), Decimal(0)) == total
        assert all((lot.qty > 0) == (total > 0) for lot in state.lots)
        assert state.wac_basis >= 0
        assert (state.wac_basis == 0) == (total == 0)
        assert state.fees == fees
        assert state.fill_count == count
        assert (state.opened_at is None) == (total == 0)
