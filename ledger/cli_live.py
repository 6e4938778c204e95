"""``ledger consume`` (the live NATS JetStream feed) and ``ledger stats`` (its counters).

Registered on the main Typer app by importing this module (``ledger.cli`` does so).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from enum import StrEnum
from typing import Annotated, Any

import typer
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger.cli import TableOrJson, app, dumps, emit_rows, err, open_engine, out, run
from ledger.consume import (
    DEFAULT_DURABLE,
    DEFAULT_SERVERS,
    DEFAULT_STREAM,
    DEFAULT_SUBJECT,
    ConsumeOptions,
    Consumer,
    ConsumeTotals,
)
from ledger.settings import Settings
from ledger.store import driver_connection
from projections.runner import ProjectionRunner

__all__ = ["consume", "stats"]

log = logging.getLogger("ledger.consume")

_PROJECTION_STOP_WAIT = 30.0


class FeedFormat(StrEnum):
    auto = "auto"
    native = "native"
    projectx = "projectx"


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _start_projections(runner: ProjectionRunner, stop: asyncio.Event) -> asyncio.Task[None]:
    """Run the projections live next to the feed; a failure stops them, not the feed."""

    async def _follow() -> None:
        try:
            await runner.follow(stop)
        except Exception as exc:
            # The feed keeps running: projections catch up from their checkpoint later.
            log.error("projection runner stopped: %s: %s", type(exc).__name__, exc)

    return asyncio.create_task(_follow(), name="projections")


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
    ] = 1000,
    queue_size: Annotated[
        int, typer.Option(min=1, help="Messages held in memory between fetch and write.")
    ] = 10_000,
    no_project: Annotated[
        bool, typer.Option("--no-project", help="Do not run the projections in this process.")
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
) -> None:
    """Append a NATS JetStream feed to the log: ack after the write, batch, drain on SIGTERM."""
    _configure_logging()
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
            projections_stop = asyncio.Event()
            main = asyncio.current_task()
            loop = asyncio.get_running_loop()
            signals: list[str] = []

            def _on_signal(name: str) -> None:
                signals.append(name)
                if len(signals) == 1:
                    log.info("%s: stopping fetch, draining the queue", name)
                    stop.set()
                elif main is not None:
                    log.warning("%s again: abandoning unacknowledged messages", name)
                    main.cancel()

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, _on_signal, sig.name)
            runner = ProjectionRunner(engine, Settings())
            projector = None if no_project else _start_projections(runner, projections_stop)
            try:
                totals = await Consumer(engine, options).run(stop)
            finally:
                projections_stop.set()
                if projector is not None:
                    try:
                        await asyncio.wait_for(projector, _PROJECTION_STOP_WAIT)
                    except TimeoutError:
                        log.warning("projection runner did not stop in time")
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            if projector is not None:
                # a graceful stop leaves the projections caught up with what was appended
                try:
                    await asyncio.wait_for(runner.catch_up(), _PROJECTION_STOP_WAIT)
                except TimeoutError:
                    log.warning("projections not caught up at exit; `ledger project` will")
            return totals

    try:
        totals = run(_consume())
    except asyncio.CancelledError:
        err.print("[yellow]stopped without draining[/] (unacknowledged messages are redelivered)")
        raise typer.Exit(1) from None
    c = totals.counts
    err.print(
        f"consumed {totals.messages} messages: received {c.received}, appended {c.appended}, "
        f"duplicates {c.duplicates}, rejected {c.rejected}; errors {totals.errors}",
        highlight=False,
        soft_wrap=True,
    )


# ------------------------------------------------------------------------ stats

_COUNTERS = "SELECT name, value, updated_at, note FROM counters ORDER BY name"
_HAS_CHECKPOINTS = "SELECT to_regclass('projection_checkpoint') IS NOT NULL"
_SERVING = """
SELECT generation, tx_id::text, position FROM projection_checkpoint WHERE status = 'serving'
"""
_LAG_AFTER = """
SELECT count(*), extract(epoch FROM now() - min(recorded_at))::float8 FROM events
WHERE (tx_id, global_position) > ($1::text::xid8, $2::bigint)
"""
_LAG_ALL = "SELECT count(*), extract(epoch FROM now() - min(recorded_at))::float8 FROM events"
_INGEST = ("received", "appended", "duplicates", "rejected")


async def _collect_stats(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as sa_conn:
        conn = await driver_connection(sa_conn)
        counters = {r["name"]: r for r in await conn.fetch(_COUNTERS)}
        serving = None
        if await conn.fetchval(_HAS_CHECKPOINTS):
            serving = await conn.fetchrow(_SERVING)
        if serving is not None:
            generation, tx_id, position = serving
            lag_events, seconds = await conn.fetchrow(_LAG_AFTER, tx_id, position)
            checkpoint: dict[str, Any] | None = {
                "generation": generation,
                "tx_id": int(tx_id),
                "position": position,
            }
        else:  # nothing projected yet: every event is behind
            lag_events, seconds = await conn.fetchrow(_LAG_ALL)
            checkpoint = None

    def value(name: str) -> int:
        row = counters.get(name)
        return int(row["value"]) if row is not None else 0

    ingest = {k: value(k) for k in _INGEST}
    errors_row = counters.get("consume.errors")
    return {
        **ingest,
        "consistent": ingest["received"]
        == ingest["appended"] + ingest["duplicates"] + ingest["rejected"],
        "rejected_by_reason": {
            n.removeprefix("rejected."): int(r["value"])
            for n, r in counters.items()
            if n.startswith("rejected.")
        },
        "consume": {
            n.removeprefix("consume."): int(r["value"])
            for n, r in counters.items()
            if n.startswith("consume.")
        },
        "projection_lag": {
            "events": lag_events,
            "seconds": round(seconds, 3) if seconds is not None else 0.0,
            "checkpoint": checkpoint,
        },
        "last_error_at": errors_row["updated_at"] if errors_row is not None else None,
        "last_error": errors_row["note"] if errors_row is not None else None,
    }


@app.command()
def stats(
    fmt: Annotated[
        TableOrJson, typer.Option("--format", "-f", help="Output format.")
    ] = TableOrJson.table,
) -> None:
    """Show ingest counters, projection lag (events and seconds) and the last feed error."""

    async def _stats() -> dict[str, Any]:
        async with open_engine() as engine:
            return await _collect_stats(engine)

    data = run(_stats())
    if fmt == "json":
        print(dumps(data))
        return
    rows: list[dict[str, Any]] = [{"metric": k, "value": data[k]} for k in _INGEST]
    rows += [
        {"metric": f"rejected: {k}", "value": v} for k, v in data["rejected_by_reason"].items()
    ]
    rows += [{"metric": f"consume: {k}", "value": v} for k, v in data["consume"].items()]
    lag = data["projection_lag"]
    rows.append({"metric": "projection lag (events)", "value": lag["events"]})
    rows.append({"metric": "projection lag (seconds)", "value": lag["seconds"]})
    rows.append({"metric": "last error at", "value": data["last_error_at"]})
    rows.append({"metric": "last error", "value": data["last_error"]})
    emit_rows(rows, fmt, title="Ledger stats")
    if not data["consistent"]:
        out.print("[bold red]received != appended + duplicates + rejected[/]")
