"""Running as a service: Prometheus metrics, health endpoints and JSON logs.

``ledger consume`` and ``ledger project --follow`` run for days. With ``--metrics-port``
each serves, on one port of its own event loop (no thread, so it stops with the command)::

    GET /metrics   Prometheus text exposition, read from the database at each scrape
    GET /healthz   200 while the process is up (liveness)
    GET /readyz    200 when connected (database, and NATS for consume) and the
                   projections are caught up within a bound; else 503 and why (JSON)

The ledger's metrics are read at scrape time from where ``ledger stats`` reads them
(:meth:`ledger.api.Ledger.stats`: the ``counters`` table, the dead letters by status,
the serving checkpoint against the log), so a scrape and ``ledger stats`` agree. The
process's own reconnects (database and NATS) and its resource use (prometheus-client's
process collector) come from the process itself. Which names mean what:
:data:`METRICS`.

Logs: :func:`configure_logging` sets the root logger to text or JSON lines (one object
per line: ``ts``, ``level``, ``logger``, ``message`` and the record's extra fields); in
both, a password (or NATS token) in any URL, and the configured URLs' passwords
wherever they appear, are masked.

This module is core: it never imports the API or the read side (the commands hand it
a ``read_stats`` callable; the stats type is named for the type checker only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, Literal

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ledger.db import Reconnect, describe, mask_secrets, redact
from ledger.errors import ServiceError

if TYPE_CHECKING:
    from ledger.api import Stats

__all__ = [
    "DEFAULT_METRICS_HOST",
    "DEFAULT_READY_LAG_EVENTS",
    "DEFAULT_READY_LAG_SECONDS",
    "METRICS",
    "HealthServer",
    "JsonFormatter",
    "LedgerCollector",
    "LogFormat",
    "MaskingFormatter",
    "Probes",
    "Readiness",
    "ServiceOptions",
    "configure_logging",
    "mask_urls",
    "serve",
]

log = logging.getLogger("ledger.service")

LogFormat = Literal["text", "json"]
DEFAULT_METRICS_HOST: Final = "127.0.0.1"
DEFAULT_READY_LAG_EVENTS: Final = 1000
DEFAULT_READY_LAG_SECONDS: Final = 30.0
_READ_TIMEOUT: Final = 5.0
"""Seconds a scrape or a readiness probe waits for the database before it says so."""
_REQUEST_TIMEOUT: Final = 5.0
_MAX_REQUEST_HEAD: Final = 8192

METRICS: Final[Mapping[str, str]] = {
    "ledger_received_total": "Records received by ingest and the feed (counters table).",
    "ledger_appended_total": "Events appended to the log.",
    "ledger_duplicates_total": "Records that were already in the log (idempotent no-ops).",
    "ledger_rejected_total": "Records refused and dead-lettered.",
    "ledger_rejected_by_reason_total": "Records refused, by reason.",
    "ledger_already_rejected_total": "Duplicates that were dead letters already (not again).",
    "ledger_retried_total": "What `ledger rejected --retry` did (resolved, appended, duplicates).",
    "ledger_consume_total": "The live feed's own counters (consume.* in ledger stats), by name.",
    "ledger_dead_letters_pending": "Dead letters not yet retried successfully (status pending).",
    "ledger_dead_letters": "Dead letters by status (pending, resolved).",
    "ledger_projection_lag_events": "Events in the log the serving projections have not applied.",
    "ledger_projection_lag_seconds": "Age of the oldest event the projections have not applied.",
    "ledger_last_append_timestamp_seconds": "Record time of the newest event in the log (Unix).",
    "ledger_faulted_streams": "Streams the projections hold as faulted.",
    "ledger_database_up": "1 when this scrape read the database, else 0.",
    "ledger_nats_connected": "1 while the feed is connected to NATS (consume only).",
    "ledger_reconnects_total": (
        "This process's reconnects (consume's include its projection process's), "
        "by target (database, nats)."
    ),
}


# ------------------------------------------------------------------------- logs

_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>,]+", re.IGNORECASE)
_NATS_SCHEMES = ("nats", "tls", "ws", "wss")
_PASSWORD_WORD = re.compile(r"\b(password\s*=\s*)('[^']*'|[^\s&'\"]+)", re.IGNORECASE)


def _mask_url(url: str) -> str:
    scheme, _, rest = url.partition("://")
    userinfo, at, _hosts = rest.partition("/")[0].rpartition("@")
    if at and ":" not in userinfo and scheme.lower() in _NATS_SCHEMES:
        # nats://TOKEN@host: the whole user part is the secret
        return f"{scheme}://***@{rest[len(userinfo) + 1 :]}"
    return redact(url)


def mask_urls(text: str, secrets_of: Iterable[str | None] = ()) -> str:
    """Return ``text`` with the secrets of every URL in it masked.

    Any ``scheme://user:password@host`` (and any ``password=...``, and a bare NATS
    token ``nats://token@host``) becomes ``***``; so does the password of each URL in
    ``secrets_of`` wherever else it appears (a driver's message may quote it alone).
    """
    text = _URL.sub(lambda m: _mask_url(m.group(0)), text)
    text = _PASSWORD_WORD.sub(r"\1***", text)  # a libpq keyword string's password=...
    for url in secrets_of:
        text = mask_secrets(text, url)
    return text


# the attributes every LogRecord has: anything else was passed as ``extra``
_RECORD_FIELDS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def _labelled(
    family: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    label: str,
    values: Mapping[str, int],
) -> CounterMetricFamily | GaugeMetricFamily:
    """One metric family of ``values`` by ``label`` (in label order), its help from
    :data:`METRICS` (counters under their ``_total`` name)."""
    key = f"{name}_total" if family is CounterMetricFamily else name
    metric = family(name, METRICS[key], labels=[label])
    for value_label, value in sorted(values.items()):
        metric.add_metric([value_label], value)
    return metric


class MaskingFormatter(logging.Formatter):
    """The text format, with secrets masked (see :func:`mask_urls`)."""

    def __init__(self, fmt: str | None = None, secrets_of: Iterable[str | None] = ()) -> None:
        """Format as ``fmt``; mask URL secrets and the passwords of ``secrets_of``."""
        super().__init__(fmt)
        self.secrets_of = tuple(s for s in secrets_of if s)

    def format(self, record: logging.LogRecord) -> str:
        """Return the formatted record, masked."""
        return mask_urls(super().format(record), self.secrets_of)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, extra fields; masked.

    ``ts`` is UTC ISO-8601 with milliseconds; an exception goes in ``exc`` (its
    traceback as text). Every string (message, extra values, traceback) is masked.
    """

    def __init__(self, secrets_of: Iterable[str | None] = ()) -> None:
        """Mask URL secrets and the passwords of the URLs in ``secrets_of``."""
        super().__init__()
        self.secrets_of = tuple(s for s in secrets_of if s)

    def _clean(self, value: object) -> object:
        if isinstance(value, str):
            return mask_urls(value, self.secrets_of)
        if isinstance(value, bool | int | float) or value is None:
            return value
        if isinstance(value, Mapping):
            return {str(k): self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        if isinstance(value, datetime):
            return value.isoformat()
        return mask_urls(str(value), self.secrets_of)

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line of JSON."""
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        data: dict[str, object] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": self._clean(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_") and key not in data:
                data[key] = self._clean(value)
        if record.exc_info:
            data["exc"] = self._clean(self.formatException(record.exc_info))
        elif record.exc_text:
            data["exc"] = self._clean(record.exc_text)
        return orjson.dumps(data, default=str).decode()


TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(
    fmt: LogFormat = "text", secrets_of: Iterable[str | None] = (), level: int = logging.INFO
) -> None:
    """Send every log record to stderr as text or JSON lines, secrets masked.

    Replaces the root logger's handlers (a second call reconfigures, it does not add).
    """
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = (
        JsonFormatter(secrets_of) if fmt == "json" else MaskingFormatter(TEXT_FORMAT, secrets_of)
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


# ---------------------------------------------------------------------- metrics


@dataclass(frozen=True, slots=True)
class ServiceOptions:
    """Where to serve metrics and health, and what "caught up" means for ``/readyz``.

    Attributes:
        metrics_port: the TCP port; None serves nothing.
        metrics_host: the address to listen on (default loopback only).
        ready_lag_events: ready only while at most this many events are unprojected.
        ready_lag_seconds: ready only while the oldest unprojected event is at most
            this old.
    """

    metrics_port: int | None = None
    metrics_host: str = DEFAULT_METRICS_HOST
    ready_lag_events: int = DEFAULT_READY_LAG_EVENTS
    ready_lag_seconds: float = DEFAULT_READY_LAG_SECONDS


@dataclass(frozen=True, slots=True)
class Readiness:
    """The answer of ``/readyz``: ready, and why not (each reason one short line)."""

    ready: bool
    reasons: tuple[str, ...] = ()
    lag_events: int | None = None
    lag_seconds: float | None = None

    def body(self) -> bytes:
        """Return the JSON body of the answer."""
        return orjson.dumps(
            {
                "ready": self.ready,
                "reasons": list(self.reasons),
                "projection_lag": {"events": self.lag_events, "seconds": self.lag_seconds},
            }
        )


@dataclass(slots=True)
class _Reading:
    """One read of the ledger's values (or why it failed)."""

    stats: Stats | None = None
    error: str | None = None


@dataclass(slots=True)
class Probes:
    """What only the running process knows: its connections and reconnects."""

    nats_connected: Callable[[], bool] | None = None
    nats_reconnects: Callable[[], int] | None = None
    database_reconnects: Callable[[], int] = field(default=lambda: Reconnect.failures)


class LedgerCollector(Collector):
    """The ledger's metrics, as last read by :meth:`HealthServer.read` (one per scrape).

    The HTTP handler reads the database (async), then renders at once: the values a
    scrape shows are the ones that scrape read, never a background task's.
    """

    def __init__(self, probes: Probes) -> None:
        """Expose the values of each reading plus the process's ``probes``."""
        self.probes = probes
        self.reading = _Reading()

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families of the current reading."""
        stats = self.reading.stats
        yield GaugeMetricFamily(
            "ledger_database_up", METRICS["ledger_database_up"], value=int(stats is not None)
        )
        reconnects = CounterMetricFamily(
            "ledger_reconnects", METRICS["ledger_reconnects_total"], labels=["target"]
        )
        reconnects.add_metric(["database"], self.probes.database_reconnects())
        if self.probes.nats_reconnects is not None:
            reconnects.add_metric(["nats"], self.probes.nats_reconnects())
        yield reconnects
        if self.probes.nats_connected is not None:
            yield GaugeMetricFamily(
                "ledger_nats_connected",
                METRICS["ledger_nats_connected"],
                value=int(self.probes.nats_connected()),
            )
        if stats is None:
            return
        for name, value in (
            ("received", stats.received),
            ("appended", stats.appended),
            ("duplicates", stats.duplicates),
            ("rejected", stats.rejected),
            ("already_rejected", stats.already_rejected),
        ):
            yield CounterMetricFamily(
                f"ledger_{name}", METRICS[f"ledger_{name}_total"], value=value
            )
        yield _labelled(
            CounterMetricFamily, "ledger_rejected_by_reason", "reason", stats.rejected_by_reason
        )
        yield _labelled(CounterMetricFamily, "ledger_retried", "counter", stats.retried)
        yield _labelled(GaugeMetricFamily, "ledger_dead_letters", "status", stats.dead_letters)
        yield _labelled(CounterMetricFamily, "ledger_consume", "counter", stats.consume)
        for name, gauge in (
            ("ledger_dead_letters_pending", stats.dead_letters.get("pending", 0)),
            ("ledger_projection_lag_events", stats.lag_events),
            ("ledger_projection_lag_seconds", stats.lag_seconds),
            ("ledger_faulted_streams", len(stats.faulted_streams)),
        ):
            yield GaugeMetricFamily(name, METRICS[name], value=gauge)
        if stats.last_append_at is not None:
            yield GaugeMetricFamily(
                "ledger_last_append_timestamp_seconds",
                METRICS["ledger_last_append_timestamp_seconds"],
                value=stats.last_append_at.timestamp(),
            )


# ----------------------------------------------------------------- HTTP server

_REASONS: Final = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Unavailable"}
_JSON: Final = "application/json"


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on one port, in the running loop.

    A deliberately small HTTP/1.1 server (GET and HEAD, one request per connection):
    what scrapers and probes send. It runs on the command's own event loop, so a
    scrape reads the database with the command's engine and stops when it stops.
    """

    def __init__(
        self,
        options: ServiceOptions,
        read_stats: Callable[[], Awaitable[Stats]],
        probes: Probes | None = None,
        *,
        secrets_of: Iterable[str | None] = (),
    ) -> None:
        """Serve ``read_stats``' values (and the ``probes``) as ``options`` say."""
        self.options = options
        self._read_stats = read_stats
        self.probes = probes or Probes()
        self.secrets_of = tuple(s for s in secrets_of if s)
        self.collector = LedgerCollector(self.probes)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int | None:
        """Return the port listened on (the one chosen, when asked for port 0)."""
        if self._server is None or not self._server.sockets:
            return None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Listen on the options' host and port.

        Raises:
            OSError: the port is taken or the address is not this machine's.
        """
        self._server = await asyncio.start_server(
            self._handle, self.options.metrics_host, self.options.metrics_port
        )
        log.info(
            "serving /metrics, /healthz and /readyz on http://%s:%s",
            self.options.metrics_host,
            self.port,
            extra={"metrics_port": self.port},
        )

    async def stop(self) -> None:
        """Stop listening and close the open connections."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()  # a request under way finishes: each is bounded by its timeouts
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)

    async def read(self) -> _Reading:
        """Read the ledger's values now (bounded by a timeout; a failure is kept)."""
        try:
            stats = await asyncio.wait_for(self._read_stats(), _READ_TIMEOUT)
        except TimeoutError:
            return _Reading(error=f"database: no answer within {_READ_TIMEOUT:.0f} s")
        except Exception as exc:
            return _Reading(error=f"database: {mask_urls(describe(exc), self.secrets_of)}")
        return _Reading(stats=stats)

    async def metrics(self) -> bytes:
        """Return the exposition of one scrape (read now, rendered at once)."""
        reading = await self.read()
        # no await from here on: no other scrape can swap the reading while it renders
        self.collector.reading = reading
        return generate_latest(self.registry)

    async def readiness(self) -> Readiness:
        """Return whether the process is ready, and why not."""
        reasons: list[str] = []
        connected = self.probes.nats_connected
        if connected is not None and not connected():
            reasons.append("nats: not connected")
        reading = await self.read()
        stats = reading.stats
        if stats is None:
            reasons.append(reading.error or "database: unavailable")
            return Readiness(False, tuple(reasons))
        opts = self.options
        if stats.lag_events > opts.ready_lag_events:
            reasons.append(
                f"projection lag: {stats.lag_events} events, more than {opts.ready_lag_events}"
            )
        if stats.lag_seconds > opts.ready_lag_seconds:
            reasons.append(
                f"projection lag: {stats.lag_seconds:.3f} s, more than {opts.ready_lag_seconds} s"
            )
        return Readiness(not reasons, tuple(reasons), stats.lag_events, stats.lag_seconds)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            if len(head) > _MAX_REQUEST_HEAD:
                return
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            status, content_type, body = await self._answer(method, target.split("?", 1)[0])
            self._respond(writer, status, content_type, b"" if method == "HEAD" else body)
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client went away
        except Exception:
            log.exception("health endpoint failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, _JSON, b'{"error": "only GET and HEAD"}'
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, await self.metrics()
        if path == "/healthz":
            return 200, _JSON, orjson.dumps({"live": True, "uptime_seconds": _uptime()})
        if path == "/readyz":
            ready = await self.readiness()
            return (200 if ready.ready else 503), _JSON, ready.body()
        return 404, _JSON, b'{"error": "not found: try /metrics, /healthz or /readyz"}'

    @staticmethod
    def _respond(writer: asyncio.StreamWriter, status: int, content_type: str, body: bytes) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + body)


_STARTED = time.monotonic()


def _uptime() -> float:
    return round(time.monotonic() - _STARTED, 3)


@contextlib.asynccontextmanager
async def serve(
    options: ServiceOptions,
    read_stats: Callable[[], Awaitable[Stats]],
    probes: Probes | None = None,
    *,
    secrets_of: Iterable[str | None] = (),
) -> AsyncIterator[HealthServer | None]:
    """Serve metrics and health while the block runs (nothing when no port is set).

    Raises:
        ServiceError: the port cannot be listened on (taken, or not this machine's
            address).
    """
    if options.metrics_port is None:
        yield None
        return
    server = HealthServer(options, read_stats, probes, secrets_of=secrets_of)
    try:
        await server.start()
    except OSError as exc:
        raise ServiceError(
            f"--metrics-port: cannot listen on {options.metrics_host}:{options.metrics_port}: "
            f"{exc.strerror or exc}"
        ) from exc
    try:
        yield server
    finally:
        await server.stop()
