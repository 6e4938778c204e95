"""``ledger ingest`` exit codes a script can use, --strict, and dead letters kept once.

0: every record appended or a duplicate; 4: some records rejected (now, or already by an
earlier run), the rest appended; 5: --strict and some record bad, nothing appended;
2: a usage error, an unreadable file, the database unavailable or not migrated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cli_testing import fetchval, free_port
from test_cli_ingest import GOOD_FILL, INSTRUMENT, fill, ledger

BAD = [
    fill(exec_id="B-1", price="5000.13"),  # off the tick grid
    '{"type":"fill", "account": ',  # not JSON
    fill(exec_id="B-3", qty="0"),
]


def counts_of(result: Any, status: int) -> dict[str, int]:
    assert result.returncode == status, (result.returncode, result.stderr)
    counts: dict[str, int] = json.loads(result.stdout)
    assert counts["received"] == (
        counts["appended"] + counts["duplicates"] + counts["rejected"] + counts["withheld"]
    )
    return counts


def stats(env: dict[str, str]) -> dict[str, Any]:
    result = ledger(env, "stats", "--format", "json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def events(db_url: str) -> int:
    return int(fetchval(db_url, "SELECT count(*) FROM events"))


def dead_letters(db_url: str) -> int:
    return int(fetchval(db_url, "SELECT count(*) FROM rejected"))


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_exit_0_when_every_record_is_appended_or_a_duplicate(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    path = write(tmp_path / "clean.jsonl", [INSTRUMENT, GOOD_FILL])
    first = counts_of(ledger(cli_env, "ingest", str(path), "-f", "json"), 0)
    assert (first["appended"], first["duplicates"], first["rejected"]) == (2, 0, 0)
    again = counts_of(ledger(cli_env, "ingest", str(path), "-f", "json"), 0)
    assert (again["appended"], again["duplicates"], again["rejected"]) == (0, 2, 0)


def test_exit_4_when_some_records_are_rejected_and_the_rest_appended(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    path = write(tmp_path / "mixed.jsonl", [INSTRUMENT, GOOD_FILL, *BAD])
    counts = counts_of(ledger(cli_env, "ingest", str(path), "-f", "json"), 4)
    assert (counts["appended"], counts["rejected"], counts["withheld"]) == (2, 3, 0)
    assert events(db_url) == 2
    table = ledger(cli_env, "ingest", str(write(tmp_path / "more.jsonl", [BAD[0]])))
    assert table.returncode == 4
    assert "received 1, appended 0, duplicates 0, rejected 1" in table.stdout


def test_reingesting_a_file_does_not_dead_letter_its_bad_lines_again(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    path = write(tmp_path / "day.jsonl", [INSTRUMENT, GOOD_FILL, *BAD])
    first = counts_of(ledger(cli_env, "ingest", str(path), "-f", "json"), 4)
    assert (first["rejected"], first["already_rejected"]) == (3, 0)
    again = counts_of(ledger(cli_env, "ingest", str(path), "-f", "json"), 4)
    assert again == {
        "received": 5,
        "appended": 0,
        "duplicates": 5,  # two events in the log, three records in the dead letter
        "rejected": 0,
        "already_rejected": 3,
        "withheld": 0,
    }
    assert dead_letters(db_url) == 3  # 3 bad lines ingested twice: 3 rows, not 6
    table = ledger(cli_env, "ingest", str(path))
    assert table.returncode == 4
    assert "duplicates 5 (3 already dead-lettered), rejected 0" in table.stdout
    assert dead_letters(db_url) == 3
    # the same bad line in another file (or at another line) is another record
    other = write(tmp_path / "other.jsonl", [BAD[0]])
    assert counts_of(ledger(cli_env, "ingest", str(other), "-f", "json"), 4)["rejected"] == 1
    assert dead_letters(db_url) == 4
    s = stats(cli_env)
    assert (s["received"], s["rejected"], s["already_rejected"]) == (16, 4, 6)
    assert s["consistent"] is True
    assert s["dead_letters"] == {"pending": 4, "resolved": 0}


def test_strict_appends_nothing_when_any_record_of_the_input_is_bad(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    good = write(tmp_path / "good.jsonl", [INSTRUMENT, GOOD_FILL])
    bad = write(tmp_path / "bad.jsonl", [fill(exec_id="T-2"), BAD[0]])
    refused = ledger(cli_env, "ingest", "--strict", str(good), str(bad), "-f", "json")
    counts = counts_of(refused, 5)
    assert counts == {
        "received": 4,
        "appended": 0,
        "duplicates": 0,
        "rejected": 1,
        "already_rejected": 0,
        "withheld": 3,
    }
    assert "--strict" in refused.stderr and "nothing appended" in refused.stderr
    assert events(db_url) == 0  # not even the good file, given first
    assert fetchval(db_url, "SELECT reason FROM rejected") == "OFF_TICK_PRICE"
    # again: still refused, the bad record found in the dead letter, not added twice
    again = counts_of(ledger(cli_env, "ingest", "--strict", str(good), str(bad), "-f", "json"), 5)
    assert (again["rejected"], again["already_rejected"], again["withheld"]) == (0, 1, 3)
    assert (events(db_url), dead_letters(db_url)) == (0, 1)
    s = stats(cli_env)  # the withheld records were not received: a later run receives them
    assert (s["received"], s["rejected"], s["already_rejected"]) == (2, 1, 1)
    assert s["consistent"] is True
    # a clean input under --strict: all of it, exit 0
    fixed = write(tmp_path / "fixed.jsonl", [fill(exec_id="T-2")])
    ok = counts_of(ledger(cli_env, "ingest", "--strict", str(good), str(fixed), "-f", "json"), 0)
    assert (ok["appended"], ok["withheld"]) == (3, 0)
    assert events(db_url) == 3


def test_strict_sees_instruments_defined_earlier_in_its_own_input(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """One transaction over batches: a fill in batch 2 is checked against batch 1."""
    path = write(tmp_path / "day.jsonl", [INSTRUMENT, *(fill(exec_id=f"S-{i}") for i in range(5))])
    counts = counts_of(
        ledger(cli_env, "ingest", "--strict", "--batch-size", "2", str(path), "-f", "json"), 0
    )
    assert counts["appended"] == 6 and events(db_url) == 6


def test_usage_errors_and_an_unreachable_database_exit_2(
    cli_env: dict[str, str], empty_db_url: str, tmp_path: Path
) -> None:
    path = write(tmp_path / "clean.jsonl", [INSTRUMENT])
    assert ledger(cli_env, "ingest", "--no-such-option", str(path)).returncode == 2
    assert ledger(cli_env, "ingest").returncode == 2  # no FILE
    missing = ledger(cli_env, "ingest", str(tmp_path / "missing.jsonl"))
    assert missing.returncode == 2 and "missing.jsonl" in missing.stderr
    # a path longer than a terminal line is named whole, never folded in two
    deep = tmp_path / ("d" * 90) / "missing-too.jsonl"
    long_missing = ledger(cli_env, "ingest", str(deep))
    assert long_missing.returncode == 2 and str(deep) in long_missing.stderr
    unmigrated = {**cli_env, "LEDGER_DATABASE_URL": empty_db_url}
    refused = ledger(unmigrated, "ingest", str(path))
    assert refused.returncode == 2 and "ledger db init" in refused.stderr
    down = {
        **os.environ,
        "LEDGER_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/ledger",
        "LEDGER_HOME": str(tmp_path / "home"),
        "LEDGER_RECONNECT_TIMEOUT": "1",
    }
    unavailable = ledger(down, "ingest", str(path))
    assert unavailable.returncode == 2, unavailable.stderr
    assert "Traceback" not in unavailable.stderr


def test_help_documents_the_exit_codes_and_strict(cli_env: dict[str, str]) -> None:
    result = ledger({**cli_env, "COLUMNS": "200"}, "ingest", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--strict" in text
    for needle in ("Exit status: 0", "4 some records rejected", "5 with --strict", "2 a usage"):
        assert needle in text, text


CSV_HEADER = "type,account,contract,exec_id,side,qty,price,occurred_at"
CSV_FILL = "fill,ACC-1,CON.F.US.EP.Z26,C-1,BUY,2,5000.25,2026-11-23T14:30:00Z"
CSV_INSTRUMENT_HEADER = "type,contract,tick_size,tick_value,currency"
CSV_INSTRUMENT = "instrument,CON.F.US.EP.Z26,0.25,12.50,USD"


def test_retry_reads_a_csv_dead_letter_as_csv_and_stats_count_the_resolved(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    early = write(tmp_path / "early.csv", [CSV_HEADER, CSV_FILL])  # no instrument yet
    counts = counts_of(ledger(cli_env, "ingest", str(early), "-f", "json"), 4)
    assert counts["rejected"] == 1
    still = json.loads(ledger(cli_env, "rejected", "--retry", "-f", "json").stdout)
    assert [r["status"] for r in still] == ["pending"]
    assert "UNKNOWN_INSTRUMENT" in still[0]["outcome"]  # read as CSV, not INVALID_JSON
    inst = write(tmp_path / "inst.csv", [CSV_INSTRUMENT_HEADER, CSV_INSTRUMENT])
    counts_of(ledger(cli_env, "ingest", str(inst), "-f", "json"), 0)
    done = json.loads(ledger(cli_env, "rejected", "--retry", "-f", "json").stdout)
    assert [r["status"] for r in done] == ["resolved"], done
    assert "appended 1" in done[0]["outcome"]
    assert fetchval(db_url, "SELECT payload->>'exec_id' FROM events WHERE type = 'fill'") == "C-1"
    s = stats(cli_env)
    assert s["retried"] == {"resolved": 1, "appended": 1, "duplicates": 0}
    assert s["dead_letters"] == {"pending": 0, "resolved": 1}
    assert s["rejected"] == s["dead_letters"]["pending"] + s["dead_letters"]["resolved"]
    assert s["retried"]["resolved"] == s["dead_letters"]["resolved"]
    assert s["consistent"] is True
    # re-ingesting the file now finds the fill in the log: a duplicate, exit 0
    again = counts_of(ledger(cli_env, "ingest", str(early), "-f", "json"), 0)
    assert (again["duplicates"], again["already_rejected"]) == (1, 0)


def test_a_csv_file_with_a_wrong_header_is_a_csv_error_naming_the_column(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    path = write(tmp_path / "wrong.csv", [CSV_HEADER.replace("exec_id", "Exec ID"), CSV_FILL])
    counts = counts_of(ledger(cli_env, "ingest", str(path), "-f", "json"), 4)
    assert counts["rejected"] == 2  # the header and its row
    rows = json.loads(ledger(cli_env, "rejected", "-f", "json").stdout)
    assert [r["reason"] for r in rows] == ["INVALID_RECORD", "INVALID_RECORD"]
    for row in rows:
        assert "CSV header" in row["message"] and "column 4 'Exec ID'" in row["message"], row
