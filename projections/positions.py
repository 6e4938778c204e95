"""The position fold: signed quantity, FIFO lots and WAC cost basis, side by side.

A pure fold with no I/O. One account and contract form one stream; its fills are folded
in event order, ``(occurred_at, log position of the original fill)``, never in arrival
order. A late fill, a bust or a correction is handled by :func:`replay`, which restates
the whole stream from its events, so the result is a function of the *set* of events.

P&L rules (DESIGN.md, "P&L rules"):

- FIFO: a closing fill consumes lots oldest first; realized = sum of consumed qty x
  (exit - lot price) x sign x point value. Exact, never rounded.
- WAC keeps the cost basis ``B`` as money (always >= 0). Opening adds qty x price x
  point value; a partial close removes ``quantize(B x q_close / |Q|, 0.01,
  ROUND_HALF_EVEN)`` (computed exactly, so no double rounding); a full close removes
  all of ``B``; realized = sign x (q_close x price x point value - removed).
- A fill larger than the open quantity closes it and opens the remainder on the other
  side at the fill price (a flip).
- Fees accumulate separately; realized P&L is gross and net = gross - fees.

Arithmetic uses the ambient ``decimal`` context (28 significant digits by default),
ample for any real price x quantity x point value; nothing on the P&L path divides.

Exceptions::

    FoldError                 a fill the fold cannot apply
    ├── OffTickPrice          the price is not a multiple of the tick size (never rounded)
    ├── OutOfOrderFill        the fill sorts at or before the last folded fill: replay instead
    └── UnknownExecution      a bust or correction names an execution the stream never had
                              (raised only by ``effective_fills(..., strict=True)``)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Literal, TypeAlias

import orjson

from ledger.events import FillBusted, FillCorrected, FillRecorded
from ledger.values import Side

__all__ = [
    "FillEffect",
    "FillInput",
    "FoldError",
    "Lot",
    "Method",
    "OffTickPrice",
    "OutOfOrderFill",
    "PositionState",
    "StreamEvent",
    "UnknownExecution",
    "apply_fill",
    "effective_fills",
    "is_in_order",
    "new_state",
    "replay",
    "unrealized",
]

Method: TypeAlias = Literal["fifo", "wac"]
"""A P&L method: first-in-first-out lots or weighted-average cost."""

StreamEvent: TypeAlias = FillRecorded | FillBusted | FillCorrected
"""The events of a trading stream that change its fills."""

_ZERO = Decimal(0)
_STATE_FORMAT = 1


class FoldError(Exception):
    """Base of every error the position fold raises."""


class OffTickPrice(FoldError):
    """A fill price is not on the instrument's tick grid (``OFF_TICK_PRICE``)."""


class OutOfOrderFill(FoldError):
    """A fill sorts at or before the last folded fill; the stream must be replayed."""


class UnknownExecution(FoldError):
    """A bust or correction names an execution id with no fill in the stream."""


@dataclass(slots=True, frozen=True)
class FillInput:
    """One effective fill, already adjusted for busts and corrections.

    Attributes:
        exec_id: the broker's execution id.
        side: BUY or SELL.
        qty: the (corrected) quantity, > 0.
        price: the (corrected) price, on the tick grid.
        fee: the (corrected) fee, >= 0.
        occurred_at: the broker's time of the original fill.
        position: the global log position of the original fill event (the tie-breaker).
        order_id: the broker's order id, if any.
    """

    exec_id: str
    side: Side
    qty: Decimal
    price: Decimal
    fee: Decimal
    occurred_at: datetime
    position: int
    order_id: str | None = None


@dataclass(slots=True)
class Lot:
    """An open FIFO lot; ``qty`` is signed (+ long, - short).

    Never changed once made (copies of a state share their lots): a fill that closes
    part of it replaces it with a smaller one.
    """

    exec_id: str
    qty: Decimal
    price: Decimal
    opened_at: datetime


