"""The README's tour, run as a new user runs it: every `ledger` line, as written.

The fenced shell blocks of the README's tour section(s) are turned into one bash
script, run from a scratch directory that holds the repository's `examples/` and
`.venv` (so relative paths and the README's own activation step work as written), on a
fresh embedded database (``LEDGER_DATABASE_URL`` unset, a private ``LEDGER_HOME`` and
``HOME``: the user's real home is never touched). ``PATH`` starts *without* the
virtual environment's `bin`, so the README's activation step is what makes `ledger` a
command, as on a fresh machine.

Each `ledger` line must exit with 0, or with the status its comment documents
("exit 3"), and print something. Positions and P&L lines are run a second time with
``--format json`` added (unless they name a format) and their rows must carry figures:
an open position its ``unrealized_pnl`` and ``mark_price``, a P&L row its
``realized_pnl``. Lines that never end by themselves run under ``timeout`` and are
stopped with SIGTERM (their documented way to stop): ``ledger project --follow`` as
written, ``ledger consume`` with its ``--servers`` pointed at a private JetStream
server (the README's 127.0.0.1:4222 may be anyone's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# a line's comment documenting a non-zero exit status, e.g. "# exit 3: breaks"
_EXIT = re.compile(r"#.*\bexit (\d+)\b")
# "received 15, appended 12, duplicates 0, rejected 3" in a comment: the figures to see
_COUNTS = re.compile(r"\b(received|appended|duplicates|rejected) (\d+)\b")
_FOLLOWS = ("ledger project --follow", "ledger consume")  # run until SIGTERM
_RUN_FOR_S = 12


@dataclass(frozen=True)
class Step:
    """One line of the tour: a `ledger` command or a shell line that sets one up."""

    index: int
    line: str

    @property
    def command(self) -> str:
        """The line without its trailing comment."""
        return re.sub(r"\s+#.*$", "", self.line).strip()

    @property
    def is_ledger(self) -> bool:
        return self.command.startswith("ledger ")

    @property
    def expected_status(self) -> int:
        found = _EXIT.search(self.line)
        return int(found.group(1)) if found else 0

    @property
    def follows(self) -> bool:
        return self.command.startswith(_FOLLOWS)

    @property
    def wants_figures(self) -> bool:
        words = self.command.split()
        return len(words) > 1 and words[1] in ("positions", "pnl")


def tour_blocks(text: str) -> list[str]:
    """Return the fenced shell blocks of every section whose heading names the tour."""
    blocks: list[str] = []
    in_tour = False
    fence: list[str] | None = None
    for line in text.splitlines():
        if fence is not None:
            if line.startswith("```"):
                blocks.append("\n".join(fence))
                fence = None
            else:
                fence.append(line)
        elif line.startswith("#") and not line.startswith("```"):
            heading = re.match(r"(#+)\s+(.*)", line)
            if heading and len(heading.group(1)) <= 2:
                in_tour = "tour" in heading.group(2).lower()
        elif in_tour and re.match(r"```(sh|bash|shell|console)\s*$", line):
            fence = []
    return blocks


def tour_steps(text: str) -> list[Step]:
    """Return the tour's lines to run (continuations joined, comments-only lines left out)."""
    steps: list[Step] = []
    pending = ""
    for block in tour_blocks(text):
        for raw in block.splitlines():
            line = pending + raw.strip()
            if line.endswith("\\"):
                pending = line[:-1].rstrip() + " "
                continue
            pending = ""
            if line and not line.startswith("#"):
                steps.append(Step(len(steps), line))
    return steps


def _script(steps: list[Step], out: Path, nats_url: str) -> str:
    parts = ['cd "$TOUR_DIR"']
    for step in steps:
        rc = out / f"{step.index}.rc"
        if not step.is_ledger:
            parts.append(f"{step.line}\necho $? > {rc}")
            continue
        command = step.command
        if command.startswith("ledger consume"):
            command = re.sub(r"--servers\s+\S+", f"--servers {nats_url}", command)
        if step.follows:
            command = f"timeout --preserve-status -s TERM {_RUN_FOR_S} {command}"
        parts.append(
            f"{{\n{command}\n}} > {out / f'{step.index}.out'} 2> {out / f'{step.index}.err'}"
            f" < /dev/null\necho $? > {rc}"
        )
        if step.wants_figures and "--format" not in command:
            parts.append(
                f"{{\n{command} --format json\n}} > {out / f'{step.index}.json'}"
                f" 2> {out / f'{step.index}.json.err'} < /dev/null"
            )
        elif step.wants_figures:
            parts.append(f"cp {out / f'{step.index}.out'} {out / f'{step.index}.json'}")
    return "\n".join(parts) + "\n"


