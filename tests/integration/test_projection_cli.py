"""Projections end to end through the CLI: ingest a JSON Lines file, then ask ``ledger``.

Every expected figure is an exact Decimal string (golden/pnl_cases.yaml or worked by
hand below); the commands run as subprocesses against the test's own database.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import yaml
from cli_testing import instrument

ROOT = Path(__file__).resolve().parents[2]
LEDGER = [sys.executable, "-m", "ledger"]
CASES: list[dict[str, Any]] = yaml.safe_load((ROOT / "tests/golden/pnl_cases.yaml").read_text())
T0 = datetime(2026, 11, 20, 14, 0, tzinfo=UTC)


def ledger(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LEDGER, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def ok_json(env: dict[str, str], *args: str) -> Any:
    result = ledger(env, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def ingest(env: dict[str, str], path: Path, records: list[dict[str, Any]]) -> dict[str, int]:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = ledger(env, "ingest", str(path), "--format", "json")
    totals: dict[str, int] = json.loads(result.stdout)
    # exit status 4: some records were rejected (the golden cases reject some on purpose)
    assert result.returncode == (4 if totals["rejected"] else 0), result.stderr
    return totals


def fill(
    account: str,
    contract: str,
    exec_id: str,
    side: str,
    qty: object,
    price: str,
    at: datetime,
    fee: str = "0",
) -> dict[str, Any]:
    return {
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


def by_account(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["account"], r["contract"]): r for r in rows}


async def _fetch(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def fetch(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    return asyncio.run(_fetch(url, query, *args))


SERVING_STATES = """
SELECT p.stream, p.state::text FROM proj_positions p JOIN projection_checkpoint c
  ON c.generation = p.generation AND c.status = 'serving' ORDER BY p.stream
"""


# ----------------------------------------------------------------- golden cases

GOLDEN = [c for c in CASES if "fills" in c]


def _contract(case: dict[str, Any]) -> str:
    return "G." + case["id"].replace("_", "-")


def _golden_records() -> list[dict[str, Any]]:
    """Per case: account K{k} holds the case's first k fills (so every prefix is checked)."""
    records: list[dict[str, Any]] = []
    for c, case in enumerate(GOLDEN):
        contract = _contract(case)
        inst = case.get("instrument") or {"tick_size": case["tick_size"], "tick_value": "0.01"}
        # the equity case: point value 1 = tick value 0.01 / tick size 0.01
        records.append(instrument(contract, inst["tick_size"], inst["tick_value"]))
        fee_per = Decimal(case.get("fee_per_contract", "0"))
        n = len(case["fills"])
        for k in range(1, n + 1):
            for i, (side, qty, price) in enumerate(case["fills"][:k]):
                fee = str(fee_per * qty) if k == n else "0"
                at = T0 + timedelta(minutes=i)
                records.append(fill(f"K{k}", contract, f"C{c}X{i}", side, qty, price, at, fee))
        if "mark_after_3" in case:
            records.append(
                {
                    "type": "mark",
                    "contract": contract,
                    "price": case["mark_after_3"]["price"],
                    "occurred_at": (T0 + timedelta(hours=6)).isoformat(),
                }
            )
    # es_tick_validation: on-tick prices are taken, off-tick ones rejected, never rounded
    tick = next(c for c in CASES if c["id"] == "es_tick_validation")
    inst = tick["instrument"]
    records.append(instrument("G.TICK", inst["tick_size"], inst["tick_value"]))
    for i, price in enumerate(tick["on_tick"] + tick["off_tick"]):
        at = T0 + timedelta(minutes=i)
        records.append(fill("K1", "G.TICK", f"T{i}", "BUY", 1, price, at))
    return records


