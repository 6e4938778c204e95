"""The rebuild: fill a new generation from zero, then swap it in atomically.

The serving generation answers queries until the swap; a rebuild that is killed leaves
its generation ``building``, and the next rebuild resumes it from its last committed
transaction. Python's folding is the bottleneck of a rebuild, and streams are
independent: a rebuild of a long log (``partition_min_events``) splits the streams
between ``rebuild_workers`` processes up to the log's end when it starts (see
:mod:`projections.partition`), joins them, then catches up and swaps as usual. Retired
generations' tables are dropped once the swap is done.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.settings import Settings
from ledger.store import Checkpoint
from projections import store as sql
from projections.partition import PartitionRunner, WorkerConfig
from projections.pipeline import Connections, Projector, positive_env
from projections.writer import Conflict, Flush, Retired

__all__ = ["RebuildResult", "Rebuilder"]

_MAX_WORKERS = 4  # rebuild worker processes by default: one per core, at most this
# Shorter logs gain little: a worker takes ~0.4 s to start (its imports). 100k events,
# alternating: 1.70-1.78 s split in two, 1.87-1.95 s in one process.
_PARTITION_MIN_EVENTS = 100_000


@dataclass(frozen=True, slots=True)
class RebuildResult:
    """What a rebuild did."""

    generation: int
    events: int
    seconds: float


async def _watch(
    proc: asyncio.subprocess.Process, progress: Callable[[int], None] | None
) -> tuple[int, str]:
    """Forward a rebuild worker's progress lines; return its exit status and error tail."""
    assert proc.stdout is not None and proc.stderr is not None
    errors = asyncio.ensure_future(proc.stderr.read())
    async for line in proc.stdout:
        text = line.strip()
        if progress is not None and text.isdigit():
            progress(int(text))
    code = await proc.wait()
    return code, (await errors).decode(errors="replace")[-2000:].strip()


