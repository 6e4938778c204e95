"""The event log's guarantees, each against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
from decimal import Decimal

import asyncpg
import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.db import plain_url
from ledger.errors import ConcurrencyError, IdempotencyConflict
from ledger.events import Event, parse_event
from ledger.store import (
    GENESIS_HASH,
    READ_LIGHT_SQL,
    Checkpoint,
    StoredEvent,
    UncheckedEventStore,
    chain_hash,
    driver_connection,
)


def fill(exec_id: str, price: str = "5000.25", account: str = "ACC-1", **extra: object) -> Event:
    record: dict[str, object] = {
        "type": "fill",
        "account": account,
        "contract": "CON.F.US.EP.Z26",
        "exec_id": exec_id,
        "side": "BUY",
        "qty": "2",
        "price": price,
        "fee": "4.50",
        "occurred_at": "2026-11-23T14:30:00.123456Z",
    }
    record.update(extra)
    return parse_event(record)


async def count(db_url: str) -> int:
    conn = await asyncpg.connect(plain_url(db_url))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()


# ---------------------------------------------------------------- immutability


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET payload = '{}'::jsonb",
        "DELETE FROM events",
        "TRUNCATE events",
    ],
)
async def test_log_rejects_mutation_as_owner(
    store: UncheckedEventStore, db_url: str, statement: str
) -> None:
    await store.append([fill("T-1")])
    conn = await asyncpg.connect(plain_url(db_url))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(statement)
    finally:
        await conn.close()
    assert await count(db_url) == 1


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET payload = '{}'::jsonb",
        "DELETE FROM events",
        "TRUNCATE events",
    ],
)
async def test_log_rejects_mutation_as_app_role(
    store: UncheckedEventStore, db_url: str, statement: str
) -> None:
    await store.append([fill("T-1")])
    conn = await asyncpg.connect(plain_url(db_url))
    try:
        await conn.execute("SET ROLE ledger_app")
        # the application role can read and append ...
        assert await conn.fetchval("SELECT count(*) FROM events") == 1
        # ... and nothing else
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)
    finally:
        await conn.close()
    assert await count(db_url) == 1


async def test_app_role_can_append(store: UncheckedEventStore, db_url: str) -> None:
    conn = await asyncpg.connect(plain_url(db_url))
    try:
        await conn.execute("SET ROLE ledger_app")
        async with conn.transaction():
            result = await store.append_on(conn, [fill("T-9")])
    finally:
        await conn.close()
    assert result.appended == 1
    assert await count(db_url) == 1


# ----------------------------------------------------------------- idempotency


async def test_same_fill_twice_is_one_event(store: UncheckedEventStore, db_url: str) -> None:
    first = await store.append([fill("T-1")])
    second = await store.append([fill("T-1")])
    assert first.appended == 1 and first.duplicates == 0
    assert second.appended == 0 and second.duplicates == 1
    assert second.positions == first.positions
    assert await count(db_url) == 1


async def test_same_number_spelled_differently_is_the_same_event(
    store: UncheckedEventStore,
) -> None:
    first = await store.append([fill("T-1", price="5000.25")])
    second = await store.append([fill("T-1", price="5000.250000000")])
    assert second.duplicates == 1 and second.positions == first.positions


async def test_same_exec_id_different_price_conflicts(
    store: UncheckedEventStore, db_url: str
) -> None:
    await store.append([fill("T-1", price="5000.25")])
    with pytest.raises(IdempotencyConflict, match="different content") as info:
        await store.append([fill("T-1", price="5000.50")])
    assert info.value.event_id == fill("T-1").event_id
    assert await count(db_url) == 1


async def test_batch_with_one_bad_event_appends_nothing(
    store: UncheckedEventStore, db_url: str
) -> None:
    await store.append([fill("T-1", price="5000.25")])
    batch = [fill("T-2"), fill("T-3"), fill("T-1", price="4999.00"), fill("T-4")]
    with pytest.raises(IdempotencyConflict):
        await store.append(batch)
    assert await count(db_url) == 1
    stream = await store.read_stream("ACC-1/CON.F.US.EP.Z26")
    assert [e.stream_version for e in stream] == [1]


@pytest.mark.parametrize("conflict", ["stored", "in batch"])
async def test_large_batch_with_a_conflict_at_its_end_appends_nothing(
    store: UncheckedEventStore, db_url: str, conflict: str
) -> None:
    """A big batch whose last event conflicts appends none of the events before it."""
    await store.append([fill("T-1", price="5000.25")])
    batch = [fill(f"T-{i}", account=f"ACC-{i % 5}") for i in range(2, 900)]
    if conflict == "stored":
        batch.append(fill("T-1", price="4999.00"))
    else:
        batch.append(fill("T-2", price="4999.00", account="ACC-2"))
    with pytest.raises(IdempotencyConflict):
        await store.append(batch)
    assert await count(db_url) == 1
    conn = await asyncpg.connect(plain_url(db_url))
    try:
        assert await conn.fetchval("SELECT sum(version) FROM streams") == 1
    finally:
        await conn.close()


async def test_in_batch_duplicate_reports_one_position(store: UncheckedEventStore) -> None:
    result = await store.append([fill("T-1"), fill("T-1")])
    assert result.appended == 1 and result.duplicates == 1
    assert result.positions[0] == result.positions[1]


# ------------------------------------------------------------------ concurrency


async def test_expected_version_mismatch_raises(store: UncheckedEventStore) -> None:
    stream = "ACC-1/CON.F.US.EP.Z26"
    await store.append([fill("T-1")], expected_versions={stream: 0})
    with pytest.raises(ConcurrencyError, match="expected version 0, but it is at version 1"):
        await store.append([fill("T-2")], expected_versions={stream: 0})
    await store.append([fill("T-2")], expected_versions={stream: 1})
    assert [e.stream_version for e in await store.read_stream(stream)] == [1, 2]


async def test_expected_version_conflict_does_not_wait_on_a_lock(
    store: UncheckedEventStore, engine: AsyncEngine
) -> None:
    stream = "ACC-1/CON.F.US.EP.Z26"
    await store.append([fill("T-1")])
    async with engine.connect() as held:
        conn = await driver_connection(held)
        tx = conn.transaction()
        await tx.start()
        await store.append_on(conn, [fill("T-2")])  # holds the stream's head
        started = asyncio.get_running_loop().time()
        with pytest.raises(ConcurrencyError, match="another writer"):
            await asyncio.wait_for(
                store.append([fill("T-3")], expected_versions={stream: 2}), timeout=5
            )
        assert asyncio.get_running_loop().time() - started < 1.0
        await tx.rollback()


# ------------------------------------------------------------ gap-free reading


async def test_late_commit_is_read_not_skipped(
    store: UncheckedEventStore, engine: AsyncEngine, db_url: str
) -> None:
    """A naive reader skips an event that commits after a later-positioned one; ours does not."""
    async with engine.connect() as sa_a:
        a = await driver_connection(sa_a)
        tx_a = a.transaction()
        await tx_a.start()
        early = await store.append_on(a, [fill("A-1", account="ACC-A")])  # lower position
        late = await store.append([fill("B-1", account="ACC-B")])  # higher position, commits first
        assert early.positions[0] < late.positions[0]

        naive = await asyncpg.connect(plain_url(db_url))
        try:
            naive_seen = [
                r[0]
                for r in await naive.fetch(
                    "SELECT global_position FROM events WHERE global_position > 0 "
                    "ORDER BY global_position"
                )
            ]
        finally:
            await naive.close()
        assert naive_seen == [late.positions[0]]  # the naive checkpoint is now past A-1

        ours, checkpoint = await store.read_all(Checkpoint())
        assert ours == []  # B-1 waits behind the still-running older transaction
        await tx_a.commit()

    ours, checkpoint = await store.read_all(checkpoint)
    assert [e.global_position for e in ours] == [early.positions[0], late.positions[0]]
    # the naive reader, resuming after its checkpoint, never sees A-1
    assert early.positions[0] < naive_seen[-1]


@pytest.mark.parametrize(
    ("run", "paged"), [(0, False), (1, False), (2, False), (3, True), (4, True)]
)
async def test_concurrent_writers_and_a_tailing_reader(
    store: UncheckedEventStore, engine: AsyncEngine, run: int, paged: bool
) -> None:
    """8 writers, thousands of events, commit order shuffled against insert order; a
    reader tailing with checkpoints sees every committed event exactly once. Batch sizes
    straddle the store's switch from INSERT to COPY, so both write paths interleave.
    ``paged``: the reader takes ``store.pages`` (which reads the next page while the
    reader has this one) up to the log's end, each time round."""
    writers, batches = 8, 20
    rng = random.Random(run)
    sizes = [[rng.choice([5, 20, 40, 120]) for _ in range(batches)] for _ in range(writers)]
    appended: list[int] = []
    done = asyncio.Event()

    async def writer(w: int) -> None:
        for b in range(batches):
            events = [fill(f"W{w}-B{b}-{i}", account=f"ACC-{w % 3}") for i in range(sizes[w][b])]
            async with engine.connect() as sa_conn:
                conn = await driver_connection(sa_conn)
                async with conn.transaction():
                    result = await store.append_on(conn, events)
                    # hold the transaction open: positions were handed out at insert,
                    # the commit lands after other writers' later inserts
                    await asyncio.sleep(rng.random() * 0.02)
            appended.extend(result.positions)

    seen: list[int] = []

    async def reader() -> None:
        checkpoint = Checkpoint()
        while True:
            finished = done.is_set()
            limit = rng.choice([7, 50, 200])
            if paged:
                batch, start = [], checkpoint
                async for page, end in store.pages(start, limit=limit):
                    batch.extend(page)
                    checkpoint = end
            else:
                batch, checkpoint = await store.read_all(checkpoint, limit=limit)
            seen.extend(e.global_position for e in batch)
            if finished and not batch:
                return
            if not batch:
                await asyncio.sleep(0.002)

    reading = asyncio.create_task(reader())
    await asyncio.gather(*(writer(w) for w in range(writers)))
    done.set()
    await reading
    assert len(appended) == sum(map(sum, sizes))
    assert len(seen) == len(set(seen)), "an event was read twice"
    assert sorted(seen) == sorted(appended), "an event was skipped"


