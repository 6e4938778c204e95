"""What every ``ledger`` command shares: the Typer app, output, engines, errors.

``--format`` always names the output format: ``table`` (for reading: money in its
currency's minor units, prices to the instrument's tick precision, averages to it plus
4 places, see :mod:`ledger.display`), ``json`` or ``csv`` (both exact, the same strings).
With ``LEDGER_DATABASE_URL`` unset every command uses the embedded cluster under
``LEDGER_HOME``, creating, starting and migrating it on first use; with it set, any
command but ``ledger db init`` refuses an unmigrated database with an error that names
``ledger db init``.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import sys
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from datetime import UTC, date, datetime
from datetime import time as dt_time
from decimal import Decimal
from enum import StrEnum
from functools import partial
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from ledger import db
from ledger.api import Instrument, Ledger
from ledger.display import AVERAGE_EXTRA_PLACES, COLUMN_KINDS, Kind, show_row
from ledger.embedded import EmbeddedPostgres
from ledger.errors import LedgerError
from ledger.service import JsonFormatter, ServiceOptions
from ledger.settings import Settings
from projections.faults import StreamFault

__all__ = [
    "AsKnownAt",
    "AsOf",
    "FormatOption",
    "InputKind",
    "LogFormatChoice",
    "LogFormatOption",
    "MetricsHostOption",
    "MetricsPortOption",
    "OutputFormat",
    "ReadyLagEventsOption",
    "ReadyLagSecondsOption",
    "TableOrJson",
    "app",
    "connect",
    "csv_cell",
    "database_url",
    "db_app",
    "dumps",
    "emit_rows",
    "err",
    "flatten",
    "json_default",
    "open_engine",
    "out",
    "parse_day",
    "parse_time",
    "parse_times",
    "progress_bar",
    "progress_bars",
    "readable",
    "run",
    "say_error",
    "service_options",
    "standby",
    "warn_faulted",
    "write_csv",
]

T = TypeVar("T")

app = typer.Typer(
    name="ledger",
    help="Event-sourced position ledger: append fills, project positions and P&L, audit.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Create, migrate, inspect and stop the database.", no_args_is_help=True)
app.add_typer(db_app, name="db")

out = Console(soft_wrap=True)
if not out.is_terminal:  # files and pipes get whole rows, not an 80-column fold
    out = Console(soft_wrap=True, width=240)
# Messages are never folded at the terminal's width by us: a folded line could cut a
# file name or a URL in two (the terminal wraps long lines itself). Progress bars draw
# on a console of their own.
err = Console(stderr=True, soft_wrap=True)
_bars = Console(stderr=True)


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


class TableOrJson(StrEnum):
    table = "table"
    json = "json"


class InputKind(StrEnum):
    auto = "auto"
    native = "native"
    projectx = "projectx"
    csv = "csv"


FormatOption = Annotated[
    OutputFormat,
    typer.Option(
        "--format",
        "-f",
        help="Output format: table (for reading: money in its currency's minor units, "
        "prices to the instrument's tick precision, averages to it plus "
        f"{AVERAGE_EXTRA_PLACES} places), json or csv (exact values, the same strings).",
    ),
]


class _Standby:
    """The ledger this command opened, whose reads may have come from a standby."""

    ledger: Ledger | None = None

    @property
    def lag(self) -> dict[str, object] | None:
        """The standby's replay lag when LEDGER_READ_URL answered this command's reads."""
        return None if self.ledger is None else self.ledger.standby_lag


standby = _Standby()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; turn the ledger's own errors into a clear message and exit 2.

    A failure to reach the database (refused, unknown user or database, a server that
    went away and did not come back within the retry window) is one line too, never a
    traceback; no message shows a password from the URLs.
    """
    settings = Settings()
    standby.ledger = None  # set by this command's connect()
    try:
        return asyncio.run(coro)
    except LedgerError as exc:
        say_error(_masked(str(exc), settings))
        raise typer.Exit(2) from None
    except Exception as exc:
        line = db.connect_failure(exc, settings.database_url) or db.connect_failure(
            exc, settings.read_url
        )
        if line is None:
            raise
        say_error(_masked(line, settings))
        raise typer.Exit(2) from None


