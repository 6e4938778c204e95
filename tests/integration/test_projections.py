"""The projection runner on a real PostgreSQL: incremental == rebuild == pure replay.

Covers busts and corrections (restating P&L, incl. a bust that removes a flip), late
fills, history compaction against as-of replays, both clocks (as-of / as-known-at) with
snapshots against full replays, and live following across a server restart.
"""

# ruff: noqa: ASYNC109, ASYNC220 - the tests drive CLI subprocesses and wait on them

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pytest_postgresql.executors import PostgreSQLExecutor
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.events import Event, FillBusted, FillCorrected, FillRecorded, parse_event
from ledger.settings import Settings
from ledger.store import UncheckedEventStore, driver_connection
from projections import cache as cache_module  # (where the runner restates streams)
from projections import queries
from projections.positions import replay
from projections.runner import ProjectionRunner

ROOT = Path(__file__).resolve().parents[2]
# Three weeks ago, whenever the suite runs: inside the default 30-day history window (a
# fixed date drifted out of it and its detail rows were compacted).
T0 = datetime.combine(datetime.now(UTC).date() - timedelta(days=22), dt_time(14), tzinfo=UTC)
# contract -> (tick size, tick value, base price); point values 50 and 1
CONTRACTS = {"C.ES": ("0.25", "12.50", "5000.00"), "C.EQ": ("0.01", "0.01", "100.00")}


# --------------------------------------------------------------------- helpers


def instruments() -> list[Event]:
    return [
        parse_event({"type": "instrument", "contract": c, "tick_size": t, "tick_value": v})
        for c, (t, v, _) in CONTRACTS.items()
    ]


def fill(
    account: str,
    contract: str,
    exec_id: str,
    side: str,
    qty: object,
    price: str,
    at: datetime,
    fee: str = "0",
) -> Event:
    return parse_event(
        {
            "type": "fill",
            "account": account,
            "contract": contract,
            "exec_id": exec_id,
            "side": side,
            "qty": str(qty),
            "price": price,
            "fee": fee,
            "occurred_at": at.isoformat(),
        }
    )


def adjust(
    kind: str, account: str, contract: str, exec_id: str, at: datetime, **extra: str
) -> Event:
    return parse_event(
        {
            "type": kind,
            "account": account,
            "contract": contract,
            "exec_id": exec_id,
            "occurred_at": at.isoformat(),
            **extra,
        }
    )


def random_log(
    rng: random.Random,
    n_fills: int,
    *,
    accounts: Sequence[str] = ("A0", "A1", "A2"),
    start: datetime = T0,
    step: timedelta = timedelta(seconds=30),
    late: float = 0.08,
    adjust_rate: float = 0.04,
) -> list[Event]:
    """Fills with opening, closing and flipping trades; late fills; busts; corrections.

    A bust or correction always comes after its fill in the log (ingest rejects the
    other order with UNKNOWN_EXECUTION).
    """
    out: list[Event] = []
    filled: dict[tuple[str, str], list[str]] = defaultdict(list)
    busted: set[tuple[str, str]] = set()
    for i in range(n_fills):
        account = rng.choice(accounts)
        contract = rng.choice(list(CONTRACTS))
        tick, _, base = CONTRACTS[contract]
        price = Decimal(base) + Decimal(tick) * rng.randint(-40, 40)
        at = start + step * i
        if rng.random() < late:
            at -= step * rng.randint(1, 60)  # happened well before fills already logged
        exec_id = f"E{i}"
        qty = rng.choice((1, 1, 2, 3, 5, 8))
        side = rng.choice(("BUY", "SELL"))
        fee = str(Decimal("0.62") * qty)
        out.append(fill(account, contract, exec_id, side, qty, str(price), at, fee))
        filled[(account, contract)].append(exec_id)
        if rng.random() < adjust_rate:
            key = (account, contract)
            victim = rng.choice(filled[key])
            when = start + step * i + timedelta(seconds=1)
            if rng.random() < 0.5 and (account, victim) not in busted:
                busted.add((account, victim))
                out.append(adjust("bust", account, contract, victim, when))
            else:
                new_price = Decimal(base) + Decimal(tick) * rng.randint(-40, 40)
                out.append(
                    adjust(
                        "correction",
                        account,
                        contract,
                        victim,
                        when,
                        qty=str(rng.choice((1, 2, 4))),
                        price=str(new_price),
                        fee="1.00",
                    )
                )
    return out


SERVING = "SELECT generation FROM projection_checkpoint WHERE status = 'serving'"
TABLE_ROWS = {
    "proj_positions": "ORDER BY stream",
    "proj_history": "ORDER BY stream, occurred_at, position, kind",
    "proj_pnl_daily": "ORDER BY stream, day",
}


