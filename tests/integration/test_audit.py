"""Audit queries and tamper evidence on a real PostgreSQL.

The tamper scenarios run as the superuser the tests connect as (``postgres``): it
switches the immutability triggers off (``ALTER TABLE events DISABLE TRIGGER USER``),
which no application role can, and then edits or deletes rows. Each scenario has a
fresh database of its own.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
from cli_testing import as_json, instrument, invoke, seed

from ledger.db import plain_url

ROOT = Path(__file__).resolve().parents[2]
PX = "TEST.PX"  # tick 0.25, tick value 0.25: point value 1
ES = "CON.F.US.EP.Z26"


def fill(
    exec_id: str,
    side: str,
    qty: str,
    price: str,
    at: str,
    account: str = "ACC-1",
    contract: str = PX,
) -> dict[str, Any]:
    return {
        "type": "fill",
        "account": account,
        "contract": contract,
        "exec_id": exec_id,
        "side": side,
        "qty": qty,
        "price": price,
        "occurred_at": f"2026-11-23T{at}Z",
    }


def bust(exec_id: str, at: str, account: str = "ACC-1") -> dict[str, Any]:
    return {
        "type": "bust",
        "account": account,
        "contract": PX,
        "exec_id": exec_id,
        "occurred_at": f"2026-11-23T{at}Z",
    }


def correction(exec_id: str, qty: str, price: str, at: str) -> dict[str, Any]:
    return {
        "type": "correction",
        "account": "ACC-1",
        "contract": PX,
        "exec_id": exec_id,
        "qty": qty,
        "price": price,
        "occurred_at": f"2026-11-23T{at}Z",
    }


def superuser(db_url: str, *statements: str) -> list[Any]:
    """Run statements as the superuser with the log's immutability triggers off."""

    async def _run() -> list[Any]:
        conn = await asyncpg.connect(plain_url(db_url))
        try:
            await conn.execute("ALTER TABLE events DISABLE TRIGGER USER")
            results = [await conn.fetch(s) for s in statements]
            await conn.execute("ALTER TABLE events ENABLE TRIGGER USER")
            return results
        finally:
            await conn.close()

    return asyncio.run(_run())


# ---------------------------------------------------------------- trail/explain

RESTATED = [
    instrument(PX, "0.25", "0.25"),
    fill("T-1", "BUY", "2", "100", "10:00:00"),
    fill("T-2", "SELL", "1", "101", "11:00:00"),
    fill("T-3", "SELL", "1", "103", "12:00:00"),
    fill("T-0", "BUY", "1", "99", "09:00:00"),  # late: recorded after fills that follow it
    bust("T-2", "13:00:00"),
    fill("T-4", "BUY", "3", "104", "14:00:00"),
    correction("T-4", "2", "104.5", "14:30:00"),
]


