"""The audit commands of the ``ledger`` CLI: reconcile, trail, explain, verify, report.

They register themselves on :data:`ledger.cli.app` when this module is imported (the
CLI module imports it at its end). Exit statuses: 0 clean; 2 a usage or input error;
``reconcile`` 3 when there are breaks; ``verify`` 1 when it finds tamper evidence.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import fields
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from ledger.api import Instrument, Lot, Verification, row_of
from ledger.cli.common import (
    AsKnownAt,
    AsOf,
    FormatOption,
    OutputFormat,
    app,
    connect,
    dumps,
    emit_rows,
    err,
    out,
    parse_day,
    parse_time,
    parse_times,
    progress_bar,
    progress_bars,
    run,
    standby,
    with_currency,
)
from ledger.display import exec_ids_shown
from ledger.events import LogSealed, ReconciliationCompleted
from ledger.integrity import problems_as_rows, seal_from_record, seal_record
from ledger.values import to_decimal
from projections.reconcile import (
    BrokerStatement,
    Proposal,
    ReconciliationError,
    parse_statement,
    run_as_dict,
)

__all__ = [
    "explain_command",
    "reconcile_command",
    "report_command",
    "trail_command",
    "verify_command",
]

EXIT_BREAKS = 3
EXIT_TAMPERED = 1


def _decimal_option(value: str | None, option: str) -> Decimal | None:
    if value is None:
        return None
    try:
        return to_decimal(value)
    except ValueError as exc:
        err.print(f"[bold red]error:[/] {option}: {exc}")
        raise typer.Exit(2) from None


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(2)


# -------------------------------------------------------------------- reconcile


def _proposal_row(p: Proposal) -> dict[str, Any]:
    return {
        "break_id": p.break_id,
        "account": p.account,
        "contract": p.contract,
        "side": p.side,
        "qty": str(p.qty),
        "price": None if p.price is None else str(p.price),
        "note": p.note,
    }


def _print_run(
    event: ReconciliationCompleted, proposals: tuple[Proposal, ...] | None, fmt: OutputFormat
) -> None:
    data = run_as_dict(event)
    if fmt == OutputFormat.json:
        if proposals is not None:
            data["proposals"] = [_proposal_row(p) for p in proposals]
        print(dumps(data))
        return
    rows = [{**b, "exec_ids": " ".join(b["exec_ids"])} for b in data["breaks"]]
    if fmt == OutputFormat.csv:
        columns = [
            "break_id",
            "type",
            "account",
            "contract",
            "ledger_value",
            "broker_value",
            "difference",
            "tolerance",
            "exec_ids",
            "detail",
        ]
        emit_rows([{c: r[c] for c in columns} for r in rows], fmt, columns=columns)
        return
    rows = [{**r, "exec_ids": exec_ids_shown(r["exec_ids"])} for r in rows]  # all: json/csv
    out.print(
        f"reconciliation {event.run_id} at {event.cutoff.isoformat()} against {event.source}: "
        f"{event.matched} matched, {len(event.breaks)} break(s)",
        highlight=False,
    )
    if rows:
        emit_rows(rows, fmt, title="Breaks")
    if proposals:
        emit_rows([_proposal_row(p) for p in proposals], fmt, title="Proposed fills (not appended)")


@app.command("reconcile")
def reconcile_command(
    cutoff: Annotated[
        str | None,
        typer.Option(help="Reconcile as of this time (ISO-8601 or a date: its end). Default: now."),
    ] = None,
    broker_file: Annotated[
        Path | None,
        typer.Option(
            "--broker-file",
            help="A broker statement: CSV account,contract,signed_qty,avg_price or a "
            "ProjectX searchOpen JSON response. Default: the log's broker_position events.",
        ),
    ] = None,
    price_tolerance: Annotated[
        str | None,
        typer.Option(
            help="Largest average-price difference that is not a break (default: "
            "half a tick of the instrument)."
        ),
    ] = None,
    pnl_tolerance: Annotated[
        str,
        typer.Option(help="Largest daily realized P&L difference that is not a break."),
    ] = "0.01",
    propose: Annotated[
        bool,
        typer.Option("--propose", help="Print the fill that would close each quantity break."),
    ] = False,
    show: Annotated[
        str | None, typer.Option("--show", help="Reprint a stored run by its run id.")
    ] = None,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Compare the ledger's positions with the broker's and record the breaks (never repairs).

    Exit status 0 when clean, 3 when there are breaks.
    """
    if show is not None and (cutoff or broker_file):
        raise _fail("--show reprints a stored run: give it without --cutoff or --broker-file")
    at = parse_time(cutoff, "--cutoff") if cutoff else datetime.now(UTC)
    assert at is not None
    price_tol = _decimal_option(price_tolerance, "--price-tolerance")
    pnl_tol = _decimal_option(pnl_tolerance, "--pnl-tolerance")
    assert pnl_tol is not None
    statement: BrokerStatement | None = None
    if broker_file is not None:
        try:
            data = broker_file.read_bytes()
        except OSError as exc:
            raise _fail(
                f"--broker-file: cannot read {str(broker_file)!r}: {exc.strerror}"
            ) from None
        try:
            statement = parse_statement(data, broker_file.name)
        except ReconciliationError as exc:
            raise _fail(f"--broker-file: {exc}") from None

    async def _reconcile() -> tuple[ReconciliationCompleted, tuple[Proposal, ...] | None]:
        async with await connect() as ledger:
            if show is not None:
                return await ledger.reconciliation(show), None
            result = await ledger.reconcile(
                cutoff=at,
                statement=statement,
                price_tolerance=price_tol,
                pnl_tolerance=pnl_tol,
            )
            return result.event, result.proposals

    event, proposals = run(_reconcile())
    _print_run(event, proposals if propose else None, fmt)
    if event.breaks:
        raise typer.Exit(EXIT_BREAKS)


