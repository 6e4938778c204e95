"""One worker of a parallel rebuild: its share of the streams, up to a fixed end.

When the log is long enough, ``ProjectionRunner.rebuild`` starts one of these per part
(``python -m projections.partition``, its configuration as JSON on stdin: the database
URL may hold a password, which a command line would show to every user). Streams are
independent (a position's fills, busts and corrections all live in its stream), so a
worker reads the log in the usual gap-free order but only its streams' rows and every
instrument, folds them exactly as the runner does, and writes them into the building
generation. It keeps its own checkpoint in ``projection_partition``: a killed rebuild
resumes each worker where its last transaction left it. The parent joins the parts
when all are done.

The rebuild projects its first part itself, in a PartitionRunner of its own. A worker
process prints the events of every committed transaction on stdout (one number per
line) for the parent's progress bar, and dies with its parent.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.db import make_engine
from ledger.settings import Settings
from ledger.store import Checkpoint, LightRow, driver_connection, light_rows
from projections import store as sql
from projections.pipeline import Projector

__all__ = ["PartitionRunner", "WorkerConfig", "main"]

_PR_SET_PDEATHSIG = 1
# for the reader's session only (it runs nothing but READ_PARTITION)
_READ_IN_INDEX_ORDER = """
SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_sort = off;
SET max_parallel_workers_per_gather = 0
"""


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs from its parent (passed as JSON on its stdin)."""

    url: str
    generation: int
    part: int
    parts: int
    parent: int  # the parent's pid: the worker exits when it is gone
    settings: dict[str, Any]
    batch_size: int
    snapshot_every: int
    cache_size: int
    flush_events: int
    journal_rows: int
    mark_every: int

    def to_json(self) -> str:
        return orjson.dumps(self.__dict__).decode()

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        return cls(**orjson.loads(text))


class PartitionRunner(Projector):
    """A runner that projects one part of the streams, up to its part's end."""

    def __init__(self, engine: AsyncEngine, config: WorkerConfig, end: Checkpoint) -> None:
        super().__init__(
            engine,
            Settings.model_validate(config.settings),
            batch_size=config.batch_size,
            snapshot_every=config.snapshot_every,
            cache_size=config.cache_size,
        )
        self.rebuild_flush_events = config.flush_events
        self.journal_rows = config.journal_rows
        self.mark_every = config.mark_every
        self.part = config.part
        self.parts = config.parts
        self.end = end

    async def _read(self, conn: asyncpg.Connection, after: Checkpoint) -> list[LightRow]:
        # The planner cannot estimate the part filter (it guesses 0.5% of the rows for
        # a hash's equality, not 1 / parts), so it would scan and sort the rest of the
        # log for every page: walk the read-order index instead. (Set on every read: a
        # reconnected reader is a new session.)
        await conn.execute(_READ_IN_INDEX_ORDER)
        rows = await conn.fetch(
            sql.READ_PARTITION,
            str(after.tx_id),
            after.position,
            self.batch_size,
            str(self.end.tx_id),
            self.end.position,
            self.parts,
            self.part,
        )
        return light_rows(rows)

    async def _checkpoint(self, conn: asyncpg.Connection, generation: int) -> Any:
        return await conn.fetchrow(sql.PARTITION_CHECKPOINT, generation, self.part)

    async def _lock_checkpoint(self, conn: asyncpg.Connection, generation: int) -> Any:
        return await conn.fetchrow(sql.LOCK_PARTITION, generation, self.part)

    async def _advance(
        self, conn: asyncpg.Connection, generation: int, end: Checkpoint, events: int
    ) -> None:
        await conn.execute(
            sql.ADVANCE_PARTITION, generation, self.part, end.tx_id, end.position, events
        )

    async def _faulted_streams(self, conn: asyncpg.Connection, generation: int) -> set[str]:
        # only this part's: another part's faulted stream is never this one's to replay
        rows = await conn.fetch(sql.FAULTED_STREAMS_OF_PART, generation, self.parts, self.part)
        return {r[0] for r in rows}

    async def project(self, generation: int, progress: Callable[[int], None] | None = None) -> int:
        """Project this part up to the end, mark it finished; return the events read."""
        events = 0
        self._forget_cache()
        try:
            async with self._connections() as conns:
                events = await self._drain(conns, generation, progress, self.rebuild_flush_events)
                row = await self._checkpoint(conns.writer, generation)
                if row is not None and row["status"] == "building":
                    await conns.writer.execute(sql.FINISH_PARTITION, generation, self.part)
        finally:
            self._forget_cache()
        return events


def _report(events: int) -> None:
    print(events, flush=True)


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux); exit if it has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent:
        raise SystemExit("rebuild worker: the rebuild that started it is gone")


async def _run(config: WorkerConfig) -> None:
    engine = make_engine(config.url, pool_size=4)
    try:
        async with engine.connect() as sa_conn:
            conn = await driver_connection(sa_conn)
            rows = await conn.fetch(sql.PARTITIONS, config.generation)
        mine = [r for r in rows if r["part"] == config.part]
        if not mine:
            return  # joined already (or the generation is gone): nothing to do
        end = Checkpoint(mine[0]["end_tx_id"], mine[0]["end_position"])
        await PartitionRunner(engine, config, end).project(config.generation, _report)
    finally:
        await engine.dispose()


def main() -> None:
    """Run one worker, its WorkerConfig as JSON on stdin."""
    config = WorkerConfig.from_json(sys.stdin.read())
    _die_with_parent(config.parent)
    asyncio.run(_run(config))


if __name__ == "__main__":
    main()
