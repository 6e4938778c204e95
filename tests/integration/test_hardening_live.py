"""Hardening of the live feed (issue 17, items 2 and 10), against real NATS and PostgreSQL."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import orjson
from cli_testing import free_port
from test_consume import (
    INSTRUMENT,
    counters,
    fill,
    publish,
    query,
    start_consumer,
    wait_exit,
    wait_until,
)


def test_first_sigterm_stops_consume_while_nats_is_down(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    """Nothing listens on the port: connecting retries for ever, yet SIGTERM ends it at once."""
    down = f"nats://127.0.0.1:{free_port()}"
    log = tmp_path / "consume.log"
    proc = start_consumer(cli_env, down, log)
    wait_until(lambda: "connecting to NATS" in log.read_text(), 60, "the first connect")
    time.sleep(4)  # well inside nats-py's own retry loop (2 s connect timeout, 1 s waits)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert wait_exit(proc, log, timeout=15) == 0, log.read_text()[-4000:]
    assert time.monotonic() - sent < 10
    assert "stopped while connecting" in log.read_text()


def test_an_extreme_timestamp_is_dead_lettered_and_the_feed_goes_on(
    nats_url: str, cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """year 1 at +01:00 (and 9999-12-31 at -01:00) overflowed astimezone and stopped the feed."""
    bad_early = {**fill(2), "occurred_at": "0001-01-01T00:00:00+01:00"}
    bad_late = {**fill(3), "occurred_at": "9999-12-31T23:59:59-01:00"}
    messages = [
        ("ledger.in.instruments", orjson.dumps(INSTRUMENT)),
        ("ledger.in.fills", orjson.dumps(fill(1))),
        ("ledger.in.fills", orjson.dumps(bad_early)),
        ("ledger.in.fills", orjson.dumps(bad_late)),
        ("ledger.in.fills", orjson.dumps(fill(4))),
    ]
    publish(nats_url, messages)
    log = tmp_path / "consume.log"
    proc = start_consumer(cli_env, nats_url, log, "--idle-exit", "3")
    assert wait_exit(proc, log) == 0, log.read_text()[-4000:]
    got = {r[0] for r in query(db_url, "SELECT payload->>'exec_id' FROM events WHERE type='fill'")}
    assert got == {"X1", "X4"}
    rejected = query(db_url, "SELECT reason, message FROM rejected ORDER BY id")
    assert [r[0] for r in rejected] == ["INVALID_RECORD", "INVALID_RECORD"]
    assert "occurred_at" in rejected[0][1] and "0001-01-01T00:00:00+01:00" in rejected[0][1]
    assert "9999-12-31T23:59:59-01:00" in rejected[1][1]
    c = counters(db_url)
    assert (c["received"], c["appended"], c["rejected"]) == (5, 3, 2)


def test_consume_refuses_what_the_store_refuses(
    nats_url: str, cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """Issue 13, item 2: the feed's path into the log runs the store's checks."""
    off_tick = {**fill(1), "price": "6000.1"}
    fractional = {**fill(2), "qty": "1.5"}
    unknown_bust = {
        "type": "bust",
        "account": "A1",
        "contract": INSTRUMENT["contract"],
        "exec_id": "NEVER",
        "occurred_at": "2025-01-21T12:00:00Z",
    }
    messages = [("ledger.in.instruments", orjson.dumps(INSTRUMENT))]
    messages += [
        ("ledger.in.fills", orjson.dumps(r)) for r in (off_tick, fractional, unknown_bust, fill(3))
    ]
    publish(nats_url, messages)
    log = tmp_path / "consume.log"
    proc = start_consumer(cli_env, nats_url, log, "--idle-exit", "3")
    assert wait_exit(proc, log) == 0, log.read_text()[-4000:]
    assert query(db_url, "SELECT type, payload->>'exec_id' FROM events ORDER BY 1, 2") == [
        ("fill", "X3"),
        ("instrument", None),
    ]
    rejected = query(db_url, "SELECT reason, message FROM rejected ORDER BY id")
    assert [r[0] for r in rejected] == ["OFF_TICK_PRICE", "OFF_SIZE_INCREMENT", "UNKNOWN_EXECUTION"]
    assert "price: 6000.1" in rejected[0][1] and "qty: 1.5" in rejected[1][1]
    assert "'NEVER'" in rejected[2][1]
    c = counters(db_url)
    assert (c["received"], c["appended"], c["rejected"]) == (5, 2, 3)