async def serving_rows(conn: asyncpg.Connection) -> dict[str, list[dict[str, Any]]]:
    """Every serving row of positions, history and daily P&L, numbers as exact text."""
    generation = await conn.fetchval(SERVING)
    out: dict[str, list[dict[str, Any]]] = {}
    for table, order in TABLE_ROWS.items():
        rows = await conn.fetch(
            f"SELECT (to_jsonb(t) - 'generation')::text FROM {table} t "
            f"WHERE generation = $1 {order}",
            generation,
        )
        out[table] = [json.loads(r[0], parse_float=str, parse_int=str) for r in rows]
    return out


async def driver(engine: AsyncEngine) -> Any:
    conn = await engine.connect()
    return conn, await driver_connection(conn)


CHECKPOINTS = "SELECT generation, status, events FROM projection_checkpoint ORDER BY generation"


async def checkpoints(engine: AsyncEngine) -> list[tuple[int, str, int]]:
    """Every generation's (generation, status, events projected)."""
    async with engine.connect() as sa:
        rows = await (await driver_connection(sa)).fetch(CHECKPOINTS)
    return [(r[0], r[1], r[2]) for r in rows]


async def snapshot_serving(engine: AsyncEngine) -> dict[str, list[dict[str, Any]]]:
    async with engine.connect() as sa:
        return await serving_rows(await driver_connection(sa))


