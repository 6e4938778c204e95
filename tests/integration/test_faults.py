"""One bad stream is isolated, never fatal (issue 13, item 3), on a real PostgreSQL.

An event the fold cannot apply is written straight into ``events`` as the table owner
(the way an older version or someone with database rights could), with a valid hash
chain. Every other stream keeps projecting and answering; the faulted stream answers
with ``StreamFaulted`` naming the event and the way out; a correction or bust of the
offending execution, appended through the ordinary write path, heals it, and then the
projections equal a fresh rebuild (one process and split) and a pure replay.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import Ledger
from ledger.errors import StreamFaulted
from ledger.events import Event, parse_event
from ledger.ingest import Ingester
from ledger.sources import Parsed, SourceRef
from ledger.store import GENESIS_HASH, EventStore, chain_hash, driver_connection, encode_event
from projections import queries
from projections.runner import ProjectionRunner
from tests.integration.test_projections import (
    ROOT,
    T0,
    TABLE_ROWS,
    adjust,
    append_all,
    checkpoints,
    fill,
    instruments,
    oracle,
    snapshot_serving,
)

BAD = "A1/C.ES"
_HEAD = "SELECT version, last_hash FROM streams WHERE stream = $1 FOR UPDATE"
_NEW_HEAD = "INSERT INTO streams (stream, version, last_hash) VALUES ($1, 0, $2)"
_INSERT = """
INSERT INTO events (stream, stream_version, event_id, type, schema_version, payload,
                    occurred_at, content_digest, hash)
VALUES ($1, $2, $3::uuid, $4, $5, $6::jsonb, $7, $8, $9) RETURNING global_position
"""
_MOVE = "UPDATE streams SET version = $2, last_hash = $3 WHERE stream = $1"
_FAULTS = """
SELECT f.stream, f.position, f.event_id::text, f.exec_id, f.reason FROM proj_faults AS f
JOIN projection_checkpoint AS c ON c.generation = f.generation AND c.status = 'serving'
ORDER BY f.stream
"""


async def append_as_owner(db_url: str, event: Event) -> int:
    """Append ``event`` with plain SQL as the table owner, past every check of the
    write path, chaining it with the store's own encoding and hash; return its position."""
    payload, digest = encode_event(event)
    conn = await asyncpg.connect(db_url)
    try:
        async with conn.transaction():
            head = await conn.fetchrow(_HEAD, event.stream)
            if head is None:
                await conn.execute(_NEW_HEAD, event.stream, GENESIS_HASH)
                version, last = 0, GENESIS_HASH
            else:
                version, last = head[0], bytes(head[1])
            version += 1
            link = chain_hash(last, version, event.event_id, digest)
            position: int = await conn.fetchval(
                _INSERT,
                event.stream,
                version,
                event.event_id,
                event.type,
                event.schema_version,
                payload,
                getattr(event, "occurred_at", None),
                digest,
                link,
            )
            await conn.execute(_MOVE, event.stream, version, link)
    finally:
        await conn.close()
    return position


