"""Hostile JSON through ingest and consume, on the real PostgreSQL and nats-server.

Whatever arrives (huge and tiny exponents, extreme dates, control characters and
trailing blanks in ids, deep nesting, random JSON in any field): nothing escapes, each
record is appended or dead-lettered once, the counts add up, the log verifies, and the
projections still fold everything that was accepted.
"""

from __future__ import annotations

import asyncio
import io
import itertools

import asyncpg
from hostile_json import INSTRUMENT, dumps, hostile_record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.consume import ConsumeOptions, Consumer
from ledger.db import make_engine, plain_url
from ledger.ingest import Ingester
from ledger.integrity import verify_log
from ledger.sources import iter_file
from ledger.store import EventStore, driver_connection
from projections.runner import ProjectionRunner

SUPPRESS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]
_serial = itertools.count()


async def _tallies(db_url: str) -> tuple[int, int, int]:
    conn = await asyncpg.connect(plain_url(db_url))
    try:
        events = await conn.fetchval("SELECT count(*) FROM events")
        rejected = await conn.fetchval("SELECT count(*) FROM rejected")
        # one dead letter per record: never two for the same line and payload
        doubled = await conn.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM rejected GROUP BY source, line, idx "
            "HAVING count(*) > 1) AS d"
        )
        return int(events), int(rejected), int(doubled)
    finally:
        await conn.close()


async def _still_sound(db_url: str) -> None:
    """The log verifies and the projections fold all of it (nothing accepted breaks them)."""
    engine = make_engine(db_url)
    try:
        await ProjectionRunner(engine).catch_up()
        async with engine.connect() as sa_conn:
            report = await verify_log(await driver_connection(sa_conn))
        assert report.ok, report.problems
    finally:
        await engine.dispose()


@settings(max_examples=40, deadline=None, suppress_health_check=SUPPRESS)
@given(records=st.lists(hostile_record(next(_serial)), min_size=1, max_size=12))
def test_hostile_records_through_ingest(db_url: str, records: list[object]) -> None:
    data = b"\n".join(dumps(r) for r in [INSTRUMENT, *records]) + b"\n"

    async def _run() -> None:
        before = await _tallies(db_url)
        results = list(iter_file(io.BytesIO(data), f"fuzz-{next(_serial)}"))
        engine = make_engine(db_url)
        try:
            counts = await Ingester(EventStore(engine), batch_size=5).ingest(results)
        finally:
            await engine.dispose()
        assert counts.received == len(results)
        assert counts.received == counts.appended + counts.duplicates + counts.rejected
        after = await _tallies(db_url)
        assert after[0] - before[0] == counts.appended
        assert after[1] - before[1] == counts.rejected
        assert after[2] == 0
        await _still_sound(db_url)

    asyncio.run(_run())


@settings(max_examples=8, deadline=None, suppress_health_check=SUPPRESS)
@given(records=st.lists(hostile_record(next(_serial)), min_size=1, max_size=10))
def test_hostile_messages_through_consume(
    db_url: str, nats_url: str, records: list[object]
) -> None:
    n = next(_serial)
    messages = [dumps(r) for r in [INSTRUMENT, *records]]

    async def _run() -> None:
        import nats

        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await js.add_stream(name=f"FUZZ{n}", subjects=[f"fuzz.{n}.>"])
            for body in messages:
                await js.publish(f"fuzz.{n}.in", body)
        finally:
            await nc.close()
        before = await _tallies(db_url)
        engine = make_engine(db_url)
        try:
            options = ConsumeOptions(
                servers=(nats_url,), stream=f"FUZZ{n}", subject=f"fuzz.{n}.>",
                durable=f"fuzz{n}", batch=4, idle_exit=1.0, stats_interval=60,
            )  # fmt: skip
            totals = await Consumer(engine, options).run(asyncio.Event())
        finally:
            await engine.dispose()
        c = totals.counts
        assert totals.messages == len(messages)
        assert c.received == c.appended + c.duplicates + c.rejected
        after = await _tallies(db_url)
        assert after[0] - before[0] == c.appended
        assert after[1] - before[1] == c.rejected
        assert after[2] == 0
        await _still_sound(db_url)

    asyncio.run(_run())
