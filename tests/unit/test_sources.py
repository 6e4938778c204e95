"""Unit tests of ledger.sources: every ProjectX shape, CSV, and every kind of rejection."""

from __future__ import annotations

import io
import json
import tracemalloc
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from ledger import sources
from ledger.errors import InvalidRecord, RejectReason
from ledger.events import (
    BrokerPositionReported,
    FillBusted,
    FillRecorded,
    InstrumentDefined,
    MarkPriceSet,
)
from ledger.sources import (
    MAX_RECORD_BYTES,
    Parsed,
    Rejected,
    SourceRef,
    convert_projectx,
    iter_file,
    parse_message,
)
from ledger.values import Side

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
PROJECTX_STEMS = sorted(p.stem for p in (FIXTURES / "projectx").glob("*.json"))

TRADE = {
    "id": 8604,
    "accountId": 203,
    "contractId": "CON.F.US.EP.H25",
    "creationTimestamp": "2025-01-21T16:13:52.523293+00:00",
    "price": "PRICE",
    "profitAndLoss": "PNL",
    "fees": "FEES",
    "side": 1,
    "size": 1,
    "voided": False,
    "orderId": 14328,
}
GOOD_FILL = (
    '{"type":"fill","account":"203","contract":"ES","exec_id":"E1","side":"BUY",'
    '"qty":1,"price":5000.25,"occurred_at":"2025-01-21T16:00:00+00:00"}'
)


def _read(path: Path, fmt: sources.InputFormat = "auto") -> list[Parsed | Rejected]:
    with path.open("rb") as stream:
        return list(iter_file(stream, str(path), fmt))


def _run(data: bytes, fmt: sources.InputFormat = "auto") -> list[Parsed | Rejected]:
    return list(iter_file(io.BytesIO(data), "test.jsonl", fmt))


def _events(results: list[Parsed | Rejected]) -> list[object]:
    assert all(isinstance(r, Parsed) for r in results), [
        (r.ref, r.reason, r.message) for r in results if isinstance(r, Rejected)
    ]
    return [r.event for r in results if isinstance(r, Parsed)]


def _trade_json(**changes: object) -> str:
    """A ProjectX trade as JSON text, with the Decimal fields spelled exactly."""
    payload = {**TRADE, **changes}
    text = json.dumps(payload)
    return (
        text.replace('"PRICE"', "6065.250000000")
        .replace('"PNL"', "50.000000000")
        .replace('"FEES"', "1.4000")
    )


# --------------------------------------------------------------------------- ProjectX


@pytest.mark.parametrize("stem", PROJECTX_STEMS)
def test_projectx_fixture_gives_the_same_events_as_its_native_twin(stem: str) -> None:
    projectx = _events(_read(FIXTURES / "projectx" / f"{stem}.json"))
    native = _events(_read(FIXTURES / "native" / f"{stem}.jsonl"))

    assert projectx == native
    assert [e.event_id for e in projectx] == [e.event_id for e in native]  # type: ignore[attr-defined]
    assert [e.payload() for e in projectx] == [e.payload() for e in native]  # type: ignore[attr-defined]
    assert len(projectx) >= 1


def test_every_projectx_shape_has_a_fixture() -> None:
    assert PROJECTX_STEMS == [
        "contracts_search",
        "positions",
        "positions_search",
        "trade_action",
        "trade_action_list",
        "trade_lines",
        "trade_list",
        "trade_nulls",
        "trade_search",
        "trade_single",
        "trade_voided",
    ]


def test_single_trade_keeps_exact_values() -> None:
    [result] = _read(FIXTURES / "projectx" / "trade_single.json")
    assert isinstance(result, Parsed)
    assert result.ref == SourceRef(str(FIXTURES / "projectx" / "trade_single.json"), 1, None)
    fill = result.event
    assert isinstance(fill, FillRecorded)
    assert fill.account == "203"  # JSON integer account id -> string
    assert fill.exec_id == "8604"
    assert fill.order_id == "14328"
    assert fill.side is Side.SELL
    assert str(fill.price) == "6065.250000000"  # 9 decimals kept, not normalized
    assert str(fill.broker_pnl) == "50.000000000"
    assert str(fill.fee) == "1.4000"
    assert fill.qty == Decimal(1)
    assert fill.occurred_at == datetime(2025, 1, 21, 16, 13, 52, 523293, tzinfo=UTC)
    assert result.raw == (FIXTURES / "projectx" / "trade_single.json").read_bytes().rstrip(b"\n")


