"""Following the log: project each append as it commits, until told to stop.

Woken by NOTIFY on every append, polling as a fallback; a lost connection (a server
restart, a failover) is retried with backoff, and every reconnect re-reads from the
checkpoint, so nothing is skipped or applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import asyncpg

from ledger.db import Reconnect, is_transient
from ledger.store import listen_for_appends
from projections import store as sql
from projections.pipeline import Connections, Projector

__all__ = ["Follower"]


class Follower(Projector):
    """Keep the serving generation up to date with the log as it grows."""

    async def follow(
        self,
        stop: asyncio.Event,
        *,
        poll_interval: float = 1.0,
        on_batch: Callable[[int], None] | None = None,
        compact_interval: float = 60.0,
        recheck: float = 0.002,
    ) -> None:
        """Project continuously until ``stop`` is set.

        Woken by NOTIFY on every append, polling every ``poll_interval`` seconds as a
        fallback; after a lost connection it reconnects with backoff, LISTENs again and
        re-reads from its checkpoint, so nothing is skipped or applied twice.

        At the head of the log each wake-up commits what it read at once, so the fixed
        cost of a wake-up bounds the lag: the connections are kept from one wake-up to
        the next (not three pool checkouts and check-ins each time), and history is
        compacted every ``compact_interval`` seconds (its window is days long), not
        after every page. A NOTIFY whose events the gap-free read cannot see yet (a
        transaction older than theirs is still open, anywhere on the server) is looked
        at again after ``recheck`` seconds, doubling up to ``poll_interval``, rather
        than at the next NOTIFY or poll.
        """
        # bounded: a database gone for longer than LEDGER_RECONNECT_TIMEOUT ends it
        reconnect = Reconnect("following the log", first=0.2)
        while not stop.is_set():
            try:
                async with (
                    listen_for_appends(self.engine) as (woken, listener),
                    self._connections() as conns,
                ):
                    reconnect.succeeded()
                    await self._follow_connected(
                        conns,
                        woken,
                        listener,
                        stop,
                        on_batch,
                        (poll_interval, compact_interval, recheck),
                    )
            except Exception as exc:
                # A held connection that read the server's FATAL (a shutdown) before its
                # socket closed fails with a protocol error instead: it is as lost.
                if not is_transient(exc):
                    raise
                backoff = reconnect.failed(exc)  # logs it; gives up past the window
                self._forget_cache()
                # the server restarted or went away: every pooled connection is suspect
                with contextlib.suppress(Exception):
                    await self.engine.dispose()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=backoff)

    async def _follow_connected(
        self,
        conns: Connections,
        woken: asyncio.Event,
        listener: asyncpg.Connection,
        stop: asyncio.Event,
        on_batch: Callable[[int], None] | None,
        timing: tuple[float, float, float],
    ) -> None:
        """Follow on one set of connections until ``stop``; a lost connection raises.

        ``timing`` is ``(poll_interval, compact_interval, recheck)`` of :meth:`follow`.
        """
        poll_interval, compact_interval, recheck = timing
        clock = asyncio.get_running_loop().time
        generation = await sql.ensure_serving(conns.writer)
        compacted_at: float | None = None
        hidden_wait: float | None = None  # set while announced events may be hidden
        while not stop.is_set():
            if woken.is_set():
                woken.clear()
                hidden_wait = recheck
            # the first pass of a session re-reads from the checkpoint: after a reconnect
            applied = await self._drain(conns, generation, None, self.batch_size)
            if on_batch and applied:
                on_batch(applied)
            if compacted_at is None or clock() - compacted_at >= compact_interval:
                row = await conns.aux.fetchrow(sql.CHECKPOINT, generation)
                if row is not None and row["status"] == "serving":
                    await self.compact_history(conns.writer, generation)
                compacted_at = clock()
            if applied or woken.is_set():
                continue
            serving = await sql.ensure_serving(conns.writer)
            if serving != generation:
                generation = serving  # a rebuild swapped its generation in
                continue
            if listener.is_closed():
                # the server went away while we slept: LISTEN again
                raise ConnectionError("the LISTEN connection was closed")
            waiters = [
                asyncio.ensure_future(woken.wait()),
                asyncio.ensure_future(stop.wait()),
            ]
            _, pending = await asyncio.wait(
                waiters,
                timeout=poll_interval if hidden_wait is None else hidden_wait,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in pending:
                task.cancel()
            if hidden_wait is not None and not woken.is_set():
                hidden_wait = hidden_wait * 2 if hidden_wait * 2 < poll_interval else None
