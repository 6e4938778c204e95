"""The core ``ledger`` commands: db, ingest, log, rejected, positions, pnl, history,
project, rebuild and demo.

``--format`` always names the output format. With ``LEDGER_DATABASE_URL`` unset every
command uses the embedded cluster under ``LEDGER_HOME``, creating, starting and
migrating it on first use; with it set, any command but ``ledger db init`` refuses an
unmigrated database with an error that names ``ledger db init``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from datetime import UTC, datetime
from datetime import time as dt_time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from ledger.api import IngestCounts, Instrument, Ledger, row_of
from ledger.cli.common import (
    AsKnownAt,
    AsOf,
    FormatOption,
    InputKind,
    LogFormatOption,
    MetricsHostOption,
    MetricsPortOption,
    OutputFormat,
    ReadyLagEventsOption,
    ReadyLagSecondsOption,
    app,
    connect,
    database_url,
    db_app,
    emit_rows,
    err,
    out,
    parse_day,
    parse_time,
    parse_times,
    progress_bar,
    run,
    say_error,
    service_options,
    warn_faulted,
    write_csv,
)
from ledger.cli.demo import DayPlan, generate_day, try_next
from ledger.db import current_revision, head_revision, make_engine, migrate, migrate_embedded
from ledger.embedded import EmbeddedPostgres
from ledger.errors import LedgerError
from ledger.service import (
    DEFAULT_METRICS_HOST,
    DEFAULT_READY_LAG_EVENTS,
    DEFAULT_READY_LAG_SECONDS,
    configure_logging,
    serve,
)
from ledger.settings import Settings
from projections.faults import StreamFault


@db_app.command("init")
def db_init() -> None:
    """Create and start the embedded cluster (if used) and migrate the schema. Idempotent."""

    async def _init() -> str:
        settings = Settings()
        if settings.database_url:
            await migrate(settings.database_url)
            return settings.database_url
        await migrate_embedded(settings)
        return database_url(settings, init=True)

    url = run(_init())
    out.print(f"database ready at schema revision {head_revision()}: {_redact(url)}")


@db_app.command("status")
def db_status() -> None:
    """Show where the database is, whether it runs, and its schema revision."""
    settings = Settings()
    if settings.database_url:
        url = settings.database_url
        where = "LEDGER_DATABASE_URL"
    else:
        cluster = EmbeddedPostgres(settings.home)
        if not cluster.initialized:
            out.print(
                f"embedded cluster: not initialized under {cluster.home} (run `ledger db init`)"
            )
            raise typer.Exit(1)
        if not cluster.running():
            out.print(f"embedded cluster at {cluster.home}: stopped")
            raise typer.Exit(1)
        url = cluster.url
        where = f"embedded cluster at {cluster.home}"

    async def _status() -> str | None:
        engine = make_engine(url)
        try:
            return await current_revision(engine)
        finally:
            await engine.dispose()

    revision = run(_status())
    state = "current" if revision == head_revision() else "needs `ledger db init`"
    out.print(f"{where}: {_redact(url)}; schema revision {revision or 'none'} ({state})")
    if revision != head_revision():
        raise typer.Exit(1)


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded cluster (no effect with LEDGER_DATABASE_URL)."""
    settings = Settings()
    if settings.database_url:
        out.print("LEDGER_DATABASE_URL is set: there is no embedded cluster to stop")
        return
    cluster = EmbeddedPostgres(settings.home)
    try:
        stopped = cluster.stop()
    except LedgerError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    out.print("embedded cluster stopped" if stopped else "embedded cluster was not running")


def _redact(url: str) -> str:
    if "@" in url and ":" in url.split("@", 1)[0].split("//", 1)[-1]:
        scheme, rest = url.split("//", 1)
        creds, host = rest.split("@", 1)
        return f"{scheme}//{creds.split(':', 1)[0]}:***@{host}"
    return url


# ----------------------------------------------------------------------- ingest


def _open_input(path: str) -> tuple[Any, str]:
    if path == "-":
        return sys.stdin.buffer, "-"
    try:
        return open(path, "rb"), path
    except OSError as exc:
        err.print(f"[bold red]error:[/] cannot read FILE {path!r}: {exc.strerror}")
        raise typer.Exit(2) from None


EXIT_REJECTED = 4
"""``ledger ingest``: some records were rejected (dead-lettered, now or by an earlier
run); every other record was appended or was a duplicate."""
EXIT_REFUSED = 5
"""``ledger ingest --strict``: some records were bad, so nothing was appended."""


