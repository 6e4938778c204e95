"""Past one machine: failover drills, standby reads and the old primary's return.

Against the real pg_auto_failover cluster of ``scripts/cluster`` (monitor, primary,
synchronous standby). In each drill ``ledger ingest`` appends a file in batches,
``ledger consume`` takes a JetStream feed and ``ledger project --follow`` follows the
log, all through the multi-host URL; the primary's machine is SIGKILLed (keeper and
postgres) at a kill point; the monitor promotes the standby; the writers reconnect and
finish. Then every acknowledged record is in the log exactly once, the counters add up,
``ledger verify`` is clean, the projections equal a fresh rebuild, and the old primary
comes back as a standby that never took a write the new primary lacks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from cli_testing import invoke
from ha_cluster import HACluster, ha_cluster  # noqa: F401 - the session fixture
from test_consume import INSTRUMENT, fill, publish

ROOT = Path(__file__).resolve().parents[2]
BOOT = "from ledger.cli import main; main()"
FILE_FILLS = 1000
FEED_FILLS = 600


def query(url: str, sql: str, *params: Any, settle: float = 30.0) -> list[tuple[Any, ...]]:
    """Run ``sql`` on the primary; a connection refused while the cluster settles after a
    failover (seen once right after the writers had finished on the new primary) is
    tried again for up to ``settle`` seconds."""
    deadline = time.monotonic() + settle
    while True:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
                return conn.execute(sql, params).fetchall()
        except psycopg.OperationalError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def start(
    env: dict[str, str], log: Path, *args: str, output: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a ``ledger`` command; its stderr goes to ``log``, its stdout to ``output``."""
    with log.open("ab") as handle, (output or Path(os.devnull)).open("wb") as stdout:
        return subprocess.Popen(
            [sys.executable, "-c", BOOT, *args], env=env, stdout=stdout, stderr=handle, cwd=ROOT
        )


def file_records() -> list[dict[str, Any]]:
    """The file `ledger ingest` appends: an instrument, fills, and off-tick rejects."""
    records: list[dict[str, Any]] = [INSTRUMENT]
    for i in range(FILE_FILLS):
        record = fill(i)
        record["exec_id"] = f"F{i}"
        if i % 100 == 99:
            record["price"] = "6000.10"  # off the 0.25 grid: dead-lettered
        records.append(record)
    return records


def feed_records() -> list[dict[str, Any]]:
    """The JetStream feed `ledger consume` takes: fills of other accounts."""
    out = []
    for i in range(FEED_FILLS):
        record = fill(i)
        record["exec_id"] = f"N{i}"
        record["account"] = f"FEED{i % 5}"
        out.append(record)
    return out