async def test_notification_wakes_a_waiting_reader(store: UncheckedEventStore) -> None:
    async with store.notifications() as woken:
        await store.append([fill("T-1")])
        await asyncio.wait_for(woken.wait(), timeout=5)


# ------------------------------------------------------------------- exactness


async def test_nine_decimal_prices_and_sub_cent_tick_values_stay_exact(
    store: UncheckedEventStore,
) -> None:
    instrument = parse_event(
        {
            "type": "instrument",
            "contract": "CON.F.US.ZN.Z26",
            "tick_size": "0.015625",
            "tick_value": "15.625",
            "currency": "USD",
        }
    )
    await store.append([instrument, fill("T-1", price="6065.250000000")])
    rows, _ = await store.read_all(Checkpoint())
    assert rows[0].payload["tick_value"] == "15.625"
    assert rows[0].payload["tick_size"] == "0.015625"
    assert rows[1].payload["price"] == "6065.250000000"
    assert Decimal(rows[1].payload["price"]) == Decimal("6065.25")


async def test_large_batch_reports_the_stored_positions(
    store: UncheckedEventStore, db_url: str
) -> None:
    """A batch big enough to be COPYed: the positions it reports are those in the log,
    duplicates (earlier and in-batch) report their originals, and heads and chains hold."""
    earlier = await store.append([fill("T-0"), fill("T-1", account="ACC-2")])
    # ~900 events, duplicates at both ends
    batch = [fill(f"T-{i}", account=f"ACC-{i % 3}") for i in range(2, 900)]
    batch[10:10] = [fill("T-0"), fill("T-1", account="ACC-2"), batch[0]]  # duplicates
    batch += [fill("T-0"), batch[-1]]
    result = await store.append(batch)
    assert (result.appended, result.duplicates) == (898, 5)
    assert result.positions[-2] == earlier.positions[0]
    assert result.positions[-1] == result.positions[-3]
    assert result.positions[10:12] == earlier.positions
    assert result.positions[12] == result.positions[0]
    stored = {
        e.event_id: e
        for account in ("ACC-0", "ACC-1", "ACC-2")
        for e in await store.read_stream(f"{account}/CON.F.US.EP.Z26")
    }
    assert [stored[e.event_id].global_position for e in batch] == list(result.positions)
    conn = await asyncpg.connect(plain_url(db_url))
    try:
        heads = dict(await conn.fetch("SELECT stream, version FROM streams"))
    finally:
        await conn.close()
    for account in ("ACC-0", "ACC-1", "ACC-2"):
        stream = await store.read_stream(f"{account}/CON.F.US.EP.Z26")
        assert [e.stream_version for e in stream] == list(range(1, len(stream) + 1))
        assert heads[f"{account}/CON.F.US.EP.Z26"] == len(stream)
        assert_chain(stream)
    # the next append, small again, continues the chains the COPY left
    await store.append([fill("T-999")])
    assert_chain(await store.read_stream("ACC-1/CON.F.US.EP.Z26"))