async def serving_faults(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as sa:
        rows = await (await driver_connection(sa)).fetch(_FAULTS)
    return [dict(r) for r in rows]


async def everything(engine: AsyncEngine) -> dict[str, Any]:
    """The serving rows of every projection table, faults included."""
    rows: dict[str, Any] = dict(await snapshot_serving(engine))
    rows["proj_faults"] = await serving_faults(engine)
    return rows


async def assert_rebuilds_equal(engine: AsyncEngine) -> dict[str, Any]:
    """Rebuild in one process, then split between worker processes: both must give
    exactly the serving rows, faults included."""
    before = await everything(engine)
    for workers in (1, 2):
        runner = ProjectionRunner(engine, batch_size=5)
        runner.rebuild_workers = workers
        runner.partition_min_events = 1
        result = await runner.rebuild()
        assert result.events > 0
        after = await everything(engine)
        for table in (*TABLE_ROWS, "proj_faults"):
            assert after[table] == before[table], (workers, table)
    return after


def ledger_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def positions(engine: AsyncEngine, **kwargs: Any) -> list[dict[str, Any]]:
    async with engine.connect() as sa:
        return await queries.position_rows(await driver_connection(sa), **kwargs)


def _healthy_day() -> list[Event]:
    t = [T0 + timedelta(minutes=i) for i in range(20)]
    return [
        fill("A0", "C.ES", "G1", "BUY", 2, "5000.00", t[0]),
        fill("A0", "C.EQ", "G2", "BUY", 10, "100.00", t[1]),
        fill("A1", "C.ES", "B1", "BUY", 1, "5001.00", t[2], "1.24"),
        fill("A2", "C.EQ", "H1", "SELL", 5, "101.00", t[3]),
    ]


async def test_off_tick_fill_faults_one_stream_and_a_correction_heals_it(
    engine: AsyncEngine,
    store: EventStore,
    db_url: str,
    cli_env: dict[str, str],
    tmp_path: Path,
) -> None:
    log = await append_all(store, instruments())
    log += await append_all(store, _healthy_day())
    runner = ProjectionRunner(engine, batch_size=3)
    await runner.catch_up()  # A1/C.ES is projected and serving before the bad fill
    t = [T0 + timedelta(minutes=30 + i) for i in range(10)]
    bad = fill("A1", "C.ES", "X9", "BUY", 1, "5000.10", t[0], "0.62")  # tick 0.25
    bad_position = await append_as_owner(db_url, bad)
    log.append((bad_position, bad))
    log += await append_all(
        store,
        [
            fill("A0", "C.ES", "G3", "SELL", 1, "5003.00", t[1]),
            fill("A1", "C.ES", "B2", "SELL", 1, "5004.00", t[2]),  # after it, same stream
            fill("A2", "C.EQ", "H2", "BUY", 5, "99.50", t[3]),
        ],
    )

    # the catch-up goes on past the bad fill; only its stream is set aside
    applied = await runner.catch_up()
    assert applied == 4
    assert (await checkpoints(engine))[-1][2] == len(log)
    faults = await serving_faults(engine)
    assert faults == [
        {
            "stream": BAD,
            "position": bad_position,
            "event_id": bad.event_id,
            "exec_id": "X9",
            "reason": faults[0]["reason"],
        }
    ]
    assert faults[0]["reason"].startswith("OffTickPrice: price 5000.10 of execution X9")
    serving = await snapshot_serving(engine)
    for table in TABLE_ROWS:
        assert all(r["stream"] != BAD for r in serving[table]), table

    # every other stream answers, and equals a pure replay of the log
    found: list[queries.StreamFault] = []
    rows = await positions(engine, include_flat=True, faults=found)
    expected = oracle([(p, e) for p, e in log if e.stream != BAD])
    assert {f"{r['account']}/{r['contract']}": r["signed_qty"] for r in rows} == {
        s: state.signed_qty for s, state in expected.items() if s.split("/")[0] != "instrument"
    }
    assert [f.stream for f in found] == [BAD]
    # the faulted stream answers with the named error, on every clock that sees the fill
    with pytest.raises(StreamFaulted) as caught:
        await positions(engine, account="A1", contract="C.ES")
    message = str(caught.value)
    for part in (BAD, str(bad_position), bad.event_id, "X9", "OffTickPrice", "correction", "bust"):
        assert part in message, part
    with pytest.raises(StreamFaulted):
        await positions(engine, account="A1", contract="C.ES", clock="as_of", at=t[5])
    # ... and not on one that does not: before the fill happened, or was recorded
    before = await positions(
        engine, account="A1", contract="C.ES", clock="as_of", at=t[0] - timedelta(seconds=1)
    )
    assert [r["signed_qty"] for r in before] == [1]
    async with engine.connect() as sa:
        conn = await driver_connection(sa)
        recorded = await conn.fetchval(
            "SELECT recorded_at FROM events WHERE global_position = $1", bad_position
        )
        known = await queries.position_rows(
            conn,
            account="A1",
            contract="C.ES",
            clock="as_known_at",
            at=recorded - timedelta(microseconds=1),
        )
        assert [r["signed_qty"] for r in known] == [1]
        found = []
        everyone_then = await queries.position_rows(
            conn, clock="as_of", at=t[5], include_flat=True, faults=found
        )
        assert BAD not in {f"{r['account']}/{r['contract']}" for r in everyone_then}
        assert [(f.stream, f.position, f.event_id) for f in found] == [
            (BAD, bad_position, bad.event_id)
        ]
        with pytest.raises(StreamFaulted):
            await queries.history_rows(conn, account="A1", contract="C.ES")
        found = []
        pnl = await queries.pnl_rows(conn, by="account", faults=found)
        assert {r.account for r in pnl} >= {"A0", "A2"} and [f.stream for f in found] == [BAD]

    # the public API: the same, typed
    async with await Ledger.connect(db_url) as ledger:
        found = []
        api_rows = await ledger.positions(include_flat=True, faults=found)
        assert BAD not in {f"{p.account}/{p.contract}" for p in api_rows}
        assert [f.stream for f in found] == [BAD]
        assert [f.position for f in await ledger.faulted_streams()] == [bad_position]
        assert [f.stream for f in (await ledger.verify()).faulted_streams] == [BAD]
        assert [f.stream for f in (await ledger.stats()).faulted_streams] == [BAD]
        with pytest.raises(StreamFaulted):
            await ledger.positions(account="A1", contract="C.ES")

    # the CLI: other accounts exit 0; everything exits 0 and names the faulted stream
    other = ledger_cli(cli_env, "positions", "--account", "A0", "-f", "json")
    assert other.returncode == 0, other.stderr
    assert {r["contract"] for r in json.loads(other.stdout)} == {"C.ES", "C.EQ"}
    assert BAD not in other.stderr
    every = ledger_cli(cli_env, "positions", "-f", "json")
    assert every.returncode == 0, every.stderr
    assert "A1" not in {r["account"] for r in json.loads(every.stdout)}
    assert BAD in every.stderr and str(bad_position) in every.stderr
    one = ledger_cli(cli_env, "positions", "--account", "A1", "--contract", "C.ES")
    assert one.returncode == 2
    assert "is faulted" in one.stderr and "X9" in one.stderr and "Traceback" not in one.stderr
    for command in ("trail", "explain", "history"):
        named = ledger_cli(cli_env, command, "--account", "A1", "--contract", "C.ES")
        assert named.returncode == 2, (command, named.stdout, named.stderr)
        assert "is faulted" in named.stderr and "Traceback" not in named.stderr, command
    pnl_cli = ledger_cli(cli_env, "pnl", "--by", "account", "-f", "json")
    assert pnl_cli.returncode == 0, pnl_cli.stderr
    assert BAD in pnl_cli.stderr
    rebuilt = ledger_cli(cli_env, "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    verified = ledger_cli(cli_env, "verify", "-f", "json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    assert [(f["stream"], f["position"]) for f in report["faulted_streams"]] == [
        (BAD, bad_position)
    ]
    stats = ledger_cli(cli_env, "stats", "-f", "json")
    assert stats.returncode == 0, stats.stderr
    assert [f["stream"] for f in json.loads(stats.stdout)["faulted_streams"]] == [BAD]

    # the end-of-day report leaves the stream out and says so, in the page and the CLI
    out_dir = tmp_path / "report"
    reported = ledger_cli(
        cli_env, "report", "--date", t[0].date().isoformat(), "--out", str(out_dir)
    )
    assert reported.returncode == 0, reported.stderr
    assert f"warning: Stream {BAD} is left out of this report" in reported.stdout
    page = (out_dir / f"eod-{t[0].date().isoformat()}.html").read_text()
    assert 'class="banner"' in page and f"Stream {BAD} is left out" in page
    assert f"log position {bad_position}" in page and "X9" in page

    # incremental == rebuild (one process and split) while it is faulted
    await assert_rebuilds_equal(engine)

    # a correction through the ordinary write path (the fill is known) heals it
    correction = adjust(
        "correction", "A1", "C.ES", "X9", t[6], qty="1", price="5000.00", fee="0.62"
    )
    counts = await Ingester(EventStore(engine)).write_batch(
        [Parsed(SourceRef("heal", 1, None), correction, b"{}")]
    )
    assert (counts.appended, counts.rejected) == (1, 0)
    log.append(((await store.append([correction])).positions[0], correction))
    await ProjectionRunner(engine, batch_size=3).catch_up()
    assert await serving_faults(engine) == []
    healed = await positions(engine, account="A1", contract="C.ES", include_flat=True)
    expected = oracle(log)
    assert healed[0]["signed_qty"] == expected[BAD].signed_qty == 1
    assert healed[0]["realized_pnl"] == expected[BAD].realized_fifo
    after = await assert_rebuilds_equal(engine)
    got = {r["stream"]: r for r in after["proj_positions"]}
    assert sorted(got) == sorted(expected)
    for stream, state in expected.items():
        assert got[stream]["realized_fifo"] == str(state.realized_fifo), stream
        assert json.loads(got[stream]["state"])["lots"] == state.to_json()["lots"], stream
    for command in ("positions", "trail", "explain", "history"):
        cli_after = ledger_cli(cli_env, command, "--account", "A1", "--contract", "C.ES")
        assert cli_after.returncode == 0, (command, cli_after.stderr)
    trail = json.loads(
        ledger_cli(cli_env, "trail", "--account", "A1", "--contract", "C.ES", "-f", "json").stdout
    )
    assert [(r["type"], r["price"]) for r in trail if r["exec_id"] == "X9"] == [
        ("fill", "5000.00"),  # the effective (corrected) price
        ("correction", "5000.00"),
    ]
    clean = ledger_cli(cli_env, "report", "--date", t[0].date().isoformat(), "--out", str(out_dir))
    assert clean.returncode == 0 and "warning" not in clean.stdout, clean.stdout
    assert 'class="banner"' not in (out_dir / f"eod-{t[0].date().isoformat()}.html").read_text()


async def test_faults_found_in_a_first_drain_and_a_rebuild_heal_with_a_bust(
    engine: AsyncEngine, store: EventStore, db_url: str
) -> None:
    """From the start of the log (the journal path) and in a rebuild: an off-tick fill,
    and a fill of a contract no instrument defines, each fault their stream alone; a
    bust and the instrument's definition heal them."""
    log = await append_all(store, instruments())
    log += await append_all(store, _healthy_day())
    t = [T0 + timedelta(minutes=40 + i) for i in range(10)]
    bad = fill("A1", "C.ES", "X1", "SELL", 2, "5002.30", t[0])
    log.append((await append_as_owner(db_url, bad), bad))
    orphan = fill("A3", "C.NEW", "N1", "BUY", 1, "10.5", t[1])
    log.append((await append_as_owner(db_url, orphan), orphan))
    log += await append_all(
        store,
        [
            fill("A1", "C.ES", f"K{i}", "BUY", 1, "5001.00", t[2] + timedelta(seconds=i))
            for i in range(12)
        ],
    )
    await ProjectionRunner(engine, batch_size=4).catch_up()
    assert [(f["stream"], f["exec_id"]) for f in await serving_faults(engine)] == [
        (BAD, "X1"),
        ("A3/C.NEW", "N1"),
    ]
    assert "no instrument" in (await serving_faults(engine))[1]["reason"]
    await assert_rebuilds_equal(engine)

    healing = [
        adjust("bust", "A1", "C.ES", "X1", t[5]),
        parse_event(
            {"type": "instrument", "contract": "C.NEW", "tick_size": "0.5", "tick_value": "5"}
        ),
    ]
    log += await append_all(store, healing)
    await ProjectionRunner(engine, batch_size=4).catch_up()
    assert await serving_faults(engine) == []
    after = await assert_rebuilds_equal(engine)
    expected = oracle([(p, e) for p, e in log if e.stream != "A3/C.NEW"])
    got = {r["stream"]: r for r in after["proj_positions"]}
    for stream, state in expected.items():
        assert got[stream]["signed_qty"] == str(state.signed_qty), stream
        assert got[stream]["realized_fifo"] == str(state.realized_fifo), stream
    assert got["A3/C.NEW"]["signed_qty"] == "1"