@app.command(
    epilog=(
        "Exit status: 0 every record appended or a duplicate; 4 some records rejected "
        "(dead-lettered now, or already by an earlier run: see `ledger rejected`), the "
        "rest appended; 5 with --strict, some records bad, so nothing appended (the bad "
        "ones are dead-lettered); 2 a usage error, an unreadable file, or the database "
        "unavailable or not migrated."
    )
)
def ingest(
    files: Annotated[
        list[str], typer.Argument(help="JSON Lines, ProjectX JSON or CSV files; - is stdin.")
    ],
    input_format: Annotated[
        InputKind, typer.Option("--input", "-i", help="Input format; auto detects it per record.")
    ] = InputKind.auto,
    fmt: FormatOption = OutputFormat.table,
    batch_size: Annotated[int, typer.Option(help="Events per transaction.")] = 1000,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="All or nothing: if any record of the input (all FILES) is bad, append "
            "nothing (the bad records are dead-lettered; exit 5). One transaction.",
        ),
    ] = False,
) -> None:
    """Validate and append records; dead-letter what cannot be appended, with its reason.

    A record dead-lettered by an earlier run (the same file, line and bytes) is not
    dead-lettered again: it counts as a duplicate, "already dead-lettered".
    """
    handles = [_open_input(p) for p in files]

    async def _ingest() -> IngestCounts:
        try:
            async with await connect() as ledger:
                with progress_bar("ingesting") as advance:
                    return await ledger.ingest_files(
                        handles,
                        input_format=input_format.value,
                        batch_size=batch_size,
                        progress=advance,
                        strict=strict,
                    )
        finally:
            for handle, _name in handles:
                if handle is not sys.stdin.buffer:
                    handle.close()

    totals = run(_ingest())
    if fmt == "json":
        print(orjson.dumps(totals.as_dict()).decode())
    elif fmt == "csv":
        write_csv([totals.as_dict()])
    else:
        already = (
            f" ({totals.already_rejected} already dead-lettered)" if totals.already_rejected else ""
        )
        withheld = f", withheld {totals.withheld}" if totals.withheld else ""
        out.print(
            f"received {totals.received}, appended {totals.appended}, "
            f"duplicates {totals.duplicates}{already}, rejected {totals.rejected}{withheld}"
        )
        if totals.by_reason:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(totals.by_reason.items()))
            err.print(f"[yellow]rejected by reason:[/] {reasons} (see `ledger rejected`)")
        if totals.already_rejected:
            err.print(
                f"[yellow]{totals.already_rejected} record(s) dead-lettered by an earlier "
                "run[/] (the same source, line and bytes): not dead-lettered again "
                "(see `ledger rejected`)"
            )
    if strict and totals.not_appended:
        err.print(
            f"[bold red]--strict:[/] {totals.not_appended} bad record(s): nothing appended "
            f"({totals.withheld} valid record(s) withheld)"
        )
        raise typer.Exit(EXIT_REFUSED)
    if totals.not_appended:
        raise typer.Exit(EXIT_REJECTED)


# -------------------------------------------------------------------------- log