def assert_chain(events: list[StoredEvent]) -> None:
    previous = GENESIS_HASH
    for e in events:
        assert e.hash == chain_hash(previous, e.stream_version, e.event_id, e.content_digest)
        previous = e.hash


async def test_hash_chain_links_each_event_to_the_previous(store: UncheckedEventStore) -> None:
    await store.append([fill("T-1"), fill("T-2")])
    await store.append([fill("T-3")])
    events = await store.read_stream("ACC-1/CON.F.US.EP.Z26")
    previous = GENESIS_HASH
    for e in events:
        assert e.hash == chain_hash(previous, e.stream_version, e.event_id, e.content_digest)
        previous = e.hash
    assert len({e.hash for e in events}) == 3


async def test_first_read_from_the_start_gives_the_log_statistics(
    store: UncheckedEventStore, db_url: str
) -> None:
    """A reader starting from zero on a big never-analyzed log analyzes it first.

    Without statistics the planner guesses how much of the log lies past a checkpoint
    and may answer a page by sorting the whole rest of it; the index walk is only
    chosen reliably once the log has statistics (asserted on a page large enough that
    the guess matters)."""
    for b in range(6):
        await store.append([fill(f"T-{b}-{i}", account=f"ACC-{i % 7}") for i in range(1000)])
    conn = await asyncpg.connect(plain_url(db_url))
    try:
        stats = "SELECT reltuples >= 0 FROM pg_class WHERE oid = 'events'::regclass"
        assert not await conn.fetchval(stats)  # (autovacuum waits a minute: not yet)
        events, _ = await store.read_all(Checkpoint(), limit=10)
        assert len(events) == 10
        assert await conn.fetchval(stats)
        explain = await conn.fetch("EXPLAIN " + READ_LIGHT_SQL, "0", 0, 5000)
        plan = "\n".join(r[0] for r in explain)
        assert "Sort" not in plan and "ix_events_tx_id_global_position" in plan, plan
    finally:
        await conn.close()


