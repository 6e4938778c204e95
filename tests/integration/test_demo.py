"""`ledger demo` end to end on the embedded default (no configuration at all)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _ledger(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_runs_end_to_end_on_the_embedded_default(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["LEDGER_HOME"] = str(tmp_path / "home")
    env["COLUMNS"] = "200"
    args = ("demo", "--accounts", "2", "--fills", "40", "--day", "2026-11-20", "--seed", "3")
    try:
        first = _ledger(env, *args)
        assert first.returncode == 0, first.stdout + first.stderr
        out = first.stdout
        assert "received 57, appended 57, duplicates 0, rejected 0" in out, out
        assert "POSITION_QTY_BREAK" in out  # the broker report that disagrees
        assert "breaks 1 " in out
        assert "positions are identical to before" in out
        report = tmp_path / "home" / "demo" / "eod-2026-11-20.html"
        assert report.is_file() and "<svg" in report.read_text()
        assert (tmp_path / "home" / "pgdata" / "PG_VERSION").is_file()
        again = _ledger(env, *args)  # re-running is safe: idempotent ingestion
        assert again.returncode == 0, again.stdout + again.stderr
        assert "received 57, appended 0, duplicates 57, rejected 0" in again.stdout
    finally:
        _ledger(env, "db", "stop")
