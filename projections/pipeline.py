"""Draining the log into one generation: read ahead, fold, write, three connections.

:class:`Projector` reads the log gap-free from a generation's checkpoint, in pages of
``batch_size`` events, until it reaches the log's head. Three connections work at once:
one reads the next page while the current one is folded; one reads what folding needs
(cached states, streams to restate); one writes, so PostgreSQL stores page *n* while
Python folds page *n + 1*. A transaction covers one page when following the log and
many pages (``rebuild_flush_events``) in a rebuild, where a kill costs at most that much
work. A drain that finds the checkpoint moved by another runner starts again from it; one
whose generation was swapped away stops. Memory is bounded by the page size and the
state cache, never the log.

The catch-up and follow of the serving generation (:mod:`projections.runner`,
:mod:`projections.follow`), the rebuild (:mod:`projections.rebuild`) and its worker
processes (:mod:`projections.partition`) all drain through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.db import is_transient
from ledger.settings import Settings
from ledger.store import (
    Checkpoint,
    EventStore,
    LightRow,
    driver_connection,
    ensure_log_statistics,
    fewer_collections,
)
from projections.writer import Conflict, Flush, PageWriter, Retired

__all__ = ["Connections", "Projector", "positive_env"]

_DEFAULT_BATCH = 5000
_REBUILD_FLUSH_EVENTS = 200_000


def positive_env(name: str, default: int) -> int:
    """Return the positive integer in environment variable ``name``, or ``default``."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


def _default_batch_size() -> int:
    """Return ``LEDGER_PROJECTION_BATCH`` (events per page) or 5000."""
    return positive_env("LEDGER_PROJECTION_BATCH", _DEFAULT_BATCH)


@dataclass(slots=True)
class Connections:
    """A drain's three connections (see the module's docstring)."""

    reader: asyncpg.Connection  # reads the next page while the current one is folded
    aux: asyncpg.Connection  # cached states and restated streams, for the fold
    writer: asyncpg.Connection  # the transaction


class Projector(PageWriter):
    """Project the log into a generation: read pages ahead, fold them, write them."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings | None = None,
        *,
        batch_size: int | None = None,
        snapshot_every: int = 64,
        cache_size: int = 50_000,
    ) -> None:
        self.engine = engine
        settings = settings or Settings()
        self.batch_size = batch_size or _default_batch_size()
        # events per transaction in a rebuild (live catch-up commits every page); a killed
        # rebuild loses at most this much work. LEDGER_REBUILD_FLUSH overrides it.
        self.rebuild_flush_events = positive_env("LEDGER_REBUILD_FLUSH", _REBUILD_FLUSH_EVENTS)
        super().__init__(settings, snapshot_every=snapshot_every, cache_size=cache_size)
        self._log_has_statistics = False  # see ledger.store.ensure_log_statistics

    @contextlib.asynccontextmanager
    async def _connections(self) -> AsyncIterator[Connections]:
        async with (
            self.engine.connect() as reader,
            self.engine.connect() as aux,
            self.engine.connect() as writer,
        ):
            try:
                yield Connections(
                    await driver_connection(reader),
                    await driver_connection(aux),
                    await driver_connection(writer),
                )
            except BaseException as exc:
                if isinstance(exc, Exception) and is_transient(exc):
                    # SQLAlchemy never saw these fail (we drive asyncpg directly): make
                    # sure the pool does not hand them out again
                    for sa_conn in (reader, aux, writer):
                        with contextlib.suppress(Exception):
                            await sa_conn.invalidate()
                raise

    async def _read(self, conn: asyncpg.Connection, after: Checkpoint) -> list[LightRow]:
        return await EventStore.read_light(conn, after, self.batch_size)

    async def _drain(
        self,
        conns: Connections,
        generation: int,
        progress: Callable[[int], None] | None,
        flush_events: int,
    ) -> int:
        """Project everything committed into ``generation``; return how many events."""
        total = 0
        if not self._log_has_statistics:
            self._log_has_statistics = await ensure_log_statistics(conns.aux)
        while True:
            row = await self._checkpoint(conns.aux, generation)
            if row is None or row["status"] == "retired":
                return total  # swapped away: the caller re-reads the serving one
            start = Checkpoint(row["tx_id"], row["position"])
            if self._cache_key != (generation, start.tx_id, start.position):
                self._forget_cache()  # another runner moved it on: the cache may be stale
            try:
                with fewer_collections(freeze=True) as settle:
                    total += await self._pipeline(
                        conns, generation, start, progress, flush_events, settle
                    )
                return total
            except Conflict:
                self._forget_cache()
            except Retired:
                self._forget_cache()
                return total
            except BaseException:
                # rolled back (or never committed): the cached states are ahead of the rows
                self._forget_cache()
                raise

    async def _pipeline(
        self,
        conns: Connections,
        generation: int,
        start: Checkpoint,
        progress: Callable[[int], None] | None,
        flush_events: int,
        settle: Callable[[], None],
    ) -> int:
        """Read, fold and write pages until the log is drained, three connections at once.

        ``settle`` is called after each page's fold (see ``fewer_collections``).
        """
        writer = conns.writer
        flush = Flush(start)
        total = 0
        if (
            self._journal is None
            and not self._cache
            and start.tx_id == 0
            and start.position == 0
            and self.journal_rows > 0
        ):
            # from the start of the log with nothing cached: every stream event comes
            # through _fold from here on, so memory holds whole streams
            self._journal = {}
            self._marks = {}
            self._journal_lost.clear()
            self._journal_size = 0
        write: asyncio.Task[int] | None = None
        nxt: asyncio.Task[list[LightRow]] | None = asyncio.ensure_future(
            self._read(conns.reader, start)
        )
        try:
            while nxt is not None:
                rows = await nxt
                nxt = None
                if not rows:
                    break
                last = rows[-1]
                end = Checkpoint(last.tx_id, last.global_position)
                # A short page is the head of the log: commit what we have rather than
                # keep reading a trickle of new events into one ever-growing transaction
                # (live projections would lag by a whole flush).
                if len(rows) >= self.batch_size:
                    nxt = asyncio.ensure_future(self._read(conns.reader, end))
                page = await self._fold(conns.aux, generation, rows, end, flush.daily, flush.dirty)
                settle()  # what the fold keeps is out of the young collections' way
                if write is not None:
                    total += await write
                    write = None
                self._trim_cache(keep=flush.dirty)
                flush.events += len(rows)
                flush.end = end
                if flush.tx is None:
                    flush.tx = await self._begin(writer, generation, flush.start)
                if flush.events >= flush_events:
                    positions = self._position_columns(flush.dirty)
                    write = asyncio.ensure_future(
                        self._write_and_commit(writer, generation, page, flush, positions, progress)
                    )
                    flush = Flush(end)
                else:
                    write = asyncio.ensure_future(self._write_page(writer, generation, page))
            if write is not None:
                total += await write
                write = None
            if flush.tx is not None:
                total += await self._commit(
                    writer, generation, flush, self._position_columns(flush.dirty), progress
                )
            return total
        finally:
            for task in (nxt, write):
                if task is None:
                    continue
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                elif not task.cancelled():
                    # a read ahead that failed while the fold raised first: its error is
                    # the same lost connection, already handled; retrieve it so asyncio
                    # does not print it as "Task exception was never retrieved"
                    task.exception()
            if not writer.is_closed() and writer.is_in_transaction():
                # failed or cancelled half way: never hand the pool an open transaction
                with contextlib.suppress(Exception):
                    await writer.execute("ROLLBACK")
