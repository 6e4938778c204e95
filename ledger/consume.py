"""Live feed: a durable NATS JetStream pull consumer that appends what it receives.

::

    JetStream ──fetch──▶ fetcher ──(msg, parsed)──▶ bounded queue ──▶ writer ──▶ PostgreSQL
        ▲                (parses)                  (backpressure)    (one task)      │
        └──────────────────────────── ack, after write_batch returned ◀───────────────┘

One fetcher task pulls messages (up to ``batch`` at a time) and parses them while the
writer waits on the database; a single writer task takes up to ``batch`` messages off
the queue, writes all their records with one :meth:`Ingester.write_batch` (one
transaction: events appended, rejects dead-lettered) and only then acknowledges them.
A crash before the ack means redelivery, and idempotent appends make redelivery
harmless, so every event lands in the log exactly once. One writer also means no two
transactions ever race on a stream.

Memory is bounded twice: by the queue (``queue_size`` messages; a full queue blocks
the fetcher) and by the JetStream consumer's ``max_ack_pending`` (the server stops
delivering while that many messages are unacknowledged).

Failures: a database error that looks like a lost connection (or a serialization
failure) is retried on the same batch, unacknowledged, with exponential backoff capped
at :data:`MAX_BACKOFF` seconds; any other error on a batch is retried one message at a
time, and a message that still fails is dead-lettered as ``INVALID_RECORD`` with the
error text, so one poison message cannot stall the feed. NATS reconnects by itself
(``max_reconnect_attempts=-1``); fetch errors are retried with the same backoff.

The consumer's own counters (``consume.messages``, ``consume.batches``,
``consume.errors``, ``consume.db_retries``, ``consume.nats_disconnects``,
``consume.nats_reconnects``) are kept in
memory and upserted into ``counters`` every few seconds by a separate task, never on
the write path. (The ingest counters ``received``/``appended``/... are bumped by the
ingester inside each batch's own transaction.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType
from nats.js.client import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.db import Reconnect, is_transient
from ledger.errors import ConsumeError, RejectReason
from ledger.ingest import IngestCounts, Ingester
from ledger.sources import (
    MAX_RECORD_BYTES,
    RAW_HEAD_BYTES,
    InputFormat,
    Parsed,
    Rejected,
    SourceRef,
    parse_message,
)
from ledger.store import (
    BUMP_COUNTERS_SQL,
    LAST_ERROR_SQL,
    EventStore,
    driver_connection,
    fewer_collections,
)

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_DURABLE",
    "DEFAULT_SERVERS",
    "DEFAULT_STREAM",
    "DEFAULT_SUBJECT",
    "MAX_BACKOFF",
    "ConsumeError",
    "ConsumeOptions",
    "ConsumeTotals",
    "Consumer",
    "is_transient",
]

log = logging.getLogger("ledger.consume")

DEFAULT_SERVERS: Final = "nats://127.0.0.1:4222"
DEFAULT_STREAM: Final = "LEDGER_IN"
DEFAULT_SUBJECT: Final = "ledger.in.>"
DEFAULT_DURABLE: Final = "ledger"
# Each write transaction pays for its BEGIN and COMMIT, for locking and moving each of
# its streams' heads once, and the projections for one page (its streams' positions):
# a backlog drains faster in bigger batches (bench_consume, fresh log, end to end:
# 19,331-19,625 events/s at 1,000, 19,848-21,544 at 4,000). A quiet feed writes what it
# has, so its lag is the same.
DEFAULT_BATCH: Final = 4000
MAX_BACKOFF: Final = 5.0
"""Seconds: the cap of the exponential backoff between retries."""
FIRST_BACKOFF: Final = 0.1

# A fetch of ``batch`` returns at once with whatever the stream holds; when it holds
# nothing, nats-py would otherwise linger for the rest of the batch until the timeout.
# So: a short-lived batch fetch, and when it finds nothing a one-message fetch that
# waits (it returns as soon as one message arrives).
_BATCH_LINGER: Final = 0.005
_IDLE_WAIT: Final = 1.0
# The fetcher yields to the writer every this many parsed messages (see _fetch_loop).
_PARSE_STEP: Final = 32

_BUMP: Final = BUMP_COUNTERS_SQL  # one statement, owned by ledger.store
_LAST_ERROR: Final = LAST_ERROR_SQL

Item = Parsed | Rejected


@dataclass(frozen=True, slots=True)
class ConsumeOptions:
    """How to reach the feed and how to pace it.

    Attributes:
        servers: NATS server URLs.
        stream: the JetStream stream, created (file storage) when missing.
        subject: the subject (wildcards allowed) the stream carries and the consumer filters.
        durable: the durable consumer name; its position survives restarts.
        batch: messages per fetch and per write transaction, at most.
        queue_size: messages held in memory between fetch and write, at most.
        ack_wait: seconds before JetStream redelivers an unacknowledged message.
        idle_exit: stop after this many seconds without a message; None runs forever.
        input_format: ``auto``, ``native`` or ``projectx``.
        stats_interval: seconds between upserts of the consumer's counters.
    """

    servers: tuple[str, ...] = (DEFAULT_SERVERS,)
    stream: str = DEFAULT_STREAM
    subject: str = DEFAULT_SUBJECT
    durable: str = DEFAULT_DURABLE
    batch: int = DEFAULT_BATCH
    queue_size: int = 10_000
    ack_wait: float = 30.0
    idle_exit: float | None = None
    input_format: InputFormat = "auto"
    stats_interval: float = 5.0

    @property
    def max_ack_pending(self) -> int:
        """Return the JetStream bound on unacknowledged messages: queue + two batches."""
        return self.queue_size + 2 * self.batch


@dataclass
class ConsumeTotals:
    """What a consumer run did; the ``consume.*`` counters hold the same numbers."""

    messages: int = 0
    batches: int = 0
    errors: int = 0
    db_retries: int = 0
    nats_disconnects: int = 0
    nats_reconnects: int = 0
    counts: IngestCounts = field(default_factory=IngestCounts)
    last_error: str = ""
    last_error_at: datetime | None = None

    def counter_values(self) -> dict[str, int]:
        """Return the consumer's own counters under their ``counters`` names."""
        return {
            "consume.messages": self.messages,
            "consume.batches": self.batches,
            "consume.errors": self.errors,
            "consume.db_retries": self.db_retries,
            "consume.nats_disconnects": self.nats_disconnects,
            "consume.nats_reconnects": self.nats_reconnects,
        }


