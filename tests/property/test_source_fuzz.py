"""Fuzz ledger.sources with thousands of malformed records mixed with valid ones.

Whatever the input, reading never raises, every non-blank line is accounted for (parsed
in full, or at least one rejection), every rejection says why, and every valid record
comes out with its numbers exactly as written.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ledger.errors import RejectReason
from ledger.events import BrokerPositionReported, FillBusted, FillRecorded, InstrumentDefined
from ledger.sources import Parsed, Rejected, SourceRef, iter_file, parse_message

SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large]


@dataclass(frozen=True)
class Raw:
    """JSON text written as is: exact numbers, NaN, Infinity."""

    text: str


def dumps(value: object) -> str:
    """Serialize like json.dumps, but write Raw values verbatim."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


@dataclass
class Case:
    """One line of input and what must come of it."""

    line: bytes
    valid: bool
    events: int = 0  # Parsed results expected from a valid line
    single: bool = True  # one payload: raw is the line itself
    exact: list[dict[str, Decimal]] = field(default_factory=list)  # per event, attr -> value
    field: str | None = None  # the field a rejection must name


# --------------------------------------------------------------------------- values

TOKEN = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
ACCOUNT = TOKEN.filter(lambda s: s.lower() not in {"instrument", "reconciliation", "seal"})
ZONES = st.sampled_from(
    [UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=5, minutes=30))]
)
TIMESTAMP = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=ZONES
).map(datetime.isoformat)


@st.composite
def decimal_text(draw: st.DrawFn, *, positive: bool = False, signed: bool = False) -> str:
    whole = draw(st.integers(0, 10**7))
    places = draw(st.integers(0, 9))
    frac = draw(st.integers(0, 10**places - 1)) if places else 0
    text = str(whole) if places == 0 else f"{whole}.{frac:0{places}d}"
    if positive and Decimal(text) == 0:
        text = "1" if places == 0 else f"1.{frac:0{places}d}"
    if signed and draw(st.booleans()):
        text = "-" + text
    return text


def number(text: str, quoted: bool) -> object:
    """A number as a JSON number, or as a decimal string."""
    return text if quoted else Raw(text)


# --------------------------------------------------------------------------- valid


@st.composite
def native_fill(draw: st.DrawFn) -> tuple[dict[str, object], dict[str, Decimal]]:
    quoted = draw(st.booleans())
    qty = draw(decimal_text(positive=True))
    price = draw(decimal_text())
    record: dict[str, object] = {
        "type": "fill",
        "account": draw(ACCOUNT),
        "contract": draw(TOKEN),
        "exec_id": draw(TOKEN),
        "side": draw(st.sampled_from(["BUY", "SELL", "buy", "sell"])),
        "qty": number(qty, quoted),
        "price": number(price, quoted),
        "occurred_at": draw(TIMESTAMP),
    }
    exact = {"qty": Decimal(qty), "price": Decimal(price)}
    if draw(st.booleans()):
        record["order_id"] = draw(TOKEN)
    if draw(st.booleans()):
        fee = draw(decimal_text())
        record["fee"] = number(fee, quoted)
        exact["fee"] = Decimal(fee)
    if draw(st.booleans()):
        pnl = draw(decimal_text(signed=True))
        record["broker_pnl"] = number(pnl, quoted)
        exact["broker_pnl"] = Decimal(pnl)
    return record, exact


@st.composite
def projectx_trade(
    draw: st.DrawFn, voided: bool | None = None
) -> tuple[dict[str, object], dict[str, Decimal]]:
    price = draw(decimal_text())
    fees = draw(st.none() | decimal_text())
    pnl = draw(st.none() | decimal_text(signed=True))
    size = draw(st.integers(1, 1000))
    record: dict[str, object] = {
        "id": draw(st.integers(1, 10**12)),
        "accountId": draw(st.integers(1, 10**9) | ACCOUNT),
        "contractId": draw(TOKEN),
        "creationTimestamp": draw(TIMESTAMP),
        "price": Raw(price),
        "profitAndLoss": None if pnl is None else Raw(pnl),
        "fees": None if fees is None else Raw(fees),
        "side": draw(st.sampled_from([0, 1])),
        "size": size,
        "voided": draw(st.booleans()) if voided is None else voided,
        "orderId": draw(st.none() | st.integers(1, 10**12)),
    }
    exact = {"price": Decimal(price), "qty": Decimal(size), "fee": Decimal(fees or 0)}
    if pnl is not None:
        exact["broker_pnl"] = Decimal(pnl)
    return record, exact