def test_trail_shows_the_bust_the_late_fill_and_the_restatement(
    cli_env: dict[str, str], db_url: str
) -> None:
    seed(db_url, RESTATED)
    rows = as_json(invoke("trail", "--account", "ACC-1", "--contract", PX, "--format", "json"))
    by = {(r["type"], r["exec_id"]): r for r in rows}
    # fold order is event order: the late T-0 comes first, each amendment follows its fill
    assert [(r["type"], r["exec_id"]) for r in rows] == [
        ("fill", "T-0"),
        ("fill", "T-1"),
        ("fill", "T-2"),
        ("bust", "T-2"),
        ("fill", "T-3"),
        ("fill", "T-4"),
        ("correction", "T-4"),
    ]
    assert [r["seq"] for r in rows] == list(range(1, 8))
    late = by[("fill", "T-0")]
    assert late["status"] == "LATE"
    assert "restated position 0 → 1, realized P&L 4 → 5" in late["detail"]
    busted = by[("fill", "T-2")]
    assert busted["status"] == "BUSTED" and busted["qty_after"] is None
    assert "busted" in busted["restated"]
    assert "busts T-2" in by[("bust", "T-2")]["detail"]
    assert "position 1 → 2, realized P&L 5 → 4" in by[("bust", "T-2")]["detail"]
    # T-3 first realized 3 (against T-1 @ 100); after T-0 and the bust it closes T-0 @ 99
    t3 = by[("fill", "T-3")]
    assert (t3["qty_after"], t3["realized_pnl"], t3["cum_realized_pnl"]) == ("2", "4", "4")
    assert t3["restated"] == "qty_after 0 → 2, realized 3 → 4"
    corrected = by[("fill", "T-4")]
    assert corrected["status"] == "CORRECTED"
    assert (corrected["qty"], corrected["price"], corrected["qty_after"]) == ("2", "104.5", "4")
    assert "qty 3 → 2, price 104 → 104.5" in by[("correction", "T-4")]["detail"]

    # as known before the bust arrived, T-2 still stands
    known = rows_known_at(db_url, 5)
    earlier = as_json(
        invoke(
            "trail",
            "--account",
            "ACC-1",
            "--contract",
            PX,
            "--as-known-at",
            known,
            "--format",
            "json",
        )
    )
    assert [(r["type"], r["exec_id"], r["status"]) for r in earlier] == [
        ("fill", "T-0", "LATE"),
        ("fill", "T-1", ""),
        ("fill", "T-2", ""),
        ("fill", "T-3", ""),
    ]
    assert earlier[-1]["cum_realized_pnl"] == "5"  # 101-99 + 103-100
    table = invoke("trail", "--account", "ACC-1", "--contract", PX)
    assert table.exit_code == 0 and "BUSTED" in table.stdout and "LATE" in table.stdout
    unknown = invoke("trail", "--account", "ACC-9", "--contract", PX)
    assert unknown.exit_code == 2 and "ACC-9" in unknown.output


def rows_known_at(db_url: str, position: int) -> str:
    """Return the recorded_at of the event at ``position`` (as ISO-8601)."""

    async def _fetch() -> str:
        conn = await asyncpg.connect(plain_url(db_url))
        try:
            value = await conn.fetchval(
                "SELECT recorded_at FROM events WHERE global_position = $1", position
            )
            return str(value.isoformat())
        finally:
            await conn.close()

    return asyncio.run(_fetch())


def test_explain_traces_each_lot_to_its_fill(cli_env: dict[str, str], db_url: str) -> None:
    seed(db_url, RESTATED)
    result = as_json(
        invoke(
            "explain",
            "--account",
            "ACC-1",
            "--contract",
            PX,
            "--as-of",
            "2026-11-23T12:30:00Z",
            "--format",
            "json",
        )
    )
    assert (result["signed_qty"], result["side"]) == ("2", "LONG")
    assert result["realized_pnl"] == "4"
    # T-3 closed T-0 (T-2 is busted): both units of T-1 are left
    assert [
        (lot["exec_id"], lot["qty"], lot["price"], lot["fill_qty"]) for lot in result["lots"]
    ] == [
        ("T-1", "2", "100", "2"),
    ]
    assert result["lots"][0]["fill_position"] == 2
    assert result["lots"][0]["fill_occurred_at"] == "2026-11-23T10:00:00+00:00"
    assert result["avg_open_price"] == "100"

    now = as_json(invoke("explain", "--account", "ACC-1", "--contract", PX, "--format", "json"))
    assert [(lot["exec_id"], lot["qty"], lot["price"]) for lot in now["lots"]] == [
        ("T-1", "2", "100"),
        ("T-4", "2", "104.5"),
    ]
    assert now["signed_qty"] == "4"
    table = invoke("explain", "--account", "ACC-1", "--contract", PX)
    assert table.exit_code == 0 and "Open FIFO lots" in table.stdout and "T-4" in table.stdout


# ---------------------------------------------------------------------- verify