@dataclass(slots=True)
class _Fetched:
    msg: Msg
    sequence: int | None
    items: list[Item]


def _describe(exc: BaseException) -> str:
    text = str(exc).replace("\x00", "").strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _stream_sequence(msg: Msg) -> int | None:
    """The message's JetStream stream sequence, from its ack subject.

    The common subject, ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.
    <consumer seq>.<time>.<pending>``, is split here; any other form goes through
    nats-py's ``metadata`` (which also builds a datetime and a dataclass per message:
    a tenth of the consumer's CPU at 15,000 messages/s).
    """
    reply = msg.reply
    if reply and reply.startswith("$JS.ACK."):
        tokens = reply.split(".")
        if len(tokens) == 9 and tokens[5].isdigit():
            return int(tokens[5])
    try:
        return int(msg.metadata.sequence.stream)
    except (nats.errors.NotJSMessageError, ValueError, IndexError, AttributeError):
        return None


def parse_msg(msg: Msg, fmt: InputFormat, sequence: int | None = None) -> list[Item]:
    """Parse one NATS message into results; ``line`` is its JetStream stream sequence."""
    if sequence is None:
        sequence = _stream_sequence(msg)
    ref = SourceRef(source=f"nats:{msg.subject}", line=sequence)
    data = msg.data
    if len(data) > MAX_RECORD_BYTES:
        return [
            Rejected(
                ref,
                data[:RAW_HEAD_BYTES],
                RejectReason.RECORD_TOO_LARGE,
                f"record: message is {len(data)} bytes, more than the {MAX_RECORD_BYTES} "
                f"bytes a record may have; not decoded (raw keeps its first "
                f"{RAW_HEAD_BYTES} bytes)",
            )
        ]
    return parse_message(data, ref, fmt)


class _Backoff:
    """Exponential backoff: 0.1 s, 0.2 s, ... capped at :data:`MAX_BACKOFF`."""

    def __init__(self) -> None:
        self.delay = FIRST_BACKOFF

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, MAX_BACKOFF)
        return delay

    def reset(self) -> None:
        self.delay = FIRST_BACKOFF


