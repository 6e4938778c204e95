"""``--format csv`` on every command that prints rows holds exactly what ``--format json``
holds: the same rows, the same columns, the same values as strings (decimals with every
trailing zero, times in ISO-8601, nested objects as JSON, null as an empty cell)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from cli_testing import as_json, invoke

ES = "CON.F.US.EP.Z26"  # tick 0.25, point value 50
ZN = "CON.F.US.TYA.Z26"  # tick 1/32 = 0.03125
DAY = "2026-11-23"


def at(clock: str) -> str:
    return f"{DAY}T{clock}Z"


def fill(exec_id: str, side: str, qty: str, price: str, clock: str, **extra: str) -> dict[str, Any]:
    return {
        "type": "fill",
        "account": "ACC-1",
        "contract": ES,
        "exec_id": exec_id,
        "side": side,
        "qty": qty,
        "price": price,
        "fee": "2.10",
        "occurred_at": at(clock),
        **extra,
    }


RECORDS: list[dict[str, Any]] = [
    {"type": "instrument", "contract": ES, "tick_size": "0.25", "tick_value": "12.50"},
    {"type": "instrument", "contract": ZN, "tick_size": "0.03125", "tick_value": "31.25"},
    fill("T-1", "BUY", "2", "5000.50", "09:00:00", fee="350.00"),
    fill("T-2", "BUY", "1", "5001.00", "09:30:00"),
    fill("T-3", "SELL", "1", "5003.00", "10:00:00"),
    fill("Z-1", "BUY", "3", "110.03125", "10:15:00", contract=ZN),
    fill("T-4", "BUY", "1", "5000.10", "11:00:00"),  # off the tick grid: dead-lettered
    {"type": "mark", "contract": ES, "price": "5002.00", "occurred_at": at("20:00:00")},
    {
        "type": "broker_position",
        "account": "ACC-1",
        "contract": ES,
        "signed_qty": "1",
        "avg_price": "5000.50",
        "occurred_at": at("20:30:00"),
    },
]


def as_text(value: Any) -> str:
    """The string a JSON value is written as in CSV (nested values: compared as JSON)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def csv_rows(result: Any) -> list[dict[str, str]]:
    # 3: reconcile found breaks; 4: ingest dead-lettered a record
    assert result.exit_code in (0, 3, 4), (result.exit_code, result.output, result.exception)
    return list(csv.DictReader(io.StringIO(result.stdout)))


def assert_same(csv_out: list[dict[str, str]], json_out: list[dict[str, Any]]) -> None:
    assert len(csv_out) == len(json_out)
    for got, want in zip(csv_out, json_out, strict=True):
        assert list(got) == list(want)
        for key, value in want.items():
            if isinstance(value, dict | list):
                assert json.loads(got[key]) == value, key
            else:
                assert got[key] == as_text(value), (key, got[key], value)


@pytest.fixture
def day(cli_env: dict[str, str], tmp_path: Path) -> Path:
    path = tmp_path / "day.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in RECORDS))
    assert invoke("ingest", str(path)).exit_code == 4  # T-4 is dead-lettered
    return path


ROW_COMMANDS = [
    ["positions", "--include-flat"],
    ["positions", "--method", "wac"],
    ["positions", "--as-of", at("09:45:00"), "--as-known-at", "2100-01-01T00:00:00Z"],
    ["pnl", "--by", "fill"],
    ["pnl", "--by", "day"],
    ["pnl", "--by", "account"],
    ["history", "--account", "ACC-1", "--contract", ES],
    ["log", "--limit", "50"],
    ["rejected"],
    ["trail", "--account", "ACC-1", "--contract", ES],
]


@pytest.mark.parametrize("command", ROW_COMMANDS, ids=" ".join)
def test_csv_of_a_row_command_equals_its_json(day: Path, command: list[str]) -> None:
    json_out = as_json(invoke(*command, "--format", "json"))
    assert json_out, "the command printed no rows: nothing would be compared"
    assert_same(csv_rows(invoke(*command, "--format", "csv")), json_out)


def test_trailing_zeros_survive_in_csv(day: Path) -> None:
    fills = csv_rows(invoke("trail", "--account", "ACC-1", "--contract", ES, "--format", "csv"))
    assert [(f["exec_id"], f["price"]) for f in fills if f["exec_id"] == "T-1"] == [
        ("T-1", "5000.50")
    ]
    pnl = csv_rows(invoke("pnl", "--by", "fill", "--format", "csv"))
    assert "350.00" in {p["fees"] for p in pnl}


def test_csv_of_ingest_equals_its_json(day: Path) -> None:
    again = as_json(invoke("ingest", str(day), "--format", "json"), 4)
    assert again["already_rejected"] == 1 and again["duplicates"] > 0
    assert_same(csv_rows(invoke("ingest", str(day), "--format", "csv")), [again])


