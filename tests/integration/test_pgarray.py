"""ledger.pgarray: a column sent as one array literal reads back as the same values,
digit for digit, as when asyncpg sends it as a list (the projection writer's path)."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.db import plain_url
from ledger.pgarray import text_array, value_array

TRICKY_TEXT = [
    "ACC-1/ES",
    "",
    "NULL",
    "null",
    'say "hi"',
    "back\\slash",
    "\\",
    '"',
    "a,b",
    "{braces}",
    " leading and trailing ",
    "tab\there",
    "line\nbreak",
    "ünïcødé/€",
    None,
]


async def _both(url: str, cast: str, values: list[Any], literal: str) -> tuple[Any, Any]:
    conn = await asyncpg.connect(plain_url(url))
    try:
        as_list = await conn.fetchval(f"SELECT $1::{cast}[]", values)
        as_text = await conn.fetchval(f"SELECT $1::text::{cast}[]", literal)
        return as_list, as_text
    finally:
        await conn.close()


async def test_text_reads_back_whole_with_quotes_backslashes_and_nulls(db_url: str) -> None:
    as_list, as_text = await _both(db_url, "text", TRICKY_TEXT, text_array(TRICKY_TEXT))
    assert as_text == TRICKY_TEXT == as_list


async def test_numbers_dates_and_times_read_back_digit_for_digit(db_url: str) -> None:
    decimals = [
        Decimal("0"),
        Decimal("-0"),
        Decimal("0.00"),
        Decimal("0E-8"),
        Decimal("1E+2"),
        Decimal("-123456789012345678901234567.89"),
        Decimal("6065.250000000"),
        Decimal("0.015625"),
        None,
    ]
    as_list, as_text = await _both(db_url, "numeric", decimals, value_array(decimals))
    assert [None if d is None else str(d) for d in as_text] == [
        None if d is None else str(d) for d in as_list
    ]
    ints = [0, -1, 2**31 - 1, None]
    assert await _both(db_url, "int", ints, value_array(ints)) == (ints, ints)
    bigints = [2**62, -(2**40), None]
    assert await _both(db_url, "bigint", bigints, value_array(bigints)) == (bigints, bigints)
    days = [date(2026, 12, 7), date(1999, 1, 1), None]
    assert await _both(db_url, "date", days, value_array(days)) == (days, days)
    times = [
        datetime(2026, 12, 7, 14, 32, 0, 123456, tzinfo=UTC),
        datetime(2026, 12, 7, 9, 30, tzinfo=timezone(timedelta(hours=-5))),
        datetime(2026, 12, 7, 23, 59, 59, 1, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        None,
    ]
    as_list, as_text = await _both(db_url, "timestamptz", times, value_array(times))
    assert as_text == times == as_list


async def test_empty_columns_are_empty_arrays(db_url: str) -> None:
    assert await _both(db_url, "text", [], text_array([])) == ([], [])
    assert await _both(db_url, "numeric", [], value_array([])) == ([], [])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(
        # what PostgreSQL's text can hold: no NUL, no lone surrogate (not UTF-8)
        st.none() | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
        max_size=12,
    ),
    decimals=st.lists(
        # up to 31 digits at exponents -40..20 (as written, trailing zeros and signs kept)
        st.none()
        | st.builds(
            lambda coefficient, exponent: Decimal(coefficient).scaleb(exponent),
            st.integers(-(10**31), 10**31),
            st.integers(-40, 20),
        ),
        max_size=12,
    ),
)
def test_any_text_and_any_finite_decimal_read_back_as_asyncpg_sends_them(
    db_url: str, texts: list[str | None], decimals: list[Decimal | None]
) -> None:
    got = asyncio.run(_both(db_url, "text", texts, text_array(texts)))
    assert got == (texts, texts)
    as_list, as_text = asyncio.run(_both(db_url, "numeric", decimals, value_array(decimals)))
    assert [None if d is None else str(d) for d in as_text] == [
        None if d is None else str(d) for d in as_list
    ]
