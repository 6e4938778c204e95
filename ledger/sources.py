"""Sources: turn raw broker input into events or rejected records.

Three input shapes reach the ledger:

- **native** JSON Lines: one object per line whose ``type`` key names the event
  (``fill``, ``bust``, ``correction``, ``instrument``, ``broker_position``, ``mark``) and
  whose other keys are the event's fields;
- **ProjectX** (TopstepX Gateway) payloads: trades, positions and contracts as the
  Gateway's REST search endpoints and its user hub send them — one per line, in lists,
  in ``{"action": 1, "data": {...}}`` envelopes, in ``{"trades": [...], "success": true}``
  responses, or as one whole (pretty-printed) response document per file;
- **CSV** with a header row of native keys.

Every record ends as exactly one of two things: :class:`Parsed` (an event, with the raw
bytes it came from) or :class:`Rejected` (the raw bytes, a
:class:`~ledger.errors.RejectReason` and a message naming the field and the value).
Nothing here raises on bad input, touches the database or awaits: the ingest layer
decides what to append and what to dead-letter.

Input is read line by line as bytes, so memory stays bounded by the longest accepted
line (:data:`MAX_RECORD_BYTES`) — except a whole-document ProjectX file, which is read
at once up to :data:`MAX_DOCUMENT_BYTES`. Numbers are decoded straight into ``Decimal``;
no float is ever made.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import BinaryIO, Final, Literal, Protocol, TypeAlias, get_args

import orjson
from pydantic import ValidationError

from ledger.errors import InvalidRecord, RejectReason
from ledger.events import EVENT_TYPES, Event, decode_json, parse_event
from ledger.values import to_decimal

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_RECORD_BYTES",
    "InputFormat",
    "Parsed",
    "Rejected",
    "SourceRef",
    "convert_projectx",
    "iter_file",
    "parse_csv_row",
    "parse_message",
    "reparse",
]

MAX_RECORD_BYTES: Final = 1_048_576
"""A line longer than this is rejected ``RECORD_TOO_LARGE`` without being decoded."""
MAX_DOCUMENT_BYTES: Final = 64 * 1_048_576
"""The largest whole-file JSON document (a pretty-printed ProjectX response) read."""
RAW_HEAD_BYTES: Final = 1024
"""How much of an oversized record is kept as its raw bytes."""

InputFormat: TypeAlias = Literal["auto", "native", "projectx", "csv"]
_FORMATS: Final = frozenset(get_args(InputFormat))

_BOM: Final = b"\xef\xbb\xbf"
_DRAIN_CHUNK: Final = 65_536
_MAX_NESTING: Final = 4
# An integer longer than this cannot be an id or an amount; decoding it as Decimal lets
# the field validators name the field instead of int() failing on the whole message.
_MAX_INT_DIGITS: Final = 64


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where a record came from.

    Attributes:
        source: a file path, ``"-"`` for stdin, or ``"nats:<subject>"``.
        line: the 1-based physical line (JSON Lines and CSV), or the NATS stream
            sequence. Blank lines yield nothing but still count as physical lines.
        index: the 0-based position of the payload inside a message that holds more
            than one (a list, an ``{"trades": [...]}`` response); ``None`` otherwise.
    """

    source: str
    line: int | None = None
    index: int | None = None

    def __str__(self) -> str:
        text = self.source
        if self.line is not None:
            text += f":{self.line}"
        if self.index is not None:
            text += f"[{self.index}]"
        return text


@dataclass(frozen=True, slots=True)
class Parsed:
    """One record that became an event.

    ``input_format`` and ``csv_header`` say how ``raw`` was read (see :func:`reparse`).
    """

    ref: SourceRef
    event: Event
    raw: bytes
    input_format: InputFormat = "auto"
    csv_header: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """One record that could not become an event, and why.

    ``input_format`` and ``csv_header`` say how ``raw`` was read, so that a retry reads
    it the same way (:func:`reparse`): a CSV row with its file's header, JSON as JSON.
    """

    ref: SourceRef
    raw: bytes
    reason: RejectReason
    message: str
    input_format: InputFormat = "auto"
    csv_header: tuple[str, ...] | None = None


Result: TypeAlias = Parsed | Rejected


