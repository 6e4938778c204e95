"""The CLI on a real PostgreSQL: ingest, dead letter, log, rejected --retry, db init."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
LEDGER = [sys.executable, "-m", "ledger"]

INSTRUMENT = (
    '{"type":"instrument","contract":"CON.F.US.EP.Z26","tick_size":"0.25",'
    '"tick_value":"12.50","currency":"USD"}'
)
GOOD_FILL = (
    '{"type":"fill","account":"ACC-1","contract":"CON.F.US.EP.Z26","exec_id":"T-1001",'
    '"order_id":"O-77","side":"buy","qty":"2","price":6065.250000000,"fee":"4.50",'
    '"occurred_at":"2026-11-23T14:30:00.123456Z"}'
)


def ledger(
    env: dict[str, str], *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LEDGER, *args],
        env=env,
        cwd=ROOT,
        input=None if stdin is None else stdin.decode(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def as_json(result: subprocess.CompletedProcess[str], status: int = 0) -> Any:
    assert result.returncode == status, result.stderr
    return json.loads(result.stdout)


def fill(**overrides: object) -> str:
    record = json.loads(GOOD_FILL)
    record.update(overrides)
    for key in [k for k, v in overrides.items() if v is None]:
        del record[key]
    return json.dumps(record)


# one line per rejected-input class, with the reason it must land under
BAD_LINES: list[tuple[str, str, str]] = [
    ('{"type":"trade","account":"ACC-1"}', "UNKNOWN_TYPE", "type"),
    (fill(exec_id="M-1", qty=None), "INVALID_RECORD", "qty: required key is missing"),
    (fill(exec_id="M-2", venue="XCME"), "INVALID_RECORD", "venue: unexpected key"),
    (fill(exec_id="M-3", qty="0"), "INVALID_RECORD", "qty: must be greater than 0"),
    (fill(exec_id="M-4", qty="-2"), "INVALID_RECORD", "qty: must be greater than 0"),
    (fill(exec_id="M-5", price="-5000.25"), "INVALID_RECORD", "price: must not be negative"),
    (fill(exec_id="M-6", price="NaN"), "INVALID_RECORD", "price"),
    (fill(exec_id="M-7", occurred_at="2026-11-23T14:30:00"), "INVALID_RECORD", "no time zone"),
    (fill(exec_id="M-8", side="HOLD"), "INVALID_RECORD", "side must be BUY or SELL"),
    (fill(exec_id="M-9", contract="ES'; DROP TABLE"), "INVALID_RECORD", "contract"),
    (fill(exec_id="M-10", price="5000.13"), "OFF_TICK_PRICE", "tick size 0.25"),
    (fill(exec_id="M-11", contract="CON.F.US.NQ.Z26"), "UNKNOWN_INSTRUMENT", "CON.F.US.NQ.Z26"),
    ('{"type":"fill", "account": ', "INVALID_JSON", ""),
    (
        '{"type":"mark","contract":"CON.F.US.EP.Z26","price":Infinity,"occurred_at":"2026-11-23T21:00:00Z"}',
        "INVALID_RECORD",
        "Infinity",
    ),
]


def test_every_rejected_class_is_dead_lettered_and_counts_add_up(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    lines = [INSTRUMENT, GOOD_FILL, *(b[0] for b in BAD_LINES), GOOD_FILL]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    counts = as_json(ledger(cli_env, "ingest", str(path), "--format", "json"), 4)
    assert counts == {
        "received": len(lines),
        "appended": 2,
        "duplicates": 1,
        "rejected": len(BAD_LINES),
        "already_rejected": 0,
        "withheld": 0,
    }
    assert counts["received"] == counts["appended"] + counts["duplicates"] + counts["rejected"]
    rejected = as_json(ledger(cli_env, "rejected", "--format", "json"))
    assert len(rejected) == len(BAD_LINES)
    by_line = {r["line"]: r for r in rejected}
    for offset, (raw, reason, needle) in enumerate(BAD_LINES):
        row = by_line[offset + 3]
        assert row["reason"] == reason, (raw, row)
        assert needle in row["message"], (raw, row["message"])
        assert row["raw"] == raw
        assert row["source"] == str(path)


def test_log_json_keeps_nine_decimals_and_sub_cent_tick_values(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    zn = (
        '{"type":"instrument","contract":"CON.F.US.ZN.Z26","tick_size":"0.015625",'
        '"tick_value":"15.625","currency":"USD"}'
    )
    path = tmp_path / "exact.jsonl"
    path.write_text("\n".join([INSTRUMENT, zn, GOOD_FILL]) + "\n")
    ledger(cli_env, "ingest", str(path))
    events = as_json(ledger(cli_env, "log", "--format", "json"))
    assert [e["type"] for e in events] == ["instrument", "instrument", "fill"]
    assert set(events[0]) == {
        "global_position",
        "stream",
        "stream_version",
        "event_id",
        "type",
        "occurred_at",
        "recorded_at",
        "payload",
    }
    assert events[1]["payload"]["tick_value"] == "15.625"
    assert events[2]["payload"]["price"] == "6065.250000000"
    assert events[2]["stream"] == "ACC-1/CON.F.US.EP.Z26"
    stream_only = as_json(
        ledger(cli_env, "log", "--stream", "instrument/CON.F.US.ZN.Z26", "--format", "json")
    )
    assert [e["payload"]["contract"] for e in stream_only] == ["CON.F.US.ZN.Z26"]
    after = as_json(ledger(cli_env, "log", "--after", "2", "--format", "json"))
    assert [e["global_position"] for e in after] == [3]


def test_stdin_and_duplicates_on_reingest(cli_env: dict[str, str]) -> None:
    data = (INSTRUMENT + "\n" + GOOD_FILL + "\n").encode()
    first = ledger(cli_env, "ingest", "-", stdin=data)
    assert first.returncode == 0, first.stderr
    assert "received 2, appended 2, duplicates 0, rejected 0" in first.stdout
    again = ledger(cli_env, "ingest", "-", stdin=data)
    assert "received 2, appended 0, duplicates 2, rejected 0" in again.stdout


def test_conflicting_reingest_is_dead_lettered_not_lost(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    ledger(cli_env, "ingest", "-", stdin=(INSTRUMENT + "\n" + GOOD_FILL + "\n").encode())
    changed = tmp_path / "changed.jsonl"
    changed.write_text(fill(price="6065.50") + "\n" + fill(exec_id="T-2") + "\n")
    counts = as_json(ledger(cli_env, "ingest", str(changed), "--format", "json"), 4)
    assert counts == {
        "received": 2,
        "appended": 1,
        "duplicates": 0,
        "rejected": 1,
        "already_rejected": 0,
        "withheld": 0,
    }
    rejected = as_json(ledger(cli_env, "rejected", "--format", "json"))
    assert [r["reason"] for r in rejected] == ["IDEMPOTENCY_CONFLICT"]


def test_retry_reingests_once_the_instrument_is_defined(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "early.jsonl"
    path.write_text(GOOD_FILL + "\n")
    counts = as_json(ledger(cli_env, "ingest", str(path), "--format", "json"), 4)
    assert counts["rejected"] == 1
    still = as_json(ledger(cli_env, "rejected", "--retry", "--format", "json"))
    assert [r["status"] for r in still] == ["pending"]
    assert "UNKNOWN_INSTRUMENT" in still[0]["outcome"]
    ledger(cli_env, "ingest", "-", stdin=(INSTRUMENT + "\n").encode())
    done = as_json(ledger(cli_env, "rejected", "--retry", "--format", "json"))
    assert [r["status"] for r in done] == ["resolved"]
    assert "appended 1" in done[0]["outcome"]
    events = as_json(ledger(cli_env, "log", "--format", "json"))
    assert [e["type"] for e in events] == ["instrument", "fill"]
    listed = as_json(ledger(cli_env, "rejected", "--format", "json"))
    assert listed[0]["status"] == "resolved" and listed[0]["attempts"] == 2


def test_unmigrated_database_names_db_init(empty_db_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "LEDGER_DATABASE_URL": empty_db_url, "LEDGER_HOME": str(tmp_path)}
    refused = ledger(env, "log")
    assert refused.returncode == 2
    assert "ledger db init" in refused.stderr
    for _ in range(2):  # idempotent
        init = ledger(env, "db", "init")
        assert init.returncode == 0, init.stderr
        assert "schema revision" in init.stdout
    status = ledger(env, "db", "status")
    assert status.returncode == 0 and "(current)" in status.stdout
    assert as_json(ledger(env, "log", "--format", "json")) == []


def test_missing_input_file_is_a_clear_error(cli_env: dict[str, str]) -> None:
    result = ledger(cli_env, "ingest", "/nonexistent/fills.jsonl")
    assert result.returncode == 2
    assert "/nonexistent/fills.jsonl" in result.stderr


@pytest.mark.slow
def test_embedded_default_initializes_starts_migrates_and_stops(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LEDGER_DATABASE_URL"}
    env["LEDGER_HOME"] = str(tmp_path / "ledger-home")
    try:
        first = ledger(env, "ingest", str(ROOT / "examples" / "day.jsonl"), "--format", "json")
        assert first.returncode == 0, first.stderr
        counts = json.loads(first.stdout)
        assert counts["received"] == counts["appended"] + counts["duplicates"] + counts["rejected"]
        assert counts["appended"] > 0
        assert (tmp_path / "ledger-home" / "pgdata" / "PG_VERSION").is_file()
        status = ledger(env, "db", "status")
        assert status.returncode == 0 and "embedded cluster" in status.stdout
        init = ledger(env, "db", "init")  # idempotent on a running, migrated cluster
        assert init.returncode == 0, init.stderr
        again = json.loads(
            ledger(env, "ingest", str(ROOT / "examples" / "day.jsonl"), "--format", "json").stdout
        )
        assert again["appended"] == 0 and again["duplicates"] == counts["appended"]
    finally:
        stop = ledger(env, "db", "stop")
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert ledger(env, "db", "status").returncode == 1