def test_null_profit_and_loss_fees_and_order_id() -> None:
    [result] = _read(FIXTURES / "projectx" / "trade_nulls.json")
    assert isinstance(result, Parsed)
    fill = result.event
    assert isinstance(fill, FillRecorded)
    assert fill.broker_pnl is None
    assert fill.order_id is None
    assert fill.fee == Decimal(0)
    assert fill.side is Side.BUY
    assert fill.account == "204"


def test_voided_trade_becomes_fill_and_bust_of_it() -> None:
    results = _read(FIXTURES / "projectx" / "trade_voided.json")
    fill, bust = _events(results)
    assert isinstance(fill, FillRecorded)
    assert isinstance(bust, FillBusted)
    assert (bust.account, bust.contract, bust.exec_id) == ("203", "CON.F.US.MNQ.H25", "8611")
    assert bust.occurred_at == fill.occurred_at
    assert [r.ref.index for r in results] == [None, None]


def test_list_and_wrapper_results_carry_their_index_and_own_raw() -> None:
    results = _read(FIXTURES / "projectx" / "trade_list.json")
    assert [(r.ref.line, r.ref.index) for r in results] == [(1, 0), (1, 1)]
    first = json.loads(results[0].raw)
    assert first["id"] == 8603
    assert b'"price":6062.750000000' in results[0].raw  # re-encoded exactly as received
    assert b'"price":6065.250000000' in results[1].raw


def test_pretty_printed_trade_search_is_one_document() -> None:
    results = _read(FIXTURES / "projectx" / "trade_search.json")
    assert [(r.ref.line, r.ref.index) for r in results] == [(1, 0), (1, 1), (1, 2)]
    events = _events(results)
    assert [e.exec_id for e in events] == ["8603", "8604", "8610"]  # type: ignore[attr-defined]
    assert str(events[2].price) == "21000.250000000"  # type: ignore[attr-defined]


def test_positions_long_short_and_flat() -> None:
    events = _events(_read(FIXTURES / "projectx" / "positions.json"))
    assert all(isinstance(e, BrokerPositionReported) for e in events)
    assert [str(e.signed_qty) for e in events] == ["2", "-3", "0"]  # type: ignore[attr-defined]
    assert [str(e.avg_price) for e in events] == ["21000.25", "6065.250000000", "0"]  # type: ignore[attr-defined]


def test_contract_search_defines_instruments_in_usd() -> None:
    events = _events(_read(FIXTURES / "projectx" / "contracts_search.json"))
    assert [
        (e.contract, str(e.tick_size), str(e.tick_value), e.currency)  # type: ignore[attr-defined]
        for e in events
    ] == [
        ("CON.F.US.EP.H25", "0.25", "12.5", "USD"),
        ("CON.F.US.MNQ.H25", "0.25", "0.5", "USD"),
        ("CON.F.US.GC.G25", "0.1", "10", "USD"),
    ]
    assert all(isinstance(e, InstrumentDefined) for e in events)
    assert events[0].point_value == Decimal(50)  # type: ignore[attr-defined]


def test_convert_projectx_returns_exact_native_records() -> None:
    payload = json.loads(_trade_json(voided=True), parse_float=Decimal)
    assert convert_projectx(payload) == [
        {
            "type": "fill",
            "account": "203",
            "contract": "CON.F.US.EP.H25",
            "exec_id": "8604",
            "order_id": "14328",
            "side": "SELL",
            "qty": 1,
            "price": Decimal("6065.250000000"),
            "fee": Decimal("1.4000"),
            "occurred_at": "2025-01-21T16:13:52.523293+00:00",
            "broker_pnl": Decimal("50.000000000"),
        },
        {
            "type": "bust",
            "account": "203",
            "contract": "CON.F.US.EP.H25",
            "exec_id": "8604",
            "occurred_at": "2025-01-21T16:13:52.523293+00:00",
        },
    ]
    assert convert_projectx(
        {"accountId": 1, "contractId": "X", "creationTimestamp": "t", "type": 2, "size": 0}
    ) == [
        {
            "type": "broker_position",
            "account": "1",
            "contract": "X",
            "occurred_at": "t",
            "signed_qty": Decimal(0),
        }
    ]
    [flat] = convert_projectx(
        {"accountId": 1, "contractId": "X", "creationTimestamp": "t", "type": 2, "size": 0}
    )
    assert str(flat["signed_qty"]) == "0"  # not "-0"
    with pytest.raises(InvalidRecord) as caught:
        convert_projectx({"accountId": 1})
    assert caught.value.reason is RejectReason.UNKNOWN_TYPE
    assert "accountId" in caught.value.message


