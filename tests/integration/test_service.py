"""The long-running commands as services: /metrics, /healthz, /readyz and JSON logs.

``ledger consume`` runs as a subprocess against a real nats-server and the test's
PostgreSQL; its endpoint is scraped over HTTP and the exposition parsed with
prometheus-client's own parser, then compared with ``ledger stats --format json``.
``ledger project --follow`` is held behind a lock to show its lag gauges rise and fall.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from cli_testing import NATS_SERVER, free_port, invoke, seed, start_nats, stop_process
from prometheus_client.parser import text_string_to_metric_families
from pytest_postgresql.executors import PostgreSQLExecutor
from test_consume import (
    BOOT,
    CONTRACT,
    INSTRUMENT,
    ROOT,
    counters,
    fill,
    publish,
    start_consumer,
    stats_json,
    wait_exit,
    wait_until,
)

NATS_PASSWORD = "n4ts-s3cret"


# --------------------------------------------------------------------------- helpers


def get(port: int, path: str) -> tuple[int, bytes]:
    """GET ``path`` on the service port; return (status, body), 503 included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def answers(port: int) -> bool:
    try:
        return get(port, "/healthz")[0] == 200
    except OSError:
        return False


def scrape(port: int) -> dict[str, float]:
    """Scrape /metrics and parse it; return {sample name{labels}: value}."""
    status, body = get(port, "/metrics")
    assert status == 200, body
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def ready(port: int) -> tuple[int, dict[str, Any]]:
    status, body = get(port, "/readyz")
    return status, json.loads(body)


def assert_metrics_match_stats(metrics: dict[str, float], stats: dict[str, Any]) -> None:
    """Every ledger value of the scrape equals what ``ledger stats`` says."""
    for name in ("received", "appended", "duplicates", "rejected", "already_rejected"):
        assert metrics[f"ledger_{name}_total"] == stats[name], name
    assert labelled(metrics, "ledger_rejected_by_reason_total") == stats["rejected_by_reason"]
    assert labelled(metrics, "ledger_consume_total") == stats["consume"]
    assert labelled(metrics, "ledger_retried_total") == stats["retried"]
    assert labelled(metrics, "ledger_dead_letters") == stats["dead_letters"]
    assert metrics["ledger_dead_letters_pending"] == stats["dead_letters"]["pending"]
    assert metrics["ledger_projection_lag_events"] == stats["projection_lag"]["events"]
    assert metrics["ledger_projection_lag_seconds"] == pytest.approx(
        stats["projection_lag"]["seconds"], abs=0.001
    )
    assert metrics["ledger_faulted_streams"] == len(stats["faulted_streams"])
    last = datetime.fromisoformat(stats["last_append_at"]).timestamp()
    assert metrics["ledger_last_append_timestamp_seconds"] == pytest.approx(last, abs=1e-6)


def labelled(metrics: dict[str, float], name: str) -> dict[str, float]:
    """Return the samples of ``name`` (one label) as {label value: value}."""
    return {
        key.split("=", 1)[1].rstrip("}"): value
        for key, value in metrics.items()
        if key.startswith(name + "{")
    }


def port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def json_lines(text: str) -> list[dict[str, Any]]:
    """Return every stderr line as a JSON object (failing on a line that is not one)."""
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line!r}")
    return records


# ----------------------------------------------------------------------------- consume


