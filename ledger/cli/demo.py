"""A realistic, seeded trading day: the demo's data and ``scripts/generate_day``'s.

Several accounts trade ES, NQ, MNQ, CL and ZN futures through scale-ins, partial
closes and flips; the day also holds a bust, a correction, a fill that arrives late
(recorded after later fills, with its true earlier time), marks, and end-of-day broker
position reports of which exactly one disagrees with the fills (the broker saw one
more contract than the ledger: a fill the ledger never received).

Marks: the previous settlement at 00:00 UTC of the day, one on every hour of the
session, and the close at 21:00. A query for "now" takes the last mark stamped by now,
so positions carry their unrealized P&L whenever the demo runs, even on a day whose
session has not happened yet (before 21:00 UTC on today's date).
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from ledger.events import FillBusted, FillCorrected, FillRecorded, parse_event
from projections.positions import replay

__all__ = ["CONTRACTS", "DayPlan", "generate_day", "ledger_command", "to_projectx", "try_next"]


@dataclass(frozen=True, slots=True)
class Contract:
    """A futures contract as the demo trades it."""

    contract: str
    tick_size: Decimal
    tick_value: Decimal
    start_price: Decimal


CONTRACTS = (
    Contract("CON.F.US.EP.Z26", Decimal("0.25"), Decimal("12.50"), Decimal("6065.25")),
    Contract("CON.F.US.ENQ.Z26", Decimal("0.25"), Decimal("5.00"), Decimal("21410.50")),
    Contract("CON.F.US.MNQ.Z26", Decimal("0.25"), Decimal("0.50"), Decimal("21410.50")),
    Contract("CON.F.US.CLE.F27", Decimal("0.01"), Decimal("10.00"), Decimal("71.05")),
    Contract("CON.F.US.ZN.Z26", Decimal("0.015625"), Decimal("15.625"), Decimal("110.015625")),
)


@dataclass
class DayPlan:
    """The generated day: records in arrival order, plus what the demo should find."""

    day: date
    records: list[dict[str, Any]] = field(default_factory=list)
    busted: str = ""
    corrected: str = ""
    late: str = ""
    disagreeing: tuple[str, str] = ("", "")


def _money(value: Decimal) -> str:
    return format(value, "f")


def _stamp(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def _mark(contract: str, price: Decimal, when: datetime) -> dict[str, Any]:
    return {
        "type": "mark",
        "contract": contract,
        "price": _money(price),
        "occurred_at": _stamp(when),
    }


def _walk(rng: random.Random, price: Decimal, tick: Decimal) -> Decimal:
    price += tick * rng.choice((-3, -2, -1, -1, 0, 1, 1, 2, 3))
    return max(price, tick)


def generate_day(
    *, seed: int = 7, accounts: int = 3, fills: int = 120, day: date | None = None
) -> DayPlan:
    """Return a seeded trading day of native records (same seed, same day, same records).

    Args:
        seed: the random seed.
        accounts: how many accounts trade (at least 1).
        fills: roughly how many fills in all (at least 10).
        day: the trading day (UTC); today when None.
    """
    rng = random.Random(seed)
    day = day or datetime.now(UTC).date()
    plan = DayPlan(day=day)
    accounts = max(1, accounts)
    fills = max(10, fills)
    for c in CONTRACTS:
        plan.records.append(
            {
                "type": "instrument",
                "contract": c.contract,
                "tick_size": _money(c.tick_size),
                "tick_value": _money(c.tick_value),
                "currency": "USD",
            }
        )
    names = [f"ACC-{i + 1}" for i in range(accounts)]
    books = {a: rng.sample(CONTRACTS, k=min(len(CONTRACTS), 2 + rng.randrange(2))) for a in names}
    if CONTRACTS[0] not in books[names[0]]:  # the stream the demo's "try next" names
        books[names[0]][0] = CONTRACTS[0]
    prices = {c.contract: c.start_price for c in CONTRACTS}
    # the previous session's settlement, so that even "now" before the session has a mark
    settlements = [
        _mark(c.contract, c.start_price, datetime.combine(day, time(0, 0), tzinfo=UTC))
        for c in CONTRACTS
    ]
    held: dict[tuple[str, str], int] = {}
    open_ = datetime.combine(day, time(13, 30), tzinfo=UTC)
    step = timedelta(seconds=(6.5 * 3600) / fills)
    hour = timedelta(hours=1)
    next_mark = open_ + timedelta(minutes=30)
    session: list[dict[str, Any]] = []  # fills and marks in time order
    trades: list[dict[str, Any]] = []
    for n in range(fills):
        when = open_ + step * n + timedelta(milliseconds=rng.randrange(1000))
        while next_mark <= when:  # on the hour: each contract at its last traded price
            session.extend(_mark(k, p, next_mark) for k, p in prices.items())
            next_mark += hour
        account = names[0] if n == 0 else rng.choice(names)
        c = CONTRACTS[0] if n == 0 else rng.choice(books[account])
        prices[c.contract] = _walk(rng, prices[c.contract], c.tick_size)
        qty_now = held.get((account, c.contract), 0)
        roll = rng.random()
        if qty_now == 0 or roll < 0.35:  # open or scale in, mostly with the position
            side = (1 if qty_now >= 0 else -1) if qty_now else rng.choice((1, -1))
            size = rng.randint(1, 3)
        elif roll < 0.75:  # partial or full close
            side = -1 if qty_now > 0 else 1
            size = rng.randint(1, abs(qty_now))
        else:  # flip through zero
            side = -1 if qty_now > 0 else 1
            size = abs(qty_now) + rng.randint(1, 3)
        held[(account, c.contract)] = qty_now + side * size
        trades.append(
            {
                "type": "fill",
                "account": account,
                "contract": c.contract,
                "exec_id": f"X-{day:%Y%m%d}-{n + 1:05d}",
                "order_id": f"O-{n + 1:05d}",
                "side": "BUY" if side > 0 else "SELL",
                "qty": str(size),
                "price": _money(prices[c.contract]),
                "fee": _money(
                    Decimal("0.62") * size if "MNQ" in c.contract else Decimal("2.25") * size
                ),
                "occurred_at": _stamp(when),
            }
        )
        session.append(trades[-1])
    # A fill that arrives late: recorded last, though it happened early in the day.
    late = trades.pop(len(trades) // 4)
    plan.late = late["exec_id"]
    eod = datetime.combine(day, time(21, 0), tzinfo=UTC)
    while next_mark < eod:
        session.extend(_mark(k, p, next_mark) for k, p in prices.items())
        next_mark += hour
    plan.records.extend(settlements)
    plan.records.extend(r for r in session if r is not late)
    plan.records.append(late)
    # The broker voids one execution and corrects the price of another.
    bust_of = trades[len(trades) // 3]
    fix_of = trades[(2 * len(trades)) // 3]
    plan.busted, plan.corrected = bust_of["exec_id"], fix_of["exec_id"]
    plan.records.append(
        {
            "type": "bust",
            "account": bust_of["account"],
            "contract": bust_of["contract"],
            "exec_id": bust_of["exec_id"],
            "occurred_at": (eod - timedelta(minutes=30)).isoformat().replace("+00:00", "Z"),
        }
    )
    tick = next(c.tick_size for c in CONTRACTS if c.contract == fix_of["contract"])
    plan.records.append(
        {
            "type": "correction",
            "account": fix_of["account"],
            "contract": fix_of["contract"],
            "exec_id": fix_of["exec_id"],
            "qty": fix_of["qty"],
            "price": _money(Decimal(fix_of["price"]) + tick),
            "fee": fix_of["fee"],
            "occurred_at": (eod - timedelta(minutes=20)).isoformat().replace("+00:00", "Z"),
        }
    )
    plan.records.extend(_mark(c.contract, prices[c.contract], eod) for c in CONTRACTS)
    plan.records.extend(_broker_reports(plan, eod, rng))
    return plan


def _broker_reports(plan: DayPlan, eod: datetime, rng: random.Random) -> list[dict[str, Any]]:
    """End-of-day broker positions from the fills as they stand; one of them is off by one."""
    streams: dict[tuple[str, str], list[tuple[int, FillRecorded | FillBusted | FillCorrected]]] = {}
    for position, record in enumerate(plan.records):
        if record["type"] in ("fill", "bust", "correction"):
            event = parse_event(record)
            assert isinstance(event, FillRecorded | FillBusted | FillCorrected)
            streams.setdefault((record["account"], record["contract"]), []).append(
                (position, event)
            )
    specs = {c.contract: c for c in CONTRACTS}
    reports = []
    keys = sorted(streams)
    disagree = keys[rng.randrange(len(keys))]
    for account, contract in keys:
        spec = specs[contract]
        state, _ = replay(
            account,
            contract,
            spec.tick_value / spec.tick_size,
            spec.tick_size,
            streams[(account, contract)],
        )
        qty = state.signed_qty
        avg = state.avg_open_price("fifo")
        if (account, contract) == disagree:
            plan.disagreeing = (account, contract)
            qty += 1 if qty >= 0 else -1  # the broker holds one more contract than we do
        reports.append(
            {
                "type": "broker_position",
                "account": account,
                "contract": contract,
                "signed_qty": str(qty),
                "avg_price": None if avg is None else _money(_nine_decimals(avg)),
                "occurred_at": eod.isoformat().replace("+00:00", "Z"),
            }
        )
    for report in reports:
        if report["avg_price"] is None:
            del report["avg_price"]
    return reports


def _nine_decimals(price: Decimal) -> Decimal:
    # the broker reports averages to 9 decimals, like ProjectX does
    return price.quantize(Decimal("0.000000001"))


def to_projectx(records: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Yield the records as ProjectX Gateway payloads (contracts, trades, positions)."""
    account_ids: dict[str, int] = {}
    trades: dict[str, dict[str, Any]] = {}
    for record in records:
        kind = record["type"]
        if "account" in record:
            account_ids.setdefault(record["account"], 1000 + len(account_ids) + 1)
        if kind == "instrument":
            yield {
                "id": record["contract"],
                "name": record["contract"].split(".")[3] + record["contract"].split(".")[4],
                "tickSize": Decimal(record["tick_size"]),
                "tickValue": Decimal(record["tick_value"]),
                "activeContract": True,
            }
        elif kind == "fill":
            trade = {
                "id": int(record["exec_id"].rsplit("-", 1)[1]),
                "accountId": account_ids[record["account"]],
                "contractId": record["contract"],
                "creationTimestamp": record["occurred_at"].replace("Z", "+00:00"),
                "price": Decimal(record["price"]),
                "profitAndLoss": None,
                "fees": Decimal(record["fee"]),
                "side": 0 if record["side"] == "BUY" else 1,
                "size": int(record["qty"]),
                "voided": False,
                "orderId": int(record["order_id"].rsplit("-", 1)[1]),
            }
            trades[record["exec_id"]] = trade
            yield trade
        elif kind == "bust":
            yield {**trades[record["exec_id"]], "voided": True}
        elif kind == "broker_position":
            qty = Decimal(record["signed_qty"])
            yield {
                "id": len(account_ids),
                "accountId": account_ids[record["account"]],
                "contractId": record["contract"],
                "creationTimestamp": record["occurred_at"].replace("Z", "+00:00"),
                "type": 1 if qty >= 0 else 2,
                "size": int(abs(qty)),
                "averagePrice": Decimal(record.get("avg_price") or "0"),
            }
        # corrections and marks have no ProjectX payload: the broker restates a trade by
        # voiding it, and marks come from market data, not the user hub