def test_parse_message_handles_a_nats_body_with_action_envelopes() -> None:
    body = f'[{{"action":1,"data":{_trade_json()}}},{{"action":1,"data":{_trade_json(id=8605)}}}]'
    results = parse_message(body.encode(), SourceRef("nats:broker.trades", 42))
    assert [r.ref for r in results] == [
        SourceRef("nats:broker.trades", 42, 0),
        SourceRef("nats:broker.trades", 42, 1),
    ]
    assert [e.exec_id for e in _events(results)] == ["8604", "8605"]  # type: ignore[attr-defined]


_NATIVE_FILL = (
    '{"type":"fill","account":"A-1","contract":"CON.F.US.EP.Z26","exec_id":"E-1",'
    '"side":"BUY","qty":"2","price":"5000.25","fee":"1.40","occurred_at":"2026-11-23T14:30:00Z"}'
)


@pytest.mark.parametrize(
    "body",
    [
        _NATIVE_FILL,  # the live feed's every message
        _NATIVE_FILL.replace('"2"', '"-2"'),  # a bad field: rejected, naming it
        _NATIVE_FILL.replace('"fill"', '"trade"'),  # an unknown type
        _NATIVE_FILL.replace('"2"', "2.50"),  # a JSON number
        _NATIVE_FILL.replace('"2"', "NaN"),  # decoded leniently: the general path
        _NATIVE_FILL.replace('"fee"', '"action"'),  # "action" but no envelope
        f'{{"action":1,"data":{_NATIVE_FILL}}}',  # an envelope
        f'{{"trades":[{_trade_json()}],"success":true}}',  # a ProjectX wrapper
        _trade_json(),  # a ProjectX trade on its own
        '{"positions":5}',
        "{}",
        "[]",
        "5",
    ],
)
def test_a_single_payload_parses_as_the_general_unwrapping_does(body: str) -> None:
    """parse_message takes a message of one unwrapped payload straight to its events;
    the results are the ones the general path (``_results``) gives, whatever the body."""
    data, ref = body.encode(), SourceRef("nats:t", 3)
    for fmt in ("auto", "native", "projectx"):
        value, lenient = sources._decode(data)
        general = list(sources._results(value, lenient, data, ref, fmt))
        assert parse_message(data, ref, fmt) == general, (body, fmt)


def test_empty_wrapper_yields_nothing() -> None:
    assert parse_message(b'{"trades":[],"success":true}', SourceRef("-")) == []


def test_projectx_error_response_is_rejected() -> None:
    [result] = parse_message(
        b'{"trades":null,"success":false,"errorCode":2,"errorMessage":"Account not found"}',
        SourceRef("-", 1),
    )
    assert isinstance(result, Rejected)
    assert result.reason is RejectReason.INVALID_RECORD
    assert result.message.startswith("success:")
    assert "'Account not found'" in result.message
    assert "errorCode 2" in result.message


def test_forced_native_format_refuses_projectx() -> None:
    [result] = parse_message(_trade_json().encode(), SourceRef("-"), "native")
    assert isinstance(result, Rejected)
    assert result.reason is RejectReason.UNKNOWN_TYPE


def test_forced_projectx_format_converts() -> None:
    [result] = _run(_trade_json().encode() + b"\n", "projectx")
    assert isinstance(result, Parsed)
    assert isinstance(result.event, FillRecorded)


