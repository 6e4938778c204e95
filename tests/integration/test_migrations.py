"""The schema exists only through Alembic: upgrade head and downgrade base both work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

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
