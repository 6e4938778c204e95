"""Shared helpers for the bench scripts: a throwaway database, realistic fills, a table.

Not part of the ledger: the scripts in this directory import it by file location
(``scripts/`` is the first entry of ``sys.path`` when a script here runs).
"""

from __future__ import annotations

import json
import os
import random
import resource
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

import projections
from ledger.db import migrate, plain_url

__all__ = [
    "CONTRACTS",
    "Figure",
    "FillFactory",
    "Stopwatch",
    "database_url",
    "instrument_records",
    "load_average",
    "peak_rss_mib",
    "print_figures",
    "print_json_line",
    "server_settings",
    "table_scans",
    "throwaway_database",
]

# (contract, tick size, tick value, a typical price): 25 real futures' grids.
CONTRACTS: tuple[tuple[str, str, str, str], ...] = (
    ("ES", "0.25", "12.50", "6065.25"),
    ("MES", "0.25", "1.25", "6065.25"),
    ("NQ", "0.25", "5.00", "21450.75"),
    ("MNQ", "0.25", "0.50", "21450.75"),
    ("YM", "1", "5.00", "44210"),
    ("RTY", "0.1", "5.00", "2390.4"),
    ("CL", "0.01", "10.00", "71.23"),
    ("NG", "0.001", "10.00", "3.412"),
    ("GC", "0.1", "10.00", "2651.3"),
    ("SI", "0.005", "25.00", "31.245"),
    ("HG", "0.0005", "12.50", "4.1235"),
    ("ZN", "0.015625", "15.625", "110.5"),
    ("ZB", "0.03125", "31.25", "117.25"),
    ("ZF", "0.0078125", "7.8125", "106.5"),
    ("ZT", "0.00390625", "7.8125", "102.75"),
    ("6E", "0.00005", "6.25", "1.05275"),
    ("6J", "0.0000005", "6.25", "0.0065105"),
    ("6B", "0.0001", "6.25", "1.2674"),
    ("6A", "0.00005", "5.00", "0.64535"),
    ("6C", "0.00005", "5.00", "0.71385"),
    ("ZC", "0.25", "12.50", "428.75"),
    ("ZS", "0.25", "12.50", "1002.5"),
    ("ZW", "0.25", "12.50", "551.25"),
    ("LE", "0.025", "10.00", "186.975"),
    ("HE", "0.025", "10.00", "84.35"),
)


def database_url(cli_url: str | None) -> str:
    """Return the server URL from ``--url`` or ``LEDGER_DATABASE_URL``, or exit."""
    url = cli_url or os.environ.get("LEDGER_DATABASE_URL")
    if not url:
        sys.exit("bench: pass --url or set LEDGER_DATABASE_URL (a postgresql:// URL)")
    return url