def test_bad_format_argument_raises() -> None:
    with pytest.raises(ValueError, match="fmt"):
        list(iter_file(io.BytesIO(b"{}"), "-", "xml"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CSV"):
        parse_message(b"{}", SourceRef("-"), "csv")


# --------------------------------------------------------------------------- CSV


def test_csv_gives_the_same_events_as_native() -> None:
    csv_results = _read(FIXTURES / "csv" / "mixed.csv")
    native = _events(_read(FIXTURES / "native" / "mixed.jsonl"))
    assert _events(csv_results) == native
    assert [r.event.event_id for r in csv_results if isinstance(r, Parsed)] == [
        e.event_id  # type: ignore[attr-defined]
        for e in native
    ]
    # Physical line numbers: header is line 1, line 4 is blank.
    assert [r.ref.line for r in csv_results] == [2, 3, 5, 6, 7, 8]
    kinds = [type(r.event) for r in csv_results if isinstance(r, Parsed)]
    assert kinds == [
        InstrumentDefined,
        FillRecorded,
        FillRecorded,
        FillBusted,
        BrokerPositionReported,
        MarkPriceSet,
    ]
    fill = csv_results[2]
    assert isinstance(fill, Parsed) and isinstance(fill.event, FillRecorded)
    assert str(fill.event.price) == "6065.250000000"
    assert fill.event.order_id == "14328"


def test_csv_rejections_keep_their_line_numbers() -> None:
    data = (
        b"type,account,contract,exec_id,side,qty,price,occurred_at\r\n"
        b"fill,203,ES,E1,BUY,1,5000.25,2025-01-21T16:00:00+00:00\r\n"
        b"fill,203,ES,E2,BUY,1,5000.25,2025-01-21T16:00:00+00:00,surplus\r\n"
        b"fill,203,ES,E3,BUY,0,5000.25,2025-01-21T16:00:00+00:00\r\n"
        b",,,,,,,\r\n"
        b"fill,\xff\xfe,ES,E4,BUY,1,5000.25,2025-01-21T16:00:00+00:00\r\n"
        b"fill,203,ES,E5,BUY,1,NaN,2025-01-21T16:00:00+00:00\r\n"
        b"fill,203,ES,E6,BUY,1,5000.25\r\n"
        b"fill,203,ES,E7,SELL,2,5000.50,2025-01-21T16:00:00+00:00"
    )
    results = _run(data)
    summary = [(r.ref.line, type(r).__name__, getattr(r, "reason", None)) for r in results]
    assert summary == [
        (2, "Parsed", None),
        (3, "Rejected", RejectReason.INVALID_RECORD),
        (4, "Rejected", RejectReason.INVALID_RECORD),
        (6, "Rejected", RejectReason.INVALID_ENCODING),
        (7, "Rejected", RejectReason.INVALID_RECORD),
        (8, "Rejected", RejectReason.INVALID_RECORD),
        (9, "Parsed", None),
    ]
    messages = [r.message for r in results if isinstance(r, Rejected)]
    assert "9 cells but the header has 8 columns" in messages[0]
    assert "'surplus'" in messages[0]
    assert messages[1].startswith("qty: must be greater than 0")
    assert "invalid UTF-8 byte(s) b'\\xff' at byte offset 5" in messages[2]
    assert messages[3].startswith("price: expected a finite decimal number")
    assert messages[4] == "occurred_at: required key is missing"
    assert results[3].raw == data.split(b"\r\n")[5]


def test_forced_csv_without_type_column_rejects_header_and_rows() -> None:
    results = _run(b"account,qty\n203,1\n", "csv")
    assert [(r.ref.line, r.reason) for r in results if isinstance(r, Rejected)] == [
        (1, RejectReason.INVALID_RECORD),
        (2, RejectReason.INVALID_RECORD),
    ]
    assert len(results) == 2
    assert "no 'type' column" in results[0].message  # type: ignore[union-attr]


CSV_ROWS = (
    b"fill,203,ES,E1,BUY,1,5000.25,2025-01-21T16:00:00+00:00\n"
    b"fill,203,ES,E2,SELL,1,5000.50,2025-01-21T16:01:00+00:00\n"
)


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        (b"Type,account,contract,exec_id,side,qty,price,occurred_at", "column 1 'Type'"),
        (b"type,account,contract,exec id,side,qty,price,occurred_at", "column 4 'exec id'"),
        (b"kind,account,contract,exec_id,side,qty,price,occurred_at", "no 'type' column"),
    ],
)
def test_a_wrong_csv_header_is_a_csv_error_naming_the_column_not_invalid_json(
    header: bytes, needle: str
) -> None:
    results = _run(header + b"\n" + CSV_ROWS)  # format auto-detected
    assert [(r.ref.line, type(r).__name__) for r in results] == [
        (1, "Rejected"),
        (2, "Rejected"),
        (3, "Rejected"),
    ]
    for r in results:
        assert isinstance(r, Rejected)
        assert r.reason is RejectReason.INVALID_RECORD, (r.reason, r.message)
        assert "CSV header" in r.message and needle in r.message, r.message
        assert r.input_format == "csv"
    assert results[1].raw == CSV_ROWS.splitlines()[0]