class Rebuilder(Projector):
    """Rebuild the projections into a new generation, in parallel parts when worth it."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings | None = None,
        *,
        batch_size: int | None = None,
        snapshot_every: int = 64,
        cache_size: int = 50_000,
    ) -> None:
        super().__init__(
            engine,
            settings,
            batch_size=batch_size,
            snapshot_every=snapshot_every,
            cache_size=cache_size,
        )
        # A rebuild of a log of at least partition_min_events events splits the streams
        # between rebuild_workers processes (projections.partition); 1: never.
        self.rebuild_workers = positive_env(
            "LEDGER_REBUILD_WORKERS", min(os.cpu_count() or 1, _MAX_WORKERS)
        )
        self.partition_min_events = positive_env(
            "LEDGER_REBUILD_PARTITION_MIN", _PARTITION_MIN_EVENTS
        )

    async def rebuild(self, progress: Callable[[int], None] | None = None) -> RebuildResult:
        """Fill a new generation from zero, then swap it in atomically.

        The serving generation answers queries until the swap. A rebuild that is killed
        leaves its generation in ``building``; the next rebuild resumes it from its last
        committed transaction.
        """
        started = asyncio.get_running_loop().time()
        events = 0
        self._forget_cache()
        try:
            async with self._connections() as conns:
                conn = conns.writer
                await sql.ensure_serving(conn)
                generation = await conn.fetchval(sql.BUILDING)
                if generation is None:
                    generation = await conn.fetchval(sql.NEW_BUILDING)
                events += await self._rebuild_in_parts(conn, generation, progress)
                while True:
                    events += await self._drain(
                        conns, generation, progress, self.rebuild_flush_events
                    )
                    try:
                        events += await self._swap(conns, generation)
                        break
                    except (Conflict, Retired):
                        self._forget_cache()
                        row = await conns.aux.fetchrow(sql.CHECKPOINT, generation)
                        if row is None or row["status"] != "building":
                            break  # another rebuild swapped it in (or replaced it): done
                        # another rebuild moved its checkpoint on: catch up, retry
                for (retired,) in await conn.fetch(sql.RETIRED):
                    async with conn.transaction():
                        for statement in sql.DROP_GENERATION_TABLES:
                            await conn.execute(statement, retired)
                        await conn.execute(sql.FORGET_GENERATION, retired)
        finally:
            self._forget_cache()
        elapsed = asyncio.get_running_loop().time() - started
        return RebuildResult(generation, events, elapsed)

    async def _split_end(self, conn: asyncpg.Connection) -> Checkpoint | None:
        """Return the log's present end if a rebuild would split the log up to it (it
        holds at least ``partition_min_events`` events and workers are allowed)."""
        if self.rebuild_workers < 2:
            return None
        head = await conn.fetchrow(sql.LOG_HEAD)
        if head is None:
            return None
        end = Checkpoint(head[0], head[1])
        logged: int = await conn.fetchval(sql.COUNT_UPTO, str(end.tx_id), end.position)
        return end if logged >= self.partition_min_events else None

    async def _rebuild_in_parts(
        self,
        conn: asyncpg.Connection,
        generation: int,
        progress: Callable[[int], None] | None,
    ) -> int:
        """Project the log up to its present end into ``generation`` with one worker
        process per part of the streams, if it is long enough (or a killed rebuild left
        parts to resume); then move the generation's checkpoint to that end.

        Returns:
            The events the parts projected (0 when the log is not split).
        """
        parts = await conn.fetch(sql.PARTITIONS, generation)
        if not parts:
            end = await self._split_end(conn)
            if end is None:
                return 0
            async with conn.transaction():
                row = await sql.lock_checkpoint(conn, generation)
                if row is None or (row["status"], row["tx_id"], row["position"]) != (
                    "building",
                    0,
                    0,
                ):
                    return 0  # a rebuild in one process has begun it: it goes on
                await conn.execute(
                    sql.CREATE_PARTITIONS, generation, self.rebuild_workers, end.tx_id, end.position
                )
            parts = await conn.fetch(sql.PARTITIONS, generation)
        end = Checkpoint(parts[0]["end_tx_id"], parts[0]["end_position"])
        pending = [r["part"] for r in parts if (r["tx_id"], r["position"]) != end]
        if pending:
            await self._run_workers(generation, pending, parts[0]["parts"], end, progress)
        async with conn.transaction():
            events: int = await conn.fetchval(sql.COUNT_UPTO, str(end.tx_id), end.position)
            joined = await conn.execute(
                sql.JOIN_PARTITIONS, generation, end.tx_id, end.position, events
            )
            await conn.execute(sql.DROP_PARTITIONS, generation)
        return events if joined == "UPDATE 1" else 0

    async def _run_workers(
        self,
        generation: int,
        pending: list[int],
        parts: int,
        end: Checkpoint,
        progress: Callable[[int], None] | None,
    ) -> None:
        """Project each part in ``pending``: the first in this process, the others in
        worker processes started first (each takes about a second to import); wait for
        all of them."""
        configs = [
            WorkerConfig(
                url=self.engine.url.render_as_string(hide_password=False),
                generation=generation,
                part=part,
                parts=parts,
                parent=os.getpid(),
                settings=self.settings.model_dump(mode="json"),
                batch_size=self.batch_size,
                snapshot_every=self.snapshot_every,
                cache_size=self.cache_size,
                flush_events=self.rebuild_flush_events,
                journal_rows=self.journal_rows,
                mark_every=self.mark_every,
            )
            for part in pending
        ]
        procs: list[asyncio.subprocess.Process] = []
        watching: list[asyncio.Future[tuple[int, str]]] = []
        try:
            for config in configs[1:]:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "projections.partition",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                procs.append(proc)
                assert proc.stdin is not None
                proc.stdin.write(config.to_json().encode())
                await proc.stdin.drain()
                proc.stdin.close()
                watching.append(asyncio.ensure_future(_watch(proc, progress)))
            await PartitionRunner(self.engine, configs[0], end).project(generation, progress)
            outcomes = await asyncio.gather(*watching)
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            for task in watching:
                task.cancel()
        for config, (code, errors) in zip(configs[1:], outcomes, strict=True):
            if code != 0:
                raise RuntimeError(
                    f"rebuild worker {config.part + 1} of {parts} exited with status {code}: "
                    f"{errors}"
                )

    async def _swap(self, conns: Connections, generation: int) -> int:
        """Take the last events, compact, and swap ``generation`` in: one transaction."""
        conn = conns.writer
        row = await conns.aux.fetchrow(sql.CHECKPOINT, generation)
        if row is None or row["status"] != "building":
            raise Conflict
        start = Checkpoint(row["tx_id"], row["position"])
        if self._cache_key != (generation, start.tx_id, start.position):
            self._forget_cache()
        flush = Flush(start)
        flush.tx = await self._begin(conn, generation, start)
        try:
            rows = await self._read(conn, start)
            end = start
            if rows:
                end = Checkpoint(rows[-1].tx_id, rows[-1].global_position)
                page = await self._fold(conns.aux, generation, rows, end, flush.daily, flush.dirty)
                flush.events = len(rows)
                await self._write(conn, generation, page)
            await self._write_flush(
                conn, generation, flush, self._position_columns(flush.dirty), end
            )
            # compacted before it serves: no reader sees a window of raw detail
            await self.compact_history(conn, generation)
            await conn.execute(sql.RETIRE_SERVING, generation)
            await conn.execute(sql.SERVE, generation)
            await flush.tx.commit()
        except BaseException:
            await flush.tx.rollback()
            raise
        return flush.events
