"""``ledger consume`` (the live NATS JetStream feed) and ``ledger stats`` (its counters).

Registered on the main Typer app by importing this module (``ledger.cli`` does so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import time
from enum import StrEnum
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from typing import Annotated, Any

import typer
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.api import Ledger, Stats
from ledger.cli.common import (
    FormatOption,
    LogFormatChoice,
    LogFormatOption,
    MetricsHostOption,
    MetricsPortOption,
    OutputFormat,
    ReadyLagEventsOption,
    ReadyLagSecondsOption,
    app,
    connect,
    dumps,
    emit_rows,
    err,
    flatten,
    open_engine,
    out,
    run,
    say_error,
    service_options,
    write_csv,
)
from ledger.consume import (
    DEFAULT_BATCH,
    DEFAULT_DURABLE,
    DEFAULT_SERVERS,
    DEFAULT_STREAM,
    DEFAULT_SUBJECT,
    ConsumeOptions,
    Consumer,
    ConsumeTotals,
)
from ledger.db import Reconnect, make_engine
from ledger.service import (
    DEFAULT_METRICS_HOST,
    DEFAULT_READY_LAG_EVENTS,
    DEFAULT_READY_LAG_SECONDS,
    LogFormat,
    Probes,
    configure_logging,
    serve,
)
from ledger.settings import Settings
from projections.runner import ProjectionRunner

__all__ = ["consume", "stats"]

log = logging.getLogger("ledger.consume")

_PROJECTION_STOP_WAIT = 30.0
# a second SIGTERM/SIGINT sooner than this after the first is the same stop sent twice
_SAME_STOP_S = 1.0


class FeedFormat(StrEnum):
    auto = "auto"
    native = "native"
    projectx = "projectx"


def _configure_logging(fmt: LogFormat = "text", secrets_of: tuple[str | None, ...] = ()) -> None:
    configure_logging(fmt, (Settings().database_url, *secrets_of))


class _ProjectionProcess:
    """The projections, followed live in a child process of their own.

    Why a process: folding is CPU-bound Python, and a page can take a while (a late
    fill restates its whole stream; a stream with many open lots serializes them all
    at each commit). In the feed's event loop such a page held the loop for hundreds
    of milliseconds, and every fetch, write and ack of the feed waited behind it
    (``scripts/bench_consume`` on such data: appended lag p99 1.75 s in one loop, 90
    ms with a child process). A thread would still share the GIL. A child process
    has its own interpreter and core and wakes on NOTIFY like ``ledger project
    --follow``; the feed's latency no longer depends on what the projections do.

    The parent governs its lifetime through a pipe: a message, or the pipe's end
    when the parent dies (even by SIGKILL), stops it. It ignores SIGINT, which a
    terminal sends to the whole process group, so a Ctrl-C drains the feed first;
    SIGTERM sent to it alone stops it early (the parent then catches up itself).
    """

    def __init__(self, url: str, log_format: LogFormat = "text") -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a running event loop
        reader, self._stop_writer = ctx.Pipe(duplex=False)
        # the child's database reconnects, for this process's metric (it mirrors them)
        self.reconnects: Synchronized[int] = ctx.Value("q", 0)
        self._process = ctx.Process(
            target=_follow_in_child,
            args=(url, reader, log_format, self.reconnects),
            name="ledger-projections",
            daemon=False,
        )
        self._process.start()
        reader.close()  # the child holds its own copy: the parent's end alone can stop it
        self._stopping = False
        loop = asyncio.get_running_loop()
        loop.add_reader(self._process.sentinel, self._on_exit)
        self._loop = loop

    def _on_exit(self) -> None:
        self._loop.remove_reader(self._process.sentinel)
        if self._stopping:
            return
        self._process.join()  # it has exited: this only reaps it and reads its code
        code = self._process.exitcode
        log.log(
            logging.WARNING if code == 0 else logging.ERROR,
            "projection process exited with code %s; the feed goes on (the projections "
            "are caught up when it stops, or by `ledger project`)",
            code,
        )

    async def stop(self) -> int | None:
        """Ask the child to stop (it catches up first); wait; return its exit code."""
        timeout = _PROJECTION_STOP_WAIT
        self._stopping = True
        with contextlib.suppress(OSError):
            self._stop_writer.send_bytes(b"stop")
        self._stop_writer.close()
        await asyncio.to_thread(self._process.join, timeout)
        if self._process.is_alive():
            log.warning("projection process did not stop within %.0f s: killing it", timeout)
            self.abandon()
        return self._process.exitcode

    def abandon(self) -> None:
        """Stop the child now, without its final catch-up (a second signal, a crash)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._stop_writer.close()
        if self._process.is_alive():
            self._process.kill()  # an open projection transaction just rolls back
        self._process.join(5)