@app.command("log")
def log_command(
    stream: Annotated[
        str | None, typer.Option(help="Only this stream, e.g. ACC-1/CON.F.US.EP.Z26.")
    ] = None,
    after: Annotated[
        int, typer.Option(help="Start after this global position (in read order).")
    ] = 0,
    limit: Annotated[int, typer.Option(help="At most this many events.")] = 100,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Print events in read order."""

    async def _log() -> list[dict[str, Any]]:
        async with await connect() as ledger:
            events = await ledger.log(stream=stream, after=after, limit=limit)
        return [
            {
                "global_position": e.global_position,
                "stream": e.stream,
                "stream_version": e.stream_version,
                "event_id": e.event_id,
                "type": e.type,
                "occurred_at": e.occurred_at,
                "recorded_at": e.recorded_at,
                "payload": e.payload,
            }
            for e in events
        ]

    emit_rows(run(_log()), fmt, title="Events")


# --------------------------------------------------------------------- rejected


@app.command()
def rejected(
    retry: Annotated[
        bool, typer.Option("--retry", help="Re-ingest pending records whose cause may be gone.")
    ] = False,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """List dead-lettered records with their reasons (or retry them)."""

    async def _rejected() -> list[dict[str, Any]]:
        async with await connect() as ledger:
            if retry:
                outcomes = await ledger.retry_rejected()
                return [{"id": o.id, "status": o.status, "outcome": o.detail} for o in outcomes]
            records = await ledger.rejected()
        return [
            {
                "id": r.id,
                "received_at": r.received_at,
                "source": r.source,
                "line": r.line,
                "index": r.index,
                "reason": r.reason,
                "message": r.message,
                "status": r.status,
                "attempts": r.attempts,
                "retry_outcome": r.retry_outcome,
                "raw": r.raw[:2000].decode("utf-8", "backslashreplace"),
            }
            for r in records
        ]

    rows = run(_rejected())
    if fmt == "table":
        rows = [{k: v for k, v in r.items() if k not in ("raw", "received_at")} for r in rows]
    emit_rows(rows, fmt, title="Rejected records")


# ------------------------------------------------------------------ projections


class MethodChoice(StrEnum):
    fifo = "fifo"
    wac = "wac"


class PnlBy(StrEnum):
    fill = "fill"
    day = "day"
    account = "account"


@app.command()
def positions(
    account: Annotated[str | None, typer.Option(help="Only this account.")] = None,
    contract: Annotated[str | None, typer.Option(help="Only this contract.")] = None,
    method: Annotated[MethodChoice, typer.Option(help="fifo or wac.")] = MethodChoice.fifo,
    as_of: AsOf = None,
    as_known_at: AsKnownAt = None,
    include_flat: Annotated[
        bool, typer.Option("--include-flat", help="Also flat positions.")
    ] = False,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Show positions, realized and unrealized P&L (caught up first)."""
    at, known = parse_times(as_of, as_known_at)

    faults: list[StreamFault] = []

    async def _positions() -> tuple[list[dict[str, Any]], dict[str, Instrument]]:
        async with await connect() as ledger:
            rows = await ledger.positions(
                account=account,
                contract=contract,
                method=method.value,
                as_of=at,
                as_known_at=known,
                include_flat=include_flat,
                faults=faults,
            )
            shown = await ledger.instruments(r.contract for r in rows)
        return [row_of(r) for r in rows], shown

    rows, instruments = run(_positions())
    emit_rows(rows, fmt, title="Positions", instruments=instruments)
    warn_faulted(faults)


@app.command()
def pnl(
    by: Annotated[PnlBy, typer.Option(help="fill, day or account.")] = PnlBy.day,
    account: Annotated[str | None, typer.Option(help="Only this account.")] = None,
    date_from: Annotated[str | None, typer.Option("--from", help="First trading day.")] = None,
    date_to: Annotated[str | None, typer.Option("--to", help="Last trading day.")] = None,
    method: Annotated[MethodChoice, typer.Option(help="fifo or wac.")] = MethodChoice.fifo,
    as_of: AsOf = None,
    as_known_at: AsKnownAt = None,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Show realized P&L and fees per fill, trading day or account (one row per currency)."""
    at, known = parse_times(as_of, as_known_at)
    first, last = parse_day(date_from, "--from"), parse_day(date_to, "--to")

    faults: list[StreamFault] = []

    async def _pnl() -> list[dict[str, Any]]:
        async with await connect() as ledger:
            lines = await ledger.pnl(
                by=by.value,
                account=account,
                date_from=first,
                date_to=last,
                method=method.value,
                as_of=at,
                as_known_at=known,
                faults=faults,
            )
        return [line.as_row(by.value) for line in lines]

    emit_rows(run(_pnl()), fmt, title="Realized P&L", instruments={})  # rows name currency
    warn_faulted(faults)


@app.command()
def history(
    account: Annotated[str, typer.Option(help="The account.")],
    contract: Annotated[str, typer.Option(help="The contract.")],
    time_from: Annotated[str | None, typer.Option("--from", help="From this time.")] = None,
    time_to: Annotated[str | None, typer.Option("--to", help="Up to this time.")] = None,
    as_of: AsOf = None,
    as_known_at: AsKnownAt = None,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Show every change of one position (older days compacted to end-of-day rows)."""
    at, known = parse_times(as_of, as_known_at)
    start, end = parse_time(time_from, "--from"), parse_time(time_to, "--to")

    async def _history() -> tuple[list[dict[str, Any]], dict[str, Instrument]]:
        async with await connect() as ledger:
            rows = await ledger.history(
                account, contract, time_from=start, time_to=end, as_of=at, as_known_at=known
            )
            shown = await ledger.instruments([contract])
        return [row_of(r) for r in rows], shown

    rows, instruments = run(_history())
    emit_rows(rows, fmt, title="Position history", instruments=instruments, contract=contract)


@app.command()
def project(
    follow: Annotated[
        bool, typer.Option("--follow", help="Keep projecting new events live.")
    ] = False,
    metrics_port: MetricsPortOption = None,
    metrics_host: MetricsHostOption = DEFAULT_METRICS_HOST,
    ready_lag_events: ReadyLagEventsOption = DEFAULT_READY_LAG_EVENTS,
    ready_lag_seconds: ReadyLagSecondsOption = DEFAULT_READY_LAG_SECONDS,
    log_format: LogFormatOption = None,
) -> None:
    """Catch the projections up with the log (and follow it with --follow).

    With --follow, --metrics-port serves /metrics, /healthz and /readyz from the start
    (the first catch-up included) and --log-format json logs one JSON object a line.
    """
    if metrics_port is not None and not follow:
        # a one-shot catch-up ends before anything could scrape it
        say_error(
            "--metrics-port: serves only with --follow "
            "(`ledger project --follow --metrics-port PORT`)"
        )
        raise typer.Exit(2)
    if log_format is not None:
        configure_logging(log_format.value, (Settings().database_url,))
    service = service_options(metrics_port, metrics_host, ready_lag_events, ready_lag_seconds)

    async def _project() -> int:
        async with (
            await connect() as ledger,
            serve(service, ledger.stats, secrets_of=(Settings().database_url,)),
        ):
            with progress_bar("projecting") as advance:
                applied = await ledger.project(advance)  # and seals the log as projected
            if not follow:
                return applied
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            if log_format is None:
                err.print("[dim]following the log; Ctrl-C to stop[/]")
            else:
                logging.getLogger("ledger.project").info("following the log")
            await ledger.follow(stop)
            return applied

    applied = run(_project())
    out.print(f"projected {applied} events")


@app.command()
def rebuild(
    projection: Annotated[
        str,
        typer.Option(help="Which projection: all (positions, pnl and history share one version)."),
    ] = "all",
) -> None:
    """Rebuild the projections from zero into a new version and swap it in atomically."""
    if projection not in ("all", "positions", "pnl", "history"):
        err.print(f"[bold red]error:[/] --projection: unknown projection {projection!r}")
        raise typer.Exit(2)

    async def _rebuild() -> str:
        async with await connect() as ledger:
            total = await ledger.count_events()
            with progress_bar("rebuilding", total=total) as advance:
                result = await ledger.rebuild(advance)
        rate = result.events / result.seconds if result.seconds else 0.0
        return (
            f"rebuilt generation {result.generation} from {result.events} events in "
            f"{result.seconds:.2f}s ({rate:,.0f} events/s) and swapped it in"
        )

    out.print(run(_rebuild()))


# ------------------------------------------------------------------------- demo


@app.command()
def demo(
    seed: Annotated[int, typer.Option(help="Random seed of the generated day.")] = 7,
    accounts: Annotated[int, typer.Option(help="How many accounts trade.")] = 3,
    fills: Annotated[int, typer.Option(help="Roughly how many fills.")] = 120,
    day: Annotated[
        str | None, typer.Option(help="Trading day (YYYY-MM-DD); default today.")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Where the day file and report go.")
    ] = None,
) -> None:
    """Run the whole product on a generated day: ingest, project, reconcile, rebuild, report."""
    settings = Settings()
    trading_day = parse_day(day, "--day") or datetime.now(UTC).date()
    folder = out_dir or settings.home / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    plan = generate_day(seed=seed, accounts=accounts, fills=fills, day=trading_day)
    day_file = folder / f"day-{trading_day:%Y%m%d}-seed{seed}.jsonl"
    day_file.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in plan.records))
    out.rule(f"[bold]position-ledger demo[/] — {trading_day} (seed {seed})")
    out.print(
        f"generated {len(plan.records)} records for {accounts} accounts: scale-ins, partial "
        f"closes, flips, bust of {plan.busted}, correction of {plan.corrected}, late fill "
        f"{plan.late}, broker reports (one disagrees: {'/'.join(plan.disagreeing)})"
    )
    out.print(f"[dim]day file: {day_file}[/]")

    async def _demo() -> dict[str, Any]:
        async with await connect(settings) as ledger:
            with progress_bar("ingesting") as advance:
                counts = await ledger.ingest_file(day_file, progress=advance)
            known_at = datetime.now(UTC)  # the log knows the whole day by now
            with progress_bar("projecting") as advance:
                await ledger.project(advance, seal=False)
            before = [row_of(p) for p in await ledger.positions(include_flat=True)]
            by_account = [
                line.as_row("account")
                for line in await ledger.pnl(
                    by="account", date_from=trading_day, date_to=trading_day
                )
            ]
            extra = await demo_extras(ledger, plan, folder)
            rebuilt = await ledger.rebuild()
            after = [row_of(p) for p in await ledger.positions(include_flat=True)]
        return {
            "counts": counts,
            "positions": before,
            "pnl": by_account,
            "rebuilt": rebuilt,
            "identical": before == after,
            "known_at": known_at,
            **extra,
        }

    result = run(_demo())
    counts = result["counts"]
    out.print(
        f"\n[bold]1. ingest[/]  received {counts.received}, appended {counts.appended}, "
        f"duplicates {counts.duplicates}, rejected {counts.rejected}"
        + (
            "  [dim](a re-run: idempotent ingestion reports duplicates)[/]"
            if counts.duplicates
            else ""
        )
    )
    out.print("\n[bold]2. positions[/] (FIFO; realized and unrealized at the day's marks)")
    emit_rows(
        [
            {
                k: r[k]
                for k in (
                    "account",
                    "contract",
                    "signed_qty",
                    "side",
                    "avg_open_price",
                    "realized_pnl",
                    "fees",
                    "unrealized_pnl",
                    "mark_price",
                )
            }
            for r in result["positions"]
        ],
        OutputFormat.table,
        title="Positions",
    )
    out.print("\n[bold]3. realized P&L per account[/] for the day")
    emit_rows(result["pnl"], OutputFormat.table, title="Realized P&L")
    for line in result.get("lines", []):
        out.print(line)
    rebuilt = result["rebuilt"]
    verdict = "[green]identical[/]" if result["identical"] else "[red]DIFFERENT[/]"
    out.print(
        f"\n[bold]crash and rebuild[/]  rebuilt the projections from zero ({rebuilt.events} "
        f"events, {rebuilt.seconds:.2f}s) into generation {rebuilt.generation} and swapped it "
        f"in: positions are {verdict} to before"
    )
    out.rule("[bold]done[/]")
    out.print(
        "what happened: a generated day was ingested into the immutable log, projected into "
        "positions and P&L, reconciled against the broker, rebuilt from zero and reported.\n"
        f"files: {folder}\n"
        "try next:"
    )
    for line in try_next(plan, result["known_at"]):
        out.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    if not result["identical"]:
        raise typer.Exit(1)


