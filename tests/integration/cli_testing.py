"""Helpers shared by the CLI-level tests (not a test module)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg
from typer.testing import CliRunner

from ledger.cli import app
from ledger.db import make_engine, plain_url
from ledger.events import parse_event
from ledger.integrity import append_seal
from ledger.store import EventStore
from projections.runner import ProjectionRunner

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_nats(port: int, store: Path, log: Path, timeout: float = 15) -> subprocess.Popen[bytes]:
    """Start a JetStream nats-server of the test's own on ``port`` (its store in
    ``store``, its output appended to ``log``); return it once it listens."""
    with log.open("ab") as handle:
        proc = subprocess.Popen(
            [NATS_SERVER, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError(f"nats-server did not listen on {port} within {timeout} s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``proc``; SIGKILL it after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def instrument(contract: str, tick_size: str, tick_value: str) -> dict[str, Any]:
    """Return a native instrument record."""
    return {
        "type": "instrument",
        "contract": contract,
        "tick_size": tick_size,
        "tick_value": tick_value,
    }


def seed(db_url: str, records: list[dict[str, Any]], *, seal: bool = False) -> None:
    """Append each record in its own transaction (arrival order = list order)."""

    async def _seed() -> None:
        engine = make_engine(db_url)
        try:
            store = EventStore(engine)
            for record in records:
                await store.append([parse_event(record)])
            if seal:
                await ProjectionRunner(engine).catch_up()
                assert await append_seal(engine) is not None
        finally:
            await engine.dispose()

    asyncio.run(_seed())


def fetchval(db_url: str, sql: str) -> Any:
    """Return one value of ``sql`` on the test's database."""

    async def _fetch() -> Any:
        conn = await asyncpg.connect(plain_url(db_url))
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(_fetch())


def invoke(*args: str) -> Any:
    """Invoke the CLI in-process (the environment comes from the cli_env fixture)."""
    return CliRunner().invoke(app, list(args))


def as_json(result: Any, code: int = 0) -> Any:
    """Assert the exit code and return the command's JSON output."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    return json.loads(result.stdout)