def _follow_in_child(
    url: str,
    stop_reader: Connection,
    log_format: LogFormat = "text",
    reconnects: Synchronized[int] | None = None,
) -> None:
    """Run in the child process: follow the log until told to stop, then catch up.

    Raises:
        SystemExit: with status 1 when the runner failed (the parent logs it).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    _configure_logging(log_format, (url,))
    if not asyncio.run(_follow_until_told(url, stop_reader, reconnects)):
        raise SystemExit(1)


async def _mirror_reconnects(reconnects: Synchronized[int]) -> None:
    """Keep the parent's copy of this process's reconnect count (within 0.5 s)."""
    while True:
        reconnects.value = Reconnect.failures
        await asyncio.sleep(0.5)


async def _follow_until_told(
    url: str, stop_reader: Connection, reconnects: Synchronized[int] | None = None
) -> bool:
    """Follow the log until the parent says stop (or is gone); return whether all went well."""
    mirror = None if reconnects is None else asyncio.create_task(_mirror_reconnects(reconnects))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    fd = stop_reader.fileno()

    def _told() -> None:
        loop.remove_reader(fd)  # it stays readable: a level-triggered callback would spin
        stop.set()

    # readable on the parent's message and on end-of-file when the parent is gone
    loop.add_reader(fd, _told)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    engine = make_engine(url)
    try:
        runner = ProjectionRunner(engine, Settings())
        await runner.follow(stop)
        # the feed has drained by now: leave the projections caught up with it
        await runner.catch_up()
        return True
    except Exception as exc:
        log.error("projection runner stopped: %s: %s", type(exc).__name__, exc)
        return False
    finally:
        loop.remove_reader(fd)
        await engine.dispose()
        if mirror is not None and reconnects is not None:
            mirror.cancel()
            reconnects.value = Reconnect.failures


async def _final_catch_up(engine: AsyncEngine) -> None:
    """Make sure a graceful stop leaves the projections caught up with what was appended.

    Normally the child has done it and this finds nothing to do (a few milliseconds);
    if the child failed or was stopped early, this does the work.
    """
    try:
        await asyncio.wait_for(
            ProjectionRunner(engine, Settings()).catch_up(), _PROJECTION_STOP_WAIT
        )
    except TimeoutError:
        log.warning("projections not caught up at exit; `ledger project` will")
    except Exception as exc:
        log.error("projections not caught up at exit: %s: %s", type(exc).__name__, exc)


@app.command()
def consume(
    servers: Annotated[
        str,
        typer.Option(envvar="LEDGER_NATS_URL", help="NATS server URL(s), comma-separated."),
    ] = DEFAULT_SERVERS,
    stream: Annotated[
        str, typer.Option(help="JetStream stream (created, file storage, if missing).")
    ] = DEFAULT_STREAM,
    subject: Annotated[str, typer.Option(help="Subject to consume (wildcards allowed).")] = (
        DEFAULT_SUBJECT
    ),
    durable: Annotated[str, typer.Option(help="Durable consumer name.")] = DEFAULT_DURABLE,
    batch: Annotated[
        int, typer.Option(min=1, max=50_000, help="Messages per fetch and per transaction.")
    ] = DEFAULT_BATCH,
    queue_size: Annotated[
        int, typer.Option(min=1, help="Messages held in memory between fetch and write.")
    ] = 10_000,
    no_project: Annotated[
        bool,
        typer.Option(
            "--no-project", help="Do not follow the log with the projections (a child process)."
        ),
    ] = False,
    idle_exit: Annotated[
        float | None,
        typer.Option(min=0, help="Exit 0 after this many seconds without a message."),
    ] = None,
    ack_wait: Annotated[
        float, typer.Option(min=0.5, help="Seconds before JetStream redelivers an unacked message.")
    ] = 30.0,
    input_format: Annotated[
        FeedFormat, typer.Option("--input", "-i", help="Payload format; auto detects it.")
    ] = FeedFormat.auto,
    metrics_port: MetricsPortOption = None,
    metrics_host: MetricsHostOption = DEFAULT_METRICS_HOST,
    ready_lag_events: ReadyLagEventsOption = DEFAULT_READY_LAG_EVENTS,
    ready_lag_seconds: ReadyLagSecondsOption = DEFAULT_READY_LAG_SECONDS,
    log_format: LogFormatOption = None,
) -> None:
    """Append a NATS JetStream feed to the log: ack after the write, batch, drain on SIGTERM."""
    fmt: LogFormat = "json" if log_format == LogFormatChoice.json else "text"
    _configure_logging(fmt, tuple(servers.split(",")))
    service = service_options(metrics_port, metrics_host, ready_lag_events, ready_lag_seconds)
    options = ConsumeOptions(
        servers=tuple(s.strip() for s in servers.split(",") if s.strip()),
        stream=stream,
        subject=subject,
        durable=durable,
        batch=batch,
        queue_size=queue_size,
        ack_wait=ack_wait,
        idle_exit=idle_exit,
        input_format=input_format.value,
    )

    async def _consume() -> ConsumeTotals:
        async with open_engine() as engine:
            stop = asyncio.Event()
            main = asyncio.current_task()
            loop = asyncio.get_running_loop()
            first_signal_at: list[float] = []

            def _on_signal(name: str) -> None:
                now = time.monotonic()
                if not first_signal_at:
                    first_signal_at.append(now)
                    log.info("%s: stopping fetch, draining the queue", name)
                    stop.set()
                elif now - first_signal_at[0] < _SAME_STOP_S:
                    # timeout(1) and a kill of the process group send one stop twice
                    log.info("%s again within %.0f s: the same stop", name, _SAME_STOP_S)
                elif main is not None:
                    log.warning("%s again: abandoning unacknowledged messages", name)
                    main.cancel()

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, _on_signal, sig.name)
            url = engine.url.render_as_string(hide_password=False)
            consumer = Consumer(engine, options)
            projector: _ProjectionProcess | None = None
            probes = Probes(
                nats_connected=lambda: consumer.nats_connected,
                nats_reconnects=lambda: consumer.totals.nats_reconnects,
                # this process's and its projection process's
                database_reconnects=lambda: (
                    Reconnect.failures + (0 if projector is None else projector.reconnects.value)
                ),
            )
            secrets = (url, *options.servers)
            try:
                async with serve(
                    service, Ledger(engine, Settings()).stats, probes, secrets_of=secrets
                ):
                    projector = None if no_project else _ProjectionProcess(url, fmt)
                    totals = await consumer.run(stop)
                    if projector is not None:
                        await projector.stop()
                        await _final_catch_up(engine)
            except BaseException:
                if projector is not None:
                    projector.abandon()  # a second signal or a failure: do not wait for it
                raise
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
                    if first_signal_at:
                        # the stop under way ends the process: the same signal once more
                        # in its last moments must not kill it by the default action
                        signal.signal(sig, signal.SIG_IGN)
            return totals

    try:
        totals = run(_consume())
    except asyncio.CancelledError:
        say_error(
            "(unacknowledged messages are redelivered)",
            level=logging.WARNING,
            label="stopped without draining",
        )
        raise typer.Exit(1) from None
    c = totals.counts
    line = (
        f"consumed {totals.messages} messages: received {c.received}, appended {c.appended}, "
        f"duplicates {c.duplicates} ({c.already_rejected} already dead-lettered), "
        f"rejected {c.rejected}; errors {totals.errors}"
    )
    if fmt == "json":  # stderr stays one JSON object a line
        log.info(line, extra={"messages": totals.messages, **c.as_dict(), "errors": totals.errors})
        return
    err.print(line, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------ stats

_INGEST = ("received", "appended", "duplicates", "rejected")


def _stats_data(stats: Stats) -> dict[str, Any]:
    """Return the stats as ``ledger stats --format json`` prints them."""
    return {
        "received": stats.received,
        "appended": stats.appended,
        "duplicates": stats.duplicates,
        "rejected": stats.rejected,
        "consistent": stats.consistent,
        "already_rejected": stats.already_rejected,
        "rejected_by_reason": dict(stats.rejected_by_reason),
        "dead_letters": dict(stats.dead_letters),
        "retried": dict(stats.retried),
        "consume": dict(stats.consume),
        "projection_lag": {
            "events": stats.lag_events,
            "seconds": stats.lag_seconds,
            "checkpoint": None if stats.checkpoint is None else dict(stats.checkpoint),
        },
        "last_error_at": stats.last_error_at,
        "last_error": stats.last_error,
        "faulted_streams": [f.as_row() for f in stats.faulted_streams],
        "last_append_at": stats.last_append_at,
    }


@app.command()
def stats(
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Show ingest counters, projection lag (events and seconds) and the last feed error."""

    async def _stats() -> Stats:
        async with await connect() as ledger:
            return await ledger.stats()

    data = _stats_data(run(_stats()))
    if fmt == "json":
        print(dumps(data))
        return
    if fmt == "csv":  # one key/value row per leaf of the JSON object
        write_csv(flatten(data))
        return
    rows: list[dict[str, Any]] = [{"metric": k, "value": data[k]} for k in _INGEST]
    rows += [
        {"metric": f"rejected: {k}", "value": v} for k, v in data["rejected_by_reason"].items()
    ]
    rows.append(
        {
            "metric": "already dead-lettered (counted as duplicates)",
            "value": data["already_rejected"],
        }
    )
    rows += [{"metric": f"dead letters: {k}", "value": v} for k, v in data["dead_letters"].items()]
    rows += [{"metric": f"retried: {k}", "value": v} for k, v in data["retried"].items()]
    rows += [{"metric": f"consume: {k}", "value": v} for k, v in data["consume"].items()]
    lag = data["projection_lag"]
    rows.append({"metric": "projection lag (events)", "value": lag["events"]})
    rows.append({"metric": "projection lag (seconds)", "value": lag["seconds"]})
    rows.append({"metric": "last error at", "value": data["last_error_at"]})
    rows.append({"metric": "last error", "value": data["last_error"]})
    rows.append({"metric": "last append at", "value": data["last_append_at"]})
    rows.append({"metric": "faulted streams", "value": len(data["faulted_streams"])})
    rows += [
        {
            "metric": f"faulted: {f['stream']}",
            "value": f"log position {f['position']}, exec_id {f['exec_id']}: {f['reason']}",
        }
        for f in data["faulted_streams"]
    ]
    emit_rows(rows, fmt, title="Ledger stats")
    if not data["consistent"]:
        out.print("[bold red]received != appended + duplicates + rejected[/]")