def test_csv_of_explain_equals_the_lots_of_its_json(day: Path) -> None:
    args = ["explain", "--account", "ACC-1", "--contract", ES]
    lots = as_json(invoke(*args, "--format", "json"))["lots"]
    assert len(lots) == 2
    assert_same(csv_rows(invoke(*args, "--format", "csv")), lots)


def test_csv_of_reconcile_equals_the_breaks_of_its_json(day: Path) -> None:
    run = as_json(invoke("reconcile", "--cutoff", at("21:00:00"), "--format", "json"), 3)
    assert run["breaks"]
    shown = invoke("reconcile", "--show", run["run_id"], "--format", "csv")
    breaks = [
        {k: (" ".join(v) if k == "exec_ids" else v) for k, v in b.items()} for b in run["breaks"]
    ]
    assert_same(csv_rows(shown), breaks)


def test_csv_of_verify_equals_the_problems_of_its_json(day: Path) -> None:
    report = as_json(invoke("verify", "--format", "json"))
    result = invoke("verify", "--format", "csv")
    assert result.stdout.splitlines()[0] == "kind,stream,global_position,stream_version,message"
    assert_same(csv_rows(result), report["problems"])


def leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        found: dict[str, Any] = {}
        for k, v in data.items():
            found |= leaves(v, f"{prefix}{k}.")
        return found
    if isinstance(data, list) and data:
        found = {}
        for i, v in enumerate(data):
            found |= leaves(v, f"{prefix}{i}.")
        return found
    return {prefix[:-1]: data}


def test_csv_of_stats_holds_every_leaf_of_its_json(day: Path) -> None:
    data = as_json(invoke("stats", "--format", "json"))
    rows = csv_rows(invoke("stats", "--format", "csv"))
    got = {r["key"]: r["value"] for r in rows}
    want = leaves(data)
    assert set(got) == set(want)
    # the lag in seconds moves between the two calls: the same kind of value, not the same
    seconds, json_seconds = got.pop("projection_lag.seconds"), want.pop("projection_lag.seconds")
    assert (seconds == "") == (json_seconds is None)
    for key, value in want.items():
        expected = json.dumps(value) if isinstance(value, dict | list) else as_text(value)
        assert got[key] == expected, key


def test_tables_show_money_in_cents_with_its_currency_and_prices_to_the_tick(day: Path) -> None:
    table = invoke("positions", "--format", "table")
    assert table.exit_code == 0, table.output
    lines = {
        line.split("│")[2].strip(): line for line in table.stdout.splitlines() if "ACC-1" in line
    }
    es, zn = lines[ES], lines[ZN]
    cells = [c.strip() for c in es.split("│")]
    assert "USD" in cells
    assert "5000.750000" in cells  # average: tick 0.25 (2 places) + 4
    assert "125.00" in cells and "354.20" in cells  # money in cents
    assert "5002.00" in cells  # the mark, to the tick
    zn_cells = [c.strip() for c in zn.split("│")]
    assert "110.031250000" in zn_cells  # tick 1/32: 5 places + 4
    # the exact values stay in JSON
    exact = {r["contract"]: r for r in as_json(invoke("positions", "--format", "json"))}
    assert exact[ES]["fees"] == "354.20" and exact[ZN]["avg_open_price"].startswith("110.03125")


def test_json_and_csv_name_the_currency_of_every_amount(day: Path, tmp_path: Path) -> None:
    """No amount goes out without its currency: positions, history and explain in JSON
    and CSV carry the instrument's (the table has had the column all along)."""
    fesx = "CON.F.EU.FESX.Z26"
    extra = tmp_path / "eur.jsonl"
    extra.write_bytes(
        orjson.dumps(
            {
                "type": "instrument",
                "contract": fesx,
                "tick_size": "1",
                "tick_value": "10",
                "currency": "EUR",
            }
        )
        + b"\n"
        + orjson.dumps(fill("E-1", "BUY", "1", "4800", "12:00:00", contract=fesx))
        + b"\n"
    )
    assert invoke("ingest", str(extra)).exit_code == 0
    rows = as_json(invoke("positions", "--format", "json"))
    assert {r["contract"]: r["currency"] for r in rows} == {ES: "USD", ZN: "USD", fesx: "EUR"}
    assert list(rows[0])[:3] == ["account", "contract", "currency"]
    table = csv_rows(invoke("positions", "--format", "csv"))
    assert {r["contract"]: r["currency"] for r in table} == {ES: "USD", ZN: "USD", fesx: "EUR"}
    history = as_json(
        invoke("history", "--account", "ACC-1", "--contract", fesx, "--format", "json")
    )
    assert history and {h["currency"] for h in history} == {"EUR"}
    explained = as_json(
        invoke("explain", "--account", "ACC-1", "--contract", fesx, "--format", "json")
    )
    assert explained["currency"] == "EUR"