@st.composite
def projectx_position(draw: st.DrawFn) -> tuple[dict[str, object], dict[str, Decimal]]:
    kind = draw(st.sampled_from([1, 2]))
    size = draw(st.integers(0, 1000))
    avg = draw(decimal_text())
    record: dict[str, object] = {
        "id": draw(st.integers(1, 10**9)),
        "accountId": draw(st.integers(1, 10**9)),
        "contractId": draw(TOKEN),
        "creationTimestamp": draw(TIMESTAMP),
        "type": kind,
        "size": size,
        "averagePrice": Raw(avg),
    }
    signed = Decimal(size) if kind == 1 else -Decimal(size)
    return record, {"signed_qty": signed, "avg_price": Decimal(avg)}


@st.composite
def projectx_contract(draw: st.DrawFn) -> tuple[dict[str, object], dict[str, Decimal]]:
    tick_size = draw(decimal_text(positive=True))
    # the point value (tick value / tick size) must be an exact decimal: a multiple
    points = draw(st.integers(1, 10**7)) * Decimal(10) ** -draw(st.integers(0, 3))
    tick_value = str(Decimal(tick_size) * points)
    record: dict[str, object] = {
        "id": draw(TOKEN),
        "name": "X",
        "tickSize": Raw(tick_size),
        "tickValue": Raw(tick_value),
        "activeContract": True,
    }
    return record, {"tick_size": Decimal(tick_size), "tick_value": Decimal(tick_value)}


def _trade_events(record: dict[str, object]) -> int:
    return 2 if record["voided"] else 1


@st.composite
def valid_case(draw: st.DrawFn) -> Case:
    shape = draw(
        st.sampled_from(["native", "trade", "action", "list", "search", "position", "contract"])
    )
    if shape == "native":
        record, exact = draw(native_fill())
        return Case(dumps(record).encode(), True, 1, exact=[exact])
    if shape in ("trade", "action"):
        record, exact = draw(projectx_trade())
        body: object = record if shape == "trade" else {"action": 1, "data": record}
        n = _trade_events(record)
        return Case(dumps(body).encode(), True, n, exact=[exact] * n)
    if shape in ("list", "search"):
        trades = draw(st.lists(projectx_trade(), min_size=2, max_size=4))
        items = [t for t, _ in trades]
        body = items if shape == "list" else {"trades": items, "success": True, "errorCode": 0}
        per_event = [e for t, e in trades for _ in range(_trade_events(t))]
        return Case(dumps(body).encode(), True, len(per_event), single=False, exact=per_event)
    record, exact = draw(projectx_position() if shape == "position" else projectx_contract())
    return Case(dumps(record).encode(), True, 1, exact=[exact])


# --------------------------------------------------------------------------- malformed

HUGE: list[object] = [
    Raw("1e99999999999999999999"),
    Raw("-1E-99999999999999999999"),
    Raw("1e400"),
    Raw("-1e400"),
    Raw("1e-400"),
    Raw("9" * 5000),
    Raw("1" + "0" * 39),
]
NON_FINITE: list[object] = [Raw("NaN"), Raw("Infinity"), Raw("-Infinity")]
NAIVE = ["2025-01-21T16:00:00", "2025-01-21", "2025-01-21T16:00:00.123456"]
BAD_IDS = [
    "x" * 65,
    "ES'; DROP TABLE events; --",
    "a b",
    "",
    "ES\x00",
    "<script>",
    "é",
    "1;1",
]
NOT_TEXT: list[object] = [True, None, [], {}, Raw("1.5")]
NOT_NUMBER: list[object] = [True, None, [], {}, "abc", "", "1,5", "0x10"]
NOT_TIME: list[object] = [123, True, None, [], "yesterday", "2025-13-01T00:00:00+00:00"]