def test_a_broken_first_json_line_does_not_turn_json_lines_into_csv() -> None:
    data = b"garbage, more garbage\n" + GOOD_FILL.encode() + b"\n"
    results = _run(data)
    assert [type(r).__name__ for r in results] == ["Rejected", "Parsed"]
    assert results[0].reason is RejectReason.INVALID_JSON  # type: ignore[union-attr]


def test_csv_records_carry_their_header_and_reparse_reads_them_as_csv() -> None:
    header = b"type,account,contract,exec_id,side,qty,price,occurred_at"
    results = _run(header + b"\n" + CSV_ROWS)
    columns = tuple(header.decode().split(","))
    assert all(r.input_format == "csv" and r.csv_header == columns for r in results)
    first = results[0]
    assert isinstance(first, Parsed)
    again = sources.reparse(first.raw, first.ref, "csv", columns)
    assert [type(r).__name__ for r in again] == ["Parsed"]
    assert again[0].event == first.event  # type: ignore[union-attr]
    # read as JSON instead (what a retry did before): not JSON at all
    as_json = sources.reparse(first.raw, first.ref, "auto", None)
    assert as_json[0].reason is RejectReason.INVALID_JSON  # type: ignore[union-attr]
    headless = sources.reparse(first.raw, first.ref, "csv", None)
    assert isinstance(headless[0], Rejected) and "no usable header" in headless[0].message


def test_json_records_carry_their_format() -> None:
    [parsed] = _run(GOOD_FILL.encode() + b"\n", "native")
    assert isinstance(parsed, Parsed) and parsed.input_format == "native"
    assert parsed.csv_header is None


# --------------------------------------------------------------------------- rejections