def test_metrics_scraped_during_a_live_consume_match_ledger_stats(
    nats_url: str, cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """The must-show: valid and invalid messages, a scrape, `ledger stats`: the same."""
    valid = 20
    bad_json = b'{"type": "fill", "account": '
    unknown = orjson.dumps({"type": "nonsense", "contract": CONTRACT})
    off_tick = orjson.dumps({**fill(valid + 1), "price": "6000.10"})
    messages = [("ledger.in.instruments", orjson.dumps(INSTRUMENT))]
    messages += [("ledger.in.fills", orjson.dumps(fill(i))) for i in range(valid)]
    messages += [
        ("ledger.in.fills", orjson.dumps(fill(3))),  # a duplicate of an appended fill
        ("ledger.in.fills", bad_json),
        ("ledger.in.fills", unknown),
        ("ledger.in.fills", off_tick),
    ]
    publish(nats_url, messages)
    port = free_port()
    # a NATS URL with a password: the JSON logs must never show it
    secret_url = nats_url.replace("nats://", f"nats://ledger:{NATS_PASSWORD}@")
    log = tmp_path / "consume.log"
    proc = start_consumer(
        cli_env,
        secret_url,
        log,
        "--metrics-port",
        str(port),
        "--ready-lag-events",
        "0",
        "--log-format",
        "json",
        project=True,
    )
    try:
        wait_until(lambda: answers(port), 60, "the metrics port")
        # the feed's own counters are flushed every 5 s: wait until they hold every message
        wait_until(
            lambda: counters(db_url).get("consume.messages", 0) == len(messages),
            60,
            "every message counted",
        )
        wait_until(lambda: ready(port)[0] == 200, 60, "/readyz 200 (caught up)")
        status, readiness = ready(port)
        assert status == 200 and readiness["ready"] is True and readiness["reasons"] == []
        assert readiness["projection_lag"]["events"] == 0

        metrics = scrape(port)
        stats = stats_json(cli_env)
        assert_metrics_match_stats(metrics, stats)
        # and they are the right numbers, not merely equal ones
        assert metrics["ledger_received_total"] == len(messages)
        assert metrics["ledger_appended_total"] == valid + 1
        assert metrics["ledger_duplicates_total"] == 1
        assert metrics["ledger_rejected_total"] == 3
        assert metrics["ledger_dead_letters_pending"] == 3
        assert metrics["ledger_consume_total{counter=messages}"] == len(messages)
        assert metrics["ledger_projection_lag_events"] == 0
        assert metrics["ledger_faulted_streams"] == 0
        assert metrics["ledger_database_up"] == 1
        assert metrics["ledger_nats_connected"] == 1
        assert metrics["ledger_reconnects_total{target=database}"] == 0
        assert metrics["ledger_reconnects_total{target=nats}"] == 0
        assert abs(metrics["ledger_last_append_timestamp_seconds"] - time.time()) < 300
        assert metrics["process_resident_memory_bytes"] > 0
        assert get(port, "/healthz")[0] == 200
        assert get(port, "/nothing")[0] == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        code = wait_exit(proc, log)
    assert code == 0, log.read_text()[-4000:]
    assert port_closed(port), "the HTTP server outlived the command"
    text = log.read_text()
    assert NATS_PASSWORD not in text
    records = json_lines(text)
    assert {"ts", "level", "logger", "message"} <= set(records[0])
    connecting = [r for r in records if r["message"].startswith("connecting to NATS")]
    assert connecting and "ledger:***@127.0.0.1" in connecting[0]["message"]
    summary = [r for r in records if r["message"].startswith("consumed ")]
    assert summary and summary[-1]["received"] == len(messages)


def test_readyz_says_why_while_nats_is_down(cli_env: dict[str, str], tmp_path: Path) -> None:
    """Live but not ready: /healthz 200, /readyz 503 naming NATS; SIGTERM stops the port."""
    down = f"nats://127.0.0.1:{free_port()}"
    port = free_port()
    log = tmp_path / "consume.log"
    proc = start_consumer(cli_env, down, log, "--metrics-port", str(port))
    try:
        wait_until(lambda: answers(port), 60, "the metrics port")
        status, readiness = ready(port)
        assert status == 503
        assert readiness["ready"] is False
        assert "nats: not connected" in readiness["reasons"]
        metrics = scrape(port)
        assert metrics["ledger_nats_connected"] == 0
        assert metrics["ledger_database_up"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = wait_exit(proc, log, timeout=30)
    assert code == 0, log.read_text()[-4000:]
    assert port_closed(port)


# ----------------------------------------------------------------------- project --follow


def test_project_follow_lag_gauges_rise_and_fall_to_zero(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """Events the follower cannot project yet show as lag (and not ready); then 0 and ready."""
    seed(db_url, [INSTRUMENT, fill(0)])
    port = free_port()
    log = tmp_path / "project.log"
    command = [
        sys.executable,
        "-c",
        BOOT,
        "project",
        "--follow",
        "--metrics-port",
        str(port),
        "--ready-lag-events",
        "0",
        "--log-format",
        "json",
    ]
    with log.open("ab") as handle:
        proc = subprocess.Popen(
            command, env=cli_env, stdout=subprocess.DEVNULL, stderr=handle, cwd=ROOT
        )
    try:
        wait_until(lambda: answers(port), 60, "the metrics port")
        # (the first catch-up appends a seal: following begins after it)
        wait_until(lambda: "following the log" in log.read_text(), 60, "following")
        wait_until(lambda: ready(port)[0] == 200, 60, "caught up with the seeded events")
        assert scrape(port)["ledger_projection_lag_events"] == 0

        # Hold the serving checkpoint (and the read horizon): the follower cannot project.
        with psycopg.connect(db_url) as held:
            held.execute("SELECT * FROM projection_checkpoint WHERE status = 'serving' FOR UPDATE")
            seed(db_url, [fill(i) for i in range(1, 6)])
            time.sleep(0.5)  # the follower is woken, and waits
            metrics = scrape(port)
            assert metrics["ledger_projection_lag_events"] == 5
            assert metrics["ledger_projection_lag_seconds"] > 0
            stats = stats_json(cli_env)
            assert stats["projection_lag"]["events"] == 5
            assert metrics["ledger_appended_total"] == stats["appended"]
            status, readiness = ready(port)
            assert status == 503
            assert any(r.startswith("projection lag: 5 events") for r in readiness["reasons"])
            held.rollback()

        wait_until(lambda: scrape(port)["ledger_projection_lag_events"] == 0, 60, "lag back to 0")
        metrics = scrape(port)
        assert metrics["ledger_projection_lag_seconds"] == 0
        assert ready(port)[0] == 200
        assert stats_json(cli_env)["projection_lag"]["events"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        code = wait_exit(proc, log)
    assert code == 0, log.read_text()[-4000:]
    assert port_closed(port)
    records = json_lines(log.read_text())
    assert any(r["message"].startswith("serving /metrics") for r in records)


def test_a_taken_metrics_port_is_one_clear_error(cli_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke("project", "--follow", "--metrics-port", str(port))
    assert result.exit_code == 2, result.output
    assert f"--metrics-port: cannot listen on 127.0.0.1:{port}" in result.output


def test_consume_counts_its_projection_process_reconnects(
    nats_url: str,
    cli_env: dict[str, str],
    pg_server: PostgreSQLExecutor,
    tmp_path: Path,
) -> None:
    """`ledger_reconnects_total{target="database"}` of consume includes the retries of
    its projection process: with the feed idle, only that process loses the database
    (its LISTEN connection) when the server restarts."""
    publish(nats_url, [("ledger.in.instruments", orjson.dumps(INSTRUMENT))])
    port = free_port()
    log = tmp_path / "consume.log"
    proc = start_consumer(cli_env, nats_url, log, "--metrics-port", str(port), project=True)
    try:
        wait_until(lambda: answers(port), 60, "the metrics port")
        wait_until(lambda: ready(port)[0] == 200, 60, "/readyz 200 (caught up)")
        assert scrape(port)["ledger_reconnects_total{target=database}"] == 0
        pg_server.stop()
        time.sleep(1.5)  # the projection process notices and retries, with backoff
        pg_server.start()

        def database_reconnects() -> float:
            try:
                return scrape(port).get("ledger_reconnects_total{target=database}", 0)
            except (AssertionError, OSError):  # the server still starting up
                return -1

        wait_until(
            lambda: database_reconnects() >= 1,
            60,
            "the projection process's reconnect in the metric",
        )
    finally:
        if not pg_server.running():
            pg_server.start()
        proc.send_signal(signal.SIGTERM)
        code = wait_exit(proc, log)
    assert code == 0, log.read_text()[-4000:]
    assert "lost the database while following the log" in log.read_text()


def test_metrics_port_without_follow_is_a_usage_error(cli_env: dict[str, str]) -> None:
    """A one-shot catch-up ends before anything could scrape it: refused, not ignored."""
    result = invoke("project", "--metrics-port", str(free_port()))
    assert result.exit_code == 2, result.output
    assert "--metrics-port: serves only with --follow" in result.output


def test_a_nats_restart_flips_readyz_and_counts_a_reconnect(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    """NATS goes away: /readyz 503 naming it; it comes back: 200, and one reconnect counted."""
    if not Path(NATS_SERVER).exists():
        pytest.skip("nats-server is not installed")
    nats_port, port = free_port(), free_port()
    store, nats_log = tmp_path / "jetstream", tmp_path / "nats-server.log"
    nats = start_nats(nats_port, store, nats_log)
    log = tmp_path / "consume.log"
    proc = start_consumer(
        cli_env, f"nats://127.0.0.1:{nats_port}", log, "--metrics-port", str(port)
    )
    try:
        wait_until(lambda: answers(port) and ready(port)[0] == 200, 60, "/readyz 200")
        assert scrape(port)["ledger_reconnects_total{target=nats}"] == 0
        stop_process(nats)
        wait_until(lambda: ready(port)[0] == 503, 30, "/readyz 503 with NATS down")
        assert "nats: not connected" in ready(port)[1]["reasons"]
        assert scrape(port)["ledger_nats_connected"] == 0
        nats = start_nats(nats_port, store, nats_log)
        wait_until(lambda: ready(port)[0] == 200, 60, "/readyz 200 again")
        metrics = scrape(port)
        assert metrics["ledger_reconnects_total{target=nats}"] == 1
        assert metrics["ledger_nats_connected"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = wait_exit(proc, log)
        stop_process(nats)
    assert code == 0, log.read_text()[-4000:]
    # the process's count is the feed's persisted counter too (flushed at exit)
    assert stats_json(cli_env)["consume"]["nats_reconnects"] == 1


def test_a_fatal_error_under_json_logs_is_a_json_line(tmp_path: Path) -> None:
    """Under --log-format json every stderr line is JSON, the one that ends the command
    too: an unreachable database is an ERROR record (exit 2), its password masked."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
        "LEDGER_DATABASE_URL": "postgresql://ledger:hunter2@127.0.0.1:1/nowhere",
        "LEDGER_RECONNECT_TIMEOUT": "1",
        "LEDGER_HOME": str(tmp_path / "home"),
    }
    command = [sys.executable, "-m", "ledger", "project", "--follow", "--log-format", "json"]
    done = subprocess.run(command, env=env, capture_output=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr.decode()
    lines = [line for line in done.stderr.decode().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line: not one plain "error:"
    assert records[-1]["level"] == "ERROR"
    assert "cannot reach the database" in records[-1]["message"]
    assert "hunter2" not in done.stderr.decode()
