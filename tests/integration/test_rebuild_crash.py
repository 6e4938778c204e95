"""SIGKILL drills: a projection runner or a rebuild killed at any point loses nothing.

A killed runner's open batch rolls back with its transaction, so a restart resumes from
the last committed checkpoint; a killed rebuild leaves the serving generation as it was
and is resumed by the next rebuild. Every drill ends by comparing all serving rows
(positions, history, daily P&L) with those of a fresh rebuild.
"""

# ruff: noqa: ASYNC220, ASYNC221 - the tests drive CLI subprocesses and wait on them

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from test_projections import (
    assert_rebuild_equals_serving,
    checkpoints,
    instruments,
    random_log,
    snapshot_serving,
)

from ledger.events import Event, parse_event
from ledger.store import UncheckedEventStore, driver_connection
from projections import store as sql
from projections.runner import ProjectionRunner

ROOT = Path(__file__).resolve().parents[2]

# Runs ProjectionRunner(batch_size=50) and SIGKILLs itself at a chosen point:
# "between": after the N-th batch committed; "mid": inside the N-th batch's transaction,
# after its rows were written but before its checkpoint moved and it committed.
SELF_KILLER = """
import asyncio, os, signal, sys
from ledger.db import make_engine
from projections.runner import ProjectionRunner

mode, n, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]

async def main():
    engine = make_engine(os.environ["LEDGER_DATABASE_URL"])
    runner = ProjectionRunner(engine, batch_size=50, snapshot_every=4)
    runner.rebuild_flush_events = int(os.environ.get("FLUSH_EVENTS", "50"))
    seen = 0
    write = runner._write

    async def killing_write(*args):
        nonlocal seen
        await write(*args)
        seen += 1
        if mode == "mid" and seen == n:
            os.kill(os.getpid(), signal.SIGKILL)

    def progress(_applied):
        if mode == "between" and seen == n:
            os.kill(os.getpid(), signal.SIGKILL)

    runner._write = killing_write
    if what == "rebuild":
        await runner.rebuild(progress)
    else:
        await runner.catch_up(progress)

asyncio.run(main())
"""


async def count_events(engine: AsyncEngine) -> int:
    async with engine.connect() as sa:
        n: int = await (await driver_connection(sa)).fetchval("SELECT count(*) FROM events")
    return n


