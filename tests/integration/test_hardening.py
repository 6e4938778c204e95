"""Hardening found by attack (issue 17) and every writer checked (issue 13, item 2).

Each test is a regression test against the real PostgreSQL of the test session: it
fails on the code before the fix.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from decimal import Context, Decimal
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from ledger.db import plain_url
from ledger.errors import EventRejected, RejectReason
from ledger.events import parse_event
from ledger.store import EventStore, UncheckedEventStore, driver_connection

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


# ------------------------------------------------------- CLI helpers (subprocesses)

ROOT = Path(__file__).resolve().parents[2]
ES = "CON.F.US.EP.Z26"
INSTRUMENT = {"type": "instrument", "contract": ES, "tick_size": "0.25", "tick_value": "12.50"}


def fill_record(exec_id: str, **overrides: object) -> dict[str, object]:
    record: dict[str, object] = {
        "type": "fill",
        "account": "ACC-1",
        "contract": ES,
        "exec_id": exec_id,
        "side": "BUY",
        "qty": "1",
        "price": "5000.25",
        "occurred_at": "2026-11-23T14:30:00Z",
    }
    record.update(overrides)
    return record


def ledger_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_lines(path: Path, records: list[object]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def ingest_json(env: dict[str, str], path: Path) -> dict[str, int]:
    result = ledger_cli(env, "ingest", str(path), "--format", "json")
    counts: dict[str, int] = json.loads(result.stdout)
    # exit 4 when some records were rejected (now or by an earlier run), else 0
    rejected = counts["rejected"] + counts["already_rejected"]
    assert result.returncode == (4 if rejected else 0), result.stderr
    assert counts["received"] == counts["appended"] + counts["duplicates"] + counts["rejected"]
    return counts


def dead_letters(db_url: str) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in fetch(db_url, "SELECT reason, message FROM rejected ORDER BY id")]


def fetch(db_url: str, sql: str) -> list[Any]:
    async def _go() -> list[Any]:
        conn = await asyncpg.connect(plain_url(db_url))
        try:
            return list(await conn.fetch(sql))
        finally:
            await conn.close()

    return asyncio.run(_go())


def positions(env: dict[str, str]) -> list[dict[str, Any]]:
    result = ledger_cli(env, "positions", "--format", "json")
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


# ------------------------------------------------ items 1 and 4: bounds at the edge


def test_an_instrument_no_fold_can_carry_is_refused_and_projections_keep_working(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    records = [
        INSTRUMENT,
        fill_record("T-1"),
        {"type": "instrument", "contract": "CON.Y", "tick_size": "1e-30", "tick_value": "1"},
        {"type": "instrument", "contract": "CON.Z", "tick_size": "1", "tick_value": "1e28"},
        {"type": "instrument", "contract": "CON.W", "tick_size": "0.03", "tick_value": "10"},
    ]
    counts = ingest_json(cli_env, write_lines(tmp_path / "i.jsonl", records))
    assert (counts["appended"], counts["rejected"]) == (2, 3)
    letters = dead_letters(db_url)
    assert [r for r, _ in letters] == ["INVALID_RECORD"] * 3
    assert "tick_size" in letters[0][1] and "1e-30" in letters[0][1]
    assert "tick_value" in letters[1][1] and "1e28" in letters[1][1]
    assert "10 / 0.03 is not an exact decimal" in letters[2][1]
    for command in ("positions", "pnl", "project", "rebuild"):
        result = ledger_cli(cli_env, command)
        assert result.returncode == 0, (command, result.stderr)
    assert ledger_cli(cli_env, "verify").returncode == 0


def test_numbers_beyond_the_bounds_are_dead_lettered_not_a_crash(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    records = [
        INSTRUMENT,
        fill_record("T-1", price="1e28"),  # DivisionImpossible in is_on_tick at 28 digits
        fill_record("T-2", qty="1E+30"),  # rounded silently by the fold at 28 digits
        fill_record("T-3", price="5000.0000000000001"),  # 13 decimals
        fill_record("T-4"),
    ]
    counts = ingest_json(cli_env, write_lines(tmp_path / "n.jsonl", records))
    assert (counts["received"], counts["appended"], counts["rejected"]) == (5, 2, 3)
    letters = dead_letters(db_url)
    assert [r for r, _ in letters] == ["INVALID_RECORD"] * 3
    assert letters[0][1].startswith("price: decimal number out of range")
    assert letters[1][1].startswith("qty: decimal number out of range")
    assert "more than 12 digits after the decimal point" in letters[2][1]


def test_the_folds_carry_the_largest_admitted_numbers_exactly(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    """Quantity and prices at the bounds: 30+ digit P&L, exact (28 digits would round)."""
    qty = "999999999999999"
    records = [
        INSTRUMENT,
        fill_record("T-1", qty=qty, price="0.25"),
        fill_record("T-2", qty=qty, price="999999999999999.75", side="SELL",
                    occurred_at="2026-11-23T15:00:00Z"),
        fill_record("T-3", qty="1", price="0.25", occurred_at="2026-11-23T16:00:00Z"),
    ]  # fmt: skip
    ingest_json(cli_env, write_lines(tmp_path / "big.jsonl", records))
    wide = Context(prec=200)
    expected = wide.multiply(
        wide.multiply(Decimal(qty), Decimal("999999999999999.50")), Decimal(50)
    )
    [row] = positions(cli_env)
    assert Decimal(row["signed_qty"]) == 1
    realized = [v for k, v in row.items() if k.startswith("realized")]
    assert realized and all(Decimal(v) == expected for v in realized), (row, expected)
    assert len(str(expected)) > 28


# --------------------------------------------------- item 2: one line, not the batch


def test_an_extreme_timestamp_is_dead_lettered_and_the_ingest_goes_on(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    records = [
        INSTRUMENT,
        fill_record("T-1"),
        fill_record("T-2", occurred_at="0001-01-01T00:00:00+01:00"),
        fill_record("T-3", occurred_at="9999-12-31T23:59:59-01:00"),
        fill_record("T-4"),
    ]
    counts = ingest_json(cli_env, write_lines(tmp_path / "t.jsonl", records))
    assert (counts["appended"], counts["rejected"]) == (3, 2)
    assert all("occurred_at: timestamp" in m for _, m in dead_letters(db_url))


# ------------------------------------------------ item 3: whole-string identifiers


def test_a_trailing_newline_does_not_make_a_second_execution_or_account(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    records = [
        INSTRUMENT,
        fill_record("T-9", qty="2"),
        fill_record("T-9\n", qty="2"),
        fill_record("T-10", account="ACC-N\n"),
        fill_record("T-11", account="ACC-N "),
    ]
    counts = ingest_json(cli_env, write_lines(tmp_path / "ids.jsonl", records))
    assert (counts["appended"], counts["rejected"]) == (2, 3)
    [row] = positions(cli_env)
    assert (row["account"], Decimal(row["signed_qty"])) == ("ACC-1", 2)
    messages = [m for _, m in dead_letters(db_url)]
    assert messages[0].startswith("exec_id: identifier 'T-9\\n'")
    assert messages[1].startswith("account: identifier 'ACC-N\\n'")
    assert messages[2].startswith("account: identifier 'ACC-N '")


def test_reconcile_refuses_an_account_with_a_trailing_newline() -> None:
    from projections.reconcile import ReconciliationError, _ident

    assert _ident("ACC-1", "account", "row 1") == "ACC-1"
    with pytest.raises(ReconciliationError, match="account must be"):
        _ident("ACC-1\n", "account", "row 1")


# ------------------------------------------ item 6: two ingests of one file at once


def test_two_ingests_of_the_same_file_at_once_both_finish(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    n = 3000
    records: list[object] = [INSTRUMENT]
    records += [
        fill_record(f"C-{i}", account=f"ACC-{i % 5}", side="BUY" if i % 2 else "SELL")
        for i in range(n)
    ]
    path = write_lines(tmp_path / "same.jsonl", records)
    for trial in range(3):
        if trial:  # the next trial appends the same file again, plus new fills
            records += [fill_record(f"D-{trial}-{i}") for i in range(200)]
            path = write_lines(path, records)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "ledger", "ingest", str(path), "--format", "json",
                 "--batch-size", "100"],
                env=cli_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            for _ in range(2)
        ]  # fmt: skip
        outs = [p.communicate(timeout=300) for p in procs]
        for proc, (_out, stderr) in zip(procs, outs, strict=True):
            assert proc.returncode == 0, stderr.decode()[-3000:]
        counts = [json.loads(stdout) for stdout, _ in outs]
        assert all(c["received"] == len(records) for c in counts)
        assert all(c["received"] == c["appended"] + c["duplicates"] + c["rejected"] for c in counts)
        [(stored,)] = fetch(db_url, "SELECT count(*) FROM events")
        assert stored == len(records)
    assert ledger_cli(cli_env, "verify").returncode == 0


# ---------------------------- issue 13, item 2: every path into the log is checked

BAD_FOR_EVERY_PATH: list[tuple[dict[str, object], RejectReason, str]] = [
    (fill_record("B-1", price="5000.1"), RejectReason.OFF_TICK_PRICE, "price: 5000.1"),
    (fill_record("B-2", qty="1.5"), RejectReason.OFF_SIZE_INCREMENT, "qty: 1.5"),
    (
        {"type": "bust", "account": "ACC-1", "contract": ES, "exec_id": "NEVER",
         "occurred_at": "2026-11-23T15:00:00Z"},
        RejectReason.UNKNOWN_EXECUTION,
        "exec_id: account ACC-1 has no fill 'NEVER'",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("record", "reason", "needle"), BAD_FOR_EVERY_PATH)
async def test_the_store_refuses_what_would_break_a_projection(
    checked_store: EventStore, db_url: str, record: dict[str, object], reason: str, needle: str
) -> None:
    await checked_store.append([parse_event(INSTRUMENT), parse_event(fill_record("OK-1"))])
    before = await _count(db_url)
    good = parse_event(fill_record("OK-2"))
    with pytest.raises(EventRejected) as info:
        await checked_store.append([good, parse_event(record)])
    assert info.value.reason == reason and info.value.index == 1
    assert needle in info.value.message
    assert await _count(db_url) == before  # nothing of the batch, the good fill neither
    # ... alone (one event: the one-statement append, checked before it)
    with pytest.raises(EventRejected) as alone:
        await checked_store.append([parse_event(record)])
    assert alone.value.reason == reason and alone.value.index == 0
    assert await _count(db_url) == before
    # ... and inside a caller's transaction too
    async with checked_store.engine.connect() as sa_conn:
        conn = await driver_connection(sa_conn)
        with pytest.raises(EventRejected):
            async with conn.transaction():
                await checked_store.append_on(conn, [parse_event(record)])
    assert await _count(db_url) == before


async def test_the_unchecked_store_says_what_it_is(store: UncheckedEventStore) -> None:
    assert "without" in (UncheckedEventStore.__doc__ or "")
    assert not isinstance(store, EventStore)
    result = await store.append([parse_event(fill_record("RAW-1", price="5000.1"))])
    assert result.appended == 1  # what the checked store exists to refuse


async def test_an_instrument_size_increment_allows_fractions(checked_store: EventStore) -> None:
    micro = {**INSTRUMENT, "contract": "CON.F.US.BTC.Z26", "size_increment": "0.1"}
    await checked_store.append([parse_event(micro)])
    ok = fill_record("F-1", contract="CON.F.US.BTC.Z26", qty="0.3")
    assert (await checked_store.append([parse_event(ok)])).appended == 1
    bad = fill_record("F-2", contract="CON.F.US.BTC.Z26", qty="0.35")
    with pytest.raises(EventRejected, match=r"OFF_SIZE_INCREMENT.*size increment \(0\.1\)"):
        await checked_store.append([parse_event(bad)])


def test_rejected_retry_checks_like_ingest(
    cli_env: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    """Dead-lettered for an unknown instrument; once it is defined the retry still refuses
    the off-tick, the fractional and the unknown bust, and appends only the good fill."""
    bad = [r for r, _, _ in BAD_FOR_EVERY_PATH]
    counts = ingest_json(cli_env, write_lines(tmp_path / "early.jsonl", [fill_record("G-1"), *bad]))
    assert counts["rejected"] == 4
    assert {r for r, _ in dead_letters(db_url)} == {"UNKNOWN_INSTRUMENT"}
    ingest_json(cli_env, write_lines(tmp_path / "inst.jsonl", [INSTRUMENT]))
    result = ledger_cli(cli_env, "rejected", "--retry")
    assert result.returncode == 0, result.stderr
    rows = fetch(db_url, "SELECT status, retry_outcome FROM rejected ORDER BY id")
    assert rows[0][0] == "resolved"
    for (status, outcome), (_, reason, needle) in zip(rows[1:], BAD_FOR_EVERY_PATH, strict=True):
        assert status == "pending" and f"still rejected: {reason}: {needle}" in outcome
    fills = fetch(db_url, "SELECT payload->>'exec_id' FROM events WHERE type = 'fill'")
    assert [r[0] for r in fills] == ["G-1"]


async def _count(db_url: str) -> int:
    conn = await asyncpg.connect(plain_url(db_url))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()


async def test_the_api_dead_letters_what_the_store_refuses(db_url: str) -> None:
    """ledger.Ledger.append: the same three, dead-lettered with their reasons, none appended."""
    from ledger import Ledger

    async with await Ledger.connect(db_url) as ledger:
        await ledger.append([parse_event(INSTRUMENT)])
        bad = [parse_event(r) for r, _, _ in BAD_FOR_EVERY_PATH]
        counts = await ledger.append(bad)
        assert (counts.received, counts.appended, counts.rejected) == (3, 0, 3)
        dead = await ledger.rejected()
        for letter, (_, reason, needle) in zip(dead, BAD_FOR_EVERY_PATH, strict=True):
            assert letter.reason == reason and needle in letter.message
        assert [e.type for e in await ledger.log()] == ["instrument"]