class _Readable(Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...

    def read(self, size: int = -1, /) -> bytes: ...


# --------------------------------------------------------------------------- files


@dataclass(frozen=True, slots=True)
class _Line:
    number: int
    data: bytes  # without its line ending; only the head when too_large
    size: int
    too_large: bool = False


def iter_file(stream: BinaryIO, source: str, fmt: InputFormat = "auto") -> Iterator[Result]:
    """Read a file of records and yield one result per record, in order.

    JSON Lines (native or ProjectX, detected per payload) are read one line at a time.
    CSV is chosen by ``fmt="csv"``, or under ``"auto"`` when the first non-blank line is
    a CSV header with a ``type`` column, or looks like a header row (two or more
    comma-separated names) above a line that is not JSON either: then a wrong header is
    rejected naming its wrong column, and each row with it. A ProjectX file that is one
    whole JSON document (the first line opens with ``{`` or ``[`` but is not a complete
    value) is read at once and treated as one message; if it does not decode either, and
    any later line is a complete JSON object or array on its own, the file is read as
    JSON Lines after all (its first line being simply broken).

    Blank lines yield nothing. A line over :data:`MAX_RECORD_BYTES` is consumed without
    being kept and yields ``RECORD_TOO_LARGE`` with its first 1024 bytes as raw.

    Args:
        stream: the binary input, read sequentially (need not be seekable).
        source: the name recorded in each result's :class:`SourceRef`.
        fmt: ``"auto"``, ``"native"``, ``"projectx"`` or ``"csv"``.

    Yields:
        :class:`Parsed` or :class:`Rejected`, never raising on bad input.

    Raises:
        ValueError: ``fmt`` is not one of the input formats.
    """
    _check_format(fmt)
    lines = _read_lines(stream)
    first = next(lines, None)
    if first is None:
        return
    if not first.too_large:
        if fmt == "csv" or (fmt == "auto" and _is_csv_header(first.data)):
            yield from _iter_csv(first, lines, source)
            return
        if fmt == "auto" and _may_be_csv_header(first.data):
            # A header with a wrong column ("Type", "kind", "exec id") above rows that
            # are not JSON either: a CSV file with a bad header, reported as such (naming
            # the column) rather than as one INVALID_JSON per line.
            second = next(lines, None)
            rest = lines if second is None else _chain(second, lines)
            if second is None or second.too_large or not _opens_json(second.data):
                yield from _iter_csv(first, rest, source)
                return
            lines = rest
        if fmt in ("auto", "projectx") and _opens_document(first.data):
            yield from _iter_document(stream, first, source, fmt)
            return
    yield from _iter_json_lines(_chain(first, lines), source, fmt)


def _check_format(fmt: str) -> None:
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(sorted(_FORMATS))}, got {fmt!r}")


def _read_lines(stream: _Readable, start: int = 0) -> Iterator[_Line]:
    """Yield the non-blank physical lines of ``stream``, each bounded in memory."""
    number = start
    limit = MAX_RECORD_BYTES + 2  # the content, a '\r' and a '\n'
    while True:
        chunk = stream.readline(limit)
        if not chunk:
            return
        number += 1
        if number == 1 and chunk.startswith(_BOM):
            chunk = chunk[len(_BOM) :]
        if chunk.endswith(b"\n") or len(chunk) < limit:
            data = chunk.removesuffix(b"\n").removesuffix(b"\r")
            if len(data) > MAX_RECORD_BYTES:
                yield _Line(number, data[:RAW_HEAD_BYTES], len(data), too_large=True)
            elif data.strip():
                yield _Line(number, data, len(data))
            continue
        # Longer than any record we accept: skip to the end of the line, keeping a head.
        head, size = chunk[:RAW_HEAD_BYTES], len(chunk)
        while not chunk.endswith(b"\n"):
            chunk = stream.readline(_DRAIN_CHUNK)
            if not chunk:
                break
            size += len(chunk)
        ending = len(chunk) - len(chunk.removesuffix(b"\n").removesuffix(b"\r"))
        yield _Line(number, head, size - ending, too_large=True)


def _chain(first: _Line, rest: Iterable[_Line]) -> Iterator[_Line]:
    yield first
    yield from rest


def _too_large(
    line: _Line,
    ref: SourceRef,
    fmt: InputFormat,
    csv_header: tuple[str, ...] | None = None,
) -> Rejected:
    return Rejected(
        ref,
        line.data,
        RejectReason.RECORD_TOO_LARGE,
        f"record: line {line.number} is {line.size} bytes, more than the "
        f"{MAX_RECORD_BYTES} bytes a record may have; not decoded "
        f"(raw keeps its first {RAW_HEAD_BYTES} bytes)",
        fmt,
        csv_header,
    )