NAIVE = "2025-01-21T16:00:00"
REJECTIONS: list[tuple[str, bytes, RejectReason, list[str]]] = [
    (
        "unknown type",
        GOOD_FILL.replace('"fill"', '"trade"').encode(),
        RejectReason.UNKNOWN_TYPE,
        ["type:", "'trade'"],
    ),
    (
        "neither native nor projectx",
        b'{"symbol":"ES","qty":1}',
        RejectReason.UNKNOWN_TYPE,
        ["keys seen: symbol, qty"],
    ),
    (
        "missing key",
        GOOD_FILL.replace(',"price":5000.25', "").encode(),
        RejectReason.INVALID_RECORD,
        ["price: required key is missing"],
    ),
    (
        "extra key",
        GOOD_FILL.replace('"qty":1', '"qty":1,"venue":"CME"').encode(),
        RejectReason.INVALID_RECORD,
        ["venue: unexpected key", "'CME'"],
    ),
    (
        "qty zero",
        GOOD_FILL.replace('"qty":1', '"qty":0').encode(),
        RejectReason.INVALID_RECORD,
        ["qty: must be greater than 0, got 0"],
    ),
    (
        "qty negative",
        GOOD_FILL.replace('"qty":1', '"qty":-2.5').encode(),
        RejectReason.INVALID_RECORD,
        ["qty: must be greater than 0, got -2.5"],
    ),
    (
        "negative price",
        GOOD_FILL.replace("5000.25", "-5000.25").encode(),
        RejectReason.INVALID_RECORD,
        ["price: must not be negative, got -5000.25"],
    ),
    (
        "NaN",
        GOOD_FILL.replace("5000.25", "NaN").encode(),
        RejectReason.INVALID_RECORD,
        ["price: NaN is not a number"],
    ),
    (
        "Infinity",
        GOOD_FILL.replace("5000.25", "Infinity").encode(),
        RejectReason.INVALID_RECORD,
        ["price: Infinity is not a number"],
    ),
    (
        "-Infinity in an extra key",
        GOOD_FILL.replace('"qty":1', '"qty":1,"x":-Infinity').encode(),
        RejectReason.INVALID_RECORD,
        ["x: -Infinity is not a number"],
    ),
    (
        "naive timestamp",
        GOOD_FILL.replace("2025-01-21T16:00:00+00:00", NAIVE).encode(),
        RejectReason.INVALID_RECORD,
        ["occurred_at:", NAIVE, "no time zone"],
    ),
    (
        "invalid UTF-8",
        GOOD_FILL.encode().replace(b'"ES"', b'"E\xc3\x28"'),
        RejectReason.INVALID_ENCODING,
        ["invalid UTF-8", "b'\\xc3'", "byte offset 44"],
    ),
    (
        "truncated JSON",
        GOOD_FILL[:60].encode(),
        RejectReason.INVALID_JSON,
        ["not valid JSON", "line 1, column 58"],
    ),
    (
        "huge exponent",
        GOOD_FILL.replace("5000.25", "1e400").encode(),
        RejectReason.INVALID_RECORD,
        ["price: decimal number out of range", "1E+400"],
    ),
    (
        "exponent beyond Decimal",
        GOOD_FILL.replace("5000.25", "1e9999999999999999999999").encode(),
        RejectReason.INVALID_RECORD,
        ["price: decimal number out of range: '1e9999999999999999999999'"],
    ),
    (
        "5000 digits",
        GOOD_FILL.replace('"qty":1', '"qty":' + "9" * 5000).encode(),
        RejectReason.INVALID_RECORD,
        ["qty: decimal number out of range", "Decimal('99999"],
    ),
    (
        "too-long id",
        GOOD_FILL.replace('"E1"', '"' + "E" * 65 + '"').encode(),
        RejectReason.INVALID_RECORD,
        ["exec_id: identifier 'EEEE", "1-64 characters"],
    ),
    (
        "injection-shaped contract",
        GOOD_FILL.replace('"ES"', '"ES\'; DROP TABLE events; --"').encode(),
        RejectReason.INVALID_RECORD,
        ["contract: identifier", '"ES\'; DROP TABLE events; --"'],
    ),
    (
        "float-looking side",
        GOOD_FILL.replace('"BUY"', "1.0").encode(),
        RejectReason.INVALID_RECORD,
        ["side: side must be BUY or SELL, got Decimal('1.0')"],
    ),
    (
        "not an object",
        b"42",
        RejectReason.INVALID_RECORD,
        ["record: expected a JSON object, got 42"],
    ),
    (
        "deeply nested",
        b"[" * 100_000 + b"]" * 100_000,
        RejectReason.INVALID_JSON,
        ["nested too deeply"],
    ),
    (
        "projectx side 2",
        _trade_json(side=2).encode(),
        RejectReason.INVALID_RECORD,
        ["side: expected 0 (buy) or 1 (sell), got 2"],
    ),
    (
        "projectx side true",
        _trade_json(side=True).encode(),
        RejectReason.INVALID_RECORD,
        ["side: expected 0 (buy) or 1 (sell), got True"],
    ),
    (
        "projectx negative trade size",
        _trade_json(size=-1).encode(),
        RejectReason.INVALID_RECORD,
        ["size (qty): must be greater than 0, got -1"],
    ),
    (
        "projectx naive timestamp",
        _trade_json(creationTimestamp=NAIVE).encode(),
        RejectReason.INVALID_RECORD,
        ["creationTimestamp (occurred_at):", NAIVE, "no time zone"],
    ),
    (
        "projectx missing price",
        json.dumps(
            {k: v for k, v in TRADE.items() if k not in ("price", "profitAndLoss", "fees")}
        ).encode(),
        RejectReason.INVALID_RECORD,
        ["price: required key is missing"],
    ),
    (
        "projectx NaN price",
        _trade_json().replace("6065.250000000", "NaN").encode(),
        RejectReason.INVALID_RECORD,
        ["price: NaN is not a number"],
    ),
    (
        "projectx unknown key",
        _trade_json(exchange="CME").encode(),
        RejectReason.INVALID_RECORD,
        ["exchange: unexpected ProjectX trade key (value 'CME')"],
    ),
    (
        "projectx boolean account",
        _trade_json(accountId=True).encode(),
        RejectReason.INVALID_RECORD,
        ["accountId (account): expected an identifier string, got bool"],
    ),
    (
        "projectx voided not a boolean",
        _trade_json(voided="yes").encode(),
        RejectReason.INVALID_RECORD,
        ["voided: expected true or false, got 'yes'"],
    ),
    (
        "projectx injection contract",
        _trade_json(contractId="ES'; DROP TABLE").encode(),
        RejectReason.INVALID_RECORD,
        ["contractId (contract): identifier", "DROP TABLE"],
    ),
    (
        "projectx huge id",
        _trade_json().replace('"id": 8604', '"id": ' + "7" * 5000).encode(),
        RejectReason.INVALID_RECORD,
        ["id (exec_id): expected an identifier string, got Decimal"],
    ),
    (
        "projectx negative position size",
        b'{"accountId":203,"contractId":"ES","creationTimestamp":"2025-01-21T16:00:00Z",'
        b'"type":1,"size":-2,"averagePrice":5000}',
        RejectReason.INVALID_RECORD,
        ["size: must not be negative", "got -2"],
    ),
    (
        "projectx position type 3",
        b'{"accountId":203,"contractId":"ES","creationTimestamp":"2025-01-21T16:00:00Z",'
        b'"type":3,"size":2,"averagePrice":5000}',
        RejectReason.INVALID_RECORD,
        ["type: expected 1 (long) or 2 (short), got 3"],
    ),
    (
        "projectx position size text",
        b'{"accountId":203,"contractId":"ES","creationTimestamp":"2025-01-21T16:00:00Z",'
        b'"type":1,"size":"two"}',
        RejectReason.INVALID_RECORD,
        ["size: expected a decimal number, got 'two'"],
    ),
    (
        "projectx contract without tickValue",
        b'{"id":"CON.F.US.EP.H25","tickSize":0.25}',
        RejectReason.INVALID_RECORD,
        ["tickValue (tick_value): required key is missing"],
    ),
    (
        "projectx unrecognised payload",
        b'{"accountId":203,"balance":1000}',
        RejectReason.UNKNOWN_TYPE,
        ["not a trade, position or contract", "accountId, balance"],
    ),
]


