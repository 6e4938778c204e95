"""A PostgreSQL restart under a running command, and failures to connect (issue 17, 7 and 11).

Against the session's real server, which the tests stop and start again: ``ledger
project --follow`` survives a restart during its first catch-up (it died with
``InternalClientError: cannot switch to state 12``), ``ledger ingest`` retries the batch
a restart cut off instead of printing a traceback, and every failure to connect is one
line with the password masked.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from cli_testing import free_port
from pytest_postgresql.executors import PostgreSQLExecutor
from test_consume import INSTRUMENT, fill

ROOT = Path(__file__).resolve().parents[2]
BOOT = "from ledger.cli import main; main()"
SECRET = "S3CRETPW"


def query(url: str, sql: str) -> Any:
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
            return conn.execute(sql).fetchone()
    except psycopg.OperationalError:
        return None


def ledger(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BOOT, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )


def write_day(path: Path, n: int) -> Path:
    path.write_bytes(
        b"".join(orjson.dumps(r) + b"\n" for r in [INSTRUMENT, *(fill(i) for i in range(n))])
    )
    return path


def restart(server: PostgreSQLExecutor) -> None:
    """Stop the server (fast: every session is cut) and start it again."""
    try:
        server.stop()
        time.sleep(0.5)
    finally:
        server.start()


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def test_project_follow_survives_a_restart_during_its_first_catch_up(
    cli_env: dict[str, str], db_url: str, pg_server: PostgreSQLExecutor, tmp_path: Path
) -> None:
    n = 3000
    assert ledger(cli_env, "ingest", str(write_day(tmp_path / "d.jsonl", n))).returncode == 0
    env = {**cli_env, "LEDGER_PROJECTION_BATCH": "10", "LEDGER_REBUILD_WORKERS": "1"}
    log = tmp_path / "follow.log"
    with log.open("wb") as handle:
        follower = subprocess.Popen(
            [sys.executable, "-c", BOOT, "project", "--follow"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=handle,
            cwd=ROOT,
        )
    projected = "SELECT coalesce(max(position), 0) FROM projection_checkpoint"
    head = query(db_url, "SELECT max(global_position) FROM events")[0]
    try:
        wait_for(lambda: (query(db_url, projected) or (0,))[0] > 0, 60, "the first page")
        assert "following the log" not in log.read_text(), "still in its first catch-up"
        restart(pg_server)
        wait_for(lambda: (query(db_url, projected) or (0,))[0] >= head, 120, "the catch-up")
        wait_for(lambda: "following the log" in log.read_text(), 60, "following")
        assert follower.poll() is None, log.read_text()[-4000:]
    finally:
        follower.send_signal(signal.SIGTERM)
        code = follower.wait(60)
    text = log.read_text()
    assert code == 0, text[-4000:]
    assert "lost the database while catching up the projections" in text
    assert "Traceback" not in text
    verified = ledger(cli_env, "verify", "--format", "json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"], verified.stdout


def test_ingest_retries_the_batch_a_restart_cut_off(
    cli_env: dict[str, str], db_url: str, pg_server: PostgreSQLExecutor, tmp_path: Path
) -> None:
    n = 4000
    day = write_day(tmp_path / "d.jsonl", n)
    log = tmp_path / "ingest.log"
    out = tmp_path / "ingest.json"
    with log.open("wb") as handle, out.open("wb") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-c", BOOT, "ingest", str(day), "--batch-size", "10", "-f", "json"],
            env=cli_env,
            stdout=stdout,
            stderr=handle,
            cwd=ROOT,
        )
    count = "SELECT count(*) FROM events"
    try:
        wait_for(lambda: (query(db_url, count) or (0,))[0] >= 200, 60, "the first batches")
        assert proc.poll() is None, "ingest must still be running at the restart"
        restart(pg_server)
    finally:
        code = proc.wait(180)
    text = log.read_text()
    assert code == 0, text[-4000:]
    assert "lost the database while writing a batch" in text
    assert "Traceback" not in text
    counts = json.loads(out.read_text())
    assert counts["received"] == n + 1
    assert counts["received"] == counts["appended"] + counts["duplicates"] + counts["rejected"]
    # every record is in the log once: a second run finds them all there
    again = ledger(cli_env, "ingest", str(day), "-f", "json")
    assert json.loads(again.stdout)["appended"] == 0
    assert query(db_url, "SELECT count(*), count(DISTINCT event_id) FROM events") == (n + 1,) * 2


def _one_masked_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("command", [["positions"], ["db", "init"], ["ingest", "-"]])
def test_a_url_that_is_not_postgresql_is_refused_on_one_masked_line(
    cli_env: dict[str, str], command: list[str]
) -> None:
    env = {**cli_env, "LEDGER_DATABASE_URL": f"mysql://admin:{SECRET}@127.0.0.1:3306/ledger"}
    line = _one_masked_line(ledger(env, *command))
    assert "mysql://admin:***@127.0.0.1:3306/ledger" in line


def test_a_refused_port_on_db_init_is_one_masked_line(cli_env: dict[str, str]) -> None:
    url = f"postgresql://ledger:{SECRET}@127.0.0.1:{free_port()}/ledger"
    for command in (["db", "init"], ["positions"], ["db", "status"]):
        line = _one_masked_line(ledger({**cli_env, "LEDGER_DATABASE_URL": url}, *command))
        assert "cannot reach the database" in line


def test_an_unknown_user_is_one_masked_line(
    cli_env: dict[str, str], pg_server: PostgreSQLExecutor
) -> None:
    url = f"postgresql://nosuchuser:{SECRET}@{pg_server.host}:{pg_server.port}/postgres"
    for command in (["db", "init"], ["positions"]):
        line = _one_masked_line(ledger({**cli_env, "LEDGER_DATABASE_URL": url}, *command))
        assert "nosuchuser" in line