async def assert_rebuild_equals_serving(
    engine: AsyncEngine, settings: Settings | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Rebuild in one process, then split between worker processes; both must give
    exactly the serving rows."""
    before = await snapshot_serving(engine)
    for workers in (1, 2):
        runner = ProjectionRunner(engine, settings, batch_size=97)
        runner.rebuild_workers = workers
        runner.partition_min_events = 1
        result = await runner.rebuild()
        after = await snapshot_serving(engine)
        assert result.events > 0
        for table in TABLE_ROWS:
            assert len(after[table]) == len(before[table]), (workers, table)
            assert after[table] == before[table], (workers, table)
    return after


def oracle(events: Sequence[tuple[int, Event]]) -> dict[str, Any]:
    """Pure replay of every stream of the log."""
    by_stream: dict[str, list[tuple[int, Any]]] = defaultdict(list)
    for position, e in events:
        if isinstance(e, FillRecorded | FillBusted | FillCorrected):
            by_stream[e.stream].append((position, e))
    out = {}
    for stream, evs in by_stream.items():
        account, contract = stream.split("/", 1)
        tick, value, _ = CONTRACTS[contract]
        pv = Decimal(value) / Decimal(tick)
        out[stream] = replay(account, contract, pv, Decimal(tick), evs)[0]
    return out


async def append_all(
    store: UncheckedEventStore, events: Sequence[Event]
) -> list[tuple[int, Event]]:
    result = await store.append(events)
    return list(zip(result.positions, events, strict=True))


# -------------------------------------------------------- busts and corrections


async def test_bust_of_a_flip_and_a_correction_incrementally_equal_rebuild(
    engine: AsyncEngine, store: UncheckedEventStore
) -> None:
    t = [T0 + timedelta(minutes=i) for i in range(10)]
    steps: list[Event] = [
        *instruments(),
        fill("FLIP", "C.EQ", "F1", "BUY", 100, "10.00", t[0]),
        fill("FLIP", "C.EQ", "F2", "SELL", 150, "12.00", t[1]),  # flips short 50
        fill("FLIP", "C.EQ", "F3", "BUY", 50, "11.00", t[2]),  # closes the short
        fill("CORR", "C.ES", "G1", "BUY", 3, "5000.00", t[0], fee="6.75"),
        fill("CORR", "C.ES", "G2", "SELL", 2, "5001.25", t[1], fee="4.50"),
        adjust("bust", "FLIP", "C.EQ", "F2", t[5]),
        adjust("correction", "CORR", "C.ES", "G1", t[5], qty="4", price="4999.75", fee="9.00"),
        fill("FLIP", "C.EQ", "F4", "SELL", 150, "12.00", t[6]),
        fill("CORR", "C.ES", "G3", "SELL", 1, "5002.00", t[7], fee="2.25"),
    ]
    runner = ProjectionRunner(engine, batch_size=2, snapshot_every=2)
    states: list[tuple[str, str, str, str]] = []
    for event in steps:
        await store.append([event])
        await runner.catch_up()
        async with engine.connect() as sa:
            rows = await serving_rows(await driver_connection(sa))
        pos = {r["stream"]: r for r in rows["proj_positions"]}
        if "FLIP/C.EQ" in pos:
            p = pos["FLIP/C.EQ"]
            states.append((p["signed_qty"], p["realized_fifo"], p["realized_wac"], p["fees"]))
    assert states == [
        ("100", "0", "0", "0"),
        ("-50", "200.00", "200.00", "0"),
        ("0", "250.00", "250.00", "0"),
        ("0", "250.00", "250.00", "0"),
        ("0", "250.00", "250.00", "0"),
        ("150", "0", "0", "0"),  # the bust: F3 now opens
        ("150", "0", "0", "0"),
        ("0", "250.00", "250.00", "0"),  # 100 x 2.00 + 50 x 1.00; 1800.00 - 1550.00
        ("0", "250.00", "250.00", "0"),
    ]
    after = await assert_rebuild_equals_serving(engine)
    pos = {r["stream"]: r for r in after["proj_positions"]}
    corr = pos["CORR/C.ES"]
    # G1 4 @ 4999.75; G2 closes 2: FIFO 2 x 1.50 x 50 = 150.00; WAC removes
    # 999950.00 x 2/4 = 499975.00 of 500125.00 -> 150.00; G3 closes 1 @ 5002.00: +112.50
    assert (corr["signed_qty"], corr["realized_fifo"], corr["realized_wac"]) == (
        "1",
        "262.50",
        "262.50",
    )
    assert corr["fees"] == "15.75"
    hist = [h for h in after["proj_history"] if h["stream"] == "FLIP/C.EQ"]
    assert [(h["exec_id"], h["qty_after"], h["cum_realized_fifo"]) for h in hist] == [
        ("F1", "100", "0"),
        ("F3", "150", "0"),
        ("F4", "0", "250.00"),
    ]
    daily = {r["stream"]: r for r in after["proj_pnl_daily"]}
    assert (daily["FLIP/C.EQ"]["realized_fifo"], daily["FLIP/C.EQ"]["fills"]) == ("250.00", "3")
    assert (daily["CORR/C.ES"]["realized_wac"], daily["CORR/C.ES"]["fees"]) == ("262.50", "15.75")


async def test_random_arrival_incremental_equals_rebuild_and_pure_replay(
    engine: AsyncEngine, store: UncheckedEventStore
) -> None:
    rng = random.Random(7)
    log = await append_all(store, instruments())
    events = random_log(rng, 400)
    runner = ProjectionRunner(engine, batch_size=13, snapshot_every=5)
    i = 0
    while i < len(events):
        n = rng.choice((1, 1, 2, 5, 17, 40))
        log += await append_all(store, events[i : i + n])
        i += n
        if rng.random() < 0.6:
            await runner.catch_up()
    await runner.catch_up()
    after = await assert_rebuild_equals_serving(engine)
    expected = oracle(log)
    got = {r["stream"]: r for r in after["proj_positions"]}
    assert sorted(got) == sorted(expected)
    for stream, state in expected.items():
        row = got[stream]
        assert row["signed_qty"] == str(state.signed_qty), stream
        assert row["realized_fifo"] == str(state.realized_fifo), stream
        assert row["realized_wac"] == str(state.realized_wac), stream
        assert row["fees"] == str(state.fees), stream
        assert json.loads(row["state"])["lots"] == state.to_json()["lots"], stream
    # late fills and adjustments really happened
    assert sum(isinstance(e, FillBusted) for _, e in log) >= 3
    assert sum(isinstance(e, FillCorrected) for _, e in log) >= 3


async def test_first_catch_up_of_a_long_log_rebuilds_it_split_and_equals_pure_replay(
    engine: AsyncEngine, store: UncheckedEventStore
) -> None:
    """A serving generation that has projected nothing, on a log long enough to split,
    is replaced by a split rebuild; later catch-ups are incremental as ever."""
    rng = random.Random(17)
    log = await append_all(store, instruments())
    events = random_log(rng, 1500, accounts=("S0", "S1", "S2", "S3", "S4"))
    log += await append_all(store, events[:1200])
    runner = ProjectionRunner(engine, batch_size=71)
    runner.rebuild_workers = 2
    runner.partition_min_events = len(log)
    projected = await runner.catch_up()
    assert await checkpoints(engine) == [(2, "serving", len(log))]
    assert projected == len(log)
    log += await append_all(store, events[1200:])
    assert await runner.catch_up() == len(events) - 1200  # into generation 2, in place
    after = await assert_rebuild_equals_serving(engine)
    expected = oracle(log)
    got = {r["stream"]: r for r in after["proj_positions"]}
    assert sorted(got) == sorted(expected)
    for stream, state in expected.items():
        assert got[stream]["realized_fifo"] == str(state.realized_fifo), stream
        assert json.loads(got[stream]["state"])["lots"] == state.to_json()["lots"], stream


async def append_catching_up(
    store: UncheckedEventStore,
    runner: ProjectionRunner,
    events: Sequence[Event],
    rng: random.Random,
) -> list[tuple[int, Event]]:
    """Append ``events`` a few at a time, catching ``runner`` up after each append."""
    log: list[tuple[int, Event]] = []
    i = 0
    while i < len(events):
        n = rng.choice((1, 2, 3, 9))
        log += await append_all(store, events[i : i + n])
        i += n
        await runner.catch_up()
    return log


async def test_restatements_across_many_days_rewrite_only_from_the_changed_day(
    engine: AsyncEngine, store: UncheckedEventStore
) -> None:
    """A restatement rewrites history and daily P&L from the trading day of the first
    fill it changes, and keeps the days before. Fills two hours apart over ~25 days,
    late fills up to five days back, busts and corrections of any earlier fill: the
    incremental projections (many small transactions) equal a rebuild, and the daily
    P&L equals a pure replay grouped by day."""
    rng = random.Random(11)
    log = await append_all(store, instruments())
    events = random_log(
        rng, 300, start=T0 - timedelta(days=20), step=timedelta(hours=2), adjust_rate=0.08
    )
    runner = ProjectionRunner(engine, batch_size=7, snapshot_every=4)
    log += await append_catching_up(store, runner, events, rng)
    after = await assert_rebuild_equals_serving(engine)
    # again with a restate journal too small to hold the streams: restatements of the
    # streams it dropped read them back from the log
    tiny = ProjectionRunner(engine, batch_size=31)
    tiny.journal_rows = 40
    dropped: list[str] = []
    drop = tiny._journal_drop

    def counting_drop(stream: str) -> None:
        dropped.append(stream)
        drop(stream)

    tiny._journal_drop = counting_drop  # type: ignore[method-assign]
    await tiny.rebuild()
    assert dropped, "the journal never overflowed"
    assert await snapshot_serving(engine) == after

    expected: dict[tuple[str, str], list[Decimal]] = {}
    by_stream: dict[str, list[tuple[int, Any]]] = defaultdict(list)
    for position, e in log:
        if isinstance(e, FillRecorded | FillBusted | FillCorrected):
            by_stream[e.stream].append((position, e))
    days_per_stream = []
    for stream, evs in by_stream.items():
        account, contract = stream.split("/", 1)
        tick, value, _ = CONTRACTS[contract]
        _, effects = replay(account, contract, Decimal(value) / Decimal(tick), Decimal(tick), evs)
        days = set()
        for effect in effects:
            day = effect.occurred_at.date().isoformat()
            days.add(day)
            sums = expected.setdefault((stream, day), [Decimal(0)] * 4)
            sums[0] += effect.realized_fifo
            sums[1] += effect.realized_wac
            sums[2] += effect.fee
            sums[3] += 1
        days_per_stream.append(len(days))
    got = {
        (r["stream"], r["day"]): [
            Decimal(r["realized_fifo"]),
            Decimal(r["realized_wac"]),
            Decimal(r["fees"]),
            Decimal(r["fills"]),
        ]
        for r in after["proj_pnl_daily"]
    }
    assert got == expected
    # the log really spans many days per stream, and restated streams on later days
    assert min(days_per_stream) >= 10
    assert sum(isinstance(e, FillBusted) for _, e in log) >= 3
    assert sum(isinstance(e, FillCorrected) for _, e in log) >= 3


async def test_restatements_from_marks_rewrite_the_same_history_as_a_pure_replay(
    engine: AsyncEngine, store: UncheckedEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restatement replays from the stream's last mark before the fill it changes
    (or from that fill) and rewrites history and daily P&L only from there: every
    history line and daily row still equals a pure replay of the whole log. Marks every
    other fill, so that most restatements start from one, across days and within one."""
    rng = random.Random(29)
    settings = Settings(history_retention_days=36_500)  # no day is compacted
    log = await append_all(store, instruments())
    events = random_log(
        rng, 400, start=T0 - timedelta(days=6), step=timedelta(minutes=25), adjust_rate=0.1
    )
    from_mark: list[bool] = []
    partial: list[Any] = []  # replays the trimmed journal could not serve
    restate = cache_module.restate_stream

    def watching(*args: Any) -> Any:
        marks = args[6]
        keys = {m.key for m in marks.points} if marks is not None else set()
        restated = restate(*args)
        if restated is None:
            partial.append(args[0])
        elif restated.forget is not None:
            _, at, position = restated.forget
            from_mark.append(at is not None and (at, position - 1) in keys)
        return restated

    monkeypatch.setattr(cache_module, "restate_stream", watching)
    runner = ProjectionRunner(engine, settings, batch_size=7, snapshot_every=4)
    runner.mark_every = 2
    log += await append_catching_up(store, runner, events, rng)
    assert sum(from_mark) >= 20, from_mark
    assert not all(from_mark)  # and some replayed from the first fill
    assert partial  # some of them after the trimmed journal fell short
    serving = await snapshot_serving(engine)

    by_stream: dict[str, list[tuple[int, Any]]] = defaultdict(list)
    for position, e in log:
        if isinstance(e, FillRecorded | FillBusted | FillCorrected):
            by_stream[e.stream].append((position, e))
    lines: list[tuple[Any, ...]] = []
    daily: dict[tuple[str, str], list[Decimal]] = {}
    for stream in sorted(by_stream):
        account, contract = stream.split("/", 1)
        tick, value, _ = CONTRACTS[contract]
        _, effects = replay(
            account, contract, Decimal(value) / Decimal(tick), Decimal(tick), by_stream[stream]
        )
        cum_fifo = cum_wac = Decimal(0)
        for f in effects:
            cum_fifo += f.realized_fifo
            cum_wac += f.realized_wac
            amounts = (f.qty_before, f.qty_after, f.realized_fifo, f.realized_wac)
            lines.append((stream, f.position, f.exec_id, *amounts, cum_fifo, cum_wac, f.fee))
            sums = daily.setdefault((stream, f.occurred_at.date().isoformat()), [Decimal(0)] * 4)
            for k, amount in enumerate((f.realized_fifo, f.realized_wac, f.fee, Decimal(1))):
                sums[k] += amount
    columns = ("qty_before", "qty_after", "realized_fifo", "realized_wac")
    columns += ("cum_realized_fifo", "cum_realized_wac", "fees")
    got_lines = [
        (h["stream"], int(h["position"]), h["exec_id"], *(Decimal(h[k]) for k in columns))
        for h in serving["proj_history"]
    ]
    assert {h["kind"] for h in serving["proj_history"]} == {"detail"}
    assert got_lines == lines
    got_daily = {
        (r["stream"], r["day"]): [Decimal(r[k]) for k in ("realized_fifo", "realized_wac")]
        + [Decimal(r["fees"]), Decimal(r["fills"])]
        for r in serving["proj_pnl_daily"]
    }
    assert got_daily == daily
    assert len({day for _, day in daily}) >= 6
    assert await assert_rebuild_equals_serving(engine, settings) == serving
    # and a rebuild in pages long enough to take several marks of a stream before a
    # restatement in the same page (which trims its journal past the page's first fill)
    big = ProjectionRunner(engine, settings, batch_size=500)
    big.mark_every = 2
    partial.clear()
    await big.rebuild()
    assert partial
    assert await snapshot_serving(engine) == serving


async def test_late_fill_same_as_on_time_in_another_database_order(
    engine: AsyncEngine, store: UncheckedEventStore
) -> None:
    """Same fills, two accounts: one in event order, one with the second fill last."""
    spec = [
        ("L1", "BUY", 2, "5000.00"),
        ("L2", "BUY", 1, "5001.25"),
        ("L3", "SELL", 2, "5003.50"),
        ("L4", "SELL", 3, "4999.75"),
        ("L5", "BUY", 2, "4998.00"),
    ]
    t = [T0 + timedelta(minutes=i) for i in range(5)]
    await store.append(instruments())
    runner = ProjectionRunner(engine)
    for i, (x, side, qty, price) in enumerate(spec):
        await store.append([fill("ON", "C.ES", x, side, qty, price, t[i])])
        if x != "L2":
            await store.append([fill("LATE", "C.ES", x, side, qty, price, t[i])])
        await runner.catch_up()
    await store.append([fill("LATE", "C.ES", "L2", "BUY", 1, "5001.25", t[1])])
    await runner.catch_up()
    rows = await snapshot_serving(engine)

    def strip(stream: str, table: str, *drop: str) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in r.items() if k not in ("stream", "account", *drop)}
            for r in rows[table]
            if r["stream"] == stream
        ]

    for table, drop in (
        ("proj_positions", ("last_position", "state")),
        ("proj_history", ("position",)),
        ("proj_pnl_daily", ()),
    ):
        assert strip("LATE/C.ES", table, *drop) == strip("ON/C.ES", table, *drop), table
    hist = strip("LATE/C.ES", "proj_history")
    assert [h["cum_realized_fifo"] for h in hist] == ["0", "0", "350.00", "275.00", "450.00"]
    assert [h["cum_realized_wac"] for h in hist] == ["0", "0", "308.33", "275.00", "450.00"]
    await assert_rebuild_equals_serving(engine)


