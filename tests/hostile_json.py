"""Hostile JSON for the fuzz tests (not a test module): records built to break the ledger.

Huge and tiny exponents, numbers at and past the bounds, extreme and overflowing
dates, control characters and trailing whitespace in identifiers, deep nesting,
random JSON values in any field. Shared by the source-level property tests
(tests/property) and the ingest/consume fuzz tests against PostgreSQL and NATS.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

CONTRACT = "CON.F.US.EP.Z26"
INSTRUMENT = {"type": "instrument", "contract": CONTRACT, "tick_size": "0.25", "tick_value": "12.5"}


class Raw:
    """JSON text written as is (numbers no Python float can hold, NaN, Infinity)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text!r})"


def dumps(value: object) -> bytes:
    """Serialize like json.dumps, but write Raw values verbatim."""

    def enc(v: object) -> str:
        if isinstance(v, Raw):
            return v.text
        if isinstance(v, dict):
            return "{" + ",".join(f"{json.dumps(str(k))}:{enc(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ",".join(enc(x) for x in v) + "]"
        return json.dumps(v)

    return enc(value).encode()


EXPONENT = st.sampled_from([-400, -40, -31, -30, -13, -12, -1, 0, 1, 14, 15, 16, 28, 30, 38, 400])
HOSTILE_NUMBER = st.one_of(
    st.builds(lambda m, e: Raw(f"{m}e{e}"), st.integers(-99, 10**20), EXPONENT),
    st.builds(lambda m, e: f"{m}E{e}", st.integers(1, 10**6), EXPONENT),
    st.sampled_from(
        [
            Raw("1e999999999999"),
            Raw("-0"),
            Raw("0E-50"),
            "0E+50",
            "1e28",
            "1E+30",
            "999999999999999",
            "1000000000000000",
            "0.000000000001",
            "0.0000000000001",
            Raw("NaN"),
            Raw("Infinity"),
            "nan",
            "-Infinity",
            "5000.25",
            "1",
            "0.25",
            "12.5",
            Raw("123456789012345678901234567890123456789012345678901234567890"),
        ]
    ),
    st.decimals(allow_nan=False, allow_infinity=False, places=4).map(str),
)
HOSTILE_TIME = st.one_of(
    st.sampled_from(
        [
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999+00:00",
            "1899-12-31T23:59:59Z",
            "2199-12-31T23:59:59Z",
            "2200-01-01T00:00:00Z",
            "2026-11-23T14:30:00",
            "2026-11-23T14:30:00Z\n",
            "2026-11-23T14:30:00+23:59",
            "not a time",
            "2026-02-30T00:00:00Z",
        ]
    ),
    st.datetimes().map(lambda d: d.isoformat() + "+14:00"),
)
HOSTILE_ID = st.one_of(
    st.sampled_from(
        ["T-9", "T-9\n", "T-9 ", " T-9", "T\x00", "T\t9", "ACC-N\n", "é", "", "x" * 65]
    ),
    st.text(max_size=8),
    st.integers(-(10**20), 10**20),
)
JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(), HOSTILE_NUMBER, st.text(max_size=10), HOSTILE_TIME
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _deep(depth: int) -> Raw:
    # as text: the nested object itself would overflow the recursion of any printer
    return Raw("[" * depth + '{"type":"fill"}' + "]" * depth)


@st.composite
def hostile_record(draw: st.DrawFn, serial: int = 0) -> object:
    """One hostile message: mostly a fill, bust, mark or instrument with bad values."""
    kind = draw(st.sampled_from(["fill", "fill", "bust", "mark", "instrument", "deep", "any"]))
    if kind == "deep":
        return _deep(draw(st.sampled_from([3, 40, 200, 3000])))
    if kind == "any":
        return draw(JSON_VALUE)
    record: dict[str, Any] = {
        "type": kind,
        "account": "ACC-1",
        "contract": CONTRACT,
        "exec_id": f"H-{serial}-{draw(st.integers(0, 10**6))}",
        "side": "BUY",
        "qty": "1",
        "price": "5000.25",
        "occurred_at": "2026-11-23T14:30:00Z",
    }
    if kind == "bust":
        for key in ("side", "qty", "price"):
            del record[key]
    if kind == "mark":
        for key in ("account", "exec_id", "side", "qty"):
            del record[key]
    if kind == "instrument":
        record = {"type": "instrument", "contract": f"C.{draw(st.integers(0, 10**6))}",
                  "tick_size": "0.25", "tick_value": "12.5"}  # fmt: skip
    fields = [k for k in record if k != "type"]
    for key in draw(st.lists(st.sampled_from(fields), max_size=3, unique=True)):
        if key in ("account", "exec_id", "contract"):
            record[key] = draw(HOSTILE_ID)
        elif key == "occurred_at":
            record[key] = draw(HOSTILE_TIME)
        elif key == "side":
            record[key] = draw(st.one_of(st.sampled_from(["BUY", "sell", "HOLD"]), JSON_LEAF))
        else:
            record[key] = draw(st.one_of(HOSTILE_NUMBER, HOSTILE_NUMBER, JSON_VALUE))
    return record
