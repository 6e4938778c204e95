"""The end-of-day report on a real PostgreSQL, rendered in headless Chromium."""

from __future__ import annotations

import csv
import os
import re
import shutil
import struct
import subprocess
from decimal import Decimal
from html import unescape
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from cli_testing import fetchval, invoke, seed

ES = "CON.F.US.EP.Z26"  # point value 50
NQ = "CON.F.US.ENQ.Z26"  # tick 0.25, tick value 5: point value 20
DAY = "2026-11-23"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def at(clock: str, day: str = DAY) -> str:
    return f"{day}T{clock}Z"


def fill(
    account: str,
    exec_id: str,
    side: str,
    qty: str,
    price: str,
    clock: str,
    contract: str = ES,
    day: str = DAY,
) -> dict[str, Any]:
    return {
        "type": "fill",
        "account": account,
        "contract": contract,
        "exec_id": exec_id,
        "side": side,
        "qty": qty,
        "price": price,
        "fee": "2.10",
        "occurred_at": at(clock, day),
    }


DAY_EVENTS: list[dict[str, Any]] = [
    {"type": "instrument", "contract": ES, "tick_size": "0.25", "tick_value": "12.50"},
    {"type": "instrument", "contract": NQ, "tick_size": "0.25", "tick_value": "5"},
    # the day before: an open position carried into the day
    fill("ACC-1", "E-0", "BUY", "1", "4990.00", "15:00:00", day="2026-11-22"),
    fill("ACC-1", "E-1", "BUY", "2", "5000.00", "09:00:00"),
    fill("ACC-1", "E-2", "SELL", "2", "5004.25", "10:30:00"),  # closes E-0 and one of E-1
    fill("ACC-1", "E-3", "SELL", "1", "4998.00", "13:15:00"),  # closes E-1's last: -100
    fill("ACC-1", "N-1", "SELL", "3", "18000.00", "09:45:00", contract=NQ),
    fill("ACC-1", "N-2", "BUY", "1", "17990.50", "14:00:00", contract=NQ),
    fill("ACC-2", "F-1", "SELL", "1", "5002.00", "11:00:00"),
    fill("ACC-2", "F-2", "BUY", "1", "4995.50", "15:30:00"),
    fill("ACC-2", "F-3", "BUY", "2", "4996.00", "16:00:00"),
    {"type": "mark", "contract": ES, "price": "4999.00", "occurred_at": at("20:59:00")},
    {"type": "mark", "contract": NQ, "price": "17980.00", "occurred_at": at("20:59:00")},
    {
        "type": "broker_position",
        "account": "ACC-1",
        "contract": NQ,
        "signed_qty": "-2",
        "avg_price": "18000.00",
        "occurred_at": at("20:00:00"),
    },
    {
        "type": "broker_position",
        "account": "ACC-2",
        "contract": ES,
        "signed_qty": "1",
        "avg_price": "4996.00",
        "occurred_at": at("20:00:00"),
    },
]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def chromium(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'chrome'}",
            *extra,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_eod_report_files_hold_the_days_numbers(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    seed(db_url, DAY_EVENTS)
    run = invoke("reconcile", "--cutoff", at("21:00:00"), "--format", "json")
    assert run.exit_code == 3, run.output  # ACC-2 holds 2 in the ledger, 1 at the broker
    out = tmp_path / "eod"
    result = invoke("report", "--date", DAY, "--out", str(out))
    assert result.exit_code == 0, (result.output, result.exception)
    stem = f"eod-{DAY}"
    for name in ("positions", "pnl", "runs", "breaks", "pnl-curve"):
        assert (out / f"{stem}-{name}.csv").is_file()
        assert (out / f"{stem}-{name}.parquet").is_file()

    pnl = {(r["account"], r["contract"]): r for r in read_csv(out / f"{stem}-pnl.csv")}
    # ES ACC-1: E-2 closes E-0 (+14.25 x 50) and one E-1 (+4.25 x 50); E-3 closes E-1 (-2 x 50)
    assert pnl[("ACC-1", ES)]["realized_pnl"] == "825.00"
    assert pnl[("ACC-1", ES)]["fees"] == "6.30"
    assert pnl[("ACC-1", ES)]["net_realized_pnl"] == "818.70"
    assert pnl[("ACC-1", NQ)]["realized_pnl"] == "190.00"  # (18000 - 17990.50) x 20
    assert pnl[("ACC-2", ES)]["realized_pnl"] == "325.00"  # (5002 - 4995.50) x 50
    positions = {(r["account"], r["contract"]): r for r in read_csv(out / f"{stem}-positions.csv")}
    assert positions[("ACC-1", ES)]["signed_qty"] == "0"
    assert (positions[("ACC-1", NQ)]["signed_qty"], positions[("ACC-1", NQ)]["unrealized_pnl"]) == (
        "-2",
        "800.00",
    )
    assert positions[("ACC-2", ES)]["avg_open_price"] == "4996.00"
    breaks = read_csv(out / f"{stem}-breaks.csv")
    assert [(b["type"], b["account"], b["exec_ids"]) for b in breaks] == [
        ("POSITION_QTY_BREAK", "ACC-2", "F-1 F-2 F-3")
    ]
    curve = read_csv(out / f"{stem}-pnl-curve.csv")
    assert [c["exec_id"] for c in curve] == ["E-2", "E-3", "N-2", "F-2"]
    assert curve[-1]["cum_realized_pnl_total"] == "1340.00"

    parquet = pl.read_parquet(out / f"{stem}-pnl.parquet")
    assert isinstance(parquet.schema["realized_pnl"], pl.Decimal)
    assert sum(parquet["realized_pnl"].to_list()) == Decimal("1340")
    assert pl.read_parquet(out / f"{stem}-breaks.parquet").height == 1

    # a bust that lands after the day: the report as known then stays reproducible
    known_at = str(fetchval(db_url, "SELECT max(recorded_at) FROM events").isoformat())
    seed(
        db_url,
        [
            {
                "type": "bust",
                "account": "ACC-2",
                "contract": ES,
                "exec_id": "F-2",
                "occurred_at": at("09:00:00", "2026-11-24"),
            }
        ],
    )
    invoke("report", "--date", DAY, "--out", str(tmp_path / "after"))
    after = {
        (r["account"], r["contract"]): r for r in read_csv(tmp_path / "after" / f"{stem}-pnl.csv")
    }
    assert after[("ACC-2", ES)]["realized_pnl"] == "300.00"  # F-3 now closes F-1 at 4996
    known = invoke(
        "report", "--date", DAY, "--out", str(tmp_path / "then"), "--as-known-at", known_at
    )
    assert known.exit_code == 0, known.output
    assert (tmp_path / "then" / f"{stem}-pnl.csv").read_text() == (
        out / f"{stem}-pnl.csv"
    ).read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_eod_report_renders_in_headless_chromium(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    seed(db_url, DAY_EVENTS)
    invoke("reconcile", "--cutoff", at("21:00:00"))
    out = tmp_path / "eod"
    assert invoke("report", "--date", DAY, "--out", str(out)).exit_code == 0
    page = out / f"eod-{DAY}.html"
    source = page.read_text()
    # self-contained: nothing to fetch, no script at all
    assert "<script" not in source
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", source)
    assert "@import" not in source and "url(" not in source

    dom = chromium(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr
    html = dom.stdout
    for table in ("positions", "pnl-accounts", "pnl", "runs", "breaks-1"):
        assert f'<table id="{table}">' in html, table
    assert html.count("<tr>") == 1 + 3 + 1 + 2 + 1 + 3 + 1 + 1 + 1 + 1  # heads + rows
    assert 'id="pnl-chart"' in html
    assert len(re.findall(r'<path class="series"', html)) == 3  # ACC-1, ACC-2 and total
    assert len(re.findall(r"<circle ", html)) == 4  # one per realizing fill
    assert "POSITION_QTY_BREAK" in html

    shot = tmp_path / "report.png"
    result = chromium(
        page, tmp_path, f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars"
    )
    assert result.returncode == 0, result.stderr
    assert shot.is_file() and shot.stat().st_size > 30_000
    assert png_size(shot) == (1280, 1600)
    keep = os.environ.get("LEDGER_TEST_SCREENSHOT")  # to look at it after the run
    if keep:
        shutil.copy(shot, keep)


NEXT_DAY = "2026-11-24"
NEXT_DAY_EVENTS: list[dict[str, Any]] = [
    # three lots at two prices: an average open price that never ends (5000.1666...)
    fill("ACC-3", "G-1", "BUY", "1", "5000.00", "09:00:00", day=NEXT_DAY),
    fill("ACC-3", "G-2", "BUY", "2", "5000.25", "09:05:00", day=NEXT_DAY),
    {**fill("ACC-3", "H-1", "SELL", "1", "18000.00", "10:00:00", NQ, NEXT_DAY), "fee": "0.125"},
    fill("ACC-3", "H-2", "BUY", "1", "17999.75", "11:00:00", NQ, NEXT_DAY),
    {"type": "mark", "contract": ES, "price": "5001.25", "occurred_at": at("20:59:00", NEXT_DAY)},
]


def test_parquet_files_of_two_days_read_together_with_one_schema(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    seed(db_url, DAY_EVENTS + NEXT_DAY_EVENTS)
    invoke("reconcile", "--cutoff", at("21:00:00"))
    out = tmp_path / "eod"
    for day in (DAY, NEXT_DAY):
        result = invoke("report", "--date", day, "--out", str(out))
        assert result.exit_code == 0, (result.output, result.exception)
    money = pl.Decimal(38, 12)
    expected: dict[str, dict[str, Any]] = {
        "positions": {
            "account": pl.String,
            "contract": pl.String,
            "currency": pl.String,
            "signed_qty": money,
            "side": pl.String,
            "avg_open_price": money,
            "mark_price": money,
            "unrealized_pnl": money,
            "realized_pnl_day": money,
            "fees_day": money,
            "opened_at": pl.Datetime("us", "UTC"),
            "last_fill_at": pl.Datetime("us", "UTC"),
        },
        "pnl": {
            "account": pl.String,
            "contract": pl.String,
            "currency": pl.String,
            "realized_pnl": money,
            "fees": money,
            "net_realized_pnl": money,
            "fills": pl.Int64,
        },
        "breaks": {
            "run_id": pl.String,
            "break_id": pl.String,
            "type": pl.String,
            "account": pl.String,
            "contract": pl.String,
            "ledger_value": pl.String,
            "broker_value": pl.String,
            "difference": pl.String,
            "tolerance": pl.String,
            "exec_ids": pl.String,
            "detail": pl.String,
        },
        "runs": {
            "run_id": pl.String,
            "cutoff": pl.Datetime("us", "UTC"),
            "recorded_at": pl.Datetime("us", "UTC"),
            "source": pl.String,
            "matched": pl.Int64,
            "breaks": pl.Int64,
        },
        "pnl-curve": {
            "occurred_at": pl.Datetime("us", "UTC"),
            "account": pl.String,
            "contract": pl.String,
            "exec_id": pl.String,
            "realized_pnl": money,
            "cum_realized_pnl_account": money,
            "cum_realized_pnl_total": money,
        },
    }
    for table, schema in expected.items():
        files = [out / f"eod-{day}-{table}.parquet" for day in (DAY, NEXT_DAY)]
        for path in files:
            assert dict(pl.read_parquet_schema(path)) == schema, path
        both = pl.scan_parquet(files).collect()
        assert dict(both.schema) == schema, table
    pnl = pl.scan_parquet([out / f"eod-{d}-pnl.parquet" for d in (DAY, NEXT_DAY)]).collect()
    assert sorted(pnl["fees"].to_list()) == [
        Decimal(v) for v in ("2.225", "4.2", "4.2", "6.3", "6.3")
    ]
    assert pnl["realized_pnl"].sum() == Decimal("1340") + Decimal("5")  # 0.25 x 20 on day 2
    # the average that never ends: rounded half-even to 12 places in Parquet only
    positions = pl.read_parquet(out / f"eod-{NEXT_DAY}-positions.parquet")
    acc3 = positions.filter((pl.col("account") == "ACC-3") & (pl.col("contract") == ES))
    assert acc3["avg_open_price"].to_list() == [Decimal("5000.166666666667")]
    csv_rows = read_csv(out / f"eod-{NEXT_DAY}-positions.csv")
    [exact] = [
        r["avg_open_price"] for r in csv_rows if (r["account"], r["contract"]) == ("ACC-3", ES)
    ]
    assert exact.startswith("5000.1666666666666666")


def rendered_text(page: Path, tmp_path: Path) -> str:
    """Return the page's text as headless Chromium lays it out (tags dropped, blanks folded)."""
    dom = chromium(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr
    body = re.sub(r"<(style|svg)\b.*?</\1>", " ", dom.stdout, flags=re.S)
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", body)).split())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_every_run_of_the_day_is_shown_with_its_source_and_its_breaks(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    seed(db_url, DAY_EVENTS)
    off = tmp_path / "statement-morning.csv"
    off.write_text(
        f"account,contract,signed_qty,avg_price\nACC-1,{NQ},-3,18000\nACC-2,{ES},1,4996\n"
    )
    clean = tmp_path / "statement-evening.csv"
    clean.write_text(
        f"account,contract,signed_qty,avg_price\nACC-1,{NQ},-2,18000\nACC-2,{ES},2,4996\n"
    )
    first = invoke("reconcile", "--cutoff", at("20:30:00"), "--broker-file", str(off))
    assert first.exit_code == 3, first.output
    second = invoke("reconcile", "--cutoff", at("21:00:00"), "--broker-file", str(clean))
    assert second.exit_code == 0, second.output
    out = tmp_path / "eod"
    assert invoke("report", "--date", DAY, "--out", str(out)).exit_code == 0
    runs = read_csv(out / f"eod-{DAY}-runs.csv")
    assert [(r["cutoff"], r["breaks"]) for r in runs] == [
        (at("20:30:00").replace("Z", "+00:00"), "2"),
        (at("21:00:00").replace("Z", "+00:00"), "0"),
    ]
    assert runs[0]["source"].startswith("file:statement-morning.csv:")
    assert runs[1]["source"].startswith("file:statement-evening.csv:")
    breaks = read_csv(out / f"eod-{DAY}-breaks.csv")
    assert {b["run_id"] for b in breaks} == {runs[0]["run_id"]} and len(breaks) == 2

    text = rendered_text(out / f"eod-{DAY}.html", tmp_path)
    morning = text.index("Run 1 of 2")
    evening = text.index("Run 2 of 2")
    assert morning < evening
    first_run, second_run = text[morning:evening], text[evening:]
    assert "cutoff 2026-11-23 20:30:00Z" in first_run
    assert "statement file statement-morning.csv" in first_run
    assert "2 break(s)" in first_run and first_run.count("POSITION_QTY_BREAK") == 2
    assert "cutoff 2026-11-23 21:00:00Z" in second_run
    assert "statement file statement-evening.csv" in second_run
    assert "0 break(s)" in second_run and "No breaks." in second_run
    assert "POSITION_QTY_BREAK" not in second_run
    assert "2 run(s)" in text


def test_a_break_with_many_executions_lists_a_few_and_counts_the_rest(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    fills = [
        fill("ACC-9", f"X-{i:02d}", "BUY", "1", "5000.00", f"09:{i:02d}:00") for i in range(20)
    ]
    seed(db_url, DAY_EVENTS[:1] + fills)
    statement = tmp_path / "broker.csv"
    statement.write_text(f"account,contract,signed_qty,avg_price\nACC-9,{ES},19,5000\n")
    invoke("reconcile", "--cutoff", at("21:00:00"), "--broker-file", str(statement))
    out = tmp_path / "eod"
    assert invoke("report", "--date", DAY, "--out", str(out)).exit_code == 0
    [brk] = read_csv(out / f"eod-{DAY}-breaks.csv")
    ids = brk["exec_ids"].split()
    assert len(ids) > 6  # the file holds every id
    page = (out / f"eod-{DAY}.html").read_text()
    shown = " ".join(ids[:6]) + f" and {len(ids) - 6} more"
    assert f"<td>{shown}</td>" in page
    assert ids[6] not in page.split('id="breaks-1"', 1)[1]
