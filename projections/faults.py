"""Faulted streams: which event of a stream cannot be folded, and why.

An event the position fold cannot apply may be in the log anyway (an older version
wrote it, or someone with database rights did): a fill off its instrument's tick grid,
a fill for a contract no instrument defines, a correction to a price off the grid or to
a quantity of zero. Such an event faults its own stream only. The runner
(:mod:`projections.runner`) keeps projecting every other stream and records the fault
in ``proj_faults``; queries on the stream raise :class:`ledger.errors.StreamFaulted`;
a later correction or bust of the offending execution heals it.

This module finds the offending event once a replay of the stream has failed. It is
only called on that path, so it may fold the stream again one fill at a time. No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from ledger.errors import StreamFaulted
from ledger.events import FillCorrected, FillRecorded
from projections.pagefold import StreamRow, _standing
from projections.positions import FoldError, StreamEvent, apply_fill, effective_fills, new_state

__all__ = [
    "UNFOLDABLE",
    "Culprit",
    "StreamFault",
    "culprit_in_events",
    "culprit_in_rows",
]

UNFOLDABLE: tuple[type[Exception], ...] = (FoldError, ArithmeticError, LookupError, ValueError)
"""What folding a stream raises when one of its events cannot be applied: the fold's
own errors, a contract with no instrument (LookupError), and what a payload the fold
cannot read raises (a missing key; decimal.InvalidOperation is an ArithmeticError)."""


@dataclass(frozen=True, slots=True)
class Culprit:
    """The event that makes a stream unfoldable.

    Attributes:
        position: its global log position.
        exec_id: the execution it fills or corrects (None when unknown).
        reason: why it cannot be folded, starting with the error's name.
    """

    position: int
    exec_id: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class StreamFault:
    """A faulted stream as ``proj_faults`` records it.

    Attributes:
        stream: ``account/contract``.
        position: the global log position of the offending event.
        event_id: the offending event's id (None if the row is gone).
        exec_id: its execution, when known.
        reason: why it cannot be folded.
        faulted_at: when the runner first found it (None for a query-time finding).
    """

    stream: str
    position: int
    event_id: str | None
    exec_id: str | None
    reason: str
    faulted_at: datetime | None = None

    @property
    def account(self) -> str:
        """The stream's account."""
        return self.stream.split("/", 1)[0]

    @property
    def contract(self) -> str:
        """The stream's contract."""
        return self.stream.split("/", 1)[1]

    def error(self) -> StreamFaulted:
        """Return the exception a query on this stream raises."""
        return StreamFaulted(self.stream, self.position, self.event_id, self.exec_id, self.reason)

    def as_row(self) -> dict[str, object]:
        """Return the fault as a plain row (CLI tables and JSON)."""
        return {
            "stream": self.stream,
            "position": self.position,
            "event_id": self.event_id,
            "exec_id": self.exec_id,
            "reason": self.reason,
        }


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def culprit_in_rows(
    stream: str,
    rows: list[StreamRow],
    grid: tuple[Decimal, Decimal] | None,
    error: BaseException,
) -> Culprit:
    """Find the offending row of a stream whose replay raised ``error``.

    Args:
        stream: the stream, ``account/contract``.
        rows: every fill, bust and correction row of the stream read so far, any order.
        grid: the contract's (point value, tick size); None when no instrument defines it.
        error: what the replay raised (the reason when no single row is to blame).

    Returns:
        The first standing fill (in event order) that does not fold, pointing at the
        correction that gave it its values if one did, else at the fill itself; with no
        instrument, the stream's first fill; else the stream's last row.
    """
    fills_rows = sorted((r for r in rows if r[1] == "fill"), key=lambda r: r[0])
    if grid is None:
        first = fills_rows[0] if fills_rows else min(rows, key=lambda r: r[0])
        return Culprit(first[0], first[2], _reason(error))
    try:
        fills, _, _ = _standing(rows, 0)
    except UNFOLDABLE as exc:  # pragma: no cover - rows were parsed when read
        last = max(rows, key=lambda r: r[0])
        return Culprit(last[0], last[2], _reason(exc))
    point_value, tick_size = grid
    account, contract = stream.split("/", 1)
    state = new_state(account, contract, point_value, tick_size)
    for fill in fills:
        try:
            apply_fill(state, fill)
        except FoldError as exc:
            corrections = [r for r in rows if r[1] == "correction" and r[2] == fill.exec_id]
            source = max(corrections, key=lambda r: (r[3], r[0]))[0] if corrections else None
            return Culprit(fill.position if source is None else source, fill.exec_id, _reason(exc))
    last = max(rows, key=lambda r: r[0])
    return Culprit(last[0], last[2], _reason(error))


def culprit_in_events(
    stream: str,
    events: Iterable[tuple[int, StreamEvent]],
    grid: tuple[Decimal, Decimal] | None,
    error: BaseException,
) -> tuple[Culprit, str | None]:
    """As :func:`culprit_in_rows`, on decoded events; also return the culprit's event id."""
    listed = list(events)
    by_position = {p: e for p, e in listed}
    fills = sorted((p for p, e in listed if isinstance(e, FillRecorded)))

    def found(position: int, exec_id: str | None, reason: str) -> tuple[Culprit, str | None]:
        event = by_position.get(position)
        return Culprit(position, exec_id, reason), None if event is None else event.event_id

    if not listed:
        return Culprit(0, None, _reason(error)), None
    if grid is None:
        first = fills[0] if fills else min(by_position)
        return found(first, by_position[first].exec_id, _reason(error))
    point_value, tick_size = grid
    account, contract = stream.split("/", 1)
    state = new_state(account, contract, point_value, tick_size)
    for fill in effective_fills(listed):
        try:
            apply_fill(state, fill)
        except FoldError as exc:
            corrections = [
                (e.occurred_at, p)
                for p, e in listed
                if isinstance(e, FillCorrected) and e.exec_id == fill.exec_id
            ]
            source = max(corrections)[1] if corrections else fill.position
            return found(source, fill.exec_id, _reason(exc))
    last = max(by_position)
    exec_id = by_position[last].exec_id
    return found(last, exec_id, _reason(error))
