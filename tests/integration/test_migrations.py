"""The schema exists only through Alembic: upgrade head and downgrade base both work."""

from __future__ import annotations

import json
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


def test_0008_keeps_the_folded_states_as_lz4_compressed_text(empty_db_url: str) -> None:
    """States written as jsonb before 0008 read back as the same JSON after it, from a
    text column compressed with lz4 (Debian's server has it); and back down again."""
    _alembic(empty_db_url, "upgrade", "0007")
    lots = [{"exec_id": f"E-{i}", "qty": "1", "price": "5000.25"} for i in range(200)]
    state = json.dumps({"signed_qty": "200", "lots": lots})
    with psycopg.connect(empty_db_url) as conn:
        conn.execute(
            "INSERT INTO proj_positions (generation, stream, account, contract, signed_qty, "
            "realized_fifo, realized_wac, fees, fill_count, last_position, state) "
            "VALUES (1, 'A/C', 'A', 'C', 200, 0, 0, 0, 200, 200, %s::jsonb)",
            (state,),
        )
    _alembic(empty_db_url, "upgrade", "head")
    with psycopg.connect(empty_db_url) as conn:
        kinds = dict(
            conn.execute(
                "SELECT attrelid::regclass::text, format_type(atttypid, atttypmod) "
                "FROM pg_attribute WHERE attname = 'state' "
                "AND attrelid IN ('proj_positions'::regclass, 'proj_snapshots'::regclass)"
            ).fetchall()
        )
        compression = conn.execute(
            "SELECT attcompression FROM pg_attribute "
            "WHERE attrelid = 'proj_positions'::regclass AND attname = 'state'"
        ).fetchone()
        (text,) = conn.execute("SELECT state FROM proj_positions").fetchone() or ("",)
    assert kinds == {"proj_positions": "text", "proj_snapshots": "text"}
    assert compression == ("l",)
    assert json.loads(text) == json.loads(state)
    _alembic(empty_db_url, "downgrade", "0007")
    with psycopg.connect(empty_db_url) as conn:
        (back,) = conn.execute("SELECT state FROM proj_positions").fetchone() or (None,)
    assert back == json.loads(state)  # jsonb again (psycopg hands it back parsed)