def ledger_command() -> str:
    """Return how the user's shell reaches this ``ledger``: its name when ``PATH`` finds
    this very command, else its full path (``scripts/setup`` installs it in ``.venv/bin``,
    which a fresh shell does not have on ``PATH``)."""
    me = shutil.which(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if me is None or os.path.basename(me) != "ledger":
        here = os.path.join(os.path.dirname(sys.executable), "ledger")
        me = here if os.access(here, os.X_OK) else None
    if me is None:  # run as ``python -m ledger``
        return f"{shlex.quote(sys.executable)} -m ledger"
    on_path = shutil.which("ledger")
    if on_path is not None and os.path.realpath(on_path) == os.path.realpath(me):
        return "ledger"
    return shlex.quote(os.path.abspath(me))


def try_next(plan: DayPlan, known_at: datetime, command: str | None = None) -> list[str]:
    """Return the demo's "try next" command lines, each runnable as printed.

    Every time in them lies in the demo's data: the stream they name has fills (the
    day's first fill is always ACC-1's on ES), the day has a mark at every hour, and
    ``known_at`` (the end of the demo's ingest, a time the log knows) is the knowledge
    time.

    Args:
        plan: the demo's day.
        known_at: a time after the demo's records were appended.
        command: how to call ``ledger``; :func:`ledger_command` when None.
    """
    ledger = command or ledger_command()
    day = plan.day.isoformat()
    stream = f"--account ACC-1 --contract {CONTRACTS[0].contract}"
    known = _stamp(known_at.astimezone(UTC))
    return [
        f"{ledger} positions --as-of {day}T15:00:00Z          # event time",
        f"{ledger} positions --as-known-at {known}   # knowledge time",
        f"{ledger} history {stream}",
        f"{ledger} reconcile --cutoff {day}T21:00:01Z --propose   # exit 3: the break",
        f"{ledger} trail {stream}",
        f"{ledger} verify",
        f"{ledger} log --limit 20",
        f"{ledger} rebuild",
    ]