def _iter_json_lines(lines: Iterable[_Line], source: str, fmt: InputFormat) -> Iterator[Result]:
    for line in lines:
        ref = SourceRef(source, line.number)
        if line.too_large:
            yield _too_large(line, ref, fmt)
        else:
            yield from parse_message(line.data, ref, fmt)


def _opens_document(data: bytes) -> bool:
    """Return whether a first line opens a JSON value it does not close."""
    if data.lstrip()[:1] not in (b"{", b"["):
        return False
    try:
        decode_json(data)
    except json.JSONDecodeError:
        return True
    except (ValueError, ArithmeticError, RecursionError):
        return False  # complete but unacceptable (NaN, huge): a JSON Lines record
    return False


def _iter_document(
    stream: _Readable, first: _Line, source: str, fmt: InputFormat
) -> Iterator[Result]:
    """Read a whole-file JSON document, or fall back to JSON Lines if it is not one."""
    budget = MAX_DOCUMENT_BYTES - first.size - 1
    rest = stream.read(budget + 1)
    ref = SourceRef(source, first.number)
    failure: InvalidRecord | None = None
    document = b""
    if len(rest) <= budget:
        document = first.data + b"\n" + rest
        try:
            value, lenient = _decode(document)
        except InvalidRecord as exc:
            failure = exc
        else:
            yield from _results(value, lenient, document, ref, fmt)
            return
    if _looks_like_json_lines(rest):
        resumed = _read_lines(_Chained(io.BytesIO(rest), stream), start=first.number)
        yield from _iter_json_lines(_chain(first, resumed), source, fmt)
    elif failure is not None:
        yield Rejected(
            ref,
            document,
            failure.reason,
            f"{failure.message} (file read as one JSON document from line {first.number})",
            fmt,
        )
    else:
        head = (first.data + b"\n" + rest[:RAW_HEAD_BYTES])[:RAW_HEAD_BYTES]
        del rest
        while stream.read(_DRAIN_CHUNK * 16):
            pass
        yield Rejected(
            ref,
            head,
            RejectReason.RECORD_TOO_LARGE,
            f"record: the JSON document starting on line {first.number} is larger than "
            f"{MAX_DOCUMENT_BYTES} bytes; not decoded (raw keeps its first "
            f"{RAW_HEAD_BYTES} bytes)",
            fmt,
        )


def _looks_like_json_lines(data: bytes) -> bool:
    """Return whether any line of ``data`` is a complete JSON object or array by itself."""
    for line in io.BytesIO(data):  # line by line, without a second copy of the buffer
        text = line.strip()
        if text[:1] not in (b"{", b"[") or len(text) > MAX_RECORD_BYTES:
            continue
        try:
            value = decode_json(text)
        except (ValueError, ArithmeticError, RecursionError):
            continue
        if isinstance(value, dict | list):
            return True
    return False


class _Chained:
    """Read from a buffer first, then from the stream it was read from."""

    def __init__(self, head: io.BytesIO, tail: _Readable) -> None:
        self._head = head
        self._tail = tail
        self._in_head = True

    def readline(self, size: int = -1, /) -> bytes:
        if self._in_head:
            chunk = self._head.readline(size)
            if chunk.endswith(b"\n") or (size >= 0 and len(chunk) >= size):
                return chunk
            self._in_head = False
            more = self._tail.readline(size - len(chunk) if size >= 0 else -1)
            return chunk + more
        return self._tail.readline(size)

    def read(self, size: int = -1, /) -> bytes:
        if self._in_head:
            chunk = self._head.read(size)
            if size >= 0 and len(chunk) >= size:
                return chunk
            self._in_head = False
            return chunk + self._tail.read(size - len(chunk) if size >= 0 else -1)
        return self._tail.read(size)


# --------------------------------------------------------------------------- CSV

_HEADER_CELL: Final = re.compile(r"[a-z_][a-z0-9_]*")
# what a column name of a wrong header may look like: words, not JSON or numbers
_HEADER_LIKE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_ .#/()-]*")


def _csv_cells(text: str) -> list[str]:
    return next(csv.reader([text], strict=True), [])


def _opens_json(data: bytes) -> bool:
    return data.lstrip()[:1] in (b"{", b"[")


def _may_be_csv_header(data: bytes) -> bool:
    """Return whether a first line could be a CSV header row, if a wrong one."""
    if _opens_json(data):
        return False
    try:
        cells = [cell.strip() for cell in _csv_cells(data.decode("utf-8"))]
    except (UnicodeDecodeError, csv.Error):
        return False
    return len(cells) >= 2 and all(_HEADER_LIKE.fullmatch(cell) for cell in cells if cell)