def say_error(message: str, *, level: int = logging.ERROR, label: str = "error:") -> None:
    """Say why a command stops: one ``error:`` line on stderr, or, under ``--log-format
    json``, one JSON log line like every other line the service writes."""
    if any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers):
        text = message if label == "error:" else f"{label} {message}"
        logging.getLogger("ledger").log(level, "%s", text)
        return
    style = "bold red" if level >= logging.ERROR else "yellow"
    err.print(f"[{style}]{label}[/] {escape(message)}", highlight=False, soft_wrap=True)


def _masked(text: str, settings: Settings) -> str:
    return db.mask_secrets(db.mask_secrets(text, settings.database_url), settings.read_url)


def _announce(cluster: EmbeddedPostgres) -> None:
    err.print(f"[dim]embedded PostgreSQL at {cluster.home} (socket in {cluster.socket_dir})[/]")


def warn_faulted(faults: Sequence[StreamFault]) -> None:
    """Say on stderr which streams an answer leaves out because they are faulted."""
    if not faults:
        return
    err.print(
        f"[yellow]warning:[/] {len(faults)} faulted stream(s) left out of this answer "
        "(each heals with a correction or bust of the named execution):",
        highlight=False,
        soft_wrap=True,
    )
    for f in faults:
        err.print(
            f"  {f.stream}: event at log position {f.position} (event_id "
            f"{f.event_id or 'unknown'}, exec_id {f.exec_id or 'unknown'}): {f.reason}",
            highlight=False,
            soft_wrap=True,
        )


def database_url(settings: Settings, *, init: bool = False) -> str:
    """Return the URL to use: LEDGER_DATABASE_URL, or the embedded cluster (started).

    The rule is the core's (:func:`ledger.db.database_url`); the CLI says on stderr
    when it created or started the embedded cluster.
    """
    return db.database_url(settings, init=init, announce=_announce)


def open_engine(settings: Settings | None = None) -> AbstractAsyncContextManager[AsyncEngine]:
    """Return :func:`ledger.db.open_engine` for the CLI (it announces the embedded cluster)."""
    return db.open_engine(settings, announce=_announce)


async def connect(settings: Settings | None = None) -> Ledger:
    """Open the :class:`ledger.Ledger` every command works through (close it after)."""
    ledger = await Ledger.connect(settings=settings, announce=_announce)
    standby.ledger = ledger
    return ledger


def json_default(value: object) -> object:
    """Encode decimals as strings and timestamps as ISO-8601."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot encode {type(value).__name__}")


def dumps(value: object) -> str:
    """Return ``value`` as indented JSON with exact decimals."""
    return orjson.dumps(value, default=json_default, option=orjson.OPT_INDENT_2).decode()


def csv_cell(value: object) -> str:
    """Return a value as its CSV cell: the very string the JSON output holds.

    Decimals keep every digit and every trailing zero (``str``, as JSON); times are
    ISO-8601; booleans and nested lists or objects are written as JSON; None is empty.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list | tuple):
        return orjson.dumps(value, default=json_default).decode()
    return str(value)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list):
        return orjson.dumps(value, default=json_default).decode()
    return str(value)


