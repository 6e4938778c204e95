"""Integration fixtures: a private NATS JetStream server per test.

The server is started here, on a free port with its own store directory (never one
that merely happens to be running, e.g. on 4222), and stopped after the test.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_testing import NATS_SERVER, free_port


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nats-server did not listen on {port} within {timeout} s")


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """Start a JetStream-enabled nats-server of the test's own; yield its URL."""
    if not Path(NATS_SERVER).exists():
        pytest.skip("nats-server is not installed")
    port = free_port()
    store = tmp_path / "jetstream"
    log = (tmp_path / "nats-server.log").open("wb")
    proc = subprocess.Popen(
        [NATS_SERVER, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_listening(port, proc)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