def _rows(document: Any) -> list[dict[str, Any]]:
    rows = document["rows"] if isinstance(document, dict) else document
    assert isinstance(rows, list)
    return rows


def _check_figures(step: Step, rows: list[dict[str, Any]]) -> None:
    assert rows, f"{step.line!r}: no rows"
    kind = step.command.split()[1]
    for row in rows:
        if kind == "positions":
            if str(row["signed_qty"]) in ("0", "0.0"):
                continue
            for key in ("signed_qty", "avg_open_price", "unrealized_pnl", "mark_price"):
                assert row.get(key) not in (None, ""), f"{step.line!r}: empty {key} in {row}"
        else:  # whatever the P&L columns are called, each has a figure
            pnl = [key for key in row if "pnl" in key]
            assert pnl, f"{step.line!r}: no P&L column in {row}"
            for key in pnl:
                assert row[key] not in (None, ""), f"{step.line!r}: empty {key} in {row}"
    if kind == "positions":
        assert any(str(r["signed_qty"]) not in ("0", "0.0") for r in rows), rows


@pytest.mark.slow
def test_every_tour_command_of_the_readme_runs_as_written(tmp_path: Path, nats_url: str) -> None:
    steps = tour_steps(README.read_text())
    ledger_steps = [s for s in steps if s.is_ledger]
    assert len(ledger_steps) >= 20, [s.line for s in steps]  # the parser found the tour
    venv = ROOT / ".venv" if (ROOT / ".venv" / "bin" / "ledger").exists() else Path(sys.prefix)
    assert (venv / "bin" / "ledger").exists(), f"no ledger command in {venv}/bin"

    tour_dir = tmp_path / "tour"
    tour_dir.mkdir()
    shutil.copytree(ROOT / "examples", tour_dir / "examples")
    (tour_dir / ".venv").symlink_to(venv)
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    bins = {str(venv / "bin"), str(Path(sys.executable).parent)}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEDGER_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", os.defpath).split(os.pathsep) if p and p not in bins
    )
    env.update(
        HOME=str(home),
        LEDGER_HOME=str(tmp_path / "ledger-home"),
        TOUR_DIR=str(tour_dir),
        COLUMNS="250",
    )
    script = tmp_path / "tour.sh"
    script.write_text(_script(steps, out, nats_url))
    try:
        run = subprocess.run(
            ["bash", str(script)],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert run.returncode == 0, run.stderr
        for step in steps:
            rc_file = out / f"{step.index}.rc"
            assert rc_file.exists(), f"{step.line!r} did not run"
            status = int(rc_file.read_text())
            if not step.is_ledger:
                assert status == 0, f"{step.line!r} exited {status}"
                continue
            stdout = (out / f"{step.index}.out").read_text()
            stderr = (out / f"{step.index}.err").read_text()
            said = f"{step.line!r} exited {status}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
            assert status == step.expected_status, said
            assert "Traceback" not in stderr, said
            if not step.follows:
                assert stdout.strip(), said
            for word, figure in _COUNTS.findall(step.line.partition("#")[2]):
                assert re.search(rf"\b{word}\D{{0,3}}{figure}\b", stdout), said
            if step.wants_figures:
                document = json.loads((out / f"{step.index}.json").read_text())
                _check_figures(step, _rows(document))
        report = list((tour_dir / "eod").glob("*.html"))
        assert report, "ledger report wrote no HTML page"
    finally:
        subprocess.run(
            [str(venv / "bin" / "ledger"), "db", "stop"],
            env=env,
            capture_output=True,
            timeout=120,
        )


def test_the_tour_parser_finds_commands_comments_and_exit_statuses() -> None:
    text = (
        "## A tour\n\nprose\n\n```sh\nsource .venv/bin/activate  # put ledger on PATH\n"
        "ledger ingest x.jsonl   # received 2, appended 1\n# a comment line\n"
        "ledger reconcile \\\n  --propose  # exit 3: breaks\n```\n\n"
        "```python\nledger = 1\n```\n\n## Other\n\n```sh\nledger not-the-tour\n```\n"
    )
    steps = tour_steps(text)
    assert [s.command for s in steps] == [
        "source .venv/bin/activate",
        "ledger ingest x.jsonl",
        "ledger reconcile --propose",
    ]
    assert [s.is_ledger for s in steps] == [False, True, True]
    assert [s.expected_status for s in steps] == [0, 0, 3]
    assert _COUNTS.findall(steps[1].line) == [("received", "2"), ("appended", "1")]
