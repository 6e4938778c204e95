"""The pg_auto_failover cluster of the HA tests: ``scripts/cluster``, started once a session.

A monitor, a primary and a synchronous standby on loopback ports, from Debian's
packages (``scripts/setup`` installs them). Without ``pg_autoctl`` the fixture fails
with a message that says so: these tests are never skipped in silence.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest

from ledger.db import migrate

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "cluster"
NODES = ("node1", "node2")


def _script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("ledger_cluster_script", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class HACluster:
    """Test-side handle on the running cluster: URLs, node states, losing a machine."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.script = _script()
        self.cluster = self.script.Cluster(home)

    @property
    def ports(self) -> dict[str, int]:
        ports: dict[str, int] = self.cluster._load()["ports"]
        return ports

    def url(self, db: str) -> str:
        """The multi-host, read-write URL of database ``db``."""
        base: str = self.cluster.url()
        return base.replace("/ledger?", f"/{db}?")

    def node_url(self, name: str, db: str) -> str:
        """A URL of one node alone."""
        return f"postgresql://postgres@127.0.0.1:{self.ports[name]}/{db}"

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in self.cluster.nodes()}

    def primary(self) -> str:
        """The node the monitor has as primary (goal state primary or wait_primary)."""
        for name, node in self.nodes().items():
            if node["goal"] in ("primary", "wait_primary", "single"):
                return name
        raise AssertionError(f"no primary: {self.nodes()}")

    def standby(self) -> str:
        (other,) = [n for n in NODES if n != self.primary()]
        return other

    def heal(self) -> None:
        """Start again any node whose keeper is not running (a test that failed midway)."""
        pids = self.cluster._load()["pids"]
        for name in NODES:
            pid = pids.get(name)
            if not pid or not self.script._alive(pid):
                self.restart(name)

    def wait_healthy(self, timeout: float = 120) -> None:
        """Wait for one primary and one secondary, each in its goal state."""
        deadline = time.monotonic() + timeout
        seen: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            try:
                seen = self.nodes()
            except Exception:
                seen = {}
            states = sorted(n["reported"] for n in seen.values() if n["reported"] == n["goal"])
            if states == ["primary", "secondary"]:
                return
            time.sleep(0.25)
        raise AssertionError(f"cluster not healthy within {timeout} s: {seen}")

    def kill(self, name: str) -> None:
        """Lose machine ``name``: SIGKILL its keeper and its postgres."""
        self.cluster.kill(name)

    def restart(self, name: str) -> None:
        self.cluster.restart(name)

    def new_database(self) -> str:
        """Create and migrate a database of the test's own (replicated to the standby)."""
        name = f"t_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        # A standby that has not replayed the CREATE DATABASE yet refuses connections to
        # it, and a multi-host connect stops at that refusal: wait for both nodes.
        deadline = time.monotonic() + 30
        for node in NODES:
            while True:
                try:
                    with psycopg.connect(self.node_url(node, name), connect_timeout=2):
                        break
                except psycopg.OperationalError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        asyncio.run(migrate(self.url(name)))
        return name


@pytest.fixture(scope="session")
def ha_cluster() -> Iterator[HACluster]:
    """Start ``scripts/cluster`` once for the session; stop and remove it at the end."""
    if shutil.which("pg_autoctl") is None:
        pytest.fail(
            "pg_autoctl is not installed: the HA tests need pg_auto_failover "
            "(run scripts/setup, which apt-get installs pg-auto-failover-cli and "
            "postgresql-15-auto-failover)"
        )
    # Not under pytest's basetemp: a pytest session starting meanwhile (another run on
    # this machine) resets /tmp/pytest-of-USER to 0700, and the servers, running as
    # the postgres user, could no longer reach their data directories.
    home = Path(tempfile.mkdtemp(prefix="ledger-ha-")) / "cluster"
    started = subprocess.run(
        [sys.executable, str(SCRIPT), "start", str(home)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if started.returncode != 0:
        pytest.fail(f"scripts/cluster start failed:\n{started.stdout}{started.stderr}")
    try:
        yield HACluster(home)
    finally:
        subprocess.run(
            [sys.executable, str(SCRIPT), "stop", str(home)], capture_output=True, timeout=120
        )
        shutil.rmtree(home.parent, ignore_errors=True)
