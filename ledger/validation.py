"""The checks every event must pass against the log before it is appended.

What one record shows is checked where the event is built (the validators of
:mod:`ledger.values` and :mod:`ledger.events`); what needs the log is checked here,
on every path into it (the store, ``ingest``, ``consume``, ``rejected --retry``):

- a trading event names a contract some ``instrument`` event defines
  (``UNKNOWN_INSTRUMENT``);
- a fill's or correction's price lies on that instrument's tick grid (``OFF_TICK_PRICE``,
  never rounded; a mark may lie between ticks);
- its quantity is positive and a whole number of the instrument's size increment
  (``OFF_SIZE_INCREMENT``: a futures contract trades in whole contracts);
- a bust or correction names an execution the log (or the same batch, earlier) has
  (``UNKNOWN_EXECUTION``).

The functions here are pure: the store looks the instruments and executions up and
passes them in (:meth:`ledger.store.EventStore.problems_on`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ledger.errors import RejectReason
from ledger.events import (
    Event,
    FillBusted,
    FillCorrected,
    FillRecorded,
    InstrumentDefined,
    MarkPriceSet,
    fill_event_id,
)
from ledger.values import is_multiple, is_on_tick

__all__ = ["Problem", "contract_of", "find_problems", "wanted_executions"]

_ADJUSTMENTS = (FillBusted, FillCorrected)

Problem = tuple[RejectReason, str]
"""Why an event may not be appended: its reason code and a message naming the field."""


def contract_of(event: Event) -> str | None:
    """Return the contract an event names, or None (seals, reconciliations)."""
    contract: Any = getattr(event, "contract", None)
    return contract if isinstance(contract, str) else None


def wanted_executions(events: Sequence[Event]) -> set[str]:
    """Return the fill event ids the busts and corrections of ``events`` name."""
    return {
        fill_event_id(e.account, e.exec_id)
        for e in events
        # exact types (see _problem): an ABCMeta's isinstance misses slowly, on every fill
        if type(e) is FillBusted or type(e) is FillCorrected
    }


def find_problems(
    events: Sequence[Event | None],
    instruments: Mapping[str, InstrumentDefined],
    known: set[str],
) -> list[Problem | None]:
    """Return, per event, why it may not be appended (None when it may).

    Events are checked in order: an instrument or a fill earlier in ``events`` counts
    for the ones after it (unless it was refused itself). A None entry is skipped.

    Args:
        events: the batch, in append order.
        instruments: the instruments the log defines, by contract.
        known: the ids of the fills the log holds (at least those the batch's busts and
            corrections name); when the batch busts or corrects anything, its fills that
            pass are added to it.
    """
    defined = dict(instruments)
    # (a fill's id is only wanted when a later bust or correction of the batch may name it)
    adjusts = any(type(e) in _ADJUSTMENTS for e in events)
    out: list[Problem | None] = []
    for event in events:
        if event is None:
            out.append(None)
            continue
        problem = _problem(event, defined, known)
        out.append(problem)
        if problem is None:
            if type(event) is InstrumentDefined:
                defined.setdefault(event.contract, event)
            elif type(event) is FillRecorded and adjusts:
                known.add(event.event_id)
    return out


def _problem(
    event: Event, instruments: Mapping[str, InstrumentDefined], known: set[str]
) -> Problem | None:
    # exact types, not isinstance: the event models' metaclass is an ABCMeta, whose
    # isinstance costs a registry walk on every miss (the events have no subclasses)
    contract = contract_of(event)
    if contract is None or type(event) is InstrumentDefined:
        return None
    instrument = instruments.get(contract)
    if instrument is None:
        return (
            RejectReason.UNKNOWN_INSTRUMENT,
            f"contract: no instrument event defines {contract!r} (define it, then "
            "`ledger rejected --retry`)",
        )
    if type(event) is FillRecorded or type(event) is FillCorrected:
        # a mark or settlement price may lie between ticks; an execution may not
        if not is_on_tick(event.price, instrument.tick_size):
            return (
                RejectReason.OFF_TICK_PRICE,
                f"price: {event.price} is not on the tick grid of {contract} "
                f"(tick size {instrument.tick_size})",
            )
        if event.qty <= 0:
            return (RejectReason.INVALID_RECORD, f"qty: must be greater than 0, got {event.qty}")
        step = instrument.quantity_step
        if not is_multiple(event.qty, step):
            return (
                RejectReason.OFF_SIZE_INCREMENT,
                f"qty: {event.qty} is not a whole number of {contract}'s size increment ({step})",
            )
    elif type(event) is MarkPriceSet and event.price < 0:
        return (RejectReason.INVALID_RECORD, f"price: must not be negative, got {event.price}")
    if type(event) is FillBusted or type(event) is FillCorrected:
        target = fill_event_id(event.account, event.exec_id)
        if target not in known:
            return (
                RejectReason.UNKNOWN_EXECUTION,
                f"exec_id: account {event.account} has no fill {event.exec_id!r} in the log",
            )
    return None
