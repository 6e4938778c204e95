"""verify's fast check of a stored event agrees with the full check (pydantic) on every row.

The fast path recomputes a flat event's content digest from its stored JSON without
validating it again. It may only ever say "intact" where the full path says so too; on
any edit it must decline (and the full path then names the problem).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.events import Event, parse_event
from ledger.integrity import _check_event, _check_flat, _epoch
from ledger.store import encode_event

TOKEN = st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True)
ACCOUNT = TOKEN.filter(lambda s: s.lower() not in {"instrument", "reconciliation", "seal"})
CONTRACT = st.from_regex(r"[A-Z][A-Z0-9.]{1,10}", fullmatch=True)
ZONES = st.sampled_from([UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=9))])
WHEN = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1), timezones=ZONES
).map(datetime.isoformat)


@st.composite
def spelled(draw: st.DrawFn, *, whole: bool = False, signed: bool = False) -> str:
    """A positive number spelled any way the sources admit: trailing zeros, exponents."""
    units = draw(st.integers(min_value=1, max_value=10**9))
    scale = 0 if whole else draw(st.integers(min_value=0, max_value=6))
    value = Decimal(units).scaleb(-scale)
    style = draw(st.sampled_from(["plain", "zeros", "exp"]))
    if style == "zeros":
        text = (
            f"{value:f}" + ("." if "." not in f"{value:f}" else "") + "0" * draw(st.integers(1, 3))
        )
    elif style == "exp":
        text = f"{value.normalize():E}"
    else:
        text = f"{value:f}"
    if signed and draw(st.booleans()):
        text = "-" + text
    return text


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["fill", "bust", "correction", "broker_position", "mark", "instr"]))
    account, contract, when = draw(ACCOUNT), draw(CONTRACT), draw(WHEN)
    if kind == "instr":
        out: dict[str, Any] = {
            "type": "instrument",
            "contract": contract,
            "tick_size": draw(spelled()),
        }
        # an exact point value: tick_value a whole number of tick sizes
        out["tick_value"] = str(Decimal(out["tick_size"]) * draw(st.integers(1, 1000)))
        if draw(st.booleans()):
            out["size_increment"] = draw(spelled(whole=True))
        if draw(st.booleans()):
            out["occurred_at"] = when
        return out
    if kind == "mark":
        return {"type": "mark", "contract": contract, "price": draw(spelled()), "occurred_at": when}
    base = {"type": kind, "account": account, "contract": contract, "occurred_at": when}
    if kind == "broker_position":
        base["signed_qty"] = draw(spelled(whole=True, signed=True))
        if draw(st.booleans()):
            base["avg_price"] = draw(spelled())
        return base
    base["exec_id"] = draw(TOKEN)
    if kind == "bust":
        return base
    base.update(qty=draw(spelled(whole=True)), price=draw(spelled()), fee=draw(spelled()))
    if kind == "fill":
        base["side"] = draw(st.sampled_from(["BUY", "SELL", "buy"]))
        if draw(st.booleans()):
            base["order_id"] = draw(TOKEN)
        if draw(st.booleans()):
            base["broker_pnl"] = draw(spelled(signed=True))
    return base


def stored(event: Event, seed: int) -> tuple[str, bytes, tuple[str, int, str]]:
    """The row as verify reads it: jsonb's text (keys in another order), the digest,
    and the type / schema_version / occurred_at (epoch text) columns."""
    payload, digest = encode_event(event)
    data = orjson.loads(payload)
    keys = list(data)
    random.Random(seed).shuffle(keys)
    text = orjson.dumps({k: data[k] for k in keys}).decode()
    at = getattr(event, "occurred_at", None)
    epoch = f"{_epoch(at):f}" if at is not None else "0"
    return text, digest, (event.type, 1, epoch)


CHECKS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@CHECKS
@given(records(), st.integers(0, 2**32))
def test_an_intact_row_passes_both_ways(record: dict[str, Any], seed: int) -> None:
    event = parse_event(record)
    text, digest, columns = stored(event, seed)
    assert _check_flat(event.stream, event.event_id, text, digest, columns)
    assert _check_event(event.stream, event.event_id, text, digest, columns) is None


def _edits(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, value in data.items():
        if key == "type":
            continue
        edited = dict(data)
        if isinstance(value, str):
            try:
                number = Decimal(value)
            except ArithmeticError:
                number = None
            if number is not None and number.is_finite():
                edited[key] = str(number + 1)
            else:
                edited[key] = value + "X" if "T" not in value else value.replace("2", "3", 1)
        else:
            edited[key] = "7"
        if edited[key] != value:
            out.append(edited)
    extra = dict(data)
    extra["note"] = "x"
    out.append(extra)
    return out


@CHECKS
@given(records(), st.integers(0, 2**32))
def test_an_edited_row_is_never_passed_by_the_fast_path(record: dict[str, Any], seed: int) -> None:
    event = parse_event(record)
    text, digest, columns = stored(event, seed)
    for edited in _edits(orjson.loads(text)):
        tampered = orjson.dumps(edited).decode()
        fast = _check_flat(event.stream, event.event_id, tampered, digest, columns)
        full = _check_event(event.stream, event.event_id, tampered, digest, columns)
        assert not fast, edited
        assert full is not None, edited


@CHECKS
@given(records(), st.integers(0, 2**32))
def test_columns_that_disagree_with_the_payload_are_reported(
    record: dict[str, Any], seed: int
) -> None:
    event = parse_event(record)
    text, digest, (kind, schema, epoch) = stored(event, seed)
    other = "mark" if kind != "mark" else "fill"
    cases: list[tuple[str, str, tuple[str, int, str]]] = [
        (event.stream, event.event_id, (other, schema, epoch)),
        (event.stream, event.event_id, (kind, 2, epoch)),
        (event.stream, "00000000-0000-5000-8000-000000000000", (kind, schema, epoch)),
        (event.stream + "x", event.event_id, (kind, schema, epoch)),
    ]
    if getattr(event, "occurred_at", None) is not None:
        cases.append((event.stream, event.event_id, (kind, schema, str(Decimal(epoch) + 1))))
    for stream, event_id, columns in cases:
        assert not _check_flat(stream, event_id, text, digest, columns)
        assert _check_event(stream, event_id, text, digest, columns) is not None
