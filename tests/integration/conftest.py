"""Integration fixtures: a private NATS JetStream server per test.

The server is started here, on a free port with its own store directory (never one
that merely happens to be running, e.g. on 4222), and stopped after the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_testing import NATS_SERVER, free_port, start_nats, stop_process


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """Start a JetStream-enabled nats-server of the test's own; yield its URL."""
    if not Path(NATS_SERVER).exists():
        pytest.skip("nats-server is not installed")
    port = free_port()
    proc = start_nats(port, tmp_path / "jetstream", tmp_path / "nats-server.log")
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        stop_process(proc)