def test_golden_cases_end_to_end(cli_env: dict[str, str], db_url: str, tmp_path: Path) -> None:
    records = _golden_records()
    totals = ingest(cli_env, tmp_path / "golden.jsonl", records)
    tick = next(c for c in CASES if c["id"] == "es_tick_validation")
    assert totals["rejected"] == len(tick["off_tick"])
    assert totals["appended"] == len(records) - len(tick["off_tick"])
    rejected = ok_json(cli_env, "rejected", "--format", "json")
    assert sorted(r["reason"] for r in rejected) == ["OFF_TICK_PRICE"] * len(tick["off_tick"])

    fifo = by_account(
        ok_json(cli_env, "positions", "--format", "json", "--include-flat", "--method", "fifo")
    )
    wac = by_account(
        ok_json(cli_env, "positions", "--format", "json", "--include-flat", "--method", "wac")
    )
    states = {stream: json.loads(state) for stream, state in fetch(db_url, SERVING_STATES)}
    checked = 0
    for case in GOLDEN:
        contract = _contract(case)
        n = len(case["fills"])
        for k in range(1, n + 1):
            f, w = fifo[(f"K{k}", contract)], wac[(f"K{k}", contract)]
            assert f["realized_pnl"] == case["fifo_cum"][k - 1], (case["id"], k)
            if "wac_cum" in case:
                assert w["realized_pnl"] == case["wac_cum"][k - 1], (case["id"], k)
            if "signed_qty_after" in case:
                assert f["signed_qty"] == case["signed_qty_after"][k - 1], (case["id"], k)
                assert w["signed_qty"] == case["signed_qty_after"][k - 1], (case["id"], k)
            if "wac_basis_after" in case:
                state = states[f"K{k}/{contract}"]
                assert state["wac_basis"] == case["wac_basis_after"][k - 1], (case["id"], k)
            checked += 1
        full = fifo[(f"K{n}", contract)]
        if "fee_per_contract" in case:
            assert full["fees"] == case["total_fees"]
            assert full["net_realized_pnl"] == case["net_after_fees"]
            assert wac[(f"K{n}", contract)]["fees"] == case["total_fees"]
            assert wac[(f"K{n}", contract)]["net_realized_pnl"] == case["net_after_fees"]
        else:
            assert full["fees"] == "0"
        if "mark_after_3" in case:
            mark = case["mark_after_3"]
            for rows in (fifo, wac):
                row = rows[("K3", contract)]
                assert row["mark_price"] == mark["price"]
                total = Decimal(row["realized_pnl"]) + Decimal(row["unrealized_pnl"])
                assert str(total) == mark["realized_plus_unrealized"], (case["id"], row)
    assert checked == sum(len(c["fills"]) for c in GOLDEN)
    # the accepted on-tick fills are in the position
    assert fifo[("K1", "G.TICK")]["signed_qty"] == str(len(tick["on_tick"]))

    # realized per fill (account with every fill) = the differences of the cumulative figures
    for method, cum_key in (("fifo", "fifo_cum"), ("wac", "wac_cum")):
        per_fill = ok_json(cli_env, "pnl", "--by", "fill", "--format", "json", "--method", method)
        for c, case in enumerate(GOLDEN):
            if cum_key not in case:
                continue
            n = len(case["fills"])
            rows = [
                r for r in per_fill if r["account"] == f"K{n}" and r["contract"] == _contract(case)
            ]
            assert [r["exec_id"] for r in rows] == [f"C{c}X{i}" for i in range(n)]
            cum = [Decimal(v) for v in case[cum_key]]
            expected = [cum[0]] + [cum[i] - cum[i - 1] for i in range(1, n)]
            assert [r["realized_pnl"] for r in rows] == [str(e) for e in expected], (
                case["id"],
                method,
            )
            running = Decimal(0)
            for r, want in zip(rows, case[cum_key], strict=True):
                running += Decimal(r["realized_pnl"])
                assert running == Decimal(want)
            assert str(running) == case[cum_key][-1]
    # and history carries the cumulative figures after every fill, digit for digit
    for case in GOLDEN:
        n = len(case["fills"])
        hist = ok_json(
            cli_env,
            "history",
            "--account",
            f"K{n}",
            "--contract",
            _contract(case),
            "--format",
            "json",
        )
        assert [h["cum_realized_fifo"] for h in hist] == case["fifo_cum"], case["id"]
        if "wac_cum" in case:
            assert [h["cum_realized_wac"] for h in hist] == case["wac_cum"], case["id"]
        if "signed_qty_after" in case:
            assert [h["qty_after"] for h in hist] == case["signed_qty_after"], case["id"]


