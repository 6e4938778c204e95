"""Issue 17 item 9: a dead letter redelivered by JetStream is not dead-lettered twice.

A consumer killed after its write committed but before its ack gets the batch again
from JetStream; its dead letters are keyed by subject (one stream's) and stream
sequence, so the redelivered bad message finds its dead letter and counts as a
duplicate (``already_rejected``), neither a second row nor a second ``rejected``.
Against a real nats-server and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import nats
import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from test_consume import (
    INSTRUMENT,
    STREAM,
    SUBJECT,
    consumer_state,
    counters,
    crash,
    fill,
    fill_count,
    publish,
    query,
    start_consumer,
    wait_exit,
    wait_until,
)

from ledger.consume import parse_msg
from ledger.db import make_engine
from ledger.ingest import Ingester
from ledger.store import EventStore


def off_tick(i: int) -> dict[str, str]:
    return {**fill(i), "exec_id": f"OFF{i}", "price": "6000.10"}


async def _write_then_die(nats_url: str, db_url: str, n: int) -> None:
    """Do what a consumer does up to its write (commit included), then stop unacked."""
    nc = await nats.connect(nats_url)
    engine = make_engine(db_url)
    try:
        js = nc.jetstream()
        await js.add_consumer(
            STREAM,
            config=ConsumerConfig(
                durable_name="ledger",
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=1,
                max_ack_pending=12_000,
                filter_subject=SUBJECT,
            ),
        )
        sub = await js.pull_subscribe_bind(durable="ledger", stream=STREAM)
        msgs = []
        while len(msgs) < n:
            msgs += await sub.fetch(n - len(msgs), timeout=5)
        items = [item for msg in msgs for item in parse_msg(msg, "auto")]
        counts = await Ingester(EventStore(engine)).write_batch(items)
        assert (counts.appended, counts.rejected) == (2, 2)
    finally:
        await engine.dispose()
        await nc.close()  # no ack: JetStream redelivers after ack_wait


def test_a_dead_letter_redelivered_after_a_crash_is_not_added_twice(
    nats_url: str, cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    publish(
        nats_url,
        [
            ("ledger.in.instruments", orjson.dumps(INSTRUMENT)),
            ("ledger.in.fills", orjson.dumps(fill(1))),
            ("ledger.in.fills", orjson.dumps(off_tick(2))),
            ("ledger.in.fills", b"{not json"),
        ],
    )
    asyncio.run(_write_then_die(nats_url, db_url, 4))
    assert query(db_url, "SELECT count(*) FROM rejected")[0][0] == 2
    log = tmp_path / "consume.log"
    proc = start_consumer(cli_env, nats_url, log, "--ack-wait", "1", "--idle-exit", "3")
    assert wait_exit(proc, log) == 0, log.read_text()[-4000:]
    assert "(2 already dead-lettered)" in log.read_text()
    rows = query(db_url, "SELECT source, line, reason FROM rejected ORDER BY line")
    assert rows == [
        ("nats:ledger.in.fills", 3, "OFF_TICK_PRICE"),
        ("nats:ledger.in.fills", 4, "INVALID_JSON"),
    ]
    c = counters(db_url)
    assert (c["received"], c["appended"], c["duplicates"], c["rejected"]) == (8, 2, 4, 2)
    assert c["already_rejected"] == 2
    assert c["rejected.OFF_TICK_PRICE"] == 1 and c["rejected.INVALID_JSON"] == 1
    assert c["received"] == c["appended"] + c["duplicates"] + c["rejected"]
    state = consumer_state(nats_url)
    assert state["num_pending"] == 0 and state["num_ack_pending"] == 0


def test_sigkill_at_random_points_dead_letters_each_bad_message_once(
    nats_url: str, cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    n = 600
    bad = set(range(5, n, 8))
    messages = [("ledger.in.instruments", orjson.dumps(INSTRUMENT))]
    messages += [
        ("ledger.in.fills", orjson.dumps(off_tick(i) if i in bad else fill(i))) for i in range(n)
    ]
    publish(nats_url, messages)
    log = tmp_path / "consume.log"
    args = ("--batch", "10", "--ack-wait", "2")
    rng = random.Random(20261203)
    for threshold in sorted(rng.sample(range(50, n - len(bad) - 100), 3)):
        proc = start_consumer(cli_env, nats_url, log, *args)
        wait_until(lambda t=threshold: fill_count(db_url) >= t, 60, f"{threshold} fills")
        crash(proc)
    proc = start_consumer(cli_env, nats_url, log, *args, "--idle-exit", "4")
    assert wait_exit(proc, log) == 0, log.read_text()[-4000:]
    assert fill_count(db_url) == n - len(bad)
    total, distinct = query(db_url, "SELECT count(*), count(DISTINCT line) FROM rejected")[0]
    assert (total, distinct) == (len(bad), len(bad))
    c = counters(db_url)
    assert c["rejected"] == len(bad) == c["rejected.OFF_TICK_PRICE"]
    assert c["appended"] == n - len(bad) + 1
    assert c["received"] == c["appended"] + c["duplicates"] + c["rejected"]
    state = consumer_state(nats_url)
    assert state["num_pending"] == 0 and state["num_ack_pending"] == 0
