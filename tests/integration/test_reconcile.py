"""Reconciliation on a real PostgreSQL: every break type, determinism, --show, --propose."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cli_testing import as_json, fetchval, instrument, invoke, seed

ES = "CON.F.US.EP.Z26"  # tick 0.25, tick value 12.50: point value 50
PX = "TEST.PX"  # tick 0.25, tick value 0.25: point value 1
DAY = "2026-11-23"
CUTOFF = f"{DAY}T21:00:00Z"


def fill(
    account: str,
    exec_id: str,
    side: str,
    qty: str,
    price: str,
    at: str,
    *,
    contract: str = ES,
    broker_pnl: str | None = None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "type": "fill",
        "account": account,
        "contract": contract,
        "exec_id": exec_id,
        "side": side,
        "qty": qty,
        "price": price,
        "occurred_at": f"{DAY}T{at}Z",
    }
    if broker_pnl is not None:
        record["broker_pnl"] = broker_pnl
    return record


def report(
    account: str, qty: str, avg: str | None, at: str, *, contract: str = ES
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "type": "broker_position",
        "account": account,
        "contract": contract,
        "signed_qty": qty,
        "occurred_at": f"{DAY}T{at}Z",
    }
    if avg is not None:
        record["avg_price"] = avg
    return record


CLEAN = [
    instrument(ES, "0.25", "12.50"),
    fill("ACC-OK", "K-1", "BUY", "2", "5000.00", "09:00:00"),
    fill("ACC-OK", "K-2", "SELL", "1", "5001.00", "10:00:00", broker_pnl="50.00"),
    # 0.1 from the ledger's 5000.00: inside half a tick (0.125)
    report("ACC-OK", "1", "5000.1", "20:00:00"),
]

BROKEN = [
    # a missing fill: the broker has a third contract the ledger never received
    fill("ACC-MISS", "M-1", "BUY", "1", "5000.00", "09:00:00"),
    report("ACC-MISS", "1", "5000.00", "10:00:00"),  # matched: the last matching point
    fill("ACC-MISS", "M-2", "BUY", "1", "5001.00", "11:00:00"),
    report("ACC-MISS", "3", "5001.00", "20:00:00"),
    # a duplicated broker fill: the same execution sent twice under two ids
    fill("ACC-DUP", "D-1", "BUY", "2", "5000.00", "09:30:00"),
    fill("ACC-DUP", "D-1-DUP", "BUY", "2", "5000.00", "09:30:00"),
    report("ACC-DUP", "2", "5000.00", "20:00:00"),
    # a stale report: right when sent, but the ledger has a fill after it
    fill("ACC-STALE", "S-1", "BUY", "1", "5000.00", "09:00:00"),
    report("ACC-STALE", "1", "5000.00", "12:00:00"),
    fill("ACC-STALE", "S-2", "BUY", "1", "5002.00", "15:00:00"),
    # an average-price drift of two ticks
    fill("ACC-AVG", "V-1", "BUY", "1", "5000.00", "09:00:00"),
    fill("ACC-AVG", "V-2", "BUY", "1", "5000.50", "09:05:00"),
    report("ACC-AVG", "2", "5000.75", "20:00:00"),
    # a position only the broker has
    report("ACC-BRK", "1", "4999.00", "20:00:00"),
    # the broker's own P&L disagrees with the ledger's FIFO realized
    fill("ACC-PNL", "P-1", "BUY", "2", "5000.00", "09:00:00"),
    fill("ACC-PNL", "P-2", "SELL", "2", "5001.00", "10:00:00", broker_pnl="100.00"),
    fill("ACC-PNL", "P-3", "BUY", "1", "5000.00", "11:00:00"),
    fill("ACC-PNL", "P-4", "SELL", "1", "5002.00", "12:00:00", broker_pnl="90.00"),
    report("ACC-PNL", "0", None, "20:00:00"),
    # the ledger is open, the broker flat
    fill("ACC-GONE", "G-1", "BUY", "1", "5000.00", "09:00:00"),
    report("ACC-GONE", "0", None, "20:00:00"),
]


def test_clean_day_has_no_breaks_and_exits_0(cli_env: dict[str, str], db_url: str) -> None:
    seed(db_url, CLEAN)
    run = as_json(invoke("reconcile", "--cutoff", CUTOFF, "--format", "json"), 0)
    assert run["breaks"] == []
    assert run["matched"] == 1
    assert run["cutoff"] == "2026-11-23T21:00:00+00:00"
    assert fetchval(db_url, "SELECT count(*) FROM events WHERE type = 'reconciliation'") == 1


def test_injected_breaks_of_every_type_are_found_with_their_exec_ids(
    cli_env: dict[str, str], db_url: str
) -> None:
    seed(db_url, CLEAN + BROKEN)
    run = as_json(invoke("reconcile", "--cutoff", CUTOFF, "--format", "json"), 3)
    found = {
        (b["type"], b["account"]): (
            b["ledger_value"],
            b["broker_value"],
            b["difference"],
            b["tolerance"],
            b["exec_ids"],
        )
        for b in run["breaks"]
    }
    assert found == {
        ("POSITION_QTY_BREAK", "ACC-MISS"): ("2", "3", "-1", "0", ["M-2"]),
        ("POSITION_QTY_BREAK", "ACC-DUP"): ("4", "2", "2", "0", ["D-1", "D-1-DUP"]),
        ("STALE_BROKER_REPORT", "ACC-STALE"): ("2", "1", "1", "0", ["S-2"]),
        ("AVG_PRICE_BREAK", "ACC-AVG"): ("5000.25", "5000.75", "-0.5", "0.125", ["V-1", "V-2"]),
        ("MISSING_IN_LEDGER", "ACC-BRK"): ("0", "1", "-1", "0", []),
        ("REALIZED_PNL_BREAK", "ACC-PNL"): ("200", "190", "10", "0.01", ["P-2", "P-4"]),
        ("MISSING_AT_BROKER", "ACC-GONE"): ("1", "0", "1", "0", ["G-1"]),
    }
    assert len(run["breaks"]) == len(found)
    assert run["matched"] == 1  # ACC-OK
    assert all(b["break_id"].startswith("brk-") for b in run["breaks"])
    assert all(b["contract"] == ES for b in run["breaks"])

    # a wider tolerance removes the price break and nothing else
    wide = as_json(
        invoke("reconcile", "--cutoff", CUTOFF, "--price-tolerance", "0.5", "--format", "json"), 3
    )
    assert {b["type"] for b in wide["breaks"]} == {t for t, _ in found} - {"AVG_PRICE_BREAK"}

    # table and CSV outputs carry the same breaks
    table = invoke("reconcile", "--cutoff", CUTOFF)
    assert table.exit_code == 3
    assert "7 break(s)" in table.stdout and "STALE_BROKER_REPORT" in table.stdout
    rows = invoke("reconcile", "--cutoff", CUTOFF, "--format", "csv").stdout.splitlines()
    assert rows[0].startswith("break_id,type,account,contract")
    assert len(rows) == 1 + 7


def test_same_cutoff_gives_same_ids_one_logged_run_and_show_reprints_it(
    cli_env: dict[str, str], db_url: str
) -> None:
    seed(db_url, CLEAN + BROKEN)
    first = as_json(invoke("reconcile", "--cutoff", CUTOFF, "--format", "json"), 3)
    second = as_json(invoke("reconcile", "--cutoff", CUTOFF, "--format", "json"), 3)
    assert first == second
    assert first["run_id"].startswith("rec-20261123T210000000000Z-")
    count = "SELECT count(*) FROM events WHERE type = 'reconciliation'"
    assert fetchval(db_url, count) == 1

    shown = as_json(invoke("reconcile", "--show", first["run_id"], "--format", "json"), 3)
    assert shown == first
    missing = invoke("reconcile", "--show", "rec-nope")
    assert missing.exit_code == 2
    assert "rec-nope" in missing.output

    # new knowledge (the missing fill arrives) is a new run with its own id
    seed(db_url, [fill("ACC-MISS", "M-3", "BUY", "1", "5002.00", "11:30:00")])
    third = as_json(invoke("reconcile", "--cutoff", CUTOFF, "--format", "json"), 3)
    assert third["run_id"] != first["run_id"]
    assert ("POSITION_QTY_BREAK", "ACC-MISS") not in {
        (b["type"], b["account"]) for b in third["breaks"]
    }
    # the breaks that did not change keep their ids
    old_ids = {b["break_id"] for b in first["breaks"] if b["account"] != "ACC-MISS"}
    assert old_ids == {b["break_id"] for b in third["breaks"]}
    assert fetchval(db_url, count) == 2
    # no silent repair: reconciliation never appends fills
    assert fetchval(db_url, "SELECT count(*) FROM events WHERE type = 'fill'") == 2 + 13 + 1


def test_propose_prices_reproduce_the_brokers_average(cli_env: dict[str, str], db_url: str) -> None:
    seed(
        db_url,
        [
            instrument(PX, "0.25", "0.25"),
            fill("ACC-P", "X-1", "BUY", "100", "100", "09:00:00", contract=PX),
            report("ACC-P", "150", "102", "20:00:00", contract=PX),
            fill("ACC-Q", "Y-1", "BUY", "10", "100", "09:00:00", contract=PX),
            report("ACC-Q", "-5", "101", "20:00:00", contract=PX),
        ],
    )
    run = as_json(invoke("reconcile", "--cutoff", CUTOFF, "--propose", "--format", "json"), 3)
    proposals = {p["account"]: p for p in run["proposals"]}
    assert (proposals["ACC-P"]["side"], proposals["ACC-P"]["qty"]) == ("BUY", "50")
    assert proposals["ACC-P"]["price"] == "106"  # (150*102 - 100*100) / 50
    # a flip opens the broker's position at the broker's average
    assert (proposals["ACC-Q"]["side"], proposals["ACC-Q"]["qty"]) == ("SELL", "15")
    assert proposals["ACC-Q"]["price"] == "101"
    assert {p["break_id"] for p in run["proposals"]} == {b["break_id"] for b in run["breaks"]}
    table = invoke("reconcile", "--cutoff", CUTOFF, "--propose")
    assert "Proposed fills" in table.stdout and "106" in table.stdout
    # proposals are printed, never appended
    assert fetchval(db_url, "SELECT count(*) FROM events WHERE type = 'fill'") == 2


def test_broker_statement_files_csv_and_projectx(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    seed(db_url, CLEAN + BROKEN[:4])
    statement = tmp_path / "eod.csv"
    statement.write_text(
        "account,contract,signed_qty,avg_price\n"
        f"ACC-OK,{ES},1,5000.1\n"
        f"ACC-MISS,{ES},3,5001.00\n"
        f"ACC-NEW,{ES},-2,\n"
    )
    run = as_json(
        invoke(
            "reconcile", "--cutoff", CUTOFF, "--broker-file", str(statement), "--format", "json"
        ),
        3,
    )
    assert run["source"].startswith("file:eod.csv:")
    assert {(b["type"], b["account"], tuple(b["exec_ids"])) for b in run["breaks"]} == {
        ("POSITION_QTY_BREAK", "ACC-MISS", ("M-2",)),
        ("MISSING_IN_LEDGER", "ACC-NEW", ()),
    }
    assert run["matched"] == 1

    searchopen = tmp_path / "positions.json"
    searchopen.write_text(
        json.dumps(
            {
                "positions": [
                    {
                        "id": 1,
                        "accountId": "ACC-OK",
                        "contractId": ES,
                        "type": 1,
                        "size": 1,
                        "averagePrice": 5000.100000000,
                    },
                    {
                        "id": 2,
                        "accountId": "ACC-MISS",
                        "contractId": ES,
                        "type": 2,
                        "size": 2,
                        "averagePrice": 5000.5,
                    },
                ],
                "success": True,
                "errorCode": 0,
                "errorMessage": None,
            }
        )
    )
    run = as_json(
        invoke(
            "reconcile", "--cutoff", CUTOFF, "--broker-file", str(searchopen), "--format", "json"
        ),
        3,
    )
    assert [(b["type"], b["account"], b["broker_value"]) for b in run["breaks"]] == [
        ("POSITION_QTY_BREAK", "ACC-MISS", "-2")
    ]

    bad = tmp_path / "bad.csv"
    bad.write_text(f"account,contract,signed_qty,avg_price\nACC-OK,{ES},lots,5000\n")
    result = invoke("reconcile", "--cutoff", CUTOFF, "--broker-file", str(bad))
    assert result.exit_code == 2
    assert "bad.csv:2" in result.output and "signed_qty" in result.output
    assert "'lots'" in result.output


@pytest.mark.parametrize("cutoff", ["2026-11-23T11:59:00Z"])
def test_cutoff_only_sees_reports_and_fills_up_to_it(
    cli_env: dict[str, str], db_url: str, cutoff: str
) -> None:
    seed(db_url, CLEAN + BROKEN[:4])
    run = as_json(invoke("reconcile", "--cutoff", cutoff, "--format", "json"), 3)
    # at 11:59 the ACC-MISS 10:00 report still matches, but M-2 (11:00) came after it
    assert [(b["type"], b["account"], b["exec_ids"]) for b in run["breaks"]] == [
        ("STALE_BROKER_REPORT", "ACC-MISS", ["M-2"]),
        ("MISSING_AT_BROKER", "ACC-OK", ["K-1", "K-2"]),
    ]