LOG = [
    instrument(PX, "0.25", "0.25"),
    instrument(ES, "0.25", "12.50"),
    fill("A-1", "BUY", "2", "100", "09:00:00"),
    fill("A-2", "BUY", "1", "101", "09:30:00"),
    fill("A-3", "SELL", "1", "102", "10:00:00"),
    fill("B-1", "BUY", "1", "5000", "09:00:00", account="ACC-2", contract=ES),
    fill("B-2", "SELL", "1", "5001", "10:00:00", account="ACC-2", contract=ES),
    fill("A-4", "SELL", "2", "103", "11:00:00"),
    fill("A-5", "BUY", "1", "99", "12:00:00"),
]
POSITION = {e["exec_id"]: i + 1 for i, e in enumerate(LOG) if e["type"] == "fill"}


def verify(*args: str) -> tuple[int, dict[str, Any]]:
    result = invoke("verify", "--format", "json", *args)
    assert result.exit_code in (0, 1), (result.output, result.exception)
    return result.exit_code, json.loads(result.stdout)


def test_verify_passes_on_an_intact_log_and_seals_it(cli_env: dict[str, str], db_url: str) -> None:
    seed(db_url, LOG)
    code, report = verify()
    assert (code, report["ok"], report["problems"]) == (0, True, [])
    assert report["events"] == len(LOG)
    assert report["streams"] == 4
    assert report["projections_checked"] == 2

    code, sealed = verify("--seal")
    assert code == 0
    assert sealed["seal"]["through_position"] == len(LOG)
    assert sealed["seal"]["event_count"] == len(LOG)
    code, again = verify("--seal")
    assert (code, again["seals"], again["seal"]) == (0, 1, None)  # nothing new to seal
    seed(db_url, [fill("A-6", "SELL", "1", "100", "13:00:00")])
    code, more = verify("--seal")
    assert code == 0 and more["seal"]["event_count"] == len(LOG) + 2  # + the first seal
    code, final = verify()
    assert (code, final["seals"], final["problems"]) == (0, 2, [])
    table = invoke("verify")
    assert table.exit_code == 0 and "OK" in table.stdout


def test_verify_names_an_edited_payload(cli_env: dict[str, str], db_url: str) -> None:
    seed(db_url, LOG, seal=True)
    position = POSITION["A-2"]
    superuser(
        db_url,
        f"UPDATE events SET payload = jsonb_set(payload, '{{qty}}', '\"2\"') "
        f"WHERE global_position = {position}",
    )
    code, report = verify()
    assert code == 1 and not report["ok"]
    hashes = [p for p in report["problems"] if p["kind"] == "HASH_MISMATCH"]
    assert [(p["stream"], p["global_position"], p["stream_version"]) for p in hashes] == [
        (f"ACC-1/{PX}", position, 2)
    ]
    assert "payload edited" in hashes[0]["message"]
    # the projection was caught up before the edit: it no longer equals a replay
    projections = [p for p in report["problems"] if p["kind"] == "PROJECTION_MISMATCH"]
    assert [p["stream"] for p in projections] == [f"ACC-1/{PX}"]
    # the edit left every hash as it was, so the seal (over the hashes) still holds
    assert len(report["problems"]) == 2
    table = invoke("verify")
    assert table.exit_code == 1
    assert f"global position {position}" in table.stdout and "FAILED" in table.stdout
    # a tampered log is never sealed
    code, refused = verify("--seal")
    assert code == 1 and refused["seal"] is None


def test_verify_names_a_projected_position_that_differs_from_a_replay(
    cli_env: dict[str, str], db_url: str
) -> None:
    """The projections' half compares each position with the stream replayed from the
    rows the chain walk read: an edited projection is named, the others are not."""
    seed(db_url, LOG)
    code, report = verify()
    assert (code, report["problems"]) == (0, [])
    superuser(
        db_url,
        "UPDATE proj_positions SET state = jsonb_set(state::jsonb, '{signed_qty}', '\"7\"')::text "
        f"WHERE stream = 'ACC-2/{ES}'",
    )
    code, report = verify()
    assert code == 1
    mismatches = [p for p in report["problems"] if p["kind"] == "PROJECTION_MISMATCH"]
    assert [p["stream"] for p in mismatches] == [f"ACC-2/{ES}"], report["problems"]
    assert "signed_qty 7" in mismatches[0]["message"]
    assert len(report["problems"]) == 1  # the log itself is intact