def _is_csv_header(data: bytes) -> bool:
    if data.lstrip()[:1] in (b"{", b"["):
        return False
    try:
        cells = [cell.strip() for cell in _csv_cells(data.decode("utf-8"))]
    except (UnicodeDecodeError, csv.Error):
        return False
    return "type" in cells and all(_HEADER_CELL.fullmatch(cell) for cell in cells)


def _csv_header(line: _Line) -> list[str]:
    """Return the column names of a header line.

    Raises:
        InvalidRecord: the header is not UTF-8, not CSV, or has no usable columns.
    """
    text = _utf8(line.data)
    try:
        cells = [cell.strip() for cell in _csv_cells(text)]
    except csv.Error as exc:
        raise InvalidRecord(RejectReason.INVALID_RECORD, f"CSV header: {exc}") from None
    bad = [(n, cell) for n, cell in enumerate(cells, 1) if not _HEADER_CELL.fullmatch(cell)]
    if bad:
        named = ", ".join(f"column {n} {_show(cell)}" for n, cell in bad)
        raise InvalidRecord(
            RejectReason.INVALID_RECORD,
            f"CSV header: {named} not a native key (column names are the native keys, "
            f"lower case, e.g. 'type', 'exec_id', 'occurred_at')",
        )
    duplicates = sorted({cell for cell in cells if cells.count(cell) > 1})
    if duplicates:
        raise InvalidRecord(
            RejectReason.INVALID_RECORD, f"CSV header: duplicate columns {_show(duplicates)}"
        )
    if "type" not in cells:
        raise InvalidRecord(
            RejectReason.INVALID_RECORD,
            f"CSV header: no 'type' column (columns {_show(cells)}); the header row must "
            "name the native keys, 'type' among them",
        )
    return cells


def _iter_csv(first: _Line, lines: Iterable[_Line], source: str) -> Iterator[Result]:
    """Yield one result per CSV row; the header itself yields nothing unless it is bad.

    Each physical line is one row (native values never hold a newline), so a broken
    row cannot swallow the rows after it.
    """
    header: tuple[str, ...] | None = None
    problem = ""
    try:
        header = tuple(_csv_header(first))
    except InvalidRecord as exc:
        problem = exc.message
        yield Rejected(SourceRef(source, first.number), first.data, exc.reason, exc.message, "csv")
    for line in lines:
        ref = SourceRef(source, line.number)
        if line.too_large:
            yield _too_large(line, ref, "csv", header)
            continue
        if header is None:
            yield Rejected(
                ref,
                line.data,
                RejectReason.INVALID_RECORD,
                f"record: no usable CSV header (line {first.number} was rejected: {problem})",
                "csv",
            )
            continue
        yield from parse_csv_row(line.data, header, ref)


def parse_csv_row(data: bytes, header: Sequence[str], ref: SourceRef) -> list[Result]:
    """Turn one CSV row, read with its file's header, into a result (none for an empty row).

    Args:
        data: the row's bytes, without its line ending.
        header: the column names of the file's header row.
        ref: where the row came from.

    Returns:
        ``[Parsed]``, ``[Rejected]``, or ``[]`` for an all-empty row. Never raises on bad
        input.
    """
    columns = tuple(header)
    try:
        record = _csv_record(data, list(columns))
        if record is None:
            return []  # an all-empty row, as spreadsheets write
        event = parse_event(record)
    except InvalidRecord as exc:
        return [Rejected(ref, data, exc.reason, exc.message, "csv", columns)]
    return [Parsed(ref, event, data, "csv", columns)]


def reparse(
    data: bytes,
    ref: SourceRef,
    input_format: InputFormat = "auto",
    csv_header: Sequence[str] | None = None,
) -> list[Result]:
    """Read a record again the way it was first read (``ledger rejected --retry``).

    A CSV row is read as CSV with the header of its file; anything else as one JSON
    message in ``input_format`` (:func:`parse_message`).

    Args:
        data: the record's raw bytes, as kept in the dead letter.
        ref: where it came from.
        input_format: the format it was read in (``Parsed.input_format``).
        csv_header: the header of its CSV file; None when the header was unusable.

    Returns:
        The results, as :func:`parse_message` or :func:`parse_csv_row`.
    """
    if input_format == "csv":
        if csv_header is None:
            return [
                Rejected(
                    ref,
                    data,
                    RejectReason.INVALID_RECORD,
                    "record: a CSV record with no usable header (fix the file's header "
                    "row and ingest the file again)",
                    "csv",
                )
            ]
        return parse_csv_row(data, csv_header, ref)
    return parse_message(data, ref, input_format)