# ------------------------------------------------------------------ trail/explain

_TRAIL_TABLE_COLUMNS = [
    "seq",
    "position",
    "type",
    "exec_id",
    "occurred_at",
    "side",
    "qty",
    "price",
    "status",
    "qty_after",
    "realized_pnl",
    "cum_realized_pnl",
    "restated",
    "detail",
]


@app.command("trail")
def trail_command(
    account: Annotated[str, typer.Option(help="The account.")],
    contract: Annotated[str, typer.Option(help="The contract.")],
    as_of: AsOf = None,
    as_known_at: AsKnownAt = None,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Show every event that made a position, in fold order, with busts and restatements."""
    at, known = parse_times(as_of, as_known_at)

    async def _trail() -> tuple[list[dict[str, Any]], dict[str, Instrument]]:
        async with await connect() as ledger:
            entries = await ledger.trail(account, contract, as_of=at, as_known_at=known)
            shown = await ledger.instruments([contract])
        return [row_of(e) for e in entries], shown

    rows, instruments = run(_trail())
    if fmt == OutputFormat.table:
        rows = [{c: r[c] for c in _TRAIL_TABLE_COLUMNS} for r in rows]
    emit_rows(
        rows,
        fmt,
        title=f"Trail of {account}/{contract}",
        instruments=instruments,
        contract=contract,
    )


@app.command("explain")
def explain_command(
    account: Annotated[str, typer.Option(help="The account.")],
    contract: Annotated[str, typer.Option(help="The contract.")],
    as_of: AsOf = None,
    as_known_at: AsKnownAt = None,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Show a position at T and the FIFO lots that make it up, each traced to its fill."""
    at, known = parse_times(as_of, as_known_at)

    instruments: dict[str, Instrument] = {}

    async def _explain() -> dict[str, Any]:
        async with await connect() as ledger:
            found = await ledger.explain(account, contract, as_of=at, as_known_at=known)
            instruments.update(await ledger.instruments([contract]))
        data = row_of(found)
        data["lots"] = [row_of(lot) for lot in found.lots]
        if found.as_known_at is None or found.clock == "as_known_at":
            del data["as_known_at"]
        return data

    result = run(_explain())
    lots = result.pop("lots")
    if fmt == OutputFormat.json:
        extra = {} if standby.lag is None else {"standby": standby.lag}
        print(dumps({**with_currency(result, instruments), "lots": lots, **extra}))
        return
    if fmt == OutputFormat.csv:  # the FIFO lots; the position itself is in --format json
        emit_rows(lots, fmt, columns=[f.name for f in fields(Lot)])
        return
    emit_rows([result], fmt, title=f"Position {account}/{contract}", instruments=instruments)
    emit_rows(lots, fmt, title="Open FIFO lots", instruments=instruments, contract=contract)


# -------------------------------------------------------------------- verify


def _seal_row(seal: LogSealed) -> dict[str, Any]:
    return {
        "through_position": seal.through_position,
        "event_count": seal.event_count,
        "digest": seal.digest,
        "occurred_at": seal.occurred_at.isoformat(),
    }


_PROBLEM_COLUMNS = ["kind", "stream", "global_position", "stream_version", "message"]


def _print_verify(report: Verification, *, seal: bool, fmt: OutputFormat) -> bool:
    """Print what ``verify`` found; return whether the log verifies."""
    sealed, caught_up_error = report.sealed, report.catch_up_error
    problems = problems_as_rows(report.problems)
    if caught_up_error:
        problems.append(
            {
                "kind": "PROJECTION_MISMATCH",
                "stream": None,
                "global_position": None,
                "stream_version": None,
                "message": caught_up_error,
            }
        )
    ok = not problems
    if fmt == OutputFormat.csv:  # the problems found, one row each (none: the header)
        emit_rows(problems, fmt, columns=_PROBLEM_COLUMNS)
        return ok
    if fmt == OutputFormat.json:
        print(
            dumps(
                {
                    "ok": ok,
                    "events": report.events,
                    "streams": report.streams,
                    "seals": report.seals,
                    "projections_checked": report.projections_checked,
                    "problems": problems,
                    "faulted_streams": [f.as_row() for f in report.faulted_streams],
                    "seal": None if sealed is None else _seal_row(sealed),
                    **({} if standby.lag is None else {"standby": standby.lag}),
                }
            )
        )
    else:
        out.print(
            f"checked {report.events} events in {report.streams} streams, {report.seals} "
            f"seal(s), {report.projections_checked} projected position(s)",
            highlight=False,
        )
        if problems:
            emit_rows(problems, fmt, title="Tamper evidence")
            out.print(f"[bold red]FAILED:[/] {len(problems)} problem(s)", highlight=False)
        else:
            out.print("[bold green]OK[/]: every hash chain, stream head and seal verifies")
        faults = report.faulted_streams
        if faults:
            emit_rows([f.as_row() for f in faults], fmt, title="Faulted streams")
            out.print(
                f"[yellow]{len(faults)} faulted stream(s)[/]: each holds an event the fold "
                "cannot apply and is left out of every answer until a correction or bust of "
                "the named execution heals it",
                highlight=False,
            )
        if sealed is not None:
            out.print(
                f"sealed {sealed.event_count} events through global position "
                f"{sealed.through_position}: {sealed.digest}",
                highlight=False,
            )
        elif seal and ok:
            out.print("[dim]nothing new to seal[/]")
        elif seal:
            out.print("[yellow]not sealed: the log does not verify[/]")
    return ok


@app.command("verify")
def verify_command(
    seal: Annotated[
        bool,
        typer.Option("--seal", help="When the log verifies, append a seal over it."),
    ] = False,
    projections: Annotated[
        bool,
        typer.Option(
            "--projections/--no-projections",
            help="Also compare the projections with a fresh replay (caught up first).",
        ),
    ] = True,
    fmt: FormatOption = OutputFormat.table,
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            help="Write the latest seal to FILE ('-' for stdout), to keep outside the database.",
        ),
    ] = None,
    against: Annotated[
        Path | None,
        typer.Option(
            "--against",
            help="Also check that the log still reaches the seal exported to FILE.",
        ),
    ] = None,
) -> None:
    """Recompute the hash chains and seals; find edited, deleted and truncated events.

    Exit status 0 when the log verifies, 1 when it finds tamper evidence.
    """
    outside: LogSealed | None = None
    if against is not None:
        try:
            outside = seal_from_record(orjson.loads(against.read_bytes()))
        except (OSError, orjson.JSONDecodeError, ValueError) as exc:
            err.print(
                f"[bold red]error:[/] --against: cannot read a seal from {str(against)!r}: {exc}"
            )
            raise typer.Exit(2) from None

    async def _verify() -> tuple[Verification, LogSealed | None]:
        async with await connect() as ledger:
            total = await ledger.count_events()
            tasks: list[tuple[str, float | None]] = [("hash chains", float(total))]
            if projections:
                tasks = [("catching up", None), *tasks, ("replaying streams", None)]
            with progress_bars(*tasks) as advances:
                catch_up, chains, streams = advances if projections else (None, advances[0], None)
                report = await ledger.verify(
                    projections=projections,
                    seal=seal,
                    against=outside,
                    progress=chains,
                    stream_progress=streams,
                    catch_up_progress=catch_up,
                )
            latest = await ledger.latest_seal() if export is not None and report.ok else None
        return report, latest

    report, latest = run(_verify())
    # with --export -, stdout carries the seal alone: the report goes to stderr
    with contextlib.redirect_stdout(sys.stderr if str(export) == "-" else sys.stdout):
        ok = _print_verify(report, seal=seal, fmt=fmt)
    if export is not None and latest is not None:
        document = orjson.dumps(seal_record(latest), option=orjson.OPT_INDENT_2) + b"\n"
        if str(export) == "-":
            sys.stdout.buffer.write(document)
            sys.stdout.flush()
        else:
            try:
                export.write_bytes(document)
            except OSError as exc:
                err.print(f"[bold red]error:[/] --export: cannot write {str(export)!r}: {exc}")
                raise typer.Exit(2) from None
    if export is not None and str(export) != "-":
        if latest is not None:
            err.print(
                f"exported the seal through global position {latest.through_position} to {export}",
                highlight=False,
            )
        elif ok:
            err.print("[yellow]nothing exported: the log has no seal yet (add --seal)[/]")
        else:
            err.print("[yellow]nothing exported: the log does not verify[/]")
    if not ok:
        raise typer.Exit(EXIT_TAMPERED)


# -------------------------------------------------------------------- report


@app.command("report")
def report_command(
    day: Annotated[str, typer.Option("--date", help="The trading day (YYYY-MM-DD).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write the files into.")],
    as_known_at: AsKnownAt = None,
) -> None:
    """Write the end-of-day report: a self-contained HTML page, plus CSV and Parquet tables."""
    trading_day = parse_day(day, "--date")
    assert trading_day is not None
    known = parse_time(as_known_at, "--as-known-at")

    warnings: list[str] = []

    async def _report() -> list[Path]:
        async with await connect() as ledger:
            with progress_bar("replaying streams") as advance:
                return await ledger.write_report(
                    trading_day, out_dir, as_known_at=known, warnings=warnings, progress=advance
                )

    for path in run(_report()):
        out.print(str(path), highlight=False)
    for line in warnings:
        out.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
