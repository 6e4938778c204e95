"""Faulted streams at the fold level: which event is to blame, and what heals it."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest

from ledger.errors import LedgerError, StreamFaulted
from ledger.events import Event
from ledger.store import encode_event
from projections.faults import culprit_in_events, culprit_in_rows
from projections.pagefold import StreamRow, stream_row
from projections.positions import FoldError, OffTickPrice, StreamEvent, replay
from tests.unit.test_positions import bust, correct, rec

STREAM = "ACC1/ES"
GRID = (Decimal(50), Decimal("0.25"))
RECORDED = datetime(2024, 3, 5, tzinfo=UTC)


def log(*events: StreamEvent) -> list[tuple[int, StreamEvent]]:
    return [(10 * (i + 1), e) for i, e in enumerate(events)]


def rows(events: list[tuple[int, StreamEvent]]) -> list[StreamRow]:
    """The rows the runner reads back from the log for these events."""
    out = []
    for position, event in events:
        payload, _ = encode_event(event)
        out.append(stream_row(position, event.type, payload, RECORDED))
    return out


def state_of(events: list[tuple[int, StreamEvent]]) -> dict[str, object]:
    state, _ = replay("ACC1", "ES", *GRID, events)
    return state.to_json()


def test_an_off_tick_fill_does_not_fold_and_a_correction_or_bust_of_it_does() -> None:
    good = rec("E1", "BUY", 2, "5000.00", 0)
    bad = rec("E2", "BUY", 1, "5000.10", 10)  # tick 0.25
    later = rec("E3", "SELL", 3, "5002.00", 20)
    with pytest.raises(OffTickPrice):
        replay("ACC1", "ES", *GRID, log(good, bad, later))
    # a correction replaces the bad price: as if the fill had been right all along
    corrected = log(good, bad, later, correct("E2", 1, "5000.25", 30))
    clean = log(good, rec("E2", "BUY", 1, "5000.25", 10), later)
    assert state_of(corrected) == state_of(clean)
    # a bust removes it: as if it had never been filled
    busted = log(good, bad, later, bust("E2", 30))
    assert state_of(busted) == state_of([busted[0], busted[2]])


def test_the_culprit_is_the_bad_fill_or_the_correction_that_made_it_bad() -> None:
    events = log(
        rec("E1", "BUY", 2, "5000.00", 0),
        rec("E2", "BUY", 1, "5000.10", 10),
        rec("E3", "SELL", 3, "5002.00", 20),
    )
    error = OffTickPrice("whatever the replay said")
    culprit, event_id = culprit_in_events(STREAM, events, GRID, error)
    assert (culprit.position, culprit.exec_id) == (20, "E2")
    assert event_id == events[1][1].event_id
    assert culprit.reason.startswith("OffTickPrice: price 5000.10 of execution E2")
    assert culprit.reason.endswith("tick_size 0.25 for ACC1/ES")
    assert culprit_in_rows(STREAM, rows(events), GRID, error) == culprit

    # a good fill corrected to a bad price: the correction is to blame (the latest one,
    # by event time, not log order)
    corrected = log(
        rec("E1", "BUY", 2, "5000.00", 0),
        correct("E1", 2, "5000.70", 40),
        correct("E1", 2, "5000.60", 30),
    )
    culprit, event_id = culprit_in_events(STREAM, corrected, GRID, error)
    assert (culprit.position, culprit.exec_id) == (20, "E1")
    assert event_id == corrected[1][1].event_id
    assert culprit.reason.startswith("OffTickPrice: price 5000.70 of execution E1")
    assert culprit_in_rows(STREAM, rows(corrected), GRID, error) == culprit


def test_with_no_instrument_the_stream_s_first_fill_is_to_blame() -> None:
    events = log(rec("E1", "BUY", 1, "10.5", 5), rec("E0", "BUY", 1, "10.5", 0))
    error = FoldError("contract: no instrument event defines 'ES'")
    culprit, event_id = culprit_in_events(STREAM, events, None, error)
    assert (culprit.position, culprit.exec_id, event_id) == (10, "E1", events[0][1].event_id)
    assert culprit.reason == "FoldError: contract: no instrument event defines 'ES'"
    assert culprit_in_rows(STREAM, rows(events), None, error) == culprit


def test_stream_faulted_names_the_event_and_the_way_out() -> None:
    exc = StreamFaulted(STREAM, 42, "0b5c-id", "E2", "OffTickPrice: price 5000.10 ...")
    assert isinstance(exc, LedgerError)
    text = str(exc)
    for part in ("'ACC1/ES' is faulted", "log position 42", "0b5c-id", "OffTickPrice"):
        assert part in text
    assert "correction" in text and "bust of execution 'E2'" in text


def test_rows_of_a_stream_round_trip_through_the_log_encoding() -> None:
    event: Event = rec("E1", "BUY", 1, "5000.10", 0)
    payload, _ = encode_event(event)
    assert orjson.loads(payload)["price"] == "5000.10"
    (row,) = rows([(7, rec("E1", "BUY", 1, "5000.10", 0))])
    assert (row[0], row[1], row[2], row[6]) == (7, "fill", "E1", Decimal("5000.10"))
