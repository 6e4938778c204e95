"""The store's one-pass event encoding agrees with the general (pydantic) path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.events import Event, canonical_value, encode_content, parse_event
from ledger.values import Side


def general_path(event: Event) -> tuple[str, bytes]:
    """What encode_content must equal: pydantic's dump, canonicalized recursively."""

    def default(value: object) -> object:
        if isinstance(value, Decimal):
            return str(value)
        if isinstance(value, Side):
            return value.value
        raise TypeError(type(value).__name__)

    data = event.model_dump(mode="python")
    return (
        orjson.dumps(data, default=default).decode(),
        orjson.dumps(canonical_value(data), option=orjson.OPT_SORT_KEYS),
    )


numbers = st.decimals(min_value=Decimal("0.000000001"), max_value=Decimal("1e12"), places=9)
spellings = st.one_of(
    numbers.map(str),
    numbers.map(lambda d: f"{d:f}0"),  # a trailing zero
    numbers.map(lambda d: f"{d:E}"),  # an exponent
    st.integers(1, 10**9),
)
zones = st.sampled_from([UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=9))])


@settings(max_examples=400)
@given(
    qty=spellings,
    price=spellings,
    fee=st.one_of(spellings, st.just("0"), st.just("0.000")),
    when=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=zones
    ),
    order_id=st.one_of(st.none(), st.just("O-1")),
    side=st.sampled_from(["BUY", "sell"]),
)
def test_fill_encoding_matches_the_general_path(
    qty: Any, price: Any, fee: Any, when: datetime, order_id: str | None, side: str
) -> None:
    record: dict[str, Any] = {
        "type": "fill",
        "account": "ACC-1",
        "contract": "CON.F.US.EP.Z26",
        "exec_id": "T-1",
        "side": side,
        "qty": qty,
        "price": price,
        "fee": fee,
        "occurred_at": when.isoformat(),
    }
    if order_id:
        record["order_id"] = order_id
    event = parse_event(record)
    assert encode_content(event) == general_path(event)


def test_other_event_types_match_the_general_path() -> None:
    records: list[dict[str, Any]] = [
        {"type": "instrument", "contract": "C.1", "tick_size": "0.25", "tick_value": "12.50"},
        {"type": "bust", "account": "A", "contract": "C.1", "exec_id": "T-1",
         "occurred_at": "2026-11-23T15:00:00+01:00"},
        {"type": "correction", "account": "A", "contract": "C.1", "exec_id": "T-1",
         "qty": "2", "price": "5000.00", "fee": "4.50", "occurred_at": "2026-11-23T15:01:00Z"},
        {"type": "broker_position", "account": "A", "contract": "C.1", "signed_qty": "-2",
         "avg_price": "5001.00", "occurred_at": "2026-11-23T21:00:00Z"},
        {"type": "mark", "contract": "C.1", "price": "5002.00",
         "occurred_at": "2026-11-23T21:00:00Z"},
    ]  # fmt: skip
    for record in records:
        event = parse_event(record)
        assert encode_content(event) == general_path(event), record


def test_numbers_longer_than_the_default_context_stay_distinct() -> None:
    # 30 significant digits: the default 28-digit context would round both to one value
    a = Decimal("100000000000000000000000000001")
    b = Decimal("100000000000000000000000000002")
    assert canonical_value(a) != canonical_value(b)
    assert canonical_value(Decimal("5000.250")) == canonical_value(Decimal("5000.25")) == "5000.25"