# ------------------------------------------------------- busts, corrections, late fills

EQ = "EQ.BUST"  # point value 1: tick value 0.01 / tick size 0.01


def adjust(kind: str, account: str, exec_id: str, at: datetime, **extra: str) -> dict[str, Any]:
    return {
        "type": kind,
        "account": account,
        "contract": EQ,
        "exec_id": exec_id,
        "occurred_at": at.isoformat(),
        **extra,
    }


def _pos(env: dict[str, str], method: str = "fifo") -> dict[tuple[str, str], dict[str, Any]]:
    return by_account(
        ok_json(env, "positions", "--format", "json", "--include-flat", "--method", method)
    )


def test_bust_and_correction_restate_pnl_through_the_cli(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    t = [T0 + timedelta(minutes=i) for i in range(10)]
    first = [
        instrument(EQ, "0.01", "0.01"),
        # FLIP: long 100, a sell of 150 flips to short 50, a buy of 50 closes it
        fill("FLIP", EQ, "F1", "BUY", 100, "10.00", t[0]),
        fill("FLIP", EQ, "F2", "SELL", 150, "12.00", t[1]),
        fill("FLIP", EQ, "F3", "BUY", 50, "11.00", t[2]),
        # CORR: a partial close whose opening fill is corrected afterwards
        fill("CORR", EQ, "G1", "BUY", 3, "100.00", t[0], fee="1.50"),
        fill("CORR", EQ, "G2", "SELL", 2, "101.00", t[1], fee="1.00"),
    ]
    assert ingest(cli_env, tmp_path / "a.jsonl", first)["appended"] == len(first)
    fifo, wac = _pos(cli_env), _pos(cli_env, "wac")
    flip = fifo[("FLIP", EQ)]
    assert (flip["signed_qty"], flip["realized_pnl"]) == ("0", "250.00")  # 200.00 + 50.00
    assert wac[("FLIP", EQ)]["realized_pnl"] == "250.00"
    corr = fifo[("CORR", EQ)]
    assert (corr["signed_qty"], corr["realized_pnl"], corr["fees"]) == ("1", "2.00", "2.50")
    assert wac[("CORR", EQ)]["realized_pnl"] == "2.00"  # removes 300.00 x 2/3 = 200.00

    second = [
        # the flip is busted: F3's buy of 50 now OPENS (long 150, nothing realized)
        adjust("bust", "FLIP", "F2", t[5]),
        # G1 was really 4 @ 99.50 with a fee of 2.00
        adjust("correction", "CORR", "G1", t[5], qty="4", price="99.50", fee="2.00"),
    ]
    assert ingest(cli_env, tmp_path / "b.jsonl", second)["appended"] == 2
    fifo, wac = _pos(cli_env), _pos(cli_env, "wac")
    flip = fifo[("FLIP", EQ)]
    assert (flip["signed_qty"], flip["side"], flip["realized_pnl"]) == ("150", "LONG", "0")
    assert wac[("FLIP", EQ)]["realized_pnl"] == "0"
    corr, corr_wac = fifo[("CORR", EQ)], wac[("CORR", EQ)]
    # FIFO 2 x (101.00 - 99.50) = 3.00; WAC removes 398.00 x 2/4 = 199.00 of 202.00
    assert (corr["signed_qty"], corr["realized_pnl"], corr["fees"]) == ("2", "3.00", "3.00")
    assert (corr_wac["realized_pnl"], corr_wac["net_realized_pnl"]) == ("3.00", "0.00")

    # a later sell of 150 closes both lots: 100 x 2.00 + 50 x 1.00; WAC 1800.00 - 1550.00
    assert (
        ingest(cli_env, tmp_path / "c.jsonl", [fill("FLIP", EQ, "F4", "SELL", 150, "12.00", t[6])])[
            "appended"
        ]
        == 1
    )
    fifo, wac = _pos(cli_env), _pos(cli_env, "wac")
    assert (fifo[("FLIP", EQ)]["signed_qty"], fifo[("FLIP", EQ)]["realized_pnl"]) == ("0", "250.00")
    assert wac[("FLIP", EQ)]["realized_pnl"] == "250.00"
    per_fill = [
        (r["exec_id"], r["realized_pnl"])
        for r in ok_json(cli_env, "pnl", "--by", "fill", "--format", "json")
        if r["account"] == "FLIP"
    ]
    assert per_fill == [("F1", "0"), ("F3", "0"), ("F4", "250.00")]
    hist = ok_json(cli_env, "history", "--account", "FLIP", "--contract", EQ, "--format", "json")
    assert [
        (h["exec_id"], h["qty_before"], h["qty_after"], h["cum_realized_fifo"]) for h in hist
    ] == [
        ("F1", "0", "100", "0"),
        ("F3", "100", "150", "0"),
        ("F4", "150", "0", "250.00"),
    ]
    daily = ok_json(cli_env, "pnl", "--by", "day", "--format", "json", "--account", "CORR")
    assert [(d["day"], d["realized_pnl"], d["fees"], d["fills"]) for d in daily] == [
        ("2026-11-20", "3.00", "3.00", 2)
    ]


def _strip(rows: list[dict[str, Any]], *drop: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def test_late_fill_gives_the_same_answers_as_on_time(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    t = [T0 + timedelta(minutes=i) for i in range(10)]
    spec = [
        ("L1", "BUY", 100, "10.00", t[0]),
        ("L2", "BUY", 100, "12.00", t[1]),
        ("L3", "SELL", 150, "15.00", t[2]),
        ("L4", "SELL", 100, "11.00", t[3]),
        ("L5", "BUY", 50, "9.00", t[4]),
    ]
    on_time = [fill("ONTIME", EQ, *s) for s in spec]
    late = [fill("LATE", EQ, *s) for s in spec if s[0] != "L2"]
    assert (
        ingest(cli_env, tmp_path / "a.jsonl", [instrument(EQ, "0.01", "0.01"), *on_time, *late])[
            "appended"
        ]
        == 10
    )
    before = _pos(cli_env)[("LATE", EQ)]
    # without L2: L3 closes 100 (+500.00) and flips short 50 @ 15.00, L4 adds 100 @ 11.00,
    # L5 buys back 50 of the 15.00 lot (+300.00)
    assert (before["signed_qty"], before["realized_pnl"]) == ("-100", "800.00")
    # L2 arrives after everything else has been projected, but happened second
    assert ingest(cli_env, tmp_path / "b.jsonl", [fill("LATE", EQ, *spec[1])])["appended"] == 1
    for method in ("fifo", "wac"):
        rows = _pos(cli_env, method)
        assert _strip([rows[("LATE", EQ)]], "account") == _strip([rows[("ONTIME", EQ)]], "account")
        assert rows[("LATE", EQ)]["realized_pnl"] == "700.00"
        assert rows[("LATE", EQ)]["signed_qty"] == "0"
        per_fill = ok_json(cli_env, "pnl", "--by", "fill", "--format", "json", "--method", method)
        assert _strip([r for r in per_fill if r["account"] == "LATE"], "account") == _strip(
            [r for r in per_fill if r["account"] == "ONTIME"], "account"
        )
    hist = {
        a: ok_json(cli_env, "history", "--account", a, "--contract", EQ, "--format", "json")
        for a in ("LATE", "ONTIME")
    }
    # log positions differ (L2 was appended last), everything else is the same
    assert _strip(hist["LATE"], "position") == _strip(hist["ONTIME"], "position")
    assert [h["cum_realized_fifo"] for h in hist["LATE"]] == CASES[0]["fifo_cum"]
    assert [h["cum_realized_wac"] for h in hist["LATE"]] == CASES[0]["wac_cum"]
