"""`ledger demo` end to end on the embedded default (no configuration at all)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path

from ledger.cli.demo import generate_day, try_next

ROOT = Path(__file__).resolve().parents[2]
LEDGER = Path(sys.executable).parent / "ledger"


def _ledger(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _without_ledger_on_path(env: dict[str, str]) -> dict[str, str]:
    """The environment of a fresh shell: the venv's `bin` is not on PATH."""
    bins = {str(LEDGER.parent), str(ROOT / ".venv" / "bin")}
    path = [p for p in env.get("PATH", os.defpath).split(os.pathsep) if p and p not in bins]
    return {**env, "PATH": os.pathsep.join(path)}


def _open_positions_have_figures(rows: list[dict[str, object]], what: str) -> None:
    open_rows = [r for r in rows if str(r["signed_qty"]) != "0"]
    assert open_rows, f"{what}: no open positions in {rows}"
    for row in open_rows:
        for key in ("avg_open_price", "unrealized_pnl", "mark_price"):
            assert row[key] not in (None, ""), f"{what}: empty {key} in {row}"


def test_demo_runs_end_to_end_on_the_embedded_default(tmp_path: Path) -> None:
    """Today's day (the default), whatever the time: positions carry their marks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["LEDGER_HOME"] = str(tmp_path / "home")
    env["COLUMNS"] = "200"
    args = ("demo", "--accounts", "2", "--fills", "40", "--seed", "3")
    try:
        first = _ledger(env, *args)
        assert first.returncode == 0, first.stdout + first.stderr
        out = first.stdout
        found = re.search(r"demo\S* — (\d{4}-\d{2}-\d{2}) \(seed 3\)", out)
        assert found, out
        day = date.fromisoformat(found.group(1))
        assert day == datetime.now(UTC).date() or day < datetime.now(UTC).date()
        plan = generate_day(seed=3, accounts=2, fills=40, day=day)
        records = len(plan.records)
        assert f"received {records}, appended {records}, duplicates 0, rejected 0" in out, out
        assert "POSITION_QTY_BREAK" in out  # the broker report that disagrees
        assert "breaks 1 " in out
        assert "positions are identical to before" in out
        report = tmp_path / "home" / "demo" / f"eod-{day}.html"
        assert report.is_file() and "<svg" in report.read_text()
        assert (tmp_path / "home" / "pgdata" / "PG_VERSION").is_file()
        positions = _ledger(env, "positions", "--format", "json")
        assert positions.returncode == 0, positions.stderr
        _open_positions_have_figures(json.loads(positions.stdout), "ledger positions")
        again = _ledger(env, *args)  # re-running is safe: idempotent ingestion
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"received {records}, appended 0, duplicates {records}, rejected 0" in again.stdout
    finally:
        _ledger(env, "db", "stop")


def test_the_demos_try_next_lines_run_as_printed(tmp_path: Path) -> None:
    """Each "try next" line, run by a shell without the venv on PATH, works and shows figures."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["LEDGER_HOME"] = str(tmp_path / "home")
    env["HOME"] = str(tmp_path)
    env["COLUMNS"] = "200"
    day = date(2026, 11, 20)
    args = ("demo", "--accounts", "2", "--fills", "30", "--seed", "5", "--day", day.isoformat())
    try:
        demo = _ledger(env, *args)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        plan = generate_day(seed=5, accounts=2, fills=30, day=day)
        shell = _without_ledger_on_path(env)
        lines = try_next(plan, datetime.now(UTC), command=str(LEDGER))
        assert len(lines) >= 6
        for line in lines:
            expected = re.search(r"#.*\bexit (\d+)", line)
            run = subprocess.run(
                ["bash", "-c", line], env=shell, capture_output=True, text=True, timeout=300
            )
            said = f"{line!r}: {run.returncode}\n{run.stdout}\n{run.stderr}"
            assert run.returncode == (int(expected.group(1)) if expected else 0), said
            assert run.stdout.strip() and "Traceback" not in run.stderr, said
            command = re.sub(r"\s+#.*$", "", line)
            if " positions " in command:
                as_json = subprocess.run(
                    ["bash", "-c", f"{command} --format json"],
                    env=shell,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                assert as_json.returncode == 0, as_json.stderr
                _open_positions_have_figures(json.loads(as_json.stdout), line)
    finally:
        _ledger(env, "db", "stop")


def test_ledger_command_is_the_full_path_unless_path_finds_it(tmp_path: Path) -> None:
    probe = (
        "import sys; sys.argv = [sys.argv[1]]; "
        "from ledger.cli.demo import ledger_command; print(ledger_command())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    fresh = _without_ledger_on_path(env)
    for argv0 in (str(LEDGER), "ledger"):
        run = subprocess.run(
            [sys.executable, "-c", probe, argv0],
            env=fresh,
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path,
        )
        assert run.stdout.strip() == str(LEDGER), argv0
    on_path = {**env, "PATH": f"{LEDGER.parent}{os.pathsep}{fresh['PATH']}"}
    run = subprocess.run(
        [sys.executable, "-c", probe, str(LEDGER)],
        env=on_path,
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert run.stdout.strip() == "ledger"
