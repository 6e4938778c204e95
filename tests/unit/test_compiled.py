"""The fold compiled by mypyc (setup.py) is the fold: same results as its source, digit
for digit, and the build in use is the one the benchmarks claim."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import projections
from ledger.store import Checkpoint, LightRow
from ledger.values import point_value
from projections import pagefold, positions
from projections.pnl import trading_day

PACKAGE = Path(projections.__file__).parent
T0 = datetime(2024, 3, 4, 14, 0, tzinfo=UTC)
# contract -> (tick size, tick value, lowest price)
CONTRACTS = {
    "ES": ("0.25", "12.5", Decimal("4900.00")),
    "ZN": ("0.015625", "15.625", Decimal("109.000000")),
}
can_compile = bool(shutil.which("cc") or shutil.which("gcc")) and not os.environ.get(
    "LEDGER_PURE_PYTHON"
)


def _source_modules() -> tuple[ModuleType, ModuleType]:
    """Load positions.py and pagefold.py from source, the second bound to the first."""
    saved = sys.modules.get("projections.positions")
    loaded = []
    try:
        for name in projections.COMPILED:
            spec = importlib.util.spec_from_file_location(
                f"projections.{name}", PACKAGE / f"{name}.py"
            )
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            # pagefold's `from projections.positions import ...` must bind the source
            sys.modules[f"projections.{name}"] = module
            spec.loader.exec_module(module)
            loaded.append(module)
    finally:
        sys.modules["projections.positions"] = saved  # type: ignore[assignment]
        sys.modules["projections.pagefold"] = pagefold
    return loaded[0], loaded[1]


SOURCE_POSITIONS, SOURCE_PAGEFOLD = _source_modules()


def test_source_modules_are_interpreted() -> None:
    assert str(SOURCE_POSITIONS.__file__).endswith("positions.py")
    assert str(SOURCE_PAGEFOLD.__file__).endswith("pagefold.py")
    assert SOURCE_PAGEFOLD._fold_fill is SOURCE_POSITIONS._fold_fill


@pytest.mark.skipif(
    not can_compile, reason="nothing is compiled (no C compiler, or LEDGER_PURE_PYTHON set)"
)
def test_setup_compiled_the_fold_and_it_is_in_use() -> None:
    assert projections.compiled_build(), "run `bash scripts/setup`: the fold is not compiled"
    assert projections.running_compiled()
    assert not str(positions.__file__).endswith(".py")


@pytest.mark.skipif(
    not can_compile, reason="nothing is compiled (no C compiler, or LEDGER_PURE_PYTHON set)"
)
def test_the_compiled_fold_imports_outside_the_source_tree(tmp_path: Path) -> None:
    """The console script runs from anywhere: every compiled piece (the modules and
    their shared runtime library) must be importable from another directory."""
    check = (
        "import projections, projections.runner; "
        "assert projections.running_compiled(), 'interpreted'; print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", check],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_ledger_pure_python_runs_the_source_even_with_a_build(tmp_path: Path) -> None:
    check = "import projections, projections.runner; print(projections.running_compiled())"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["LEDGER_PURE_PYTHON"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_a_stale_build_is_not_used(tmp_path: Path) -> None:
    for name in projections.COMPILED:
        (tmp_path / f"{name}.py").write_text("")
        (tmp_path / f"{name}.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert projections.compiled_build(tmp_path)
    future = time.time() + 60
    os.utime(tmp_path / "pagefold.py", (future, future))  # edited after the build
    assert not projections.compiled_build(tmp_path)
    (tmp_path / "pagefold.py").unlink()
    assert not projections.compiled_build(tmp_path)
    assert not projections.compiled_build(tmp_path / "empty")


# --------------------------------------------------------------- same results


def _rows(draw: st.DrawFn) -> list[LightRow]:
    """Log rows of a few streams: instruments, fills (some late), busts, corrections."""
    rows: list[LightRow] = []
    recorded = T0 + timedelta(days=1)

    def add(kind: str, stream: str, payload: dict[str, Any]) -> None:
        n = len(rows) + 1
        rows.append(LightRow(n, 100 + n, stream, kind, orjson.dumps(payload).decode(), recorded))

    for contract, (tick, value, _) in CONTRACTS.items():
        add(
            "instrument",
            f"instrument/{contract}",
            {"contract": contract, "tick_size": tick, "tick_value": value, "currency": "USD"},
        )
    execs: list[tuple[str, str, str]] = []
    for i in range(draw(st.integers(min_value=1, max_value=40))):
        account = draw(st.sampled_from(["ACC1", "ACC2"]))
        contract = draw(st.sampled_from(sorted(CONTRACTS)))
        stream = f"{account}/{contract}"
        action = draw(st.sampled_from(["fill"] * 8 + ["bust", "correction", "mark"]))
        tick = Decimal(CONTRACTS[contract][0])
        price = CONTRACTS[contract][2] + tick * draw(st.integers(min_value=0, max_value=40))
        if action == "fill" or not execs:
            exec_id = f"X{i}"
            late = draw(st.integers(min_value=0, max_value=9)) == 0
            # three hours apart (restatements span days), some a day and more late
            occurred = T0 + timedelta(hours=3 * (i - 10 if late else i), microseconds=i)
            execs.append((exec_id, stream, contract))
            add(
                "fill",
                stream,
                {
                    "account": account,
                    "contract": contract,
                    "exec_id": exec_id,
                    "side": draw(st.sampled_from(["BUY", "SELL"])),
                    "qty": str(draw(st.integers(min_value=1, max_value=6))),
                    "price": str(price),
                    "fee": draw(st.sampled_from(["0", "1.40", "0.62"])),
                    "occurred_at": occurred.isoformat(),
                },
            )
        elif action == "mark":
            add("mark", f"mark/{contract}", {"contract": contract, "price": str(price)})
        else:
            exec_id, stream, contract = draw(st.sampled_from(execs))
            payload: dict[str, Any] = {
                "exec_id": exec_id,
                "occurred_at": (T0 + timedelta(seconds=i)).isoformat(),
            }
            if action == "correction":
                tick = Decimal(CONTRACTS[contract][0])  # the corrected execution's contract
                price = CONTRACTS[contract][2] + tick * draw(st.integers(min_value=0, max_value=40))
                payload.update(qty="2", price=str(price), fee="0.25")
            add(action, stream, payload)
    return rows


def _fold(pf: ModuleType, pos: ModuleType, rows: list[LightRow]) -> dict[str, Any]:
    """Fold ``rows`` in three pages as the runner does (slices, restate, collect);
    return everything that folding produced."""
    cache: OrderedDict[str, Any] = OrderedDict()
    instruments: dict[str, tuple[Decimal, Decimal]] = {}

    def new_state(stream: str, account: str, contract: str) -> Any:
        tick, value = instruments[contract]
        state = pos.new_state(account, contract, point_value(value, tick), tick)
        cache[stream] = state
        return state

    def add_instrument(p: dict[str, Any]) -> None:
        instruments[p["contract"]] = (Decimal(p["tick_size"]), Decimal(p["tick_value"]))

    journal: dict[str, list[Any]] = {}
    marks: dict[str, Any] = {}
    daily: dict[str, dict[date, list[Any]]] = {}
    dirty: set[str] = set()
    collect_days: list[datetime] = []

    def day_of(at: datetime) -> date:
        collect_days.append(at)
        return trading_day(at, None, None)

    # marks every other fill: restatements replay from marks as often as from scratch
    scope = pf.FoldScope(
        cache, {}, journal, set(), 3, new_state, add_instrument, marks, True, day_of, 2
    )
    journaled = 0
    trimmed = 0
    replayed_whole: list[str] = []
    pages = []
    # three pages, as the runner folds them: a restatement in a later page rewrites
    # only from the first day it changes
    for lo, hi in (
        (0, len(rows) // 3),
        (len(rows) // 3, len(rows) // 2),
        (len(rows) // 2, len(rows)),
    ):
        if lo == hi:
            continue
        page = pf.Page(Checkpoint(rows[hi - 1].tx_id, rows[hi - 1].global_position))
        middle = (lo + hi) // 2
        journaled += pf.fold_rows(scope, page, rows, lo, middle)
        journaled += pf.fold_rows(scope, page, rows, middle, hi)
        first_new: dict[str, int] = {}
        for row in rows[lo:hi]:
            first_new.setdefault(row.stream, row.global_position)
        for stream in sorted(page.restate):
            account, contract = stream.split("/")
            state = new_state(stream, account, contract)
            events = journal[stream]
            mine = marks.get(stream)
            folded = page.effects.get(stream)
            first = (folded[0][pf.E_OCCURRED_AT], folded[0][pf.E_POSITION]) if folded else None
            restated = pf.restate_stream(
                state, events, first_new[stream], True, day_of, None, mine, first
            )
            if restated is None:
                # the trimmed journal does not reach the change: replay the whole stream,
                # as the runner does from the log
                events = journal[stream] = [
                    pf.stream_row(r.global_position, r.type, r.payload, r.recorded_at)
                    for r in rows[:hi]
                    if r.stream == stream and r.type in ("fill", "bust", "correction")
                ]
                mine.trimmed = False
                state = new_state(stream, account, contract)
                restated = pf.restate_stream(
                    state, events, first_new[stream], True, day_of, None, mine, first
                )
                replayed_whole.append(stream)
            if mine is not None:
                trimmed += pf.trim_journal(events, mine)
            cache[stream] = restated.state
            page.effects[stream] = restated.effects
            page.cum_before[stream] = restated.cum_before
            if restated.forget is not None:
                page.forget[stream] = restated.forget
            if restated.seed is not None:
                page.seed[stream] = restated.seed
        pf.collect(page, 7, cache, daily, dirty, True, day_of)
        pages.append(page)
    return {
        "journaled": journaled,
        "trimmed": trimmed,
        "replayed_whole": replayed_whole,
        "journal": journal,
        "effects": [p.effects for p in pages],
        "restate": [p.restate for p in pages],
        "forget": [p.forget for p in pages],
        "seed": [p.seed for p in pages],
        "snapshots": [p.snapshots for p in pages],
        "history": [line for p in pages for line in p.history],
        "daily": daily,
        "dirty": dirty,
        "states": {s: orjson.dumps(state.to_json()) for s, state in cache.items()},
        "order": list(cache),
        "days": collect_days,
    }


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_compiled_and_source_folds_agree_digit_for_digit(data: st.DataObject) -> None:
    rows = _rows(data.draw)
    compiled = _fold(pagefold, positions, rows)
    source = _fold(SOURCE_PAGEFOLD, SOURCE_POSITIONS, rows)
    assert compiled == source
    # and the decimals agree in their exponents too, not only in value
    assert repr(compiled["effects"]) == repr(source["effects"])
    assert repr(compiled["daily"]) == repr(source["daily"])


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_replay_rows_gives_the_folded_state_compiled_and_source(data: st.DataObject) -> None:
    """An as-of query that replays a whole stream (``replay_rows``) gets the state the
    runner's fold ends with (pages, restatements from marks and all), digit for digit,
    compiled or not."""
    rows = _rows(data.draw)
    folded = _fold(pagefold, positions, rows)["states"]
    instruments: dict[str, tuple[Decimal, Decimal]] = {}
    for r in rows:
        if r.type == "instrument":
            p = orjson.loads(r.payload)
            instruments[p["contract"]] = (Decimal(p["tick_size"]), Decimal(p["tick_value"]))
    assert folded
    for stream, expected in folded.items():
        account, contract = stream.split("/")
        tick, value = instruments[contract]
        events = [
            pagefold.stream_row(r.global_position, r.type, r.payload, r.recorded_at)
            for r in reversed(rows)  # (in any order)
            if r.stream == stream and r.type in ("fill", "bust", "correction")
        ]
        for pf, pos in ((pagefold, positions), (SOURCE_PAGEFOLD, SOURCE_POSITIONS)):
            flat = pos.new_state(account, contract, point_value(value, tick), tick)
            state = pf.replay_rows(flat, list(events))
            assert orjson.dumps(state.to_json()) == expected, (stream, pf.__file__)


def _lines(history: list[str]) -> Iterator[list[str]]:
    for line in history:
        assert line.endswith("\n")
        yield line[:-1].split("\t")


def test_history_lines_carry_the_payload_timestamp_and_running_totals() -> None:
    """A concrete case, so the comparison above is not only compiled == source."""
    rows = [
        LightRow(
            1,
            1,
            "instrument/ES",
            "instrument",
            orjson.dumps(
                {"contract": "ES", "tick_size": "0.25", "tick_value": "12.5", "currency": "USD"}
            ).decode(),
            T0,
        ),
    ]
    for n, (side, qty, price) in enumerate(
        [("BUY", "2", "5000.25"), ("SELL", "3", "5001.00"), ("BUY", "1", "5000.00")], start=2
    ):
        payload = {
            "account": "ACC1",
            "contract": "ES",
            "exec_id": f"E{n}",
            "side": side,
            "qty": qty,
            "price": price,
            "fee": "1.40",
            "occurred_at": f"2024-03-04T14:00:0{n}.000001+00:00",
        }
        rows.append(LightRow(n, n, "ACC1/ES", "fill", orjson.dumps(payload).decode(), T0))
    result = _fold(pagefold, positions, rows)
    lines = list(_lines(result["history"]))
    assert [line[7] for line in lines] == [
        "2024-03-04T14:00:02.000001+00:00",
        "2024-03-04T14:00:03.000001+00:00",
        "2024-03-04T14:00:04.000001+00:00",
    ]
    # qty before/after, realized fifo/wac, cumulative fifo/wac, fee
    assert [line[12:19] for line in lines] == [
        ["0", "2", "0", "0", "0", "0", "1.40"],
        ["2", "-1", "75.00", "75.00", "75.00", "75.00", "1.40"],
        ["-1", "0", "50.00", "50.00", "125.00", "125.00", "1.40"],
    ]
    assert result["daily"]["ACC1/ES"][date(2024, 3, 4)] == [
        "ACC1",
        "ES",
        Decimal("125.00"),
        Decimal("125.00"),
        Decimal("4.20"),
        3,
    ]


# ------------------------------------------------- datetimes written by orjson

_any_time = st.datetimes(
    min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999)
)
_zoned = st.one_of(
    _any_time.map(lambda d: d.replace(tzinfo=UTC)),
    st.builds(
        lambda d, minutes: d.replace(tzinfo=timezone(timedelta(minutes=minutes))),
        st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 1, 1)),
        st.integers(-23 * 60, 23 * 60),
    ),
    _any_time,  # naive
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_zoned, min_size=1, max_size=6), st.integers(0, 10**12))
def test_json_text_is_the_to_json_text_compiled_and_source(
    times: list[datetime], position: int
) -> None:
    """A state's JSON text (snapshots, positions) is what ``to_json`` and orjson give,
    whether a datetime is written by orjson or by ``isoformat()``."""
    for pos in (positions, SOURCE_POSITIONS):
        state = pos.PositionState(
            account="ACC1",
            contract="ES",
            point_value=Decimal("50"),
            tick_size=Decimal("0.25"),
            signed_qty=Decimal(len(times)),
            lots=[pos.Lot(f"X{i}", Decimal(1), Decimal("4900.25"), t) for i, t in enumerate(times)],
            opened_at=times[0],
            closed_at=times[-1],
            last_fill_at=times[-1],
            last_key=(times[-1], position),
            fill_count=len(times),
        )
        assert state.json_text() == orjson.dumps(state.to_json()).decode()


_fill_step = st.tuples(
    st.booleans(),  # buying
    st.integers(1, 7),  # qty
    st.integers(-40, 40),  # price, in ticks from 4900.00
    st.booleans(),  # take a copy of the state first (a mark), and fold the copy too
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_fill_step, min_size=1, max_size=40))
def test_json_text_of_a_folded_state_is_the_to_json_text_compiled_and_source(
    steps: list[tuple[bool, int, int, bool]],
) -> None:
    """After opens, partial closes (a lot's quantity changes), full closes and flips, in
    a state and in its copies (a mark's), the state's text is what ``to_json`` and
    orjson give, and reads back as the state; a state deep-copies (a text kept for each
    lot was tried: it must be reset by a partial close, and this catches it when not)."""
    tick = Decimal("0.25")
    start = datetime(2026, 12, 7, 14, 30, tzinfo=UTC)
    for pos in (positions, SOURCE_POSITIONS):
        state = pos.PositionState("ACC1", "ES", Decimal("50"), tick)
        copies = []
        for i, (buying, qty, ticks, copy_first) in enumerate(steps):
            if copy_first:
                copies.append(state.copy())
            at = start + timedelta(seconds=i)
            price = Decimal("4900.00") + ticks * tick
            for s in (state, *copies[-1:]):
                s.json_text()  # the lots' texts written before the fill changes them
                pos._fold_fill(s, f"X{i}", buying, Decimal(qty), price, Decimal("0"), at, i + 1)
            for s in (state, *copies):
                text = s.json_text()
                assert text == orjson.dumps(s.to_json()).decode()
                assert pos.PositionState.from_json(orjson.loads(text)) == s
        assert copy.deepcopy(state) == state


@settings(max_examples=300, deadline=None)
@given(_zoned)
def test_iso_text_is_isoformat_compiled_and_source(at: datetime) -> None:
    for pf in (pagefold, SOURCE_PAGEFOLD):
        assert pf._iso_text(at) == at.isoformat()


def test_the_effect_indexes_name_the_fields_the_fold_writes() -> None:
    """``E_*`` index an effect by name: each gives the field the fold puts there (for
    a fill folded incrementally and for the same fill replayed by a restatement)."""
    tick = Decimal("0.25")
    for pf, pos in ((pagefold, positions), (SOURCE_PAGEFOLD, SOURCE_POSITIONS)):
        cache: OrderedDict[str, Any] = OrderedDict()

        def new_state(
            stream: str, account: str, contract: str, pos: Any = pos, cache: Any = cache
        ) -> Any:
            state = pos.new_state(account, contract, point_value(Decimal("12.5"), tick), tick)
            cache[stream] = state
            return state

        def add_instrument(_: dict[str, Any]) -> None:
            pass

        occurred = "2024-03-04T14:00:02.5+00:00"
        payload = {
            "account": "ACC1",
            "contract": "ES",
            "exec_id": "E7",
            "side": "SELL",
            "qty": "2",
            "price": "5000.25",
            "fee": "1.40",
            "occurred_at": occurred,
        }
        row = LightRow(7, 3, "ACC1/ES", "fill", orjson.dumps(payload).decode(), T0)
        scope = pf.FoldScope(cache, {}, None, set(), 64, new_state, add_instrument)
        page = pf.Page(Checkpoint(3, 7))
        pf.fold_rows(scope, page, [row], 0, 1)
        (folded,) = page.effects["ACC1/ES"]
        events = [pf.stream_row(7, "fill", row.payload, T0)]
        flat = pos.new_state("ACC1", "ES", point_value(Decimal("12.5"), tick), tick)
        restated = pf.restate_stream(flat, events, 7, True, lambda at: at.date())
        assert restated is not None
        (replayed,) = restated.effects
        for effect in (folded, replayed):
            assert len(effect) == pf.EFFECT_FIELDS
            named = {
                pf.E_EXEC_ID: "E7",
                pf.E_POSITION: 7,
                pf.E_OCCURRED_AT: datetime.fromisoformat(occurred),
                pf.E_SIDE: "SELL",
                pf.E_FEE: Decimal("1.40"),
                pf.E_QTY_BEFORE: Decimal(0),
                pf.E_QTY_AFTER: Decimal(-2),
                pf.E_REALIZED_FIFO: Decimal(0),
                pf.E_REALIZED_WAC: Decimal(0),
                pf.E_QTY_TEXT: "2",
                pf.E_PRICE_TEXT: "5000.25",
                pf.E_FEE_TEXT: "1.40",
            }
            assert {i: effect[i] for i in named} == named
            assert datetime.fromisoformat(effect[pf.E_OCCURRED_TEXT]) == named[pf.E_OCCURRED_AT]
        assert folded[pf.E_OCCURRED_TEXT] == occurred  # the payload's own text
        # every field is named, each by its own index
        assert sorted([*named, pf.E_OCCURRED_TEXT]) == list(range(pf.EFFECT_FIELDS))


def test_the_stream_row_indexes_name_the_fields_a_row_is_parsed_into() -> None:
    """``R_*`` index a journal row by name, for a fill, a correction and a bust."""
    occurred = "2024-03-04T14:00:02.5+00:00"
    at = datetime.fromisoformat(occurred)
    base = {"account": "A", "contract": "ES", "exec_id": "E7", "occurred_at": occurred}
    fill = {**base, "side": "BUY", "qty": "2", "price": "5000.25", "fee": "1.40"}
    correction = {**base, "qty": "3", "price": "5000.50", "fee": "0.62"}
    cases = [
        ("fill", fill, "BUY", Decimal(2), Decimal("5000.25"), Decimal("1.40")),
        ("correction", correction, "", Decimal(3), Decimal("5000.50"), Decimal("0.62")),
        ("bust", base, "", Decimal(0), Decimal(0), Decimal(0)),
    ]
    for pf in (pagefold, SOURCE_PAGEFOLD):
        for kind, payload, side, qty, price, fee in cases:
            row = pf.stream_row(9, kind, orjson.dumps(payload).decode(), T0)
            assert len(row) == pf.STREAM_ROW_FIELDS
            named = {
                pf.R_POSITION: 9,
                pf.R_TYPE: kind,
                pf.R_EXEC_ID: "E7",
                pf.R_OCCURRED_AT: at,
                pf.R_SIDE: side,
                pf.R_QTY: qty,
                pf.R_PRICE: price,
                pf.R_FEE: fee,
                pf.R_RECORDED_AT: T0,
            }
            assert {i: row[i] for i in named} == named
            assert sorted(named) == list(range(pf.STREAM_ROW_FIELDS))


def test_a_pages_uncached_streams_and_first_positions_compiled_and_source() -> None:
    def row(position: int, stream: str, kind: str) -> LightRow:
        return LightRow(position, 7, stream, kind, "{}", T0)

    rows = [
        row(1, "instrument/ES", "instrument"),
        row(2, "B/ES", "fill"),
        row(3, "A/ES", "fill"),
        row(4, "B/ES", "bust"),
        row(5, "C/ZN", "broker_position"),
        row(6, "D/ZN", "correction"),
        row(7, "A/ES", "fill"),
    ]
    for pf in (pagefold, SOURCE_PAGEFOLD):
        cached = OrderedDict([("A/ES", object())])
        assert pf.uncached_streams(rows, cached) == ["B/ES", "D/ZN"]
        assert pf.uncached_streams([], cached) == []
        restate = {"A/ES": 9, "D/ZN": 9, "E/ES": 9}
        assert pf.first_positions(rows, restate) == {"A/ES": 3, "D/ZN": 6}


def test_position_columns_are_the_states_fields_compiled_and_source() -> None:
    for pos, pf in ((positions, pagefold), (SOURCE_POSITIONS, SOURCE_PAGEFOLD)):
        flat = pos.new_state("A", "ES", Decimal(50), Decimal("0.25"))
        held = pos.new_state("B", "ES", Decimal(50), Decimal("0.25"))
        for i, (buying, qty, price) in enumerate(
            [(True, "2", "4900.25"), (True, "1", "4901.00"), (False, "1", "4902.50")]
        ):
            pf._fold_fill(
                held, f"X{i}", buying, Decimal(qty), Decimal(price), Decimal("0.10"),
                T0 + timedelta(seconds=i), 10 + i,
            )
        cache = OrderedDict([("B/ES", held), ("A/ES", flat)])
        columns = pf.position_columns(["A/ES", "B/ES"], cache)
        assert [list(c) for c in zip(*columns, strict=True)] == [
            [
                "A/ES", "A", "ES", flat.signed_qty, None, None, flat.realized_fifo,
                flat.realized_wac, flat.fees, None, None, None, 0, 0, flat.json_text(),
            ],
            [
                "B/ES", "B", "ES", Decimal(2), held.avg_open_price("fifo"),
                held.avg_open_price("wac"), held.realized_fifo, held.realized_wac,
                held.fees, T0, None, T0 + timedelta(seconds=2), 3, 12, held.json_text(),
            ],
        ]
        assert str(held.realized_fifo) == "112.50"  # 1 x (4902.50 - 4900.25) x 50
        assert pf.position_columns([], cache) == ([],) * 15
