"""Progress bars go to a terminal's stderr only: scripted output stays clean."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import orjson
from cli_testing import instrument, invoke

ES = "CON.F.US.EP.Z26"


def fills(n: int) -> bytes:
    records = [instrument(ES, "0.25", "12.50")] + [
        {
            "type": "fill",
            "account": "ACC-1",
            "contract": ES,
            "exec_id": f"T-{i}",
            "side": "BUY" if i % 2 else "SELL",
            "qty": "1",
            "price": "5000.25",
            "occurred_at": f"2026-11-23T10:{i // 60:02d}:{i % 60:02d}Z",
        }
        for i in range(n)
    ]
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


def on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str, bytes]:
    """Run ``ledger ARGS`` with stderr on a pseudo-terminal; return (status, stdout, tty)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ledger", *args],
        stdout=subprocess.PIPE,
        stderr=follower,
        env={**env, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    stdout = proc.communicate(timeout=120)[0].decode()
    os.close(leader)
    return proc.returncode, stdout, seen


def test_verify_shows_its_bars_on_a_terminal_and_nothing_in_a_pipe(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    day = tmp_path / "day.jsonl"
    day.write_bytes(fills(300))
    assert invoke("ingest", str(day)).exit_code == 0
    status, stdout, tty = on_a_terminal(["verify", "--format", "json"], cli_env)
    assert status == 0, (stdout, tty)
    assert b"hash chains" in tty and b"replaying streams" in tty
    assert orjson.loads(stdout)["events"] == 301  # stdout holds the JSON alone

    piped = subprocess.run(
        [sys.executable, "-m", "ledger", "verify", "--format", "json"],
        capture_output=True,
        env=cli_env,
        timeout=120,
    )
    assert piped.returncode == 0, piped.stderr
    assert b"hash chains" not in piped.stderr and b"\x1b[" not in piped.stderr
    assert orjson.loads(piped.stdout)["events"] == 301


def test_report_shows_a_bar_on_a_terminal(cli_env: dict[str, str], tmp_path: Path) -> None:
    day = tmp_path / "day.jsonl"
    day.write_bytes(fills(10))
    assert invoke("ingest", str(day)).exit_code == 0
    args = ["report", "--date", "2026-11-23", "--out", str(tmp_path / "eod")]
    status, stdout, tty = on_a_terminal(args, cli_env)
    assert status == 0, (stdout, tty)
    assert b"replaying streams" in tty
    assert "eod-2026-11-23.html" in stdout