async def demo_extras(ledger: Ledger, plan: DayPlan, folder: Path) -> dict[str, Any]:
    """Reconcile the demo day against the broker's reports and write its EOD report."""
    cutoff = datetime.combine(plan.day, dt_time(21, 0, 1), tzinfo=UTC)
    result = await ledger.reconcile(cutoff=cutoff)
    files = await ledger.write_report(plan.day, folder)
    run_event = result.event
    lines = [
        f"\n[bold]4. end-of-day reconciliation[/] at {cutoff.isoformat()}: matched "
        f"{run_event.matched}, breaks {len(run_event.breaks)} (run {run_event.run_id})"
    ]
    for brk in run_event.breaks:
        lines.append(
            f"   [yellow]{brk.type}[/] {brk.account} {brk.contract}: ledger {brk.ledger_value}, "
            f"broker {brk.broker_value}, difference {brk.difference}; "
            f"fills since the last match: {', '.join(brk.exec_ids[-5:]) or 'none'}"
        )
    for proposal in result.proposals:
        price = "" if proposal.price is None else f" @ {proposal.price}"
        lines.append(
            f"   proposal (not written): {proposal.side} {proposal.qty}{price} "
            f"{proposal.account} {proposal.contract} {proposal.note}".rstrip()
        )
    html = next((f for f in files if f.suffix == ".html"), None)
    lines.append(f"\n[bold]5. EOD report[/] {html} (+ CSV and Parquet beside it)")
    return {"lines": lines, "breaks": len(run_event.breaks), "report": html}