def test_verify_names_a_deleted_event(cli_env: dict[str, str], db_url: str) -> None:
    seed(db_url, LOG, seal=True)
    superuser(db_url, f"DELETE FROM events WHERE global_position = {POSITION['A-3']}")
    code, report = verify()
    assert code == 1
    gaps = [p for p in report["problems"] if p["kind"] == "VERSION_GAP"]
    assert [(p["stream"], p["stream_version"], p["global_position"]) for p in gaps] == [
        (f"ACC-1/{PX}", 3, POSITION["A-4"])
    ]
    assert "version 3 missing" in gaps[0]["message"]
    seals = [p for p in report["problems"] if p["kind"] == "SEAL_MISMATCH"]
    assert len(seals) == 1 and f"it sealed {len(LOG)} events" in seals[0]["message"]


def test_a_later_seal_goes_on_from_the_last_and_does_not_bless_an_earlier_edit(
    cli_env: dict[str, str], db_url: str
) -> None:
    seed(db_url, LOG, seal=True)
    seed(db_url, [fill("A-6", "SELL", "1", "104", "13:00:00")])
    assert invoke("project").exit_code == 0  # seals what is new: A-6 (after the seal)
    code, report = verify()
    assert (code, report["seals"], report["problems"]) == (0, 2, [])
    # an event before both seals disappears; then more arrive and are sealed
    superuser(db_url, f"DELETE FROM events WHERE global_position = {POSITION['A-3']}")
    seed(db_url, [fill("A-7", "BUY", "1", "98", "14:00:00")])
    assert invoke("project").exit_code == 0
    code, report = verify("--no-projections")
    assert code == 1 and report["seals"] == 3
    # the newest seal went on from the one before it, so it breaks at the gap too: a
    # seal computed afresh over the edited log would have matched it
    seals = [p for p in report["problems"] if p["kind"] == "SEAL_MISMATCH"]
    assert len(seals) == 3, seals


def test_verify_detects_a_truncated_log_tail(cli_env: dict[str, str], db_url: str) -> None:
    seed(db_url, LOG, seal=True)
    # the last three events of the log: and the seal itself
    superuser(db_url, f"DELETE FROM events WHERE global_position > {POSITION['A-4'] - 1}")
    code, report = verify("--no-projections")
    assert code == 1
    heads = {p["stream"]: p["message"] for p in report["problems"] if p["kind"] == "HEAD_MISMATCH"}
    assert set(heads) == {f"ACC-1/{PX}", "seal/log"}
    assert "versions 4..5 deleted from its tail" in heads[f"ACC-1/{PX}"]
    assert "versions 1..1 deleted" in heads["seal/log"]


def test_verify_detects_a_stream_removed_whole_by_its_seal(
    cli_env: dict[str, str], db_url: str
) -> None:
    seed(db_url, LOG, seal=True)
    # a careful forger removes the stream's events and its head row: only the seal sees it
    superuser(
        db_url,
        f"DELETE FROM events WHERE stream = 'ACC-2/{ES}'",
        f"DELETE FROM streams WHERE stream = 'ACC-2/{ES}'",
    )
    code, report = verify("--no-projections")
    assert code == 1
    assert [p["kind"] for p in report["problems"]] == ["SEAL_MISMATCH"]
    assert (
        f"it sealed {len(LOG)} events, the log now holds {len(LOG) - 2}"
        in report["problems"][0]["message"]
    )


def test_verify_runs_from_the_installed_entry_point(cli_env: dict[str, str], db_url: str) -> None:
    seed(db_url, LOG)
    superuser(db_url, f"DELETE FROM events WHERE global_position = {POSITION['B-1']}")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from ledger.cli import main; main()",
            "verify",
            "--no-projections",
        ],
        env=cli_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "version 1 missing" in result.stdout and f"ACC-2/{ES}" in result.stdout