def _csv_record(data: bytes, header: list[str]) -> dict[str, object] | None:
    try:
        cells = _csv_cells(_utf8(data))
    except csv.Error as exc:
        raise InvalidRecord(RejectReason.INVALID_RECORD, f"CSV row: {exc}") from None
    if len(cells) > len(header):
        raise InvalidRecord(
            RejectReason.INVALID_RECORD,
            f"CSV row: {len(cells)} cells but the header has {len(header)} columns "
            f"(extra cells {_show(cells[len(header) :])})",
        )
    record: dict[str, object] = {
        name: cell for name, cell in zip(header, cells, strict=False) if cell != ""
    }
    return record or None


# --------------------------------------------------------------------------- messages


def parse_message(data: bytes, ref: SourceRef, fmt: InputFormat = "auto") -> list[Result]:
    """Turn one message (a NATS message body, or one JSON line) into results.

    The message may be a single payload, a list of payloads, ``{"action": 1, "data":
    ...}`` envelopes (also inside a list), or a ProjectX response wrapper
    (``{"trades": [...]}``, ``{"positions": [...]}``, ``{"contracts": [...]}``). Each
    payload independently becomes :class:`Parsed` (one per event: a voided ProjectX
    trade gives two) or one :class:`Rejected`. When the message holds more than one
    payload, each result's ``ref.index`` is the payload's position and its ``raw`` the
    payload re-encoded; otherwise ``raw`` is ``data`` itself. An empty list or wrapper
    yields nothing.

    Args:
        data: the message bytes (UTF-8 JSON); the caller bounds their size.
        ref: where the message came from.
        fmt: ``"auto"`` detects each payload's format; ``"native"`` and ``"projectx"``
            force one.

    Returns:
        The results in payload order. Bad input never raises.

    Raises:
        ValueError: ``fmt`` is not a JSON format (CSV needs a header: use
            :func:`iter_file`).
    """
    _check_format(fmt)
    if fmt == "csv":
        raise ValueError("parse_message takes JSON; CSV rows need their header: use iter_file")
    try:
        value, lenient = _decode(data)
    except InvalidRecord as exc:
        return [Rejected(ref, data, exc.reason, exc.message, fmt)]
    if not lenient and type(value) is dict and _UNWRAPPING_KEYS.isdisjoint(value):
        # one payload, no wrapper (a live feed's every message): what _results makes of
        # it, without unwrapping through its generators (a third of parsing a fill)
        try:
            events = _payload_events(value, fmt)
        except InvalidRecord as exc:
            return [Rejected(ref, data, exc.reason, exc.message, fmt)]
        return [Parsed(ref, event, data, fmt) for event in events]
    return list(_results(value, lenient, data, ref, fmt))


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = data[exc.start : exc.end]
        raise InvalidRecord(
            RejectReason.INVALID_ENCODING,
            f"record: invalid UTF-8 byte(s) {bad!r} at byte offset {exc.start} ({exc.reason})",
        ) from None


def _decode(data: bytes) -> tuple[object, bool]:
    """Decode a JSON message; the flag says whether payloads need a non-finite check.

    Raises:
        InvalidRecord: ``INVALID_ENCODING`` or ``INVALID_JSON``.
    """
    text = _utf8(data)
    try:
        return decode_json(text), False
    except json.JSONDecodeError as exc:
        raise InvalidRecord(
            RejectReason.INVALID_JSON,
            f"record: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}; "
            f"got {_show_text(text)})",
        ) from None
    except RecursionError:
        raise InvalidRecord(
            RejectReason.INVALID_JSON, "record: JSON nested too deeply to decode"
        ) from None
    except (ValueError, ArithmeticError):
        # NaN/Infinity, an integer too long for int(), or an exponent beyond what Decimal
        # holds: decode again with markers, so the payload check can name the field.
        pass
    try:
        value = json.loads(
            text, parse_float=_parse_float, parse_int=_parse_int, parse_constant=Decimal
        )
    except (ValueError, ArithmeticError, RecursionError) as exc:  # pragma: no cover
        raise InvalidRecord(RejectReason.INVALID_JSON, f"record: not valid JSON: {exc}") from None
    return value, True


class _Unrepresentable(Decimal):
    """A JSON number beyond even Decimal's exponent range (a NaN carrying its text)."""

    text: str


def _parse_float(text: str) -> Decimal:
    try:
        return Decimal(text)
    except ArithmeticError:
        marker = _Unrepresentable("NaN")
        marker.text = text
        return marker