@pytest.mark.parametrize(
    ("bad", "reason", "expected"),
    [pytest.param(bad, reason, expected, id=name) for name, bad, reason, expected in REJECTIONS],
)
def test_bad_record_is_rejected_and_neighbours_still_parse(
    bad: bytes, reason: RejectReason, expected: list[str]
) -> None:
    good_after = GOOD_FILL.replace('"E1"', '"E2"').encode()
    data = GOOD_FILL.encode() + b"\n\n" + bad + b"\n" + good_after + b"\n"
    results = _run(data)

    assert [type(r) for r in results] == [Parsed, Rejected, Parsed]
    assert [r.ref.line for r in results] == [1, 3, 4]
    rejected = results[1]
    assert isinstance(rejected, Rejected)
    assert rejected.reason is reason, rejected.message
    for text in expected:
        assert text in rejected.message
    assert rejected.raw == bad
    assert rejected.ref == SourceRef("test.jsonl", 3, None)


def test_rejection_inside_a_list_names_its_index_and_spares_the_others() -> None:
    body = f"[{_trade_json()},{_trade_json(id=8605, size=0)},{_trade_json(id=8606)}]"
    results = parse_message(body.encode(), SourceRef("nats:t", 7))
    assert [(type(r).__name__, r.ref.index) for r in results] == [
        ("Parsed", 0),
        ("Rejected", 1),
        ("Parsed", 2),
    ]
    assert results[1].message == (  # type: ignore[union-attr]
        "size (qty): must be greater than 0, got 0 (got 0)"
    )
    assert json.loads(results[1].raw)["id"] == 8605


def test_voided_trade_with_a_bad_field_is_one_rejection() -> None:
    results = parse_message(_trade_json(voided=True, size=0).encode(), SourceRef("-"))
    assert len(results) == 1
    assert isinstance(results[0], Rejected)


# --------------------------------------------------------------------------- lines


