"""Hardening found by attack (issue 17) and every writer checked (issue 13, item 2).

Each test is a regression test against the real PostgreSQL of the test session: it
fails on the code before the fix.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from ledger.db import plain_url

APP_INSERT = (
    "INSERT INTO events ({extra}stream, stream_version, event_id, type, schema_version, "
    "payload, occurred_at, content_digest, hash) VALUES ({values}'x/y', 1, "
    "gen_random_uuid(), 'fill', 1, '{{}}', now(), '\\x00', '\\x00')"
)


async def _as_app(db_url: str, sql: str) -> list[Any]:
    conn = await asyncpg.connect(plain_url(db_url))
    try:
        await conn.execute("SET ROLE ledger_app")
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


# ------------------------------------------------------------- item 5: log columns


@pytest.mark.parametrize(
    ("column", "value"),
    [("tx_id", "'5'::xid8"), ("recorded_at", "'2020-01-01T00:00:00Z'")],
)
def test_ledger_app_cannot_set_tx_id_or_recorded_at(db_url: str, column: str, value: str) -> None:
    sql = APP_INSERT.format(extra=f"{column}, ", values=f"{value}, ")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match=f"events.{column} is assigned"):
        asyncio.run(_as_app(db_url, sql))


def test_ledger_app_cannot_set_global_position(db_url: str) -> None:
    first = asyncio.run(_as_app(db_url, APP_INSERT.format(extra="", values="") + " RETURNING *"))
    assert len(first) == 1
    plain = APP_INSERT.format(extra="global_position, ", values="1, ")
    with pytest.raises(asyncpg.GeneratedAlwaysError):
        asyncio.run(_as_app(db_url, plain))
    overriding = plain.replace(") VALUES (", ") OVERRIDING SYSTEM VALUE VALUES (")
    with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError):  # no value drawn: refused
        asyncio.run(_as_app(db_url, overriding))
    # a value drawn from the sequence, then an older one written: behind a checkpoint
    behind = f"SELECT nextval('events_global_position_seq'); {overriding}"
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="global_position is assigned"):
        asyncio.run(_as_app_script(db_url, behind))
    assert asyncio.run(_as_app(db_url, "SELECT count(*) FROM events")) == [(1,)]


async def _as_app_script(db_url: str, sql: str) -> None:
    conn = await asyncpg.connect(plain_url(db_url))
    try:
        await conn.execute("SET ROLE ledger_app")
        await conn.execute(sql)
    finally:
        await conn.close()