NATIVE_BAD: dict[str, list[object]] = {
    "account": [*NOT_TEXT, *BAD_IDS, "instrument", "SEAL"],
    "contract": [*NOT_TEXT, *BAD_IDS],
    "exec_id": [*NOT_TEXT, *BAD_IDS],
    "order_id": [*NOT_TEXT[:1], *NOT_TEXT[2:], *BAD_IDS],
    "side": ["HOLD", 1, 0, True, None, [], "B"],
    "qty": [*NOT_NUMBER, *HUGE, *NON_FINITE, Raw("0"), Raw("-1"), Raw("-0.5"), "-3"],
    "price": [*NOT_NUMBER, *HUGE, *NON_FINITE, Raw("-0.25"), "-1"],
    "fee": [*NOT_NUMBER, *HUGE, *NON_FINITE, Raw("-1.4")],
    "broker_pnl": [*NOT_NUMBER[:1], *NOT_NUMBER[2:], *HUGE, *NON_FINITE],
    "occurred_at": [*NOT_TIME, *NAIVE, "x" * 41],
}
NATIVE_REQUIRED = ["type", "account", "contract", "exec_id", "side", "qty", "price", "occurred_at"]

TRADE_BAD: dict[str, list[object]] = {
    "id": [*NOT_TEXT, *BAD_IDS, Raw("9" * 5000)],
    "accountId": [*NOT_TEXT, *BAD_IDS, "instrument"],
    "contractId": [*NOT_TEXT, *BAD_IDS],
    "creationTimestamp": [*NOT_TIME, *NAIVE],
    "price": [*NOT_NUMBER, *HUGE, *NON_FINITE, Raw("-6065.25")],
    "fees": [*NOT_NUMBER[:1], *NOT_NUMBER[2:], *HUGE, *NON_FINITE, Raw("-1")],
    "profitAndLoss": [*NOT_NUMBER[:1], *NOT_NUMBER[2:], *HUGE, *NON_FINITE],
    "side": [2, -1, True, False, "BUY", None, Raw("0.0"), Raw("1e0")],
    "size": [*NOT_NUMBER, *HUGE, *NON_FINITE, 0, -1, -100],
    "voided": ["yes", 1, 0, [], Raw("NaN")],
    "orderId": [True, [], {}, *BAD_IDS],
}
TRADE_REQUIRED = ["id", "accountId", "contractId", "creationTimestamp", "price", "side", "size"]
POSITION_BAD: dict[str, list[object]] = {
    "type": [0, 3, -1, True, "long", None, Raw("1.0")],
    "size": [-1, -2, Raw("-0.5"), "abc", None, True, *HUGE, *NON_FINITE],
    "averagePrice": [Raw("-1"), "abc", True, *HUGE, *NON_FINITE],
    "creationTimestamp": [*NOT_TIME, *NAIVE],
    "accountId": [*NOT_TEXT, *BAD_IDS],
}
CONTRACT_BAD: dict[str, list[object]] = {
    "id": [*NOT_TEXT, *BAD_IDS],
    "tickSize": [Raw("0"), Raw("-0.25"), "abc", None, True, *HUGE, *NON_FINITE],
    "tickValue": [Raw("0"), Raw("-12.5"), "abc", None, True, *HUGE, *NON_FINITE],
    # descriptive keys are not kept, but NaN/Infinity is refused wherever it appears
    "name": NON_FINITE,
    "description": NON_FINITE,
    "activeContract": NON_FINITE,
}
BAD_BYTES = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xa0\xa1", b"\xed\xa0\x80", b"\xf0\x28\x8c\x28"]


@st.composite
def malformed_native(draw: st.DrawFn) -> Case:
    record, _ = draw(native_fill())
    kind = draw(st.sampled_from(["value", "missing", "extra"]))
    if kind == "value":
        name = draw(st.sampled_from(sorted(NATIVE_BAD)))
        record[name] = draw(st.sampled_from(NATIVE_BAD[name]))
    elif kind == "missing":
        name = draw(st.sampled_from(NATIVE_REQUIRED))
        del record[name]
    else:
        name = draw(st.sampled_from(["venue", "zzz", "Qty", "side "]))
        record[name] = draw(st.sampled_from([1, "x", None, Raw("NaN")]))
    return Case(dumps(record).encode(), False, field=name)