def _parse_int(text: str) -> int | Decimal:
    return int(text) if len(text) <= _MAX_INT_DIGITS else Decimal(text)


@dataclass(frozen=True, slots=True)
class _Problem:
    """A part of a message that is not a payload and cannot hold any."""

    value: object
    message: str


_WRAPPER_KEYS: Final = ("trades", "positions", "contracts")
# A payload with none of these keys is no envelope or wrapper: parse_message takes it
# straight to its events.
_UNWRAPPING_KEYS: Final = frozenset({"action", *_WRAPPER_KEYS})
_RESPONSE_KEYS: Final = frozenset({"success", "errorCode", "errorMessage"})


def _payloads(value: object, depth: int = 0) -> Iterator[object]:
    """Unwrap lists, action envelopes and response wrappers down to payloads."""
    if depth > _MAX_NESTING:
        yield _Problem(value, f"record: wrappers nested more than {_MAX_NESTING} deep")
    elif isinstance(value, list):
        for item in value:
            yield from _payloads(item, depth + 1)
    elif isinstance(value, dict) and "action" in value and "data" in value and len(value) == 2:
        yield from _payloads(value["data"], depth + 1)
    elif isinstance(value, dict) and (key := _wrapper_key(value)) is not None:
        items = value[key]
        if value.get("success") is False:
            yield _Problem(
                value,
                f"success: the ProjectX response reports a failure "
                f"(errorCode {_show(value.get('errorCode'))}, "
                f"errorMessage {_show(value.get('errorMessage'))})",
            )
        elif not isinstance(items, list):
            yield _Problem(value, f"{key}: expected a list, got {_show(items)}")
        else:
            for item in items:
                yield from _payloads(item, depth + 1)
    else:
        yield value


def _wrapper_key(value: Mapping[str, object]) -> str | None:
    keys = [key for key in _WRAPPER_KEYS if key in value]
    if len(keys) == 1 and all(key in _RESPONSE_KEYS or key == keys[0] for key in value):
        return keys[0]
    return None


def _results(
    value: object, lenient: bool, data: bytes, ref: SourceRef, fmt: InputFormat
) -> Iterator[Result]:
    items = list(_payloads(value))
    many = len(items) > 1
    for index, item in enumerate(items):
        item_ref = replace(ref, index=index) if many else ref
        raw = _encode(item.value if isinstance(item, _Problem) else item, data) if many else data
        try:
            if isinstance(item, _Problem):
                raise InvalidRecord(RejectReason.INVALID_RECORD, item.message)
            if lenient:
                _refuse_non_finite(item)
            events = _payload_events(item, fmt)
        except InvalidRecord as exc:
            yield Rejected(item_ref, raw, exc.reason, exc.message, fmt)
        else:
            for event in events:
                yield Parsed(item_ref, event, raw, fmt)


def _encode(value: object, fallback: bytes) -> bytes:
    """Re-encode one payload of a larger message, numbers spelled as received."""
    try:
        return orjson.dumps(value, default=_number_fragment)
    except (TypeError, orjson.JSONEncodeError):
        return fallback  # e.g. an integer beyond 64 bits: keep the whole message


def _number_fragment(value: object) -> orjson.Fragment:
    if isinstance(value, _Unrepresentable):
        return orjson.Fragment(value.text.encode())
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value).encode())
    raise TypeError(f"cannot encode {type(value).__name__}")