# ----------------------------------------------------------- history retention

HISTORY_OF = """
SELECT stream, day, kind, qty_after::text, cum_realized_fifo::text, cum_realized_wac::text,
       realized_fifo::text, fees::text
FROM proj_history h JOIN projection_checkpoint c ON c.generation = h.generation
WHERE c.status = 'serving' ORDER BY h.stream, h.occurred_at, h.position
"""
DAILY = """
SELECT stream, day, realized_fifo::text, fees::text FROM proj_pnl_daily d
JOIN projection_checkpoint c ON c.generation = d.generation WHERE c.status = 'serving'
"""


async def _check_compaction(engine: AsyncEngine, cutoff_day: date) -> tuple[int, int]:
    """Old days: one eod row per position and day, equal to an as-of replay at day end."""
    async with engine.connect() as sa:
        conn = await driver_connection(sa)
        generation = await queries.serving_generation(conn)
        assert generation is not None
        rows = await conn.fetch(HISTORY_OF)
        daily = {(r[0], r[1]): (r[2], r[3]) for r in await conn.fetch(DAILY)}
        per_day: dict[tuple[str, date], list[asyncpg.Record]] = defaultdict(list)
        for r in rows:
            per_day[(r["stream"], r["day"])].append(r)
        old = recent = 0
        for (stream, day), group in per_day.items():
            if day < cutoff_day:
                assert [r["kind"] for r in group] == ["eod"], (stream, day)
                end = datetime.combine(day, dt_time.max, tzinfo=UTC)
                state = (await queries.stream_at(conn, generation, stream, "as_of", end)).state
                eod = group[0]
                assert eod["qty_after"] == str(state.signed_qty), (stream, day)
                assert eod["cum_realized_fifo"] == str(state.realized_fifo), (stream, day)
                assert eod["cum_realized_wac"] == str(state.realized_wac), (stream, day)
                # the eod row's day figures are the daily P&L's
                assert (eod["realized_fifo"], eod["fees"]) == daily[(stream, day)]
                old += 1
            else:
                assert {r["kind"] for r in group} == {"detail"}, (stream, day)
                recent += len(group)
        return old, recent