async def test_pages_reads_ahead_to_the_end_and_closes_clean(store: UncheckedEventStore) -> None:
    """``pages`` yields what ``read_all`` does, page after page, up to the log's end; a
    reader that stops early (its next page already being read) leaves nothing running."""
    await store.append([fill(f"P-{i}") for i in range(25)])
    expected, after = [], Checkpoint()
    while True:
        page, after = await store.read_all(after, limit=10)
        if not page:
            break
        expected.append(([e.global_position for e in page], after))
    got = [([e.global_position for e in page], end) async for page, end in store.pages(limit=10)]
    assert got == expected and [len(p) for p, _ in got] == [10, 10, 5]
    # stopped after its first page, while the second is being read
    async with contextlib.aclosing(store.pages(limit=10)) as pages:
        async for page, _ in pages:
            assert len(page) == 10
            break
    pending = [t for t in asyncio.all_tasks() if "read_all" in repr(t.get_coro())]
    assert pending == []
    # a page that ends the log exactly: one more read finds nothing, and it ends
    got = [len(p) async for p, _ in store.pages(expected[1][1], limit=5)]
    assert got == [5]


async def test_read_rows_are_immutable_and_leave_the_collector_as_found(
    store: UncheckedEventStore,
) -> None:
    """A read's events are immutable, carry every column of their row, and the pause of
    the cyclic collector while a page is decoded ends with the read: an enabled collector
    is enabled again, one the caller disabled stays disabled."""
    await store.append([fill("RO-1"), fill("RO-2", price="5000.50")])
    assert gc.isenabled()
    page, _ = await store.read_all(limit=10)
    assert gc.isenabled()
    first = page[0]
    with pytest.raises(AttributeError):
        first.payload = {}  # type: ignore[misc]
    assert first.payload["exec_id"] == "RO-1" and first.payload["price"] == "5000.25"
    assert (first.stream, first.stream_version, first.type) == (
        "ACC-1/CON.F.US.EP.Z26",
        1,
        "fill",
    )
    assert first.hash == chain_hash(GENESIS_HASH, 1, first.event_id, first.content_digest)
    assert isinstance(first.recorded_at, type(first.occurred_at))
    assert first.occurred_at.isoformat() == "2026-11-23T14:30:00.123456+00:00"
    assert [e.global_position for e in await store.read_stream(first.stream)] == [
        e.global_position for e in page
    ]
    gc.disable()
    try:
        again, _ = await store.read_all(limit=10)
        assert not gc.isenabled()
        assert [e.event_id for e in again] == [e.event_id for e in page]
    finally:
        gc.enable()