@st.composite
def malformed_projectx(draw: st.DrawFn) -> Case:
    shape = draw(st.sampled_from(["trade", "trade", "position", "contract"]))
    if shape == "trade":
        record, _ = draw(projectx_trade(voided=draw(st.booleans())))
        bad, required = TRADE_BAD, TRADE_REQUIRED
    elif shape == "position":
        record, _ = draw(projectx_position())
        bad, required = POSITION_BAD, ["type", "size", "accountId", "contractId"]
    else:
        record, _ = draw(projectx_contract())
        bad, required = CONTRACT_BAD, ["id", "tickValue"]
    kind = draw(st.sampled_from(["value", "value", "missing", "extra"]))
    if kind == "value":
        name = draw(st.sampled_from(sorted(bad)))
        record[name] = draw(st.sampled_from(bad[name]))
    elif kind == "missing":
        name = draw(st.sampled_from(required))
        del record[name]
    else:
        name = draw(st.sampled_from(["exchange", "unknownKey", "Price"]))
        record[name] = 1
    body: object = record if draw(st.booleans()) else {"action": 1, "data": record}
    return Case(dumps(body).encode(), False, field=name)


@st.composite
def broken_bytes(draw: st.DrawFn) -> Case:
    good = draw(valid_case()).line
    if draw(st.booleans()):
        cut = draw(st.integers(1, len(good) - 1))
        return Case(good[:cut], False)
    at = good.index(b'":"') + 3  # inside the first string value
    return Case(good[:at] + draw(st.sampled_from(BAD_BYTES)) + good[at:], False)


@st.composite
def mixed_list(draw: st.DrawFn) -> Case:
    """A list of trades of which exactly one is broken: the others still parse."""
    goods = draw(st.lists(projectx_trade(voided=False), min_size=1, max_size=3))
    bad = draw(malformed_projectx())
    items = [Raw(dumps(t)) for t, _ in goods]
    items.insert(draw(st.integers(0, len(items))), Raw(bad.line.decode()))
    return Case(dumps(items).encode(), False, events=len(goods), single=False)


WRONG_SHAPES = [b"42", b'"fill"', b"null", b"true", b"[1,2]", b'{"symbol":"ES"}', b"{}"]

malformed_case = st.one_of(
    malformed_native(),
    malformed_projectx(),
    broken_bytes(),
    mixed_list(),
    st.sampled_from(WRONG_SHAPES).map(lambda b: Case(b, False, single=not b.startswith(b"["))),
)
any_case = st.one_of(valid_case(), malformed_case, malformed_case)


def _check_exact(event: object, exact: dict[str, Decimal]) -> None:
    for name, expected in exact.items():
        value = getattr(event, name)
        assert isinstance(value, Decimal), (name, value)
        # as_tuple: same digits and exponent, so 6065.250000000 stays 9 places
        assert value.as_tuple() == expected.as_tuple() or (expected == 0 and value == 0), (
            name,
            value,
            expected,
        )


# --------------------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None, suppress_health_check=SUPPRESS)
@given(
    cases=st.lists(any_case, min_size=0, max_size=25),
    anchor=valid_case(),
    where=st.integers(0, 25),
    blanks=st.lists(st.sampled_from([b"", b"  ", b"\t", b" \r"]), max_size=25),
    crlf=st.booleans(),
)
def test_fuzzed_stream_accounts_for_every_line(
    cases: list[Case], anchor: Case, where: int, blanks: list[bytes], crlf: bool
) -> None:
    cases = [*cases]
    cases.insert(min(where, len(cases)), anchor)  # at least one well-formed line
    ending = b"\r\n" if crlf else b"\n"
    chunks: list[bytes] = []
    by_line: dict[int, Case] = {}
    for position, case in enumerate(cases):
        if position < len(blanks):
            chunks.append(blanks[position])
        chunks.append(case.line)
        by_line[len(chunks)] = case
    data = ending.join(chunks) + ending

    results = list(iter_file(io.BytesIO(data), "fuzz.jsonl"))

    grouped: dict[int, list[Parsed | Rejected]] = defaultdict(list)
    for result in results:
        assert isinstance(result, Parsed | Rejected)
        assert result.ref.source == "fuzz.jsonl"
        assert result.ref.line in by_line, result.ref
        if isinstance(result, Rejected):
            assert result.message.strip()
            assert isinstance(result.reason, RejectReason)
        grouped[result.ref.line].append(result)

    fully_parsed = with_rejection = 0
    for number, case in by_line.items():
        got = grouped[number]
        assert got, f"line {number} yielded nothing: {case.line[:200]!r}"
        rejected = [r for r in got if isinstance(r, Rejected)]
        parsed = [r for r in got if isinstance(r, Parsed)]
        if rejected:
            with_rejection += 1
        else:
            fully_parsed += 1
        if case.valid:
            assert not rejected, [(r.reason, r.message) for r in rejected]
            assert len(parsed) == case.events
            for result, exact in zip(parsed, case.exact, strict=True):
                if isinstance(result.event, FillBusted):
                    continue
                _check_exact(result.event, exact)
        else:
            assert rejected, f"malformed line parsed: {case.line[:300]!r}"
            assert len(parsed) == case.events  # only a mixed list has good neighbours
        if case.single:
            assert all(r.raw == case.line for r in got)
            assert all(r.ref.index is None for r in got)
    assert fully_parsed + with_rejection == len(by_line)
    assert len(results) == sum(len(v) for v in grouped.values())