def _refuse_non_finite(value: object, path: str = "") -> None:
    """Reject NaN/Infinity anywhere in a payload, naming where (JSON has neither)."""
    if isinstance(value, _Unrepresentable):
        raise InvalidRecord(
            RejectReason.INVALID_RECORD,
            f"{path or 'record'}: decimal number out of range: {_show(value.text)}",
        )
    if isinstance(value, Decimal) and not value.is_finite():
        raise InvalidRecord(
            RejectReason.INVALID_RECORD,
            f"{path or 'record'}: {value} is not a number the ledger accepts (got {_show(value)})",
        )
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_non_finite(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for position, item in enumerate(value):
            _refuse_non_finite(item, f"{path}[{position}]")


_PROJECTX_MARKERS: Final = ("creationTimestamp", "accountId", "contractId", "tickSize")


def _payload_events(payload: object, fmt: InputFormat) -> list[Event]:
    if not isinstance(payload, dict):
        raise InvalidRecord(
            RejectReason.INVALID_RECORD, f"record: expected a JSON object, got {_show(payload)}"
        )
    if fmt == "native" or (fmt == "auto" and isinstance(payload.get("type"), str)):
        return [parse_event(payload)]
    if fmt == "projectx" or any(key in payload for key in _PROJECTX_MARKERS):
        return [_projectx_event(record) for record in convert_projectx(payload)]
    raise InvalidRecord(
        RejectReason.UNKNOWN_TYPE,
        f"type: record is neither native (no string 'type' key) nor ProjectX (none of "
        f"{', '.join(_PROJECTX_MARKERS)}); keys seen: {_keys(payload)}",
    )


# --------------------------------------------------------------------------- ProjectX

_TRADE_NAMES: Final = {
    "account": "accountId",
    "contract": "contractId",
    "exec_id": "id",
    "order_id": "orderId",
    "side": "side",
    "qty": "size",
    "price": "price",
    "fee": "fees",
    "occurred_at": "creationTimestamp",
    "broker_pnl": "profitAndLoss",
}
_POSITION_NAMES: Final = {
    "account": "accountId",
    "contract": "contractId",
    "signed_qty": "size",
    "avg_price": "averagePrice",
    "occurred_at": "creationTimestamp",
}
_CONTRACT_NAMES: Final = {"contract": "id", "tick_size": "tickSize", "tick_value": "tickValue"}
# ProjectX key -> native key, per native event type, for messages in ProjectX terms.
_NAMES_BY_TYPE: Final = {
    "fill": _TRADE_NAMES,
    "bust": _TRADE_NAMES,
    "broker_position": _POSITION_NAMES,
    "instrument": _CONTRACT_NAMES,
}
_TRADE_KEYS: Final = frozenset({*_TRADE_NAMES.values(), "voided"})
_POSITION_KEYS: Final = frozenset({*_POSITION_NAMES.values(), "id", "type"})
# Descriptive contract keys the ledger does not need; accepted and left out.
_CONTRACT_KEYS: Final = frozenset(
    {*_CONTRACT_NAMES.values(), "name", "description", "activeContract", "symbolId"}
)
_SIDES: Final = {0: "BUY", 1: "SELL"}
_POSITION_TYPES: Final = {1: "long", 2: "short"}


def convert_projectx(payload: Mapping[str, object]) -> list[dict[str, object]]:
    """Convert one ProjectX (TopstepX Gateway) payload into native records.

    A trade becomes a ``fill`` (and, when ``voided``, also a ``bust`` of it, so the
    trail is kept); a position a ``broker_position`` (signed by its ``type``: 1 long,
    2 short); a contract an ``instrument`` in USD. Values are passed on as decoded
    (``Decimal`` stays exact, numeric ids become strings); the event validators check
    them afterwards.

    Args:
        payload: one decoded ProjectX object.

    Returns:
        The native records, each ready for :func:`ledger.events.parse_event`.

    Raises:
        InvalidRecord: ``UNKNOWN_TYPE`` when the payload is not a trade, position or
            contract; ``INVALID_RECORD`` for an unexpected key or a bad ``side``,
            ``voided``, ``type`` or ``size``, naming the ProjectX key and value.
    """
    if "tickSize" in payload or "tickValue" in payload:
        return [_convert_contract(payload)]
    if any(key in payload for key in ("side", "price", "voided", "fees", "profitAndLoss")):
        return _convert_trade(payload)
    if "type" in payload or "averagePrice" in payload:
        return [_convert_position(payload)]
    raise InvalidRecord(
        RejectReason.UNKNOWN_TYPE,
        f"type: ProjectX payload is not a trade, position or contract; keys seen: {_keys(payload)}",
    )


def _check_keys(payload: Mapping[str, object], allowed: frozenset[str], kind: str) -> None:
    for key, value in payload.items():
        if key not in allowed:
            raise InvalidRecord(
                RejectReason.INVALID_RECORD,
                f"{_show_key(key)}: unexpected ProjectX {kind} key (value {_show(value)})",
            )


def _ident(value: object) -> object:
    # Gateway ids are JSON integers; native ids are strings.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _copy(
    payload: Mapping[str, object],
    record: dict[str, object],
    names: Mapping[str, str],
    *,
    optional: frozenset[str] = frozenset(),
) -> None:
    """Copy present keys under their native names; ``null`` on an optional key is absent."""
    for native, key in names.items():
        if key not in payload:
            continue
        value = payload[key]
        if value is None and native in optional:
            continue
        record[native] = _ident(value) if native in _ID_FIELDS else value


_ID_FIELDS: Final = frozenset({"account", "contract", "exec_id", "order_id"})