async def test_history_compaction_matches_as_of_replay_and_is_idempotent(
    engine: AsyncEngine, store: UncheckedEventStore, cli_env: dict[str, str]
) -> None:
    rng = random.Random(11)
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=46)
    await store.append(instruments())
    events = random_log(rng, 360, start=start, step=timedelta(hours=3), late=0.1)
    for i in range(0, len(events), 60):
        await store.append(events[i : i + 60])
    settings = Settings(history_retention_days=30)
    runner = ProjectionRunner(engine, settings, batch_size=50, snapshot_every=4)
    await runner.catch_up()

    async def count_events() -> int:
        async with engine.connect() as sa:
            n: int = await (await driver_connection(sa)).fetchval("SELECT count(*) FROM events")
            return n

    n_events = await count_events()
    cutoff_day = (now - timedelta(days=30)).date()
    old, recent = await _check_compaction(engine, cutoff_day)
    assert old >= 20 and recent >= 50, (old, recent)
    before = await snapshot_serving(engine)
    # idempotent: compacting again changes nothing
    async with engine.connect() as sa:
        conn = await driver_connection(sa)
        generation = await queries.serving_generation(conn)
        assert generation is not None
        assert await runner.compact_history(conn, generation) == 0
    await runner.catch_up()
    assert await snapshot_serving(engine) == before
    await assert_rebuild_equals_serving(engine, settings)
    assert await count_events() == n_events

    # a late fill into a compacted day restates the stream and is compacted again
    late_at = now - timedelta(days=40, hours=5)
    await store.append([fill("A0", "C.ES", "LATE-1", "SELL", 7, "5010.00", late_at)])
    await runner.catch_up()
    old2, _ = await _check_compaction(engine, cutoff_day)
    assert old2 >= old
    await assert_rebuild_equals_serving(engine, settings)
    assert await count_events() == n_events + 1

    # the CLI: LEDGER_HISTORY_RETENTION_DAYS moves the window, history shows eod rows,
    # and --as-of at a compacted day's end agrees with its eod row
    env = dict(cli_env, LEDGER_HISTORY_RETENTION_DAYS="10")
    hist = _cli_json(env, "history", "--account", "A0", "--contract", "C.ES", "--format", "json")
    cutoff10 = (now - timedelta(days=10)).date()
    kinds = {(h["day"], h["kind"]) for h in hist}
    assert all(k == "eod" for d, k in kinds if date.fromisoformat(d) < cutoff10)
    assert all(k == "detail" for d, k in kinds if date.fromisoformat(d) >= cutoff10)
    eod = [h for h in hist if h["kind"] == "eod"]
    assert len({h["day"] for h in eod}) == len(eod)
    pick = eod[len(eod) // 2]
    pos = _cli_json(
        env,
        "positions",
        "--account",
        "A0",
        "--contract",
        "C.ES",
        "--as-of",
        pick["day"],
        "--include-flat",
        "--format",
        "json",
    )
    assert (pos[0]["signed_qty"], pos[0]["realized_pnl"]) == (
        pick["qty_after"],
        pick["cum_realized_fifo"],
    )
    old10, _ = await _check_compaction(engine, cutoff10)
    assert old10 > old2
    assert await count_events() == n_events + 1


def _cli_json(env: dict[str, str], *args: str) -> Any:
    result = subprocess.run(
        [sys.executable, "-m", "ledger", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ------------------------------------------------------------------ two clocks


async def test_as_known_at_before_a_bust_shows_the_fill_as_of_does_not(
    engine: AsyncEngine, store: UncheckedEventStore, cli_env: dict[str, str]
) -> None:
    t = [T0 + timedelta(minutes=i) for i in range(5)]
    await store.append(instruments())
    await store.append([fill("K", "C.ES", "B1", "BUY", 2, "5000.00", t[0])])
    await store.append([fill("K", "C.ES", "B2", "SELL", 1, "5002.00", t[1])])
    runner = ProjectionRunner(engine, snapshot_every=1)
    await runner.catch_up()
    async with engine.connect() as sa:
        known: datetime = await (await driver_connection(sa)).fetchval("SELECT now()")
    await asyncio.sleep(0.05)
    await store.append([adjust("bust", "K", "C.ES", "B2", t[4])])
    await runner.catch_up()
    async with engine.connect() as sa:
        conn = await driver_connection(sa)
        then = await queries.position_rows(conn, clock="as_known_at", at=known)
        as_of = await queries.position_rows(conn, clock="as_of", at=t[2])
        now = await queries.position_rows(conn)
    assert [(r["signed_qty"], r["realized_pnl"]) for r in then] == [
        (Decimal("1"), Decimal("100.00"))
    ]
    assert [(str(r["signed_qty"]), str(r["realized_pnl"])) for r in then] == [("1", "100.00")]
    assert [(str(r["signed_qty"]), str(r["realized_pnl"])) for r in as_of] == [("2", "0")]
    assert [(str(r["signed_qty"]), str(r["realized_pnl"])) for r in now] == [("2", "0")]
    # the same through the CLI, on both clocks, for positions, per-fill P&L and history
    at_known = known.isoformat()
    rows = _cli_json(cli_env, "positions", "--as-known-at", at_known, "--format", "json")
    assert [(r["signed_qty"], r["realized_pnl"]) for r in rows] == [("1", "100.00")]
    rows = _cli_json(cli_env, "positions", "--as-of", t[2].isoformat(), "--format", "json")
    assert [(r["signed_qty"], r["realized_pnl"]) for r in rows] == [("2", "0")]
    fills = _cli_json(cli_env, "pnl", "--by", "fill", "--as-known-at", at_known, "--format", "json")
    assert [(r["exec_id"], r["realized_pnl"]) for r in fills] == [("B1", "0"), ("B2", "100.00")]
    fills = _cli_json(
        cli_env, "pnl", "--by", "fill", "--as-of", t[3].isoformat(), "--format", "json"
    )
    assert [(r["exec_id"], r["realized_pnl"]) for r in fills] == [("B1", "0")]
    hist = _cli_json(
        cli_env,
        "history",
        "--account",
        "K",
        "--contract",
        "C.ES",
        "--as-known-at",
        at_known,
        "--format",
        "json",
    )
    assert [(h["exec_id"], h["qty_after"]) for h in hist] == [("B1", "2"), ("B2", "1")]


LOG_ROWS = """
SELECT global_position, stream, type, payload::text, recorded_at FROM events
WHERE type IN ('fill', 'bust', 'correction') ORDER BY global_position
"""


async def test_snapshot_answers_equal_full_replay_on_both_clocks(
    engine: AsyncEngine, store: UncheckedEventStore
) -> None:
    rng = random.Random(2026)
    await store.append(instruments())
    events = random_log(rng, 320, accounts=("S0", "S1"), late=0.12, adjust_rate=0.05)
    runner = ProjectionRunner(engine, batch_size=11, snapshot_every=3)
    i = 0
    while i < len(events):
        n = rng.randint(5, 25)
        await store.append(events[i : i + n])
        i += n
        await runner.catch_up()  # snapshots from many states of knowledge
    async with engine.connect() as sa:
        conn = await driver_connection(sa)
        generation = await queries.serving_generation(conn)
        assert generation is not None
        assert await conn.fetchval("SELECT count(*) FROM proj_snapshots") > 60
        log = [
            (r[0], r[1], parse_event(json.loads(r[3]), allow_internal=True), r[4])
            for r in await conn.fetch(LOG_ROWS)
        ]
        streams = sorted({r[1] for r in log})
        times = [e.occurred_at for _, _, e, _ in log]
        lo, hi = min(times) - timedelta(minutes=5), max(times) + timedelta(minutes=5)
        recorded = sorted({r[3] for r in log})
        hits = {"as_of": 0, "as_known_at": 0}
        for k in range(300):
            stream = rng.choice(streams)
            account, contract = stream.split("/", 1)
            tick, value, _ = CONTRACTS[contract]
            pv, ts = Decimal(value) / Decimal(tick), Decimal(tick)
            if k % 2 == 0:
                clock = "as_of"
                at = lo + (hi - lo) * rng.random()
                if rng.random() < 0.3:  # exactly at a fill's time
                    at = rng.choice(times)
                chosen = [
                    (p, e)
                    for p, s, e, _ in log
                    if s == stream and (not isinstance(e, FillRecorded) or e.occurred_at <= at)
                ]
            else:
                clock = "as_known_at"
                at = rng.choice(recorded) + timedelta(microseconds=rng.choice((0, 1, -1)))
                chosen = [(p, e) for p, s, e, rec in log if s == stream and rec <= at]
            expected, _ = replay(account, contract, pv, ts, chosen)
            view = await queries.stream_at(conn, generation, stream, clock, at)
            if not view.replayed:
                hits[clock] += 1
            assert view.state.to_json() == expected.to_json(), (clock, stream, at)
    # many answers came from a snapshot plus a tail, not a full replay (a later bust,
    # correction or late fill that reaches into a snapshot sends the query to an earlier
    # one, three at most: 92 of the 150 as-of answers here; 48 when it replayed the
    # stream at the first, 29 when adjustments of fills after T also counted)
    assert hits["as_of"] > 80 and hits["as_known_at"] > 100, hits
    # and the others were replayed from the stream's rows (the runner's parse and fold)
    assert hits["as_of"] + hits["as_known_at"] < 300, hits


# --------------------------------------------------------- live: NOTIFY, restart


async def _wait_caught_up(engine: AsyncEngine, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with engine.connect() as sa:
                conn = await driver_connection(sa)
                total = await conn.fetchval("SELECT count(*) FROM events")
                done = await conn.fetchval(
                    "SELECT events FROM projection_checkpoint WHERE status = 'serving'"
                )
            if done == total:
                return
        except Exception:
            pass
        assert time.monotonic() < deadline, "the follower did not catch up"
        await asyncio.sleep(0.1)


async def _wait_accepting(engine: AsyncEngine, timeout: float = 30.0) -> None:
    """Wait until the server takes connections: the executor's start() returns when the
    port is open, while PostgreSQL may still refuse with "the database system is
    starting up" (the follower copes with that; this test's own appends would not)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with engine.connect() as sa:
                await (await driver_connection(sa)).fetchval("SELECT 1")
            return
        except Exception:  # refused, starting up: as the driver or SQLAlchemy words it
            assert time.monotonic() < deadline, "the server did not come back"
            await asyncio.sleep(0.1)


async def test_follow_picks_up_appends_and_survives_a_server_restart(
    engine: AsyncEngine,
    store: UncheckedEventStore,
    cli_env: dict[str, str],
    pg_server: PostgreSQLExecutor,
    tmp_path: Path,
) -> None:
    rng = random.Random(5)
    events = random_log(rng, 300, accounts=("F0", "F1"))
    await store.append(instruments())
    await store.append(events[:50])
    log = (tmp_path / "follow.log").open("wb")
    follower = subprocess.Popen(
        [sys.executable, "-m", "ledger", "project", "--follow"],
        env=dict(cli_env, LEDGER_PROJECTION_BATCH="20"),
        cwd=ROOT,
        stdout=log,
        stderr=log,
    )
    try:
        await _wait_caught_up(engine)
        # appended after it started: woken by NOTIFY (well under its 1 s poll)
        for chunk in range(50, 150, 25):
            await store.append(events[chunk : chunk + 25])
            started = time.monotonic()
            await _wait_caught_up(engine)
        assert time.monotonic() - started < 0.9
        await engine.dispose()
        pg_server.stop()
        await asyncio.sleep(0.5)
        pg_server.start()
        await _wait_accepting(engine)
        for chunk in range(150, len(events), 30):
            await store.append(events[chunk : chunk + 30])
            await asyncio.sleep(0.05)
        await _wait_caught_up(engine)
        assert follower.poll() is None, "the follower died"
        assert b"lost the database" in (tmp_path / "follow.log").read_bytes()
    finally:
        if not pg_server.running():
            pg_server.start()
        follower.terminate()
        follower.wait(20)
        log.close()
    async with engine.connect() as sa:
        conn = await driver_connection(sa)
        row = await conn.fetchrow(
            "SELECT events, status FROM projection_checkpoint WHERE status = 'serving'"
        )
        total = await conn.fetchval("SELECT count(*) FROM events")
        trading = await conn.fetchval(
            "SELECT count(*) FROM events WHERE type IN ('fill', 'bust', 'correction')"
        )
    # every event applied exactly once (`ledger project` may append a seal of its own)
    assert trading == len(events)
    assert row["events"] == total
    after = await assert_rebuild_equals_serving(engine)
    assert sum(int(r["fill_count"]) for r in after["proj_positions"]) == len(
        [r for r in after["proj_history"]]
    )