@settings(max_examples=1500, deadline=None, suppress_health_check=SUPPRESS)
@given(case=st.one_of(malformed_native(), malformed_projectx()))
def test_malformed_record_is_rejected_naming_its_field(case: Case) -> None:
    results = parse_message(case.line, SourceRef("nats:fuzz", 1))
    assert len(results) == 1, results
    [result] = results
    assert isinstance(result, Rejected), case.line
    assert result.raw == case.line
    assert case.field is not None
    assert case.field.strip() in result.message, (case.field, result.message)


@settings(max_examples=600, deadline=None, suppress_health_check=SUPPRESS)
@given(case=broken_bytes())
def test_broken_bytes_are_invalid_encoding_or_json(case: Case) -> None:
    [result] = parse_message(case.line, SourceRef("-", 1))
    assert isinstance(result, Rejected)
    assert result.reason in (RejectReason.INVALID_JSON, RejectReason.INVALID_ENCODING)
    assert result.message.startswith("record: ")


@settings(max_examples=400, deadline=None, suppress_health_check=SUPPRESS)
@given(case=valid_case())
def test_valid_record_is_parsed_exactly(case: Case) -> None:
    results = parse_message(case.line, SourceRef("-", 1))
    assert [type(r) for r in results] == [Parsed] * case.events
    for result, exact in zip(results, case.exact, strict=True):
        assert isinstance(result, Parsed)
        assert isinstance(
            result.event, FillRecorded | FillBusted | BrokerPositionReported | InstrumentDefined
        )
        if not isinstance(result.event, FillBusted):
            _check_exact(result.event, exact)


@settings(max_examples=200, deadline=None, suppress_health_check=SUPPRESS)
@given(lines=st.lists(st.binary(max_size=80), max_size=20))
def test_arbitrary_bytes_never_raise(lines: list[bytes]) -> None:
    data = b"\n".join(lines)
    for result in iter_file(io.BytesIO(data), "noise"):
        assert isinstance(result, Parsed | Rejected)
        if isinstance(result, Rejected):
            assert result.message


CSV_HEADER = ["type", "account", "contract", "exec_id", "side", "qty", "price", "occurred_at"]
CELL = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"),
    max_size=12,
)


def _csv_row(record: dict[str, object]) -> list[str]:
    values = [record[key] for key in CSV_HEADER]
    return [value.text if isinstance(value, Raw) else str(value) for value in values]


