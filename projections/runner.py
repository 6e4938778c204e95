"""The projection runner: the one place the read side does I/O.

It reads the log gap-free from its checkpoint, folds what it reads with the pure folds,
and writes the projection rows and the new checkpoint in one transaction. The
checkpoint row is locked by that transaction and checked against where the runner
started, so two runners (a live ``ledger project --follow`` and a query command
catching up) never apply anything twice: the second one finds the checkpoint moved,
drops what it folded, and starts again from the new checkpoint.

A fill that arrives in event order is folded incrementally. A late fill, a bust or a
correction restates its stream: the runner reads the stream's events as far as its
read position and replays them, then rewrites the stream's history and daily P&L. The
projections are therefore a function of the set of events, not of their arrival order.

:class:`ProjectionRunner` is built in layers, one concern per module:

- :mod:`projections.cache`: the cached stream states, the restatement journal and
  marks, the instruments and faulted streams; the fold of one page into them;
- :mod:`projections.writer`: the transaction that holds the checkpoint, the page and
  flush writes, the commit, history compaction;
- :mod:`projections.pipeline`: the drain of the log into a generation, three
  connections at once (read ahead, fold, write);
- :mod:`projections.follow`: the live loop (LISTEN/NOTIFY, polling, reconnects);
- :mod:`projections.rebuild`: the rebuild into a new generation (parallel parts in
  worker processes, :mod:`projections.partition`) and the atomic swap;
- this module: catching up, which on a fresh, long log is a split rebuild.

Throughput (``scripts/bench_replay``): see :mod:`projections.pipeline` and
:mod:`projections.rebuild`.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from ledger.db import retry_transient
from ledger.values import point_value
from projections import store as sql
from projections.cache import Instrument, parse_session
from projections.follow import Follower
from projections.rebuild import Rebuilder, RebuildResult

__all__ = ["Instrument", "ProjectionRunner", "RebuildResult", "parse_session", "point_value"]


class ProjectionRunner(Follower, Rebuilder):
    """Keep the projections of one database up to date with its log."""

    async def catch_up(self, progress: Callable[[int], None] | None = None) -> int:
        """Project every committed event into the serving generation; return how many.

        A serving generation that has projected nothing yet, on a log long enough to
        split (``partition_min_events``), is replaced by a rebuild instead, which splits
        the streams between processes (``ledger project`` on a fresh, long log).
        """
        async with self._connections() as conns:
            generation = await sql.ensure_serving(conns.writer)
            if not await self._worth_a_split_rebuild(conns.aux, generation):
                applied = await self._drain(conns, generation, progress, self.batch_size)
                # Always: the window moves with the clock (and its setting), not only
                # with new events; with nothing old enough this is one empty index scan.
                # (Not on a generation a rebuild swapped away meanwhile: it is being
                # dropped.)
                row = await conns.aux.fetchrow(sql.CHECKPOINT, generation)
                if row is not None and row["status"] == "serving":
                    await self.compact_history(conns.writer, generation)
                return applied
        return (await self.rebuild(progress)).events

    async def catch_up_retrying(self, progress: Callable[[int], None] | None = None) -> int:
        """:meth:`catch_up`, retried when the database is lost midway (bounded, logged).

        Safe: every page commits with its checkpoint, so a retry goes on from the last
        committed page (the in-memory states of the failed attempt are dropped). This is
        what ``ledger project`` does before it follows, so a server restart or a
        failover during that first catch-up is survived.
        """
        return await retry_transient(
            lambda: self.catch_up(progress),
            "catching up the projections",
            engine=self.engine,
            on_retry=self._forget_cache,
        )

    async def _worth_a_split_rebuild(self, conn: asyncpg.Connection, generation: int) -> bool:
        """Return whether ``generation`` has projected nothing of a log long enough to
        split (see catch_up)."""
        if self.rebuild_workers < 2:
            return False
        row = await conn.fetchrow(sql.CHECKPOINT, generation)
        if row is None or (row["tx_id"], row["position"]) != (0, 0):
            return False
        return await self._split_end(conn) is not None