@pytest.fixture
def ha_env(
    ha_cluster: HACluster,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[dict[str, str]]:
    """A fresh migrated database on the cluster; the CLI's environment pointing at it.

    Set in this process too (for in-process ``invoke``) and returned for subprocesses.
    """
    ha_cluster.heal()
    ha_cluster.wait_healthy()
    db = ha_cluster.new_database()
    settings = {
        "LEDGER_DATABASE_URL": ha_cluster.url(db),
        "LEDGER_HOME": str(tmp_path / "home"),
        "LEDGER_RECONNECT_TIMEOUT": "90",
    }
    monkeypatch.delenv("LEDGER_READ_URL", raising=False)
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    env = {**os.environ, **settings, "HA_DB": db}
    yield env


def cli(*args: str) -> Any:
    """Run a ledger command in-process; assert it succeeded; return its stdout as JSON."""
    result = invoke(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def file_events(url: str) -> int:
    """How many of the file's fills (exec ids F...) are in the log so far."""
    try:
        return int(
            query(
                url, "SELECT count(*) FROM events WHERE payload->>'exec_id' LIKE 'F%%'", settle=0
            )[0][0]
        )
    except psycopg.Error:
        return -1


@pytest.mark.parametrize("kill_at", [50, 600], ids=["early", "late"])
def test_failover_drill_loses_no_acknowledged_event(
    ha_cluster: HACluster,  # noqa: F811
    ha_env: dict[str, str],
    nats_url: str,
    tmp_path: Path,
    kill_at: int,
) -> None:
    url = ha_env["LEDGER_DATABASE_URL"]
    day = tmp_path / "day.jsonl"
    day.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in file_records()))
    feed = [("ledger.in.instruments", orjson.dumps(INSTRUMENT))]
    feed += [("ledger.in.fills", orjson.dumps(r)) for r in feed_records()]
    publish(nats_url, feed)
    log = tmp_path / "drill.log"

    follower = start(ha_env, log, "project", "--follow")
    consumer = start(
        ha_env,
        log,
        "consume",
        "--servers",
        nats_url,
        "--no-project",
        "--batch",
        "50",
        "--idle-exit",
        "20",
    )
    counted = tmp_path / "ingest.json"
    ingest = start(
        ha_env, log, "ingest", str(day), "--batch-size", "50", "--format", "json", output=counted
    )

    deadline = time.monotonic() + 120
    while file_events(url) < kill_at:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        assert ingest.poll() is None, f"ingest ended before the kill point: {log.read_text()}"
        time.sleep(0.05)
    old = ha_cluster.primary()
    ha_cluster.kill(old)  # the machine is gone: its keeper and its postgres

    assert ingest.wait(180) == 4, log.read_text()[-4000:]  # 4: some records rejected
    counts = json.loads(counted.read_text())
    assert counts["received"] == FILE_FILLS + 1
    assert counts["received"] == counts["appended"] + counts["duplicates"] + counts["rejected"]
    # a batch written again after the failover finds its dead letters: already_rejected
    assert counts["rejected"] + counts["already_rejected"] == FILE_FILLS // 100
    assert query(url, "SELECT count(*) FROM rejected")[0][0] == FILE_FILLS // 100
    assert consumer.wait(180) == 0, log.read_text()[-4000:]
    assert ha_cluster.primary() != old, "the monitor promoted the standby"
    assert follower.poll() is None, f"project --follow died: {log.read_text()[-4000:]}"
    assert "lost the database" in log.read_text()

    # Every acknowledged record is in the log exactly once: appending the file and the
    # feed again finds every event there already (none appended), and no event id twice.
    again = invoke("ingest", str(day), "--format", "json")
    assert again.exit_code == 4, again.output  # its off-tick fills: already dead-lettered
    assert json.loads(again.stdout)["appended"] == 0
    assert json.loads(again.stdout)["already_rejected"] == FILE_FILLS // 100
    feed_file = tmp_path / "feed.jsonl"
    feed_file.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in feed_records()))
    assert cli("ingest", str(feed_file), "--format", "json") == {
        "received": FEED_FILLS,
        "appended": 0,
        "duplicates": FEED_FILLS,
        "rejected": 0,
        "already_rejected": 0,
        "withheld": 0,
    }
    total, distinct, fills = query(
        url,
        "SELECT count(*), count(DISTINCT event_id), count(*) FILTER (WHERE type = 'fill') "
        "FROM events",
    )[0]
    assert total == distinct
    assert fills == FILE_FILLS - FILE_FILLS // 100 + FEED_FILLS
    stats = cli("stats", "--format", "json")
    assert stats["consistent"], stats

    follower.send_signal(signal.SIGTERM)
    assert follower.wait(60) == 0, log.read_text()[-4000:]

    assert cli("verify", "--format", "json")["ok"]
    before = cli("positions", "--format", "json", "--include-flat")
    assert invoke("rebuild").exit_code == 0
    after = cli("positions", "--format", "json", "--include-flat")
    assert before == after
    assert len(after) == 7 + 5

    # The old primary comes back as a standby of the new one: read-only, and with
    # exactly the new primary's log once it has replayed it (no write of its own).
    ha_cluster.restart(old)
    ha_cluster.wait_healthy()
    assert ha_cluster.standby() == old
    db = ha_env["HA_DB"]
    old_url = ha_cluster.node_url(old, db)
    assert query(old_url, "SELECT pg_is_in_recovery()")[0][0] is True
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        query(old_url, "INSERT INTO counters (name, value) VALUES ('x', 1)")
    lsn = query(ha_cluster.node_url(ha_cluster.primary(), db), "SELECT pg_current_wal_lsn()")
    deadline = time.monotonic() + 30
    while (
        query(old_url, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", lsn[0][0])[0][0] is not True
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ids = "SELECT md5(string_agg(event_id::text, ',' ORDER BY global_position)) FROM events"
    assert query(old_url, ids) == query(url, ids)


def test_standby_reads_equal_the_primarys(
    ha_cluster: HACluster,  # noqa: F811
    ha_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    day = tmp_path / "day.jsonl"
    records = [INSTRUMENT] + [fill(i) for i in range(300)]
    day.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    assert invoke("ingest", str(day)).exit_code == 0
    assert invoke("project").exit_code == 0
    known_at = query(ha_env["LEDGER_DATABASE_URL"], "SELECT max(recorded_at) FROM events")[0][0]
    # later knowledge, projected too: as-known-at the earlier time must not see it
    more = tmp_path / "more.jsonl"
    more.write_bytes(b"".join(orjson.dumps(fill(i)) + b"\n" for i in range(300, 400)))
    assert invoke("ingest", str(more)).exit_code == 0
    assert invoke("project").exit_code == 0

    read_url = ha_cluster.node_url(ha_cluster.standby(), ha_env["HA_DB"])
    clocks = (["--as-of", "2025-01-21T10:02:30+00:00"], ["--as-known-at", known_at.isoformat()], [])
    on_primary = [cli("positions", "--format", "json", "--include-flat", *c) for c in clocks]

    monkeypatch.setenv("LEDGER_READ_URL", read_url)
    # the verify through the standby waits for its replay of the primary's present WAL
    verified = cli("verify", "--format", "json")
    assert verified["ok"] and verified["standby"]["in_recovery"] is True
    for clock, primary in zip(clocks, on_primary, strict=True):
        answer = cli("positions", "--format", "json", "--include-flat", *clock)
        assert answer["rows"] == primary
        assert answer["rows"], clock
        lag = answer["standby"]
        assert lag["in_recovery"] is True
        assert lag["replay_behind_bytes"] is not None
        assert lag["replay_lag_seconds"] is not None
    assert on_primary[1] != on_primary[2], "as-known-at hides the later fills"
    # explain and trail read there too, and say how far behind it was
    explained = cli(
        "explain", "--account", "A1", "--contract", INSTRUMENT["contract"], "-f", "json"
    )
    assert explained["standby"]["in_recovery"] is True
    assert cli("trail", "--account", "A1", "--contract", INSTRUMENT["contract"], "-f", "json")[
        "rows"
    ]

    # Nothing is written there: events appended and not yet projected on the primary are
    # not projected by a read through the standby (it answers what the primary had).
    monkeypatch.delenv("LEDGER_READ_URL")
    assert invoke("ingest", str(write_more(tmp_path))).exit_code == 0
    monkeypatch.setenv("LEDGER_READ_URL", read_url)
    assert cli("positions", "--format", "json", "--include-flat")["rows"] == on_primary[2]


def write_more(tmp_path: Path) -> Path:
    path = tmp_path / "later.jsonl"
    path.write_bytes(b"".join(orjson.dumps(fill(i)) + b"\n" for i in range(400, 450)))
    return path
