"""Position history: one row per change of a position, and retention compaction.

Every fill that changes a position becomes a ``"detail"`` row. Detail older than the
retention cutoff is compacted into one ``"eod"`` row per account, contract and trading
day, which keeps the end-of-day quantity and cumulative P&L and the day's realized P&L
and fees. The log keeps every event, so compacted detail can always be recomputed by an
as-of replay.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Literal, TypeAlias
from zoneinfo import ZoneInfo

from projections.pnl import trading_day
from projections.positions import FillEffect

__all__ = ["HistoryKind", "HistoryRow", "compact", "history_rows"]

HistoryKind: TypeAlias = Literal["detail", "eod"]

_ZERO = Decimal(0)


@dataclass(slots=True, frozen=True)
class HistoryRow:
    """One change of a position (``detail``) or one compacted trading day (``eod``).

    Attributes:
        account: the account id.
        contract: the contract id.
        position: the log position of the fill event (of the day's last fill for eod).
        exec_id: the execution id (of the day's last fill for eod).
        occurred_at: the broker's time of the fill (of the day's last fill for eod).
        qty_before: the signed position before the fill (before the day's first fill).
        qty_after: the signed position after the fill (at the end of the day).
        realized_fifo: gross FIFO P&L realized by the fill (by the day's fills).
        realized_wac: gross WAC P&L realized by the fill (by the day's fills).
        cum_realized_fifo: cumulative gross FIFO P&L after the fill (at end of day).
        cum_realized_wac: cumulative gross WAC P&L after the fill (at end of day).
        fees: the fill's fee (the day's fees).
        kind: ``"detail"`` or ``"eod"``.
        day: the trading day.
    """

    account: str
    contract: str
    position: int
    exec_id: str
    occurred_at: datetime
    qty_before: Decimal
    qty_after: Decimal
    realized_fifo: Decimal
    realized_wac: Decimal
    cum_realized_fifo: Decimal
    cum_realized_wac: Decimal
    fees: Decimal
    kind: HistoryKind
    day: date


def history_rows(
    account: str,
    contract: str,
    effects: Iterable[FillEffect],
    *,
    session_start: time | None = None,
    tz: ZoneInfo | None = None,
    cum_realized_fifo: Decimal = _ZERO,
    cum_realized_wac: Decimal = _ZERO,
) -> list[HistoryRow]:
    """Return one detail row per fill effect with running cumulative P&L.

    Args:
        account: the account id.
        contract: the contract id.
        effects: fill effects in event order, as returned by the position fold.
        session_start: the trading-day boundary (see ``projections.pnl.trading_day``).
        tz: the time zone of the boundary.
        cum_realized_fifo: cumulative FIFO P&L before the first effect (0 for a full
            restatement; the state's figure before the fill when folding incrementally).
        cum_realized_wac: cumulative WAC P&L before the first effect.

    Raises:
        ValueError: an effect has a naive ``occurred_at``.
    """
    rows = []
    cum_fifo = cum_realized_fifo
    cum_wac = cum_realized_wac
    for effect in effects:
        cum_fifo += effect.realized_fifo
        cum_wac += effect.realized_wac
        rows.append(
            HistoryRow(
                account=account,
                contract=contract,
                position=effect.position,
                exec_id=effect.exec_id,
                occurred_at=effect.occurred_at,
                qty_before=effect.qty_before,
                qty_after=effect.qty_after,
                realized_fifo=effect.realized_fifo,
                realized_wac=effect.realized_wac,
                cum_realized_fifo=cum_fifo,
                cum_realized_wac=cum_wac,
                fees=effect.fee,
                kind="detail",
                day=trading_day(effect.occurred_at, session_start, tz),
            )
        )
    return rows


def _order(row: HistoryRow) -> tuple[str, str, datetime, int]:
    return (row.account, row.contract, row.occurred_at, row.position)


def _collapse(group: list[HistoryRow]) -> HistoryRow:
    first = group[0]
    last = group[-1]
    if len(group) == 1 and first.kind == "eod":
        return first
    realized_fifo = first.realized_fifo
    realized_wac = first.realized_wac
    fees = first.fees
    for row in group[1:]:
        realized_fifo += row.realized_fifo
        realized_wac += row.realized_wac
        fees += row.fees
    return HistoryRow(
        account=last.account,
        contract=last.contract,
        position=last.position,
        exec_id=last.exec_id,
        occurred_at=last.occurred_at,
        qty_before=first.qty_before,
        qty_after=last.qty_after,
        realized_fifo=realized_fifo,
        realized_wac=realized_wac,
        cum_realized_fifo=last.cum_realized_fifo,
        cum_realized_wac=last.cum_realized_wac,
        fees=fees,
        kind="eod",
        day=last.day,
    )


def compact(rows: Iterable[HistoryRow], cutoff: datetime) -> list[HistoryRow]:
    """Collapse rows older than ``cutoff`` into one ``eod`` row per position and day.

    Rows with ``occurred_at < cutoff`` (detail or earlier eod rows) are grouped by
    account, contract and trading day; each group becomes one eod row (see
    :class:`HistoryRow` for its fields). Rows at or after the cutoff are kept as they
    are. ``compact(compact(rows, c), c) == compact(rows, c)``. A cutoff inside a trading
    day leaves that day's earlier rows as a partial eod row, which merges with the rest
    of the day when a later cutoff passes it; the runner should pass a day boundary.

    Returns:
        The rows ordered by account, contract, ``occurred_at`` and log position.

    Raises:
        ValueError: ``cutoff`` is naive; the message names the value.
    """
    if cutoff.tzinfo is None or cutoff.utcoffset() is None:
        raise ValueError(f"cutoff {cutoff.isoformat()} has no time zone")
    kept: list[HistoryRow] = []
    groups: dict[tuple[str, str, date], list[HistoryRow]] = {}
    for row in rows:
        if row.occurred_at < cutoff:
            groups.setdefault((row.account, row.contract, row.day), []).append(row)
        else:
            kept.append(row)
    for group in groups.values():
        group.sort(key=_order)
        kept.append(_collapse(group))
    kept.sort(key=_order)
    return kept
