"""The embedded cluster is its owner's alone (issue 17, item 8).

Runs the CLI on the embedded default (no LEDGER_DATABASE_URL) in a home of the test's
own: another local user (``nobody``) cannot reach the server, neither by TCP nor by its
socket; the CLI works as ``ledger_app``, which can neither switch the log's triggers
off nor set the columns the database assigns.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from ledger.embedded import EmbeddedPostgres, find_bindir

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


def _as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", *args], capture_output=True, text=True, timeout=60
    )


async def _as_app(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.mark.slow
def test_another_local_user_cannot_reach_the_embedded_cluster(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser to act as another local user")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["LEDGER_HOME"] = str(tmp_path / "home")
    cluster = EmbeddedPostgres(tmp_path / "home")
    try:
        first = _ledger(env, "ingest", str(ROOT / "examples" / "day.jsonl"))
        assert first.returncode == 4, first.stderr  # the tour's day: 3 records refused
        status = _ledger(env, "db", "status")
        assert status.returncode == 0 and "postgresql://ledger_app@" in status.stdout
        psql = str(find_bindir() / "psql")
        port = str(cluster.port)
        # no TCP listener at all
        tcp = _as_nobody(psql, "-h", "127.0.0.1", "-p", port, "-U", "ledger", "-d", "ledger",
                         "-c", "SELECT 1")  # fmt: skip
        assert tcp.returncode != 0 and "refused" in tcp.stderr, tcp.stderr
        # the home is walkable (the server runs as postgres), its socket directory is not
        assert _as_nobody("ls", str(cluster.home)).returncode == 0
        disable = "ALTER TABLE events DISABLE TRIGGER USER"
        sock = _as_nobody(psql, "-h", str(cluster.socket_dir), "-p", port, "-U", "ledger",
                          "-d", "ledger", "-c", disable)  # fmt: skip
        assert sock.returncode != 0 and "Permission denied" in sock.stderr, sock.stderr
        assert oct(cluster.socket_dir.stat().st_mode & 0o777) == "0o700"
        # the role the CLI works as cannot switch the log's triggers off ...
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="must be owner"):
            asyncio.run(_as_app(cluster.url, disable))
        # ... nor write its own record time
        insert = (
            "INSERT INTO events (recorded_at, stream, stream_version, event_id, type, "
            "schema_version, payload, occurred_at, content_digest, hash) VALUES "
            "('2000-01-01Z', 'x/y', 1, gen_random_uuid(), 'fill', 1, '{}', now(), '\\x00', "
            "'\\x00')"
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="recorded_at is assigned"):
            asyncio.run(_as_app(cluster.url, insert))
        # and rebuild, project and verify need nothing more than ledger_app has
        for command in ("rebuild", "project", "verify"):
            result = _ledger(env, command)
            assert result.returncode == 0, (command, result.stderr)
    finally:
        _ledger(env, "db", "stop")