class Consumer:
    """Pull from JetStream, append durably, then acknowledge.

    Call :meth:`run` with an :class:`asyncio.Event`; setting it is the graceful
    shutdown path: fetching stops, the queue is drained and written, its messages are
    acknowledged, and :meth:`run` returns. Cancelling :meth:`run` instead abandons
    whatever is unacknowledged (JetStream redelivers it to the next run).
    """

    def __init__(self, engine: AsyncEngine, options: ConsumeOptions) -> None:
        self.engine = engine
        self.options = options
        self.totals = ConsumeTotals()
        self._store = EventStore(engine)
        self._ingester = Ingester(self._store, batch_size=options.batch)
        self._flushed: dict[str, int] = {}
        self._last_activity = time.monotonic()
        self._busy = False
        self._idle = False
        self._nc: Client | None = None
        self._closing = False
        # Stream sequences queued or being written: a redelivery of one of them (its
        # ack_wait ran out while it waited) is dropped instead of queued twice.
        self._inflight: set[int] = set()

    @property
    def idled_out(self) -> bool:
        """Return whether the last run ended because of ``idle_exit``."""
        return self._idle

    @property
    def nats_connected(self) -> bool:
        """Return whether the feed is connected to NATS now (for ``/readyz``)."""
        return self._nc is not None and bool(self._nc.is_connected) and not self._closing

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> ConsumeTotals:
        """Consume until ``stop`` is set (or ``idle_exit`` passes); return the totals.

        Raises:
            ConsumeError: the stream exists but does not carry the subject, or the
                consumer cannot be created.
        """
        nc = await self._connect(stop)
        if nc is None:
            return self.totals
        self._nc = nc
        flusher: asyncio.Task[None] | None = None
        try:
            js = nc.jetstream()
            sub = await self._subscribe(js)
            queue: asyncio.Queue[_Fetched | None] = asyncio.Queue(self.options.queue_size)
            flusher = asyncio.create_task(self._flush_loop(stop), name="consume-counters")
            fetcher = asyncio.create_task(self._fetch_loop(sub, queue, stop), name="fetcher")
            writer = asyncio.create_task(self._write_loop(queue), name="writer")
            try:
                with fewer_collections(freeze=True):
                    await asyncio.gather(fetcher, writer)
            finally:
                for task in (fetcher, writer):
                    task.cancel()
                await asyncio.gather(fetcher, writer, return_exceptions=True)
        finally:
            if flusher is not None:
                flusher.cancel()
                await asyncio.gather(flusher, return_exceptions=True)
            await self._close(nc)
            await self._flush_counters()
        return self.totals

    async def _connect(self, stop: asyncio.Event) -> Client | None:
        """Connect to NATS, retrying, until connected or ``stop`` is set (then None).

        Each attempt races ``stop``: a client with ``max_reconnect_attempts=-1`` may keep
        trying the servers inside ``connect`` for ever while they are down, and the first
        SIGTERM must end the process at once, not when NATS comes back.
        """
        backoff = _Backoff()
        servers = list(self.options.servers)
        log.info("connecting to NATS at %s", ", ".join(servers))
        while not stop.is_set():
            nc = Client()
            connecting = asyncio.ensure_future(
                nc.connect(
                    servers=servers,
                    name="ledger-consume",
                    connect_timeout=2,
                    reconnect_time_wait=1,
                    max_reconnect_attempts=-1,
                    allow_reconnect=True,
                    error_cb=self._on_nats_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
            )
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            if not connecting.done():
                log.info("stopped while connecting to NATS at %s", ", ".join(servers))
                while not connecting.done():
                    # Python 3.11's asyncio.wait_for (inside nats-py's connect attempt)
                    # can swallow a cancel that lands as the attempt fails: the client
                    # then retries for ever. Cancel again until the task has ended
                    # (seen: 1 in ~9 runs of test_first_sigterm_stops_consume_while_nats
                    # _is_down hung past its 15 s).
                    connecting.cancel()
                    await asyncio.wait({connecting}, timeout=0.5)
                await asyncio.gather(connecting, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await nc.close()
                return None
            try:
                connecting.result()
            except (OSError, TimeoutError, nats.errors.Error) as exc:
                self._note_error(f"cannot connect to NATS at {', '.join(servers)}", exc)
                await _sleep_or_stop(stop, backoff.next())
                continue
            return nc
        return None

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        opts = self.options
        try:
            info = await js.stream_info(opts.stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(name=opts.stream, subjects=[opts.subject], storage=StorageType.FILE)
            log.info("created stream %s on subject %s (file storage)", opts.stream, opts.subject)
        else:
            subjects = info.config.subjects or []
            if not any(_subject_covers(s, opts.subject) for s in subjects):
                raise ConsumeError(
                    f"stream: {opts.stream!r} carries {subjects}, not the subject "
                    f"{opts.subject!r} (choose --stream or --subject to match)"
                )
        config = ConsumerConfig(
            durable_name=opts.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=opts.ack_wait,
            max_ack_pending=opts.max_ack_pending,
            filter_subject=opts.subject,
        )
        try:
            await js.add_consumer(opts.stream, config=config)
        except nats.js.errors.BadRequestError as exc:
            # An existing durable whose settings cannot be edited in place: keep it.
            log.warning("using durable %s as it is (%s)", opts.durable, exc.description)
        except nats.js.errors.APIError as exc:
            raise ConsumeError(
                f"durable: cannot create consumer {opts.durable!r} on stream "
                f"{opts.stream!r}: {exc.description}"
            ) from exc
        log.info(
            "consuming %s from stream %s as durable %s (batch %d, queue %d, max_ack_pending %d)",
            opts.subject,
            opts.stream,
            opts.durable,
            opts.batch,
            opts.queue_size,
            opts.max_ack_pending,
        )
        return await js.pull_subscribe_bind(
            durable=opts.durable,
            stream=opts.stream,
            pending_msgs_limit=opts.max_ack_pending + opts.batch,
        )

    async def _close(self, nc: Client) -> None:
        self._closing = True
        try:
            if nc.is_connected:
                await nc.flush(timeout=5)  # the last acks
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            self._note_error("flushing the last acks to NATS", exc)
        try:
            await nc.close()
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            log.debug("closing the NATS connection: %s", exc)

    # -------------------------------------------------------------------- fetcher

    async def _fetch_loop(
        self,
        sub: JetStreamContext.PullSubscription,
        queue: asyncio.Queue[_Fetched | None],
        stop: asyncio.Event,
    ) -> None:
        backoff = _Backoff()
        fmt = self.options.input_format
        while not stop.is_set():
            try:
                msgs = await self._fetch(sub)
            except (nats.errors.Error, OSError) as exc:
                self._note_error("fetching from JetStream", exc)
                await _sleep_or_stop(stop, backoff.next())
                continue
            backoff.reset()
            if msgs:
                self._last_activity = time.monotonic()
                for i, msg in enumerate(msgs):
                    if i % _PARSE_STEP == _PARSE_STEP - 1:
                        # parsing a whole fetch (~30 ms a thousand) in one go held back
                        # the writer's database replies, on which the feed's pace hangs
                        await asyncio.sleep(0)
                    seq = _stream_sequence(msg)
                    if seq is not None:
                        if seq in self._inflight:
                            continue
                        self._inflight.add(seq)
                    # Blocks while the queue is full: backpressure, not memory.
                    await queue.put(_Fetched(msg, seq, parse_msg(msg, fmt, seq)))
            elif self._idle_expired(queue):
                log.info("no message for %.1f s: stopping", self.options.idle_exit)
                self._idle = True
                break
        await queue.put(None)  # the writer drains what is queued, then stops

    async def _fetch(self, sub: JetStreamContext.PullSubscription) -> list[Msg]:
        try:
            return await sub.fetch(self.options.batch, timeout=_BATCH_LINGER)
        except TimeoutError:
            pass
        try:
            return await sub.fetch(1, timeout=_IDLE_WAIT)
        except TimeoutError:
            return []

    def _idle_expired(self, queue: asyncio.Queue[_Fetched | None]) -> bool:
        limit = self.options.idle_exit
        if limit is None or self._busy or not queue.empty():
            return False
        return time.monotonic() - self._last_activity >= limit

    # --------------------------------------------------------------------- writer

    async def _write_loop(self, queue: asyncio.Queue[_Fetched | None]) -> None:
        batch_size = self.options.batch
        done = False
        while not done:
            first = await queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < batch_size and not queue.empty():
                nxt = queue.get_nowait()
                if nxt is None:
                    done = True
                    break
                batch.append(nxt)
            self._busy = True
            try:
                await self._write_and_ack(batch)
            finally:
                self._busy = False
                self._last_activity = time.monotonic()

    async def _write_and_ack(self, batch: Sequence[_Fetched]) -> None:
        items = [item for f in batch for item in f.items]
        counts = await self._write(items) if items else IngestCounts()
        # Durable now: only from here on may JetStream forget these messages.
        for f in batch:
            try:
                await f.msg.ack()
            except (nats.errors.Error, OSError) as exc:
                # Not acknowledged means redelivered, and a redelivered event is a duplicate.
                self._note_error("acknowledging a message", exc)
            if f.sequence is not None:
                self._inflight.discard(f.sequence)
        self.totals.messages += len(batch)
        self.totals.batches += 1
        self.totals.counts.add(counts)

    async def _write(self, items: Sequence[Item]) -> IngestCounts:
        """Write ``items`` durably, retrying what is transient and isolating what is not."""
        # bounded: a database gone for longer than LEDGER_RECONNECT_TIMEOUT stops the
        # consumer with one line (its unacknowledged messages are redelivered)
        reconnect = Reconnect(f"writing {len(items)} records")
        while True:
            try:
                return await self._ingester.write_batch(items)
            except Exception as exc:
                # The ingester caches instruments it saw in the failed batch; start afresh.
                self._ingester = Ingester(self._store, batch_size=self.options.batch)
                if is_transient(exc):
                    self.totals.db_retries += 1
                    delay = reconnect.failed(exc)
                    self._note_error(f"writing {len(items)} records (retry in {delay:.1f} s)", exc)
                    await self.engine.dispose()  # drop pooled connections to a dead server
                    await asyncio.sleep(delay)
                    continue
                self._note_error(f"writing {len(items)} records", exc)
                if len(items) > 1:
                    total = IngestCounts()
                    for item in items:
                        total.add(await self._write([item]))
                    return total
                (item,) = items
                if isinstance(item, Rejected) and item.message.startswith("write: "):
                    raise  # cannot even dead-letter it: stop rather than lose it
                return await self._write([_poisoned(item, exc)])

    # ------------------------------------------------------------------- counters

    async def _flush_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await _sleep_or_stop(stop, self.options.stats_interval)
            await self._flush_counters()
            c = self.totals.counts
            log.info(
                "messages %d, received %d, appended %d, duplicates %d, rejected %d, errors %d",
                self.totals.messages,
                c.received,
                c.appended,
                c.duplicates,
                c.rejected,
                self.totals.errors,
            )

    async def _flush_counters(self) -> None:
        """Upsert the consumer counters' growth since the last flush; keep it on failure."""
        current = self.totals.counter_values()
        delta = {k: v - self._flushed.get(k, 0) for k, v in current.items()}
        delta = {k: v for k, v in delta.items() if v}
        if not delta:
            return
        try:
            await asyncio.wait_for(self._bump(delta), 5)
        except Exception as exc:
            log.debug("counters not saved yet: %s", _describe(exc))
            return
        self._flushed = current

    async def _bump(self, delta: dict[str, int]) -> None:
        async with self.engine.connect() as sa_conn:
            conn = await driver_connection(sa_conn)
            async with conn.transaction():
                await conn.execute(_BUMP, list(delta), list(delta.values()))
                if "consume.errors" in delta and self.totals.last_error:
                    await conn.execute(_LAST_ERROR, self.totals.last_error[:2000])

    # -------------------------------------------------------------------- logging

    def _note_error(self, doing: str, exc: BaseException) -> None:
        self.totals.errors += 1
        self.totals.last_error = f"{doing}: {_describe(exc)}"
        self.totals.last_error_at = datetime.now(UTC)
        log.warning("consume error: %s", self.totals.last_error)

    async def _on_nats_error(self, exc: Exception) -> None:
        log.warning("nats: %s", _describe(exc))

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        self.totals.nats_disconnects += 1
        log.warning("nats: disconnected; reconnecting")

    async def _on_reconnected(self) -> None:
        self.totals.nats_reconnects += 1
        url = self._nc.connected_url if self._nc else None
        log.info("nats: reconnected to %s", url.geturl() if url else "?")


def _poisoned(item: Item, exc: BaseException) -> Rejected:
    """Return ``item`` as a dead letter carrying the error that kept it out of the log."""
    return Rejected(
        item.ref,
        item.raw,
        RejectReason.INVALID_RECORD,
        f"write: {_describe(exc)}",
        item.input_format,
        item.csv_header,
    )


def _subject_covers(pattern: str, subject: str) -> bool:
    """Return whether stream subject ``pattern`` captures every subject ``subject`` matches."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s):
            return False
        if token != "*" and token != s[i]:
            return False
        if token == "*" and s[i] == ">":
            return False
    return len(p) == len(s)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