# ------------------------------------------------- one event, one statement


def _statements(engine: AsyncEngine) -> list[str]:
    """Record every statement the engine's connections send from now on."""
    sent: list[str] = []

    def log_queries(dbapi_conn: object, _record: object) -> None:
        driver: asyncpg.Connection = dbapi_conn.driver_connection  # type: ignore[attr-defined]
        driver.add_query_logger(lambda record: sent.append(record.query))

    event.listen(engine.sync_engine, "connect", log_queries)
    return sent


async def test_one_event_is_one_statement_and_the_same_row(
    engine: AsyncEngine, store: UncheckedEventStore
) -> None:
    """A single event goes to the log in one statement (no BEGIN, lock, insert, COMMIT):
    a new stream and an existing one, between batches; the rows, versions and hash
    links are those the batch path writes (chain_hash), the head follows."""
    await engine.dispose()  # new connections, each with the logger
    sent = _statements(engine)
    first = await store.append([fill("S-1")])  # a new stream
    assert len(sent) == 1 and "WITH head AS" in sent[0]
    await store.append([fill("S-2"), fill("S-3")])
    sent.clear()
    fourth = await store.append([fill("S-4")], causation_id=None)  # an existing stream
    assert len(sent) == 1
    other = await store.append([fill("S-5", account="ACC-2")])
    assert (first.appended, fourth.appended, other.appended) == (1, 1, 1)
    assert fourth.positions[0] > first.positions[0]
    events = await store.read_stream("ACC-1/CON.F.US.EP.Z26")
    assert [e.stream_version for e in events] == [1, 2, 3, 4]
    previous = GENESIS_HASH
    for e in events:
        assert e.hash == chain_hash(previous, e.stream_version, e.event_id, e.content_digest)
        previous = e.hash
    conn = await asyncpg.connect(plain_url(str(engine.url)))
    try:
        head = await conn.fetchrow("SELECT version, last_hash FROM streams WHERE stream = $1",
                                   "ACC-1/CON.F.US.EP.Z26")  # fmt: skip
    finally:
        await conn.close()
    assert (head["version"], bytes(head["last_hash"])) == (4, previous)
    # a duplicate alone: the statement fails whole, the batch path reports it
    sent.clear()
    again = await store.append([fill("S-4")])
    assert (again.appended, again.duplicates, again.positions) == (0, 1, fourth.positions)
    with pytest.raises(IdempotencyConflict):
        await store.append([fill("S-4", price="5000.50")])
    assert [e.stream_version for e in await store.read_stream("ACC-1/CON.F.US.EP.Z26")] == [
        1, 2, 3, 4
    ]  # fmt: skip


async def test_single_and_batch_writers_on_one_stream_keep_one_chain(
    store: UncheckedEventStore,
) -> None:
    """Writers of one event at a time and writers of batches, concurrently on the same
    stream (and a second one): versions run 1..N without a gap, each link follows the
    one before it, and the head holds the last."""

    async def singles(w: int) -> None:
        for i in range(25):
            await store.append([fill(f"ONE-{w}-{i}", account=f"ACC-{i % 2}")])

    async def batches(w: int) -> None:
        for b in range(8):
            await store.append(
                [fill(f"MANY-{w}-{b}-{i}", account=f"ACC-{i % 2}") for i in range(5)]
            )

    await asyncio.gather(*(singles(w) for w in range(6)), *(batches(w) for w in range(2)))
    total = 0
    for stream in ("ACC-0/CON.F.US.EP.Z26", "ACC-1/CON.F.US.EP.Z26"):
        events = await store.read_stream(stream)
        total += len(events)
        assert [e.stream_version for e in events] == list(range(1, len(events) + 1))
        previous = GENESIS_HASH
        for e in events:
            assert e.hash == chain_hash(previous, e.stream_version, e.event_id, e.content_digest)
            previous = e.hash
    assert total == 6 * 25 + 2 * 8 * 5