@settings(max_examples=200, deadline=None, suppress_health_check=SUPPRESS)
@given(
    rows=st.lists(
        st.one_of(
            st.lists(CELL, min_size=1, max_size=10),
            native_fill().map(lambda pair: _csv_row(pair[0])),
        ),
        max_size=20,
    )
)
def test_csv_rows_are_each_accounted_for(rows: list[list[str]]) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows(rows)
    data = out.getvalue().encode()

    results = list(iter_file(io.BytesIO(data), "fuzz.csv"))

    lines = data.split(b"\n")
    expected = {
        number
        for number, line in enumerate(lines, start=1)
        # a row of empty cells is skipped, unless it has more cells than the header:
        # that is malformed, and rejected rather than dropped
        if number > 1
        and line.strip()
        and (any(rows[number - 2]) or len(rows[number - 2]) > len(CSV_HEADER))
    }
    assert [r.ref.line for r in results] == sorted(expected)
    for row, result in zip([rows[n - 2] for n in sorted(expected)], results, strict=True):
        if isinstance(result, Rejected):
            assert result.message
        if row[0] == "fill" and len(row) == len(CSV_HEADER):  # a generated valid fill
            assert isinstance(result, Parsed), result
            assert isinstance(result.event, FillRecorded)
            assert result.event.qty.as_tuple() == Decimal(row[5]).as_tuple()


# --------------------------------------------------------------------------- hostile

from hostile_json import dumps as hostile_dumps  # noqa: E402
from hostile_json import hostile_record  # noqa: E402

from ledger.values import (  # noqa: E402
    ID_PATTERN,
    MAX_INTEGER_DIGITS,
    MAX_SCALE,
    is_on_tick,
)


def _assert_admitted(event: object) -> None:
    """An event that passed the edge carries only what the ledger can carry exactly."""
    for name, value in vars(event).items():
        if isinstance(value, Decimal):
            exponent = value.as_tuple().exponent
            assert isinstance(exponent, int) and exponent >= -MAX_SCALE, (name, value)
            assert abs(value) < Decimal(10) ** MAX_INTEGER_DIGITS, (name, value)
        elif isinstance(value, datetime):
            assert value.tzinfo is not None and 1900 <= value.year < 2200, (name, value)
        elif name in ("account", "contract", "exec_id", "order_id") and value is not None:
            assert ID_PATTERN.fullmatch(value), (name, value)
    if isinstance(event, InstrumentDefined):
        assert event.point_value * event.tick_size == event.tick_value
    price = getattr(event, "price", None)
    if price is not None:
        is_on_tick(price, Decimal("0.25"))  # never raises (DivisionImpossible at 28 digits)
        is_on_tick(price, Decimal("0.000000000001"))


@settings(max_examples=1500, deadline=None, suppress_health_check=SUPPRESS)
@given(records=st.lists(hostile_record(), min_size=1, max_size=8), fmt=st.sampled_from(
    ["auto", "native", "projectx"]))  # fmt: skip
def test_hostile_json_never_escapes_and_every_line_is_accounted_for(
    records: list[object], fmt: str
) -> None:
    """Every source: a message at a time, and a file of lines; both say the same."""
    lines = [hostile_dumps(r) for r in records]
    per_message = []
    for number, line in enumerate(lines, start=1):
        results = parse_message(line, SourceRef("fuzz", number), fmt)  # type: ignore[arg-type]
        assert results or line.startswith(b"["), line  # only an empty list yields nothing
        for result in results:
            assert result.ref.line == number
            if isinstance(result, Parsed):
                _assert_admitted(result.event)
            else:
                assert isinstance(result, Rejected) and result.message
        per_message += results
    data = b"\n".join(lines) + b"\n"
    from_file = list(iter_file(io.BytesIO(data), "fuzz", fmt))  # type: ignore[arg-type]
    assert [(r.ref.line, type(r)) for r in from_file] == [
        (r.ref.line, type(r)) for r in per_message
    ]


@settings(max_examples=300, deadline=None, suppress_health_check=SUPPRESS)
@given(records=st.lists(hostile_record(), min_size=1, max_size=6))
def test_hostile_csv_rows_never_escape(records: list[object]) -> None:
    rows = [r for r in records if isinstance(r, dict)]
    assume(rows)
    header = sorted({str(k) for r in rows for k in r} | {"type"})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(
            [
                v.text if hasattr(v, "text") else hostile_dumps(v).decode()
                if isinstance(v, dict | list)
                else "" if v is None else str(v)
                for v in (row.get(k) for k in header)
            ]
        )  # fmt: skip
    for result in iter_file(io.BytesIO(out.getvalue().encode()), "fuzz.csv", "csv"):
        if isinstance(result, Parsed):
            _assert_admitted(result.event)
        else:
            assert result.message