def self_kill(
    env: dict[str, str], mode: str, n: int, what: str = "catch_up", flush_events: int = 50
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SELF_KILLER, mode, str(n), what],
        env=dict(env, FLUSH_EVENTS=str(flush_events)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr


async def kill_rebuild_when(env: dict[str, str], reached: Callable[[], Awaitable[bool]]) -> None:
    """Start `ledger rebuild` and SIGKILL it as soon as ``reached()`` holds."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ledger", "rebuild"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not await reached():
            assert proc.poll() is None, "the rebuild finished before it could be killed"
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)


def rebuild_to_the_end(env: dict[str, str]) -> None:
    """Run `ledger rebuild` to the end: it resumes generation 2 and swaps it in."""
    result = subprocess.run(
        [sys.executable, "-m", "ledger", "rebuild"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "rebuilt generation 2" in result.stdout


async def test_runner_killed_between_and_mid_batch_resumes_exactly(
    engine: AsyncEngine, store: UncheckedEventStore, cli_env: dict[str, str]
) -> None:
    rng = random.Random(4)
    events = random_log(rng, 4000, accounts=("K0", "K1", "K2", "K3", "K4"))
    await store.append(instruments())
    await store.append(events[:1000])

    # killed after the 5th batch committed: exactly 5 x 50 events are projected
    self_kill(cli_env, "between", 5)
    assert await checkpoints(engine) == [(1, "serving", 250)]
    # killed inside the 3rd batch of the next run: its writes roll back with it
    self_kill(cli_env, "mid", 3)
    assert await checkpoints(engine) == [(1, "serving", 350)]

    await store.append(events[1000:2500])
    # `ledger project` with small batches, SIGKILLed at random points
    env = dict(cli_env, LEDGER_PROJECTION_BATCH="7")
    killed_mid_run = 0
    for _ in range(4):
        [(_g, _s, start)] = await checkpoints(engine)
        proc = subprocess.Popen(
            [sys.executable, "-m", "ledger", "project"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # once it is projecting, let it run a random while, then kill it
            deadline = time.monotonic() + 30
            while (await checkpoints(engine))[0][2] == start and proc.poll() is None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            await asyncio.sleep(rng.uniform(0.0, 0.25))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed_mid_run += 1
        finally:
            proc.wait(30)
        # a late fill, a bust or a correction may land between restarts
        await store.append(events[2500 + _ * 200 : 2700 + _ * 200])
    [(_, _, projected)] = await checkpoints(engine)
    assert killed_mid_run == 4 and projected < await count_events(engine)

    await store.append(events[3300:])
    logged = await count_events(engine)
    result = subprocess.run(
        [sys.executable, "-m", "ledger", "project"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    [(_, _, projected)] = await checkpoints(engine)
    assert projected >= logged  # (`ledger project` appends a seal after catching up)
    await ProjectionRunner(engine).catch_up()
    [(_, _, projected)] = await checkpoints(engine)
    assert projected == await count_events(engine)
    await assert_rebuild_equals_serving(engine)


async def test_rebuild_killed_half_way_leaves_serving_intact_and_resumes(
    engine: AsyncEngine, store: UncheckedEventStore, cli_env: dict[str, str]
) -> None:
    rng = random.Random(9)
    events = random_log(
        rng, 19_500, accounts=[f"R{i}" for i in range(20)], adjust_rate=0.01, late=0.02
    )
    await store.append(instruments())
    for i in range(0, len(events) - 300, 2000):
        await store.append(events[i : min(i + 2000, len(events) - 300)])
    total = await count_events(engine)
    assert total > 19_000
    await ProjectionRunner(engine).catch_up()
    before = await snapshot_serving(engine)
    assert await checkpoints(engine) == [(1, "serving", total)]

    # pages of 500, a transaction every 2,000 events
    env = dict(cli_env, LEDGER_PROJECTION_BATCH="500", LEDGER_REBUILD_FLUSH="2000")

    async def a_quarter_in() -> bool:
        building = [r for r in await checkpoints(engine) if r[1] == "building"]
        return bool(building) and total // 4 <= building[0][2]

    await kill_rebuild_when(env, a_quarter_in)
    rows = await checkpoints(engine)
    assert rows[0] == (1, "serving", total)
    assert rows[1][:2] == (2, "building") and rows[1][2] < total, rows
    assert await snapshot_serving(engine) == before  # the serving rows are untouched

    # more events arrive; the serving generation projects them incrementally
    await store.append(events[len(events) - 300 :])
    await ProjectionRunner(engine, batch_size=64).catch_up()
    incremental = await snapshot_serving(engine)
    assert incremental != before

    # the re-run resumes the killed generation, completes, swaps, and equals incremental
    rebuild_to_the_end(env)
    total = await count_events(engine)
    assert await checkpoints(engine) == [(2, "serving", total)]
    assert await snapshot_serving(engine) == incremental
    async with engine.connect() as sa:
        leftovers = await (await driver_connection(sa)).fetchval(
            "SELECT count(*) FROM proj_history WHERE generation = 1"
        )
    assert leftovers == 0
    await assert_rebuild_equals_serving(engine)


PARTS = "SELECT part, tx_id, position, events FROM projection_partition ORDER BY part"


async def partitions(engine: AsyncEngine) -> list[tuple[int, int, int, int]]:
    async with engine.connect() as sa:
        rows = await (await driver_connection(sa)).fetch(PARTS)
    return [(r[0], r[1], r[2], r[3]) for r in rows]


async def settled_partitions(engine: AsyncEngine, flush: int) -> list[tuple[int, int, int, int]]:
    """The partitions once they stop moving (two reads 0.3 s apart agree), each at most
    one flush of ``flush`` events past where the first read found it.

    A worker the kill caught with its COMMIT sent has that transaction completed by
    PostgreSQL after the worker is gone (seen once in CI: one more flush landed after
    the first read); nothing more may follow. (Besides the kernel's parent-death
    signal, a worker also stops at its next progress line, its pipe's reader gone.)
    """
    first = last = await partitions(engine)
    while True:
        await asyncio.sleep(0.3)
        now = await partitions(engine)
        for (part, *_, was), (_, *_, is_now) in zip(first, now, strict=True):
            assert is_now - was <= flush, f"part {part} went on after the kill: {first} {now}"
        if now == last:
            return now
        last = now


async def test_parallel_rebuild_killed_half_way_takes_its_workers_and_resumes(
    engine: AsyncEngine, store: UncheckedEventStore, cli_env: dict[str, str]
) -> None:
    rng = random.Random(21)
    events = random_log(
        rng, 12_000, accounts=[f"P{i}" for i in range(12)], adjust_rate=0.01, late=0.02
    )
    await store.append(instruments())
    for i in range(0, len(events), 2000):
        await store.append(events[i : i + 2000])
    total = await count_events(engine)
    await ProjectionRunner(engine).catch_up()
    before = await snapshot_serving(engine)

    # two worker processes, each committing every 900 of its events in pages of 300
    env = dict(
        cli_env,
        LEDGER_PROJECTION_BATCH="300",
        LEDGER_REBUILD_FLUSH="900",
        LEDGER_REBUILD_WORKERS="2",
        LEDGER_REBUILD_PARTITION_MIN="1",
    )

    async def a_quarter_in() -> bool:  # and the worker process has committed
        parts = await partitions(engine)
        return all(p[3] > 0 for p in parts) and total // 4 <= sum(p[3] for p in parts)

    await kill_rebuild_when(env, a_quarter_in)
    # the workers died with it: their checkpoints stay where they are
    killed = await settled_partitions(engine, 900)
    await asyncio.sleep(1.5)
    assert await partitions(engine) == killed
    assert [p[0] for p in killed] == [0, 1]
    assert 0 < sum(p[3] for p in killed) < total + 2 * len(instruments())
    assert await checkpoints(engine) == [(1, "serving", total), (2, "building", 0)]
    assert await snapshot_serving(engine) == before

    # the re-run resumes both parts, joins them, swaps, and equals the serving rows
    rebuild_to_the_end(env)
    assert await checkpoints(engine) == [(2, "serving", total)]
    assert await partitions(engine) == []
    assert await snapshot_serving(engine) == before


async def test_rebuild_killed_mid_batch_then_resumed_equals_incremental(
    engine: AsyncEngine, store: UncheckedEventStore, cli_env: dict[str, str]
) -> None:
    rng = random.Random(12)
    await store.append(instruments())
    await store.append(random_log(rng, 1500, accounts=("M0", "M1", "M2")))
    await ProjectionRunner(engine, batch_size=33).catch_up()
    before = await snapshot_serving(engine)
    self_kill(cli_env, "mid", 7, "rebuild")  # 6 batches of the new generation committed
    assert await checkpoints(engine) == [
        (1, "serving", await count_events(engine)),
        (2, "building", 300),
    ]
    assert await snapshot_serving(engine) == before
    self_kill(cli_env, "between", 4, "rebuild")  # resumed: 4 more batches
    assert (await checkpoints(engine))[1] == (2, "building", 500)
    # a rebuild transaction spans pages (4 x 50 here): a kill loses the open one only
    self_kill(cli_env, "mid", 11, "rebuild", flush_events=200)
    assert (await checkpoints(engine))[1] == (2, "building", 900)
    assert await snapshot_serving(engine) == before
    await ProjectionRunner(engine, batch_size=77).rebuild()
    assert [r[:2] for r in await checkpoints(engine)] == [(2, "serving")]
    assert await snapshot_serving(engine) == before


async def test_swap_succeeds_when_the_serving_checkpoint_moved_during_the_rebuild(
    engine: AsyncEngine,
) -> None:
    """The swap retires the old generation before serving the new one (one unique index).

    The serving checkpoint advancing while a rebuild runs leaves its row version after the
    building row; a single UPDATE flipping both then meets the building row first.
    """
    store = UncheckedEventStore(engine)

    def fills(start: int, stop: int) -> list[Event]:
        return [
            parse_event(
                {
                    "type": "fill",
                    "account": f"A{i % 3}",
                    "contract": "ES",
                    "exec_id": f"R-{i}",
                    "side": "BUY" if i % 2 else "SELL",
                    "qty": "1",
                    "price": "5000.25",
                    "occurred_at": f"2026-11-23T14:00:{i:02d}Z",
                }
            )
            for i in range(start, stop)
        ]

    instrument = {"type": "instrument", "contract": "ES", "tick_size": "0.25", "tick_value": "12.5"}
    await store.append([parse_event(instrument), *fills(0, 20)])
    runner = ProjectionRunner(engine)
    await runner.catch_up()
    for round_ in range(3):
        async with engine.connect() as sa_conn:
            conn = await driver_connection(sa_conn)
            await conn.fetchval(sql.NEW_BUILDING)  # a rebuild has started ...
        await store.append(fills(20 + round_ * 10, 30 + round_ * 10))
        await ProjectionRunner(engine).catch_up()  # ... and the serving one moves on
        result = await runner.rebuild()  # resumes the building generation and swaps it in
        async with engine.connect() as sa_conn:
            conn = await driver_connection(sa_conn)
            rows = await conn.fetch("SELECT generation, status FROM projection_checkpoint")
        assert [(r["generation"], r["status"]) for r in rows] == [(result.generation, "serving")]


async def test_a_rebuild_whose_generation_another_swapped_in_stops(
    engine: AsyncEngine, store: UncheckedEventStore
) -> None:
    """Two rebuilds find the same building generation; one swaps it in while the other
    is still on its way. The other, finding it serving, stops there instead of
    retrying its swap forever."""
    rng = random.Random(31)
    await store.append(instruments())
    await store.append(random_log(rng, 3000, accounts=("C0", "C1", "C2", "C3")))
    await ProjectionRunner(engine).catch_up()
    before = await snapshot_serving(engine)
    async with engine.connect() as sa_conn:
        await (await driver_connection(sa_conn)).fetchval(sql.NEW_BUILDING)
    first, second = ProjectionRunner(engine), ProjectionRunner(engine, batch_size=67)
    # the second has found generation 2 and waits there until the first is done
    found, go_on = asyncio.Event(), asyncio.Event()
    in_parts = second._rebuild_in_parts

    async def held(*args: Any) -> int:
        found.set()
        await go_on.wait()
        return await in_parts(*args)

    second._rebuild_in_parts = held  # type: ignore[method-assign]
    late = asyncio.ensure_future(second.rebuild())
    await asyncio.wait_for(found.wait(), 30)
    done = await first.rebuild()
    go_on.set()
    result = await asyncio.wait_for(late, 30)
    assert done.generation == result.generation == 2
    assert await checkpoints(engine) == [(2, "serving", await count_events(engine))]
    assert await snapshot_serving(engine) == before