def _convert_trade(payload: Mapping[str, object]) -> list[dict[str, object]]:
    _check_keys(payload, _TRADE_KEYS, "trade")
    fill: dict[str, object] = {"type": "fill"}
    names = {k: v for k, v in _TRADE_NAMES.items() if k != "side"}
    _copy(payload, fill, names, optional=frozenset({"order_id", "fee", "broker_pnl"}))
    if "side" in payload:
        side = payload["side"]
        if not (isinstance(side, int) and not isinstance(side, bool) and side in _SIDES):
            raise InvalidRecord(
                RejectReason.INVALID_RECORD,
                f"side: expected 0 (buy) or 1 (sell), got {_show(side)}",
            )
        fill["side"] = _SIDES[side]
    voided = payload.get("voided")
    if voided is not None and not isinstance(voided, bool):
        raise InvalidRecord(
            RejectReason.INVALID_RECORD, f"voided: expected true or false, got {_show(voided)}"
        )
    if not voided:
        return [fill]
    bust: dict[str, object] = {"type": "bust"}
    bust.update(
        {key: fill[key] for key in ("account", "contract", "exec_id", "occurred_at") if key in fill}
    )
    return [fill, bust]


def _convert_position(payload: Mapping[str, object]) -> dict[str, object]:
    _check_keys(payload, _POSITION_KEYS, "position")
    record: dict[str, object] = {"type": "broker_position"}
    _copy(payload, record, _POSITION_NAMES, optional=frozenset({"avg_price"}))
    for key in ("type", "size"):
        if key not in payload:
            raise InvalidRecord(
                RejectReason.INVALID_RECORD, f"{key}: required ProjectX position key is missing"
            )
    kind = payload["type"]
    if not (isinstance(kind, int) and not isinstance(kind, bool) and kind in _POSITION_TYPES):
        raise InvalidRecord(
            RejectReason.INVALID_RECORD,
            f"type: expected 1 (long) or 2 (short), got {_show(kind)}",
        )
    try:
        size = to_decimal(payload["size"])
    except ValueError as exc:
        raise InvalidRecord(RejectReason.INVALID_RECORD, f"size: {exc}") from None
    if size < 0:
        raise InvalidRecord(
            RejectReason.INVALID_RECORD,
            f"size: must not be negative (the sign is in 'type'), got {size}",
        )
    # -Decimal(0) is Decimal('-0'): keep a flat position plainly 0.
    record["signed_qty"] = -size if kind == 2 and size else size
    return record


def _convert_contract(payload: Mapping[str, object]) -> dict[str, object]:
    _check_keys(payload, _CONTRACT_KEYS, "contract")
    record: dict[str, object] = {"type": "instrument", "currency": "USD"}
    _copy(payload, record, _CONTRACT_NAMES)
    return record


def _projectx_event(record: Mapping[str, object]) -> Event:
    """Validate a converted record, naming fields by their ProjectX keys on failure."""
    try:
        return parse_event(record)
    except InvalidRecord as exc:
        kind = str(record.get("type"))
        model = EVENT_TYPES.get(kind)
        if exc.reason is not RejectReason.INVALID_RECORD or model is None:
            raise
        try:
            model.model_validate(record)
        except ValidationError as error:
            names = _NAMES_BY_TYPE.get(kind, {})
            raise InvalidRecord(RejectReason.INVALID_RECORD, _describe(error, names)) from None
        raise


def _describe(error: ValidationError, names: Mapping[str, str]) -> str:
    """Render validation problems as ``projectxKey (native_key): problem (got value)``."""
    parts = []
    for item in error.errors(include_url=False):
        native = ".".join(str(part) for part in item["loc"]) or "record"
        key = names.get(str(item["loc"][0])) if item["loc"] else None
        field = f"{key} ({native})" if key is not None and key != native else native
        if item["type"] == "missing":
            parts.append(f"{field}: required key is missing")
        else:
            message = str(item["msg"]).removeprefix("Value error, ")
            parts.append(f"{field}: {message} (got {_show(item.get('input'))})")
    return "; ".join(parts)


# --------------------------------------------------------------------------- messages


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _show_key(key: str) -> str:
    return key if len(key) <= 40 and key.isidentifier() else _show(key)


def _show_text(text: str) -> str:
    return _show(text if len(text) <= 80 else text[:80])


def _keys(payload: Mapping[str, object]) -> str:
    keys = [_show_key(str(key)) for key in list(payload)[:12]]
    more = len(payload) - len(keys)
    return (", ".join(keys) or "none") + (f" and {more} more" if more > 0 else "")