@asynccontextmanager
async def throwaway_database(
    url: str, *, label: str = "", migrated: bool = True, keep: bool = False
) -> AsyncIterator[str]:
    """Create ``bench_<random>`` on the server of ``url``, migrate it, yield its URL, drop it.

    With ``keep`` the database is left in place (its name is printed) for inspection.
    """
    name = f"bench_{label}{secrets.token_hex(4)}"
    admin = await asyncpg.connect(plain_url(url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    db_url = make_url(plain_url(url)).set(database=name).render_as_string(hide_password=False)
    try:
        if migrated:
            await migrate(db_url)
        yield db_url
    finally:
        if keep:
            print(f"kept database {name}")
        else:
            admin = await asyncpg.connect(plain_url(url))
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()


async def server_settings(url: str) -> str:
    """Return a one-line description of the server and its durability settings."""
    conn = await asyncpg.connect(plain_url(url))
    try:
        version = await conn.fetchval("SHOW server_version")
        parts = [f"PostgreSQL {version}"]
        for name in ("synchronous_commit", "fsync", "wal_sync_method", "shared_buffers"):
            parts.append(f"{name}={await conn.fetchval(f'SHOW {name}')}")
    finally:
        await conn.close()
    fold = "compiled by mypyc" if projections.running_compiled() else "interpreted"
    return ", ".join(parts) + f"; {os.cpu_count()} CPUs; projection fold {fold}"


async def table_scans(db_url: str, table: str = "events") -> str:
    """Return how ``table`` was scanned (a sequential scan of the log is a bad plan)."""
    conn = await asyncpg.connect(plain_url(db_url))
    try:
        row = await conn.fetchrow(
            "SELECT seq_scan, seq_tup_read, idx_scan, last_autoanalyze IS NOT NULL AS analyzed"
            " FROM pg_stat_user_tables WHERE relname = $1",
            table,
        )
    finally:
        await conn.close()
    if row is None:
        return f"{table}: no statistics"
    return (
        f"{table}: {row['seq_scan']:,} sequential scans reading {row['seq_tup_read']:,} rows, "
        f"{row['idx_scan']:,} index scans, auto-analyzed: {'yes' if row['analyzed'] else 'no'}"
    )


def instrument_records() -> list[dict[str, str]]:
    """Return one native ``instrument`` record per contract."""
    return [
        {"type": "instrument", "contract": c, "tick_size": t, "tick_value": v, "currency": "USD"}
        for c, t, v, _ in CONTRACTS
    ]


class FillFactory:
    """Realistic native fill records: many accounts x contracts, prices on each grid.

    One factory keeps one clock and one random walk per contract, so fills from
    successive calls sort after earlier ones in every stream (``occurred_at`` rises).
    """

    def __init__(
        self,
        accounts: int = 200,
        contracts: int = 25,
        seed: int = 20261123,
        *,
        max_step_us: int = 20_000,
    ) -> None:
        self.rng = random.Random(seed)
        self.max_step_us = max_step_us  # between successive fills: 1..this microseconds
        self.accounts = [f"ACC{a:04d}" for a in range(accounts)]
        self.contracts = [
            (c, Decimal(tick), int(Decimal(price) / Decimal(tick)))
            for c, tick, _, price in CONTRACTS[:contracts]
        ]
        self.clock = datetime(2026, 11, 23, 14, 30, tzinfo=UTC)

    def fills(
        self, n: int, prefix: str, *, accounts: Sequence[str] | None = None
    ) -> list[dict[str, str]]:
        """Return ``n`` fill records with exec ids ``{prefix}-{i}`` (unique per prefix)."""
        rng = self.rng
        pool = list(accounts) if accounts is not None else self.accounts
        ticks = {c: t for c, _, t in self.contracts}
        out = []
        for i in range(n):
            account = pool[rng.randrange(len(pool))]
            contract, tick, _ = self.contracts[rng.randrange(len(self.contracts))]
            ticks[contract] = max(1, ticks[contract] + rng.randint(-4, 4))
            self.clock += timedelta(microseconds=rng.randint(1, self.max_step_us))
            qty = rng.choice((1, 1, 1, 2, 2, 3, 5, 10))
            out.append(
                {
                    "type": "fill",
                    "account": account,
                    "contract": contract,
                    "exec_id": f"{prefix}-{i:09d}",
                    "order_id": f"O{prefix}-{i // 3:08d}",
                    "side": "BUY" if rng.random() < 0.5 else "SELL",
                    "qty": str(qty),
                    "price": str(ticks[contract] * tick),
                    "fee": str(Decimal("0.62") * qty),
                    "occurred_at": self.clock.isoformat(),
                }
            )
        self.contracts = [(c, t, ticks[c]) for c, t, _ in self.contracts]
        return out


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    seconds: float = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self._start


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores; idle and
    iowait excluded), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + ticks[4]
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuMeter:
    """``with CpuMeter() as cpu: ...`` then ``cpu.own`` (this process and the children
    it waited for: the rebuild's worker processes) and ``cpu.rest`` (every other process
    on the machine over the same time: the PostgreSQL backends serving it, and any other
    load) in CPU seconds. /proc/stat counts in clock ticks (10 ms), so short spans are
    coarse."""

    own: float = 0.0
    rest: float = 0.0

    def __enter__(self) -> CpuMeter:
        self._own, self._busy = _own_cpu_s(), _machine_busy_s()
        return self

    def __exit__(self, *_: object) -> None:
        self.own = _own_cpu_s() - self._own
        self.rest = max(0.0, _machine_busy_s() - self._busy - self.own)


@dataclass
class Figure:
    """One measured case; ``baseline`` names the case its second ratio is taken against."""

    case: str
    events: int
    seconds: float
    baseline: str | None = None

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else float("inf")


def load_average() -> str:
    """Return the 1/5/15-minute load averages (other work on the machine skews figures)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def peak_rss_mib() -> float:
    """Return this process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_figures(
    title: str,
    figures: Iterable[Figure],
    *,
    reference: str | None = None,
    reference_label: str = "",
    baseline_label: str = "vs baseline",
    notes: Sequence[str] = (),
) -> None:
    """Print a table of figures, their ratio to ``reference`` and to their own baseline."""
    rows = list(figures)
    by_case = {f.case: f for f in rows}
    ref = by_case.get(reference) if reference else None
    table = Table(title=title, title_justify="left")
    table.add_column("case")
    table.add_column("events", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("events/s", justify="right")
    if ref:
        table.add_column(reference_label, justify="right")
    table.add_column(baseline_label, justify="right")
    for f in rows:
        cells = [f.case, f"{f.events:,}", f"{f.seconds:.2f}", f"{f.rate:,.0f}"]
        if ref:
            cells.append(f"{f.rate / ref.rate:.2f}")
        base = by_case.get(f.baseline) if f.baseline else None
        cells.append(f"{f.rate / base.rate:.2f} ({base.case})" if base else "")
        table.add_row(*cells)
    console = Console(width=160)
    console.print(table)
    for note in notes:
        console.print(note, highlight=False)


def print_json_line(figures: dict[str, float | int | bool | str | None]) -> None:
    """Print a run's named figures as ONE JSON line, the last line a bench prints.

    Numbers stay JSON numbers (floats rounded to 4 significant decimals after the point
    where that loses nothing useful), so runs compare without reading the tables.
    """
    out: dict[str, float | int | bool | str | None] = {}
    for name, value in figures.items():
        if isinstance(value, float):
            value = round(value, 4) if abs(value) < 100 else round(value, 1)
        out[name] = value
    print(json.dumps(out, separators=(", ", ": ")), flush=True)