@dataclass(slots=True)
class PositionState:
    """The position of one account in one contract, under FIFO and WAC at once.

    Attributes:
        account: the account id.
        contract: the contract id.
        point_value: money per 1.0 of price (tick value / tick size).
        tick_size: the price grid.
        signed_qty: the position size; negative is short.
        lots: open FIFO lots, oldest first; their quantities sum to ``signed_qty``.
        wac_basis: the WAC cost basis as money, |Q| x average x point value, >= 0.
        realized_fifo: cumulative gross realized P&L under FIFO.
        realized_wac: cumulative gross realized P&L under WAC.
        fees: cumulative fees.
        opened_at: when the current non-flat position was opened; None when flat.
        closed_at: when the position last went flat; None if it never has.
        last_fill_at: ``occurred_at`` of the last folded fill.
        last_key: ``(occurred_at, position)`` of the last folded fill.
        fill_count: how many fills have been folded.
    """

    account: str
    contract: str
    point_value: Decimal
    tick_size: Decimal
    signed_qty: Decimal = _ZERO
    lots: list[Lot] = field(default_factory=list)
    wac_basis: Decimal = _ZERO
    realized_fifo: Decimal = _ZERO
    realized_wac: Decimal = _ZERO
    fees: Decimal = _ZERO
    opened_at: datetime | None = None
    closed_at: datetime | None = None
    last_fill_at: datetime | None = None
    last_key: tuple[datetime, int] | None = None
    fill_count: int = 0

    @property
    def side(self) -> Literal["LONG", "SHORT", "FLAT"]:
        """Return LONG, SHORT or FLAT."""
        if self.signed_qty > 0:
            return "LONG"
        if self.signed_qty < 0:
            return "SHORT"
        return "FLAT"

    def avg_open_price(self, method: Method = "fifo") -> Decimal | None:
        """Return the average open price, or None when flat.

        FIFO: the quantity-weighted price of the open lots. WAC: basis / (|Q| x point
        value). Display only: P&L is never computed from it.
        """
        if self.signed_qty == 0:
            return None
        if method == "fifo":
            return sum((lot.qty * lot.price for lot in self.lots), _ZERO) / self.signed_qty
        return self.wac_basis / (abs(self.signed_qty) * self.point_value)

    def realized(self, method: Method = "fifo") -> Decimal:
        """Return cumulative gross realized P&L under ``method``."""
        return self.realized_fifo if method == "fifo" else self.realized_wac

    def net_realized(self, method: Method = "fifo") -> Decimal:
        """Return cumulative realized P&L net of fees under ``method``."""
        return self.realized(method) - self.fees

    def copy(self) -> PositionState:
        """Return an independent copy.

        The copy has a list of lots of its own but shares the lots themselves: nothing
        changes a lot once made (a partial close replaces the lot it closes from), so a
        restatement mark costs a list, not a lot per open lot.
        """
        return PositionState(
            account=self.account,
            contract=self.contract,
            point_value=self.point_value,
            tick_size=self.tick_size,
            signed_qty=self.signed_qty,
            lots=list(self.lots),
            wac_basis=self.wac_basis,
            realized_fifo=self.realized_fifo,
            realized_wac=self.realized_wac,
            fees=self.fees,
            opened_at=self.opened_at,
            closed_at=self.closed_at,
            last_fill_at=self.last_fill_at,
            last_key=self.last_key,
            fill_count=self.fill_count,
        )

    def to_json(self) -> dict[str, object]:
        """Return a JSON-able dict: decimals as strings, datetimes as ISO-8601.

        ``PositionState.from_json(state.to_json())`` restores the state exactly, down to
        each decimal's exponent.
        """
        return self._json(False)

    def json_text(self) -> str:
        """Return ``orjson.dumps(self.to_json()).decode()``, the same text, faster.

        A UTC datetime goes to orjson as it is: orjson writes it as ``isoformat()``
        does, without the per-call cost of ``isoformat()`` on an aware datetime (its
        ``utcoffset`` call); a state holds one per open lot.
        """
        return orjson.dumps(self._json(True)).decode()

    def _json(self, native: bool) -> dict[str, object]:
        last_key = self.last_key
        return {
            "format": _STATE_FORMAT,
            "account": self.account,
            "contract": self.contract,
            "point_value": str(self.point_value),
            "tick_size": str(self.tick_size),
            "signed_qty": str(self.signed_qty),
            "lots": [
                {
                    "exec_id": lot.exec_id,
                    "qty": str(lot.qty),
                    "price": str(lot.price),
                    "opened_at": _when(lot.opened_at, native),
                }
                for lot in self.lots
            ],
            "wac_basis": str(self.wac_basis),
            "realized_fifo": str(self.realized_fifo),
            "realized_wac": str(self.realized_wac),
            "fees": str(self.fees),
            "opened_at": _opt_when(self.opened_at, native),
            "closed_at": _opt_when(self.closed_at, native),
            "last_fill_at": _opt_when(self.last_fill_at, native),
            "last_key": (None if last_key is None else [_when(last_key[0], native), last_key[1]]),
            "fill_count": self.fill_count,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> PositionState:
        """Rebuild a state from :meth:`to_json` output.

        Raises:
            ValueError: a key is missing or holds the wrong kind of value; the message
                names the key and the value.
        """
        fmt = data.get("format")
        if fmt != _STATE_FORMAT:
            raise ValueError(f"format: unsupported position state format {fmt!r}")
        raw_lots = data.get("lots")
        if not isinstance(raw_lots, list):
            raise ValueError(f"lots: expected a list, got {raw_lots!r}")
        lots = []
        for item in raw_lots:
            if not isinstance(item, Mapping):
                raise ValueError(f"lots: expected an object, got {item!r}")
            lots.append(
                Lot(
                    exec_id=_str(item, "exec_id"),
                    qty=_dec(item, "qty"),
                    price=_dec(item, "price"),
                    opened_at=_dt(item, "opened_at"),
                )
            )
        raw_key = data.get("last_key")
        last_key: tuple[datetime, int] | None
        if raw_key is None:
            last_key = None
        elif (
            isinstance(raw_key, list | tuple)
            and len(raw_key) == 2
            and isinstance(raw_key[0], str)
            and isinstance(raw_key[1], int)
        ):
            last_key = (datetime.fromisoformat(raw_key[0]), raw_key[1])
        else:
            raise ValueError(f"last_key: expected [timestamp, position], got {raw_key!r}")
        fill_count = data.get("fill_count")
        if not isinstance(fill_count, int):
            raise ValueError(f"fill_count: expected an integer, got {fill_count!r}")
        return cls(
            account=_str(data, "account"),
            contract=_str(data, "contract"),
            point_value=_dec(data, "point_value"),
            tick_size=_dec(data, "tick_size"),
            signed_qty=_dec(data, "signed_qty"),
            lots=lots,
            wac_basis=_dec(data, "wac_basis"),
            realized_fifo=_dec(data, "realized_fifo"),
            realized_wac=_dec(data, "realized_wac"),
            fees=_dec(data, "fees"),
            opened_at=_opt_dt(data, "opened_at"),
            closed_at=_opt_dt(data, "closed_at"),
            last_fill_at=_opt_dt(data, "last_fill_at"),
            last_key=last_key,
            fill_count=fill_count,
        )


def _when(value: datetime, native: bool) -> datetime | str:
    """``value.isoformat()``; or, with ``native``, a UTC datetime itself, for orjson to
    write (the same text: tests/unit/test_compiled.py checks it)."""
    if native and value.tzinfo is UTC:
        return value
    return value.isoformat()


def _opt_when(value: datetime | None, native: bool) -> datetime | str | None:
    return None if value is None else _when(value, native)


def _str(data: Mapping[str, object], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, got {value!r}")
    return value


def _dec(data: Mapping[str, object], key: str) -> Decimal:
    value = data.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a decimal string, got {value!r}")
    return Decimal(value)


def _dt(data: Mapping[str, object], key: str) -> datetime:
    return datetime.fromisoformat(_str(data, key))


def _opt_dt(data: Mapping[str, object], key: str) -> datetime | None:
    return None if data.get(key) is None else _dt(data, key)


@dataclass(slots=True, frozen=True)
class FillEffect:
    """What one fill did to a position: the source of a P&L row and a history row.

    Attributes:
        exec_id: the execution id of the fill.
        position: the log position of the original fill event.
        occurred_at: the broker's time of the fill.
        side: BUY or SELL.
        qty: the effective quantity.
        price: the effective price.
        fee: the effective fee.
        qty_before: the signed position before the fill.
        qty_after: the signed position after the fill.
        realized_fifo: gross P&L realized by this fill under FIFO.
        realized_wac: gross P&L realized by this fill under WAC.
        closed_lots: ``(lot exec_id, qty consumed, lot price)`` per FIFO lot consumed.
    """

    exec_id: str
    position: int
    occurred_at: datetime
    side: Side
    qty: Decimal
    price: Decimal
    fee: Decimal
    qty_before: Decimal
    qty_after: Decimal
    realized_fifo: Decimal
    realized_wac: Decimal
    closed_lots: tuple[tuple[str, Decimal, Decimal], ...]


def new_state(
    account: str, contract: str, point_value: Decimal, tick_size: Decimal
) -> PositionState:
    """Return a flat position with no history."""
    return PositionState(
        account=account, contract=contract, point_value=point_value, tick_size=tick_size
    )


def is_in_order(state: PositionState, occurred_at: datetime, position: int) -> bool:
    """Return whether a fill at ``(occurred_at, position)`` can be folded incrementally.

    True when it sorts strictly after the last folded fill; otherwise the stream must be
    restated with :func:`replay`.
    """
    return state.last_key is None or (occurred_at, position) > state.last_key


def _basis_share(basis: Decimal, q_close: Decimal, q_open: Decimal) -> Decimal:
    """Return ``basis x q_close / q_open`` rounded half-even to 0.01, exactly.

    Integer arithmetic avoids rounding the quotient to the context precision before
    rounding it to cents (double rounding could flip a half-cent).
    """
    num_a, den_a = (basis * q_close).as_integer_ratio()
    num_b, den_b = q_open.as_integer_ratio()
    numerator = num_a * den_b * 100
    denominator = den_a * num_b
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return Decimal(quotient).scaleb(-2)


def apply_fill(state: PositionState, fill: FillInput) -> FillEffect:
    """Fold one fill into ``state`` (mutated in place) and return what it did.

    Args:
        state: the position to update.
        fill: the effective fill; it must sort after ``state.last_key``.

    Returns:
        The fill's effect: quantities before and after, and P&L realized under both
        methods.

    Raises:
        OffTickPrice: ``fill.price`` is not a multiple of ``state.tick_size``.
        OutOfOrderFill: the fill sorts at or before the last folded fill.
        FoldError: ``fill.qty`` is not greater than zero.
    """
    closed: list[tuple[str, Decimal, Decimal]] = []
    before, after, realized_fifo, realized_wac = _fold_fill(
        state,
        fill.exec_id,
        fill.side is Side.BUY,
        fill.qty,
        fill.price,
        fill.fee,
        fill.occurred_at,
        fill.position,
        closed,
    )
    return FillEffect(
        exec_id=fill.exec_id,
        position=fill.position,
        occurred_at=fill.occurred_at,
        side=fill.side,
        qty=fill.qty,
        price=fill.price,
        fee=fill.fee,
        qty_before=before,
        qty_after=after,
        realized_fifo=realized_fifo,
        realized_wac=realized_wac,
        closed_lots=tuple(closed),
    )


def _fold_fill(
    state: PositionState,
    exec_id: str,
    buying: bool,
    qty: Decimal,
    price: Decimal,
    fee: Decimal,
    occurred_at: datetime,
    position: int,
    closed: list[tuple[str, Decimal, Decimal]] | None = None,
) -> tuple[Decimal, Decimal, Decimal, Decimal]:
    """The body of :func:`apply_fill` on plain values (no per-fill objects).

    Returns ``(qty_before, qty_after, realized_fifo, realized_wac)``; the lots the fill
    closed, ``(exec_id, qty, price)`` each, are appended to ``closed`` when given (the
    runner's fold does not want them).
    """
    if price % state.tick_size != _ZERO:
        raise OffTickPrice(
            f"price {price} of execution {exec_id} is not a multiple of "
            f"tick_size {state.tick_size} for {state.account}/{state.contract}"
        )
    if qty <= _ZERO:
        raise FoldError(f"qty of execution {exec_id} must be greater than 0, got {qty}")
    key = (occurred_at, position)
    last_key = state.last_key
    if last_key is not None and key <= last_key:
        raise OutOfOrderFill(
            f"execution {exec_id} at (occurred_at={occurred_at.isoformat()}, "
            f"position={position}) does not sort after the last folded fill "
            f"(occurred_at={last_key[0].isoformat()}, position={last_key[1]}); "
            "replay the stream"
        )

    before = state.signed_qty
    realized_fifo = _ZERO
    realized_wac = _ZERO

    if not before or (before > _ZERO) == buying:
        open_qty = qty
    else:
        pv = state.point_value
        lots = state.lots
        held = -before if before < _ZERO else before
        close_qty = qty if qty < held else held
        # FIFO: consume lots oldest first.
        remaining = close_qty
        consumed = 0
        for lot in lots:
            lot_qty = lot.qty
            lot_abs = -lot_qty if lot_qty < _ZERO else lot_qty
            take = lot_abs if lot_abs < remaining else remaining
            signed_take = take if lot_qty > _ZERO else -take
            lot_price = lot.price
            realized_fifo += signed_take * (price - lot_price) * pv
            if closed is not None:
                closed.append((lot.exec_id, take, lot_price))
            remaining -= take
            if take == lot_abs:
                consumed += 1
            else:  # a new lot, not a change to this one: copies of the state share lots
                lots[consumed] = Lot(lot.exec_id, lot_qty - signed_take, lot_price, lot.opened_at)
            if remaining == _ZERO:
                break
        if consumed:
            del lots[:consumed]
        # WAC basis carry.
        removed = (
            state.wac_basis if close_qty == held else _basis_share(state.wac_basis, close_qty, held)
        )
        proceeds = close_qty * price * pv - removed
        realized_wac = proceeds if before > _ZERO else -proceeds
        state.wac_basis -= removed
        state.realized_fifo += realized_fifo
        state.realized_wac += realized_wac
        open_qty = qty - close_qty

    if open_qty:
        state.lots.append(Lot(exec_id, open_qty if buying else -open_qty, price, occurred_at))
        state.wac_basis += open_qty * price * state.point_value

    after = before + qty if buying else before - qty
    state.signed_qty = after
    state.fees += fee
    if not after:
        state.opened_at = None
        state.closed_at = occurred_at
    elif not before or (before > _ZERO) != (after > _ZERO):
        state.opened_at = occurred_at
    state.last_fill_at = occurred_at
    state.last_key = key
    state.fill_count += 1
    return before, after, realized_fifo, realized_wac


def effective_fills(
    events: Iterable[tuple[int, StreamEvent]], *, strict: bool = False
) -> list[FillInput]:
    """Return the fills of one stream that stand, in event order.

    Rules, all independent of the order in which ``events`` arrive:

    - a bust removes its execution, whenever it occurred (after a correction too; a
      correction never revives a busted execution);
    - a correction replaces the quantity, price and fee of its execution; when there are
      several, the latest by ``(occurred_at, position)`` wins;
    - a bust or correction whose execution id has no fill is ignored (ingest rejects
      those with ``UNKNOWN_EXECUTION``), or raises with ``strict=True``;
    - if the same execution id was recorded twice, the earlier log position stands.

    Args:
        events: ``(log position, event)`` pairs of ONE stream, in any order.
        strict: raise instead of ignoring a bust or correction of an unknown execution.

    Returns:
        The effective fills sorted by ``(occurred_at, position of the original fill)``.

    Raises:
        UnknownExecution: with ``strict=True``, a bust or correction names an execution
            id that has no fill.
    """
    recorded: dict[str, tuple[int, FillRecorded]] = {}
    busted: set[str] = set()
    corrected: dict[str, tuple[tuple[datetime, int], FillCorrected]] = {}
    for position, event in events:
        exec_id = event.exec_id
        if isinstance(event, FillRecorded):
            earlier = recorded.get(exec_id)
            if earlier is None or position < earlier[0]:
                recorded[exec_id] = (position, event)
        elif isinstance(event, FillBusted):
            busted.add(exec_id)
        else:
            key = (event.occurred_at, position)
            latest = corrected.get(exec_id)
            if latest is None or key > latest[0]:
                corrected[exec_id] = (key, event)
    if strict:
        unknown = sorted((busted | corrected.keys()) - recorded.keys())
        if unknown:
            raise UnknownExecution(
                f"exec_id {unknown[0]!r} is busted or corrected but was never filled"
            )
    fills = []
    for exec_id, (position, fill) in recorded.items():
        if exec_id in busted:
            continue
        correction = corrected.get(exec_id)
        source = fill if correction is None else correction[1]
        fills.append(
            FillInput(
                exec_id=exec_id,
                side=fill.side,
                qty=source.qty,
                price=source.price,
                fee=source.fee,
                occurred_at=fill.occurred_at,
                position=position,
                order_id=fill.order_id,
            )
        )
    fills.sort(key=lambda f: (f.occurred_at, f.position))
    return fills


def replay(
    account: str,
    contract: str,
    point_value: Decimal,
    tick_size: Decimal,
    events: Iterable[tuple[int, StreamEvent]],
) -> tuple[PositionState, list[FillEffect]]:
    """Restate one stream from its events: fold its effective fills from a flat state.

    This is how a late fill, a bust or a correction restates P&L from the earliest
    affected fill.

    Args:
        account: the account id.
        contract: the contract id.
        point_value: money per 1.0 of price.
        tick_size: the price grid.
        events: ``(log position, event)`` pairs of the stream, in any order.

    Returns:
        The final state and the effect of every effective fill, in event order.

    Raises:
        OffTickPrice: an effective fill (perhaps corrected) is off the tick grid.
        FoldError: an effective fill has a quantity that is not greater than zero.
    """
    state = new_state(account, contract, point_value, tick_size)
    effects = [apply_fill(state, fill) for fill in effective_fills(events)]
    return state, effects


def unrealized(state: PositionState, mark: Decimal, method: Method = "fifo") -> Decimal:
    """Return the open position's unrealized P&L at ``mark``.

    FIFO: sum of lot qty x (mark - lot price) x point value. WAC: Q x mark x point
    value - sign(Q) x basis. Realized + unrealized is the same under both methods.
    """
    pv = state.point_value
    if method == "fifo":
        return sum((lot.qty * (mark - lot.price) * pv for lot in state.lots), _ZERO)
    q = state.signed_qty
    if q == 0:
        return _ZERO
    market = q * mark * pv
    return market - state.wac_basis if q > 0 else market + state.wac_basis
