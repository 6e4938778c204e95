"""The schema exists only through Alembic: upgrade head and downgrade base both work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

from ledger.ingest import dead_letter_key
from ledger.sources import SourceRef

ROOT = Path(__file__).resolve().parents[2]


def _alembic(url: str, *args: str) -> None:
    env = {**os.environ, "LEDGER_DATABASE_URL": url}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {r[0] for r in rows}


def test_upgrade_head_downgrade_base_and_up_again(empty_db_url: str) -> None:
    assert _tables(empty_db_url) == set()
    _alembic(empty_db_url, "upgrade", "head")
    created = _tables(empty_db_url)
    assert {"events", "streams", "rejected", "counters", "projection_checkpoint"} <= created
    assert {"proj_positions", "proj_history", "proj_pnl_daily", "proj_snapshots"} <= created
    _alembic(empty_db_url, "downgrade", "base")
    assert _tables(empty_db_url) == {"alembic_version"}
    _alembic(empty_db_url, "upgrade", "head")
    assert _tables(empty_db_url) == created
    with psycopg.connect(empty_db_url) as conn:
        triggers = {
            r[0]
            for r in conn.execute(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = 'events'::regclass"
            ).fetchall()
        }
    assert {"events_no_update_delete", "events_no_truncate", "events_notify"} <= triggers


def test_0006_keys_old_dead_letters_and_folds_their_copies(empty_db_url: str) -> None:
    """An older version dead-lettered a re-ingested file's bad lines twice: keep one."""
    _alembic(empty_db_url, "upgrade", "0005")
    rows = [
        # (source, line, idx, raw, reason, status)
        ("day.jsonl", 3, None, b"{bad", "INVALID_JSON", "pending"),
        ("day.jsonl", 4, None, b'{"type":"fill"}', "INVALID_RECORD", "pending"),
        ("day.jsonl", 3, None, b"{bad", "INVALID_JSON", "pending"),  # the re-ingest
        ("day.jsonl", 4, None, b'{"type":"fill"}', "INVALID_RECORD", "resolved"),
        ("nats:ledger.in.fills", 17, 1, b"[1,2]", "INVALID_RECORD", "pending"),
        ("nats:ledger.in.fills", 17, 1, b"[1,2]", "INVALID_RECORD", "pending"),  # redelivered
        ("nats:ledger.in.fills", 17, 1, b"[1,2]", "INVALID_RECORD", "pending"),
        ("api", None, None, b"{}", "INVALID_RECORD", "pending"),
    ]
    with psycopg.connect(empty_db_url) as conn:
        for source, line, idx, raw, reason, status in rows:
            conn.execute(
                "INSERT INTO rejected (source, line, idx, raw, reason, message, status) "
                "VALUES (%s, %s, %s, %s, %s, 'm', %s)",
                (source, line, idx, raw, reason, status),
            )
        counters = {
            "received": 10,
            "appended": 2,
            "duplicates": 0,
            "rejected": 8,
            "rejected.INVALID_JSON": 2,
            "rejected.INVALID_RECORD": 6,
        }
        for name, value in counters.items():
            conn.execute("INSERT INTO counters (name, value) VALUES (%s, %s)", (name, value))
    _alembic(empty_db_url, "upgrade", "head")
    with psycopg.connect(empty_db_url) as conn:
        kept = conn.execute(
            "SELECT id, source, line, idx, raw, status, dead_key FROM rejected ORDER BY id"
        ).fetchall()
        after = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    assert [(r[0], r[5]) for r in kept] == [
        (1, "pending"),
        (4, "resolved"),
        (5, "pending"),
        (8, "pending"),
    ]
    for _id, source, line, idx, raw, _status, key in kept:
        assert bytes(key) == dead_letter_key(SourceRef(source, line, idx), bytes(raw))
    assert after["rejected"] == 4 and after["already_rejected"] == 4
    assert after["rejected.INVALID_JSON"] == 1 and after["rejected.INVALID_RECORD"] == 3
    assert after["duplicates"] == 4
    assert after["received"] == after["appended"] + after["duplicates"] + after["rejected"]
    with psycopg.connect(empty_db_url) as conn, conn.cursor() as cur:
        try:
            cur.execute(
                "INSERT INTO rejected (source, raw, reason, message, dead_key) "
                "SELECT source, raw, reason, message, dead_key FROM rejected WHERE id = 1"
            )
        except psycopg.errors.UniqueViolation:
            pass
        else:
            raise AssertionError("a second dead letter with the same key was accepted")
    _alembic(empty_db_url, "downgrade", "0005")
    _alembic(empty_db_url, "upgrade", "head")