def test_line_over_the_limit_is_rejected_without_decoding_and_memory_stays_bounded() -> None:
    huge = b'{"type":"fill","account":"' + b"A" * (10 * 1024 * 1024) + b'"}'
    data = GOOD_FILL.encode() + b"\n" + huge + b"\n" + GOOD_FILL.replace("E1", "E2").encode()
    stream = io.BytesIO(data)
    del huge
    tracemalloc.start()
    try:
        results = list(iter_file(stream, "big.jsonl"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * MAX_RECORD_BYTES
    assert [(type(r).__name__, r.ref.line) for r in results] == [
        ("Parsed", 1),
        ("Rejected", 2),
        ("Parsed", 3),
    ]
    rejected = results[1]
    assert isinstance(rejected, Rejected)
    assert rejected.reason is RejectReason.RECORD_TOO_LARGE
    assert rejected.raw == b'{"type":"fill","account":"' + b"A" * (1024 - 26)
    assert f"is {10 * 1024 * 1024 + 28} bytes" in rejected.message


@pytest.mark.parametrize(
    ("size", "too_large"), [(MAX_RECORD_BYTES, False), (MAX_RECORD_BYTES + 1, True)]
)
def test_limit_is_exact(size: int, too_large: bool) -> None:
    line = GOOD_FILL.encode().ljust(size)  # trailing spaces are valid JSON whitespace
    [result] = _run(line + b"\r\n" + b"\n")
    assert isinstance(result, Rejected) is too_large
    if too_large:
        assert result.reason is RejectReason.RECORD_TOO_LARGE  # type: ignore[union-attr]


def test_oversized_line_without_newline_at_the_end_of_the_file() -> None:
    results = _run(GOOD_FILL.encode() + b"\n" + b"[" + b"1," * MAX_RECORD_BYTES)
    assert [(type(r).__name__, r.ref.line) for r in results] == [("Parsed", 1), ("Rejected", 2)]


def test_blank_lines_crlf_and_bom() -> None:
    data = b"\xef\xbb\xbf" + GOOD_FILL.encode() + b"\r\n \t\r\n\r\n" + b"{bad\r\n"
    results = _run(data)
    assert [(type(r).__name__, r.ref.line) for r in results] == [("Parsed", 1), ("Rejected", 4)]
    assert results[1].raw == b"{bad"


def test_empty_file_yields_nothing() -> None:
    assert _run(b"") == []
    assert _run(b"\n  \n") == []


def test_truncated_first_line_falls_back_to_json_lines() -> None:
    data = GOOD_FILL[:30].encode() + b"\n" + GOOD_FILL.encode() + b"\n{\n"
    results = _run(data)
    assert [(type(r).__name__, r.ref.line) for r in results] == [
        ("Rejected", 1),
        ("Parsed", 2),
        ("Rejected", 3),
    ]
    assert results[0].reason is RejectReason.INVALID_JSON  # type: ignore[union-attr]


def test_broken_pretty_printed_document_is_one_rejection() -> None:
    text = (FIXTURES / "projectx" / "trade_search.json").read_bytes()
    broken = text[: len(text) // 2]
    [result] = _run(broken)
    assert isinstance(result, Rejected)
    assert result.reason is RejectReason.INVALID_JSON
    assert result.ref.line == 1
    assert "read as one JSON document" in result.message
    assert result.raw == broken.rstrip(b"\n")


def test_document_over_the_limit_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 2000)
    trades = [json.loads(_trade_json(id=n), parse_float=str) for n in range(30)]
    text = json.dumps({"trades": trades, "success": True}, indent=2).encode()
    assert len(text) > 2000
    [result] = _run(text)
    assert isinstance(result, Rejected)
    assert result.reason is RejectReason.RECORD_TOO_LARGE
    assert result.raw == text[: len(result.raw)]
    assert len(result.raw) == 1024


def test_json_lines_with_broken_first_line_over_the_document_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 300)
    lines = [GOOD_FILL.replace("E1", f"E{n}") for n in range(20)]
    data = ("{\n" + "\n".join(lines) + "\n").encode()
    results = _run(data)
    assert [r.ref.line for r in results] == list(range(1, 22))
    assert isinstance(results[0], Rejected)
    assert all(isinstance(r, Parsed) for r in results[1:])


def test_pretty_printed_single_trade_document() -> None:
    text = json.dumps(json.loads(_trade_json(), parse_float=Decimal), indent=2, default=str)
    [result] = _run(text.encode())
    assert isinstance(result, Parsed)
    assert result.ref == SourceRef("test.jsonl", 1, None)


def test_raw_of_a_list_item_spells_numbers_as_received() -> None:
    body = b'[{"type":"mark","contract":"ES","price":1e99999999999999999999,"occurred_at":"x"},42]'
    first, second = parse_message(body, SourceRef("-", 1))
    assert isinstance(first, Rejected)
    assert first.raw == (
        b'{"type":"mark","contract":"ES","price":1e99999999999999999999,"occurred_at":"x"}'
    )
    assert first.message == "price: decimal number out of range: '1e99999999999999999999'"
    assert second.raw == b"42"