def flatten(data: Mapping[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """Return a nested JSON object as ``key``/``value`` rows (dotted keys, list indexes).

    For commands whose JSON is one object rather than rows (``stats``): its CSV is
    these rows, one per leaf, so nothing of the JSON is left out.
    """
    rows: list[dict[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows += flatten(value, f"{name}.")
        elif isinstance(value, list | tuple) and value:
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    rows += flatten(item, f"{name}.{i}.")
                else:
                    rows.append({"key": f"{name}.{i}", "value": item})
        else:
            rows.append({"key": name, "value": value})
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Print rows as CSV with a header (``columns``, else the first row's keys).

    With no rows and no columns nothing is printed: an empty CSV, as JSON prints ``[]``.
    """
    names = list(columns) if columns is not None else (list(rows[0]) if rows else [])
    if not names:
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        writer.writerow([csv_cell(row.get(c)) for c in names])
    sys.stdout.write(buffer.getvalue())


def readable(
    row: Mapping[str, Any], instruments: Mapping[str, Instrument], contract: str | None = None
) -> dict[str, Any]:
    """Return a row as a table shows it (see :mod:`ledger.display`): money in its
    currency's minor units with a ``currency`` column, prices to the tick precision,
    averages to it plus :data:`ledger.display.AVERAGE_EXTRA_PLACES` places."""
    name = row.get("contract", contract)
    inst = instruments.get(name) if isinstance(name, str) else None
    currency = row.get("currency") or (inst.currency if inst is not None else None)
    shown = show_row(row, currency=currency, tick_size=None if inst is None else inst.tick_size)
    return _named_currency(shown, row, currency)


def with_currency(
    row: Mapping[str, Any], instruments: Mapping[str, Instrument], contract: str | None = None
) -> dict[str, Any]:
    """Return a row holding money with its instrument's ``currency`` (after ``contract``),
    the values as they are: what JSON and CSV print, so that no amount goes without it."""
    name = row.get("contract", contract)
    inst = instruments.get(name) if isinstance(name, str) else None
    return _named_currency(dict(row), row, None if inst is None else inst.currency)


def _named_currency(
    shown: dict[str, Any], row: Mapping[str, Any], currency: str | None
) -> dict[str, Any]:
    has_money = any(COLUMN_KINDS.get(k) is Kind.MONEY for k in row)
    if "currency" in row or not has_money or currency is None:
        return shown
    after = "contract" if "contract" in row else None
    result: dict[str, Any] = {} if after else {"currency": currency}
    for k, v in shown.items():
        result[k] = v
        if k == after:
            result["currency"] = currency
    return result


def emit_rows(
    rows: Sequence[dict[str, Any]],
    fmt: OutputFormat | TableOrJson,
    *,
    title: str = "",
    columns: Sequence[str] | None = None,
    instruments: Mapping[str, Instrument] | None = None,
    contract: str | None = None,
) -> None:
    """Print rows as a Rich table, a JSON list, or CSV with a header.

    CSV holds exactly what JSON holds, cell for cell (see :func:`csv_cell`). The table
    is for reading: with ``instruments`` (and ``contract`` for rows of one contract that
    do not name it) numbers are shown by :func:`readable`; without, exactly. With
    ``instruments``, JSON and CSV rows that hold money name its ``currency`` too.
    """
    if instruments is not None and fmt != "table":
        rows = [with_currency(r, instruments, contract) for r in rows]
        if columns is not None and rows and "currency" in rows[0] and "currency" not in columns:
            at = list(columns).index("contract") + 1 if "contract" in columns else 0
            columns = [*columns[:at], "currency", *columns[at:]]
    if fmt == "json":
        if standby.lag is not None:  # read from a standby: say how far behind it was
            print(dumps({"rows": list(rows), "standby": standby.lag}))
        else:
            print(dumps(list(rows)))
        return
    if fmt == "csv":
        write_csv(rows, columns)
        return
    if instruments is not None:
        rows = [readable(r, instruments, contract) for r in rows]
    names = list(rows[0]) if rows else []
    table = Table(title=title or None, show_lines=False)
    for c in names:
        table.add_column(c, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row[c]) for c in names))
    if rows:
        out.print(table)
    else:
        out.print(f"[dim]no {title.lower() or 'rows'}[/]")


@contextmanager
def progress_bars(
    *tasks: tuple[str, float | None],
) -> Iterator[list[Callable[[int], None]]]:
    """Yield one ``advance(n)`` callback per (description, total) task, driving progress
    bars on stderr when it is a terminal; elsewhere (pipes, files, scripts) they do
    nothing, so scripted output stays clean."""
    if not err.is_terminal:
        yield [lambda _n: None for _ in tasks]
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}"),
        TimeElapsedColumn(),
        console=_bars,
        transient=True,
    ) as bar:
        ids = [bar.add_task(description, total=total) for description, total in tasks]
        yield [partial(_advance, bar, task) for task in ids]


def _advance(bar: Progress, task: TaskID, n: int) -> None:
    bar.advance(task, n)


@contextmanager
def progress_bar(description: str, total: float | None = None) -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(n)`` callback driving a progress bar on a terminal (else silent)."""
    with progress_bars((description, total)) as (advance,):
        yield advance


# --------------------------------------------------------------------------- db


def parse_time(value: str | None, option: str) -> datetime | None:
    """Parse a CLI time: ISO-8601 with a zone (``Z`` or an offset) or a date (its end, UTC).

    A time without a zone is refused, as ingest refuses a naive ``occurred_at``: guessing
    UTC would silently shift a query by the user's offset.
    """
    if value is None:
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime.combine(day, dt_time.max, tzinfo=UTC)
        parsed = datetime.fromisoformat(value)
    except ValueError:
        err.print(
            f"[bold red]error:[/] {option}: not an ISO-8601 time or date: {value!r}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2) from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        err.print(
            f"[bold red]error:[/] {option}: {value!r} has no time zone (naive times are "
            f"refused, as ingest refuses them): write {value}Z for UTC, or an offset",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)
    return parsed


def parse_day(value: str | None, option: str) -> date | None:
    """Parse a CLI trading day (YYYY-MM-DD)."""
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        err.print(f"[bold red]error:[/] {option}: not a date (YYYY-MM-DD): {value!r}")
        raise typer.Exit(2) from None


def parse_times(
    as_of: str | None, as_known_at: str | None
) -> tuple[datetime | None, datetime | None]:
    """Parse ``--as-of`` and ``--as-known-at``; both at once ask what was known at the
    second time about the first."""
    return parse_time(as_of, "--as-of"), parse_time(as_known_at, "--as-known-at")


AsOf = Annotated[
    str | None,
    typer.Option(
        "--as-of",
        help="Event time: everything now known to have happened by T (with --as-known-at: "
        "only what had been recorded by then).",
    ),
]
AsKnownAt = Annotated[
    str | None, typer.Option("--as-known-at", help="Knowledge time: only what was recorded by T.")
]


# ------------------------------------------------- long-running commands as services
# ``ledger consume`` and ``ledger project --follow`` (see ledger.service).


class LogFormatChoice(StrEnum):
    text = "text"
    json = "json"


MetricsPortOption = Annotated[
    int | None,
    typer.Option(
        min=0,
        max=65535,
        help="Serve /metrics (Prometheus), /healthz and /readyz on this TCP port.",
    ),
]
MetricsHostOption = Annotated[
    str, typer.Option(help="Address the metrics and health port listens on.")
]
ReadyLagEventsOption = Annotated[
    int, typer.Option(min=0, help="/readyz: ready while at most this many events are unprojected.")
]
ReadyLagSecondsOption = Annotated[
    float,
    typer.Option(min=0, help="/readyz: ready while the oldest unprojected event is this young."),
]
LogFormatOption = Annotated[
    LogFormatChoice | None,
    typer.Option(
        "--log-format",
        envvar="LEDGER_LOG_FORMAT",
        help="Log lines as text or json (one object a line); secrets masked.",
    ),
]


def service_options(
    port: int | None, host: str, lag_events: int, lag_seconds: float
) -> ServiceOptions:
    """Return the metrics and health options of a long-running command."""
    return ServiceOptions(port, host, lag_events, lag_seconds)
