"""Realized P&L per fill, per trading day and per account: pure and exact.

A trading day is a calendar date, in UTC by default. Markets whose session starts the
evening before (CME: 17:00 America/Chicago) pass that boundary: a fill at or after it
belongs to the next day. There is no holiday or weekend calendar: a fill after Friday's
boundary belongs to Saturday.

Sums are exact ``Decimal`` additions; amounts in different currencies are never added
together (each aggregate row carries one currency).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Literal, TypeAlias
from zoneinfo import ZoneInfo

from projections.positions import FillEffect, Method

__all__ = ["Grouping", "PnlRow", "aggregate", "pnl_rows", "trading_day"]

Grouping: TypeAlias = Literal["fill", "day", "account", "account_day"]
"""How :func:`aggregate` groups rows (see there)."""

_ONE_DAY = timedelta(days=1)


def trading_day(
    occurred_at: datetime, session_start: time | None = None, tz: ZoneInfo | None = None
) -> date:
    """Return the trading day a fill at ``occurred_at`` belongs to.

    Args:
        occurred_at: an aware timestamp.
        session_start: the wall-clock time (in ``tz``) at which the next trading day
            begins; a fill at or after it belongs to the next calendar day. None: the
            trading day is the calendar date.
        tz: the time zone of the calendar and of ``session_start``; None means UTC.

    Raises:
        ValueError: ``occurred_at`` is naive; the message names the value.
    """
    if occurred_at.tzinfo is None or occurred_at.utcoffset() is None:
        raise ValueError(f"occurred_at {occurred_at.isoformat()} has no time zone")
    local = occurred_at.astimezone(UTC if tz is None else tz)
    day = local.date()
    if session_start is not None and local.time() >= session_start.replace(tzinfo=None):
        day += _ONE_DAY
    return day


@dataclass(slots=True, frozen=True)
class PnlRow:
    """Realized P&L of one fill, or a sum of such rows.

    A key field that an aggregation sums across is None (``exec_id`` for a day row,
    ``contract`` and ``exec_id`` for an account row, ``day`` too for an account total).

    Attributes:
        account: the account id.
        contract: the contract id, or None when summed across contracts.
        day: the trading day, or None when summed across days.
        exec_id: the execution id, or None when summed across fills.
        realized_fifo: gross realized P&L under FIFO.
        realized_wac: gross realized P&L under WAC.
        fees: fees.
        fills: how many fills the row covers.
        currency: the currency of every amount in the row.
    """

    account: str
    contract: str | None
    day: date | None
    exec_id: str | None
    realized_fifo: Decimal
    realized_wac: Decimal
    fees: Decimal
    fills: int
    currency: str = "USD"

    def realized(self, method: Method = "fifo") -> Decimal:
        """Return gross realized P&L under ``method``."""
        return self.realized_fifo if method == "fifo" else self.realized_wac

    def net_realized(self, method: Method = "fifo") -> Decimal:
        """Return realized P&L net of fees under ``method``."""
        return self.realized(method) - self.fees


def pnl_rows(
    account: str,
    contract: str,
    effects: Iterable[FillEffect],
    *,
    session_start: time | None = None,
    tz: ZoneInfo | None = None,
    currency: str = "USD",
) -> list[PnlRow]:
    """Return one P&L row per fill effect, with its trading day.

    Args:
        account: the account id.
        contract: the contract id.
        effects: the fill effects of the stream, as returned by the position fold.
        session_start: the trading-day boundary (see :func:`trading_day`).
        tz: the time zone of the boundary (see :func:`trading_day`).
        currency: the contract's currency.

    Raises:
        ValueError: an effect has a naive ``occurred_at``.
    """
    return [
        PnlRow(
            account=account,
            contract=contract,
            day=trading_day(effect.occurred_at, session_start, tz),
            exec_id=effect.exec_id,
            realized_fifo=effect.realized_fifo,
            realized_wac=effect.realized_wac,
            fees=effect.fee,
            fills=1,
            currency=currency,
        )
        for effect in effects
    ]


_Key: TypeAlias = tuple[str, str | None, date | None, str | None, str]


def _key(row: PnlRow, by: Grouping) -> _Key:
    if by == "fill":
        return (row.account, row.contract, row.day, row.exec_id, row.currency)
    if by == "day":
        return (row.account, row.contract, row.day, None, row.currency)
    if by == "account_day":
        return (row.account, None, row.day, None, row.currency)
    return (row.account, None, None, None, row.currency)


def aggregate(rows: Iterable[PnlRow], by: Grouping) -> list[PnlRow]:
    """Sum P&L rows exactly, grouped by ``by``.

    Groupings (each also keeps currencies apart):

    - ``"fill"``: per account, contract, day and execution;
    - ``"day"``: per account, contract and trading day;
    - ``"account_day"``: per account and trading day, across contracts;
    - ``"account"``: per account, across contracts and days (filter the rows to the
      period you want first).

    Returns:
        One row per group, in the order each group first appears in ``rows``.

    Raises:
        ValueError: ``by`` is not one of the groupings above.
    """
    if by not in ("fill", "day", "account", "account_day"):
        raise ValueError(f"by: expected fill, day, account or account_day, got {by!r}")
    totals: dict[_Key, PnlRow] = {}
    for row in rows:
        key = _key(row, by)
        seen = totals.get(key)
        if seen is None:
            account, contract, day, exec_id, currency = key
            totals[key] = PnlRow(
                account=account,
                contract=contract,
                day=day,
                exec_id=exec_id,
                realized_fifo=row.realized_fifo,
                realized_wac=row.realized_wac,
                fees=row.fees,
                fills=row.fills,
                currency=currency,
            )
        else:
            totals[key] = PnlRow(
                account=seen.account,
                contract=seen.contract,
                day=seen.day,
                exec_id=seen.exec_id,
                realized_fifo=seen.realized_fifo + row.realized_fifo,
                realized_wac=seen.realized_wac + row.realized_wac,
                fees=seen.fees + row.fees,
                fills=seen.fills + row.fills,
                currency=seen.currency,
            )
    return list(totals.values())
