"""The public Python API (``from ledger import Ledger``) against a real PostgreSQL.

The README's example runs here as written; both clocks at once are checked against a
replay of the log filtered by hand; P&L never adds up two currencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from cli_testing import as_json, instrument, invoke

from ledger import Ledger, SyncLedger
from ledger.events import FillRecorded, event_from_stored, parse_event
from ledger.store import Checkpoint
from projections.positions import replay

ROOT = Path(__file__).resolve().parents[2]
ES = "CON.F.US.EP.Z26"
DAX = "CON.F.EU.FDAX.Z26"
DAY = "2026-11-23"


def at(clock: str) -> datetime:
    return datetime.fromisoformat(f"{DAY}T{clock}:00+00:00")


def fill(
    exec_id: str, side: str, qty: str, price: str, clock: str, *, contract: str = ES
) -> dict[str, Any]:
    return {
        "type": "fill",
        "account": "ACC-1",
        "contract": contract,
        "exec_id": exec_id,
        "side": side,
        "qty": qty,
        "price": price,
        "occurred_at": at(clock).isoformat(),
    }


def bust(exec_id: str, clock: str) -> dict[str, Any]:
    return {
        "type": "bust",
        "account": "ACC-1",
        "contract": ES,
        "exec_id": exec_id,
        "occurred_at": at(clock).isoformat(),
    }


# ------------------------------------------------------------------ the README


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it from Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's 'Use it from Python' section has no python block"
    return match.group(1)


def test_the_readme_python_example_runs_and_prints_positions_and_pnl(
    cli_env: dict[str, str],
) -> None:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_example(), "README.md", "exec"), {"__name__": "__main__"})
    lines = printed.getvalue().splitlines()
    assert lines[0] == "received 3, appended 3, duplicates 0, rejected 0"
    position = [line.split() for line in lines if line.startswith("position ")]
    pnl = [line.split() for line in lines if line.startswith("pnl ")]
    # bought 2 at 5000.25, sold 1 at 5001.00: 0.75 points x 50 (12.50 a 0.25 tick)
    assert [(p[1], p[2], Decimal(p[3]), Decimal(p[4]), Decimal(p[5])) for p in position] == [
        ("ACC-1", ES, Decimal(1), Decimal("5000.25"), Decimal("37.50"))
    ]
    assert [(p[1], p[2], Decimal(p[3]), Decimal(p[4]), Decimal(p[5])) for p in pnl] == [
        ("ACC-1", "USD", Decimal("37.50"), Decimal("6.75"), Decimal("30.75"))
    ]
    # run again: idempotent, the same answers
    again = io.StringIO()
    with contextlib.redirect_stdout(again):
        exec(compile(readme_example(), "README.md", "exec"), {"__name__": "__main__"})
    assert again.getvalue().splitlines()[0] == "received 3, appended 0, duplicates 3, rejected 0"
    assert again.getvalue().splitlines()[1:] == lines[1:]


# -------------------------------------------------------------- both clocks


def test_both_clocks_at_once_equal_a_replay_of_the_log_filtered_by_hand(
    db_url: str, cli_env: dict[str, str]
) -> None:
    with SyncLedger(db_url) as ledger:
        first = ledger.ingest(
            [
                instrument(ES, "0.25", "12.50"),
                fill("A", "BUY", "2", "100.00", "10:00"),
                fill("B", "SELL", "1", "101.00", "10:20"),
                fill("D", "BUY", "1", "99.00", "11:00"),
            ]
        )
        assert (first.appended, first.rejected) == (4, 0)
        known_by = ledger.log(limit=10)[-1].recorded_at  # T2: all of the above, no more
        asyncio.run(asyncio.sleep(0.05))
        # recorded after T2: a late fill that happened before T1, and a bust of B
        late = ledger.ingest([fill("C", "BUY", "3", "100.50", "10:10"), bust("B", "10:30")])
        assert (late.appended, late.rejected) == (2, 0)
        happened_by = at("10:45")  # T1

        stored = ledger.log(stream=f"ACC-1/{ES}", limit=100)
        assert max(e.recorded_at for e in stored) > known_by
        by_hand = [
            (e.global_position, event_from_stored(e.payload))
            for e in stored
            if e.recorded_at <= known_by
            and (
                e.type in ("bust", "correction")
                or (e.type == "fill" and e.occurred_at <= happened_by)
            )
        ]
        expected, effects = replay("ACC-1", ES, Decimal(50), Decimal("0.25"), by_hand)
        # A and B only: D happened after T1, C and the bust were recorded after T2
        assert [e.exec_id for e in effects] == ["A", "B"]
        assert (expected.signed_qty, expected.realized_fifo) == (Decimal(1), Decimal(50))

        [both] = ledger.positions(as_of=happened_by, as_known_at=known_by, include_flat=True)
        assert (both.signed_qty, both.realized_pnl, both.avg_open_price) == (
            expected.signed_qty,
            expected.realized_fifo,
            expected.avg_open_price("fifo"),
        )
        # each clock alone answers something else, so both really were applied
        [event_only] = ledger.positions(as_of=happened_by, include_flat=True)
        [knowledge_only] = ledger.positions(as_known_at=known_by, include_flat=True)
        assert event_only.signed_qty == Decimal(5)  # A + C, B busted
        assert knowledge_only.signed_qty == Decimal(2)  # A - B + D

        lines = ledger.pnl(by="fill", as_of=happened_by, as_known_at=known_by)
        assert [(p.exec_id, p.realized_pnl) for p in lines] == [
            ("A", Decimal(0)),
            ("B", Decimal(50)),
        ]
        assert [
            h.exec_id for h in ledger.history("ACC-1", ES, as_of=happened_by, as_known_at=known_by)
        ] == ["A", "B"]
        trail = ledger.trail("ACC-1", ES, as_of=happened_by, as_known_at=known_by)
        assert [(t.type, t.exec_id, t.status) for t in trail] == [
            ("fill", "A", ""),
            ("fill", "B", ""),
        ]
        explained = ledger.explain("ACC-1", ES, as_of=happened_by, as_known_at=known_by)
        assert explained.signed_qty == Decimal(1)
        assert explained.as_known_at == known_by
        assert [(lot.exec_id, lot.qty) for lot in explained.lots] == [("A", Decimal(1))]

    # the command line: --as-of with --as-known-at
    rows = as_json(
        invoke(
            "positions",
            "--as-of",
            happened_by.isoformat(),
            "--as-known-at",
            known_by.isoformat(),
            "--include-flat",
            "--format",
            "json",
        )
    )
    assert [(r["account"], Decimal(r["signed_qty"]), Decimal(r["realized_pnl"])) for r in rows] == [
        ("ACC-1", Decimal(1), Decimal(50))
    ]
    explained_cli = as_json(
        invoke(
            "explain",
            "--account",
            "ACC-1",
            "--contract",
            ES,
            "--as-of",
            happened_by.isoformat(),
            "--as-known-at",
            known_by.isoformat(),
            "--format",
            "json",
        )
    )
    assert (Decimal(explained_cli["signed_qty"]), len(explained_cli["lots"])) == (Decimal(1), 1)
    assert datetime.fromisoformat(explained_cli["as_known_at"]) == known_by


# ------------------------------------------------------------------ currencies


def test_pnl_by_account_keeps_two_currencies_apart(db_url: str, cli_env: dict[str, str]) -> None:
    with SyncLedger(db_url) as ledger:
        counts = ledger.ingest(
            [
                instrument(ES, "0.25", "12.50"),
                {**instrument(DAX, "0.5", "12.50"), "currency": "EUR"},
                fill("E1", "BUY", "1", "5000.00", "10:00"),
                fill("E2", "SELL", "1", "5001.00", "10:05"),  # +50 USD
                fill("X1", "BUY", "1", "18000.0", "10:00", contract=DAX),
                fill("X2", "SELL", "1", "18002.0", "10:05", contract=DAX),  # +50 EUR
            ]
        )
        assert (counts.appended, counts.rejected) == (6, 0)
        lines = ledger.pnl(by="account")
        assert [(p.account, p.currency, p.realized_pnl, p.fills) for p in lines] == [
            ("ACC-1", "EUR", Decimal(50), 2),
            ("ACC-1", "USD", Decimal(50), 2),
        ]
        report = ledger.report(datetime.fromisoformat(DAY).date())
        from projections.report import account_totals

        assert [(t["currency"], t["realized_pnl"]) for t in account_totals(report)] == [
            ("EUR", Decimal(50)),
            ("USD", Decimal(50)),
        ]

    for clock in ([], ["--as-of", "2026-11-24"], ["--as-known-at", "2099-01-01"]):
        rows = as_json(invoke("pnl", "--by", "account", *clock, "--format", "json"))
        assert [(r["account"], r["currency"], Decimal(r["realized_pnl"])) for r in rows] == [
            ("ACC-1", "EUR", Decimal(50)),
            ("ACC-1", "USD", Decimal(50)),
        ], clock


# ------------------------------------------------------------------ writes


async def test_append_validates_before_the_log(db_url: str) -> None:
    async with await Ledger.connect(db_url) as ledger:
        await ledger.ingest([instrument(ES, "0.25", "12.50")])
        off_tick = parse_event(fill("OT", "BUY", "1", "5000.10", "10:00"))
        unknown = parse_event(bust("NEVER", "10:01"))
        counts = await ledger.append([off_tick, unknown])
        assert (counts.received, counts.appended, counts.rejected) == (2, 0, 2)
        assert dict(counts.by_reason) == {"OFF_TICK_PRICE": 1, "UNKNOWN_EXECUTION": 1}
        assert [e.type for e in await ledger.log()] == ["instrument"]
        dead = await ledger.rejected()
        assert [(d.reason, d.source) for d in dead] == [
            ("OFF_TICK_PRICE", "api"),
            ("UNKNOWN_EXECUTION", "api"),
        ]
        assert "5000.10" in dead[0].message
        good = parse_event(fill("OK", "BUY", "1", "5000.25", "10:00"))
        assert (await ledger.append([good])).appended == 1
        assert (await ledger.append([good])).duplicates == 1


async def test_strict_ingest_appends_nothing_when_a_record_is_bad(db_url: str) -> None:
    records = [
        instrument(ES, "0.25", "12.50"),
        fill("S-1", "BUY", "1", "5000.25", "10:00"),
        fill("S-2", "BUY", "1", "5000.10", "10:01"),  # off the tick grid
    ]
    async with await Ledger.connect(db_url) as ledger:
        refused = await ledger.ingest(records, strict=True)
        assert (refused.received, refused.appended, refused.rejected) == (3, 0, 1)
        assert (refused.withheld, refused.already_rejected, refused.not_appended) == (2, 0, 1)
        assert refused.as_dict() == {
            "received": 3,
            "appended": 0,
            "duplicates": 0,
            "rejected": 1,
            "already_rejected": 0,
            "withheld": 2,
        }
        assert await ledger.log() == []
        again = await ledger.ingest(records, strict=True)  # the same records, same source
        assert (again.rejected, again.already_rejected, again.duplicates) == (0, 1, 1)
        assert len(await ledger.rejected()) == 1
        done = await ledger.ingest(records[:2], strict=True)
        assert (done.appended, done.withheld) == (2, 0)
        stats = await ledger.stats()
        assert (stats.received, stats.rejected, stats.already_rejected) == (4, 1, 1)
        assert stats.consistent and stats.dead_letters == {"pending": 1, "resolved": 0}


async def test_events_yields_the_log_then_what_is_appended_live(db_url: str) -> None:
    async with await Ledger.connect(db_url) as ledger:
        await ledger.ingest([instrument(ES, "0.25", "12.50")])
        stop = asyncio.Event()
        seen: list[str] = []

        async def read() -> Checkpoint:
            last = Checkpoint()
            async for event in ledger.events(stop=stop, poll=5.0):
                seen.append(event.type)
                last = Checkpoint(event.tx_id, event.global_position)
                if len(seen) == 3:
                    stop.set()
            return last

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.2)
        assert seen == ["instrument"]
        await ledger.ingest([fill("L1", "BUY", "1", "5000.00", "10:00")])
        await ledger.ingest([fill("L2", "SELL", "1", "5000.25", "10:01")])
        # woken by NOTIFY: well before the 5 s poll
        last = await asyncio.wait_for(reader, 3.0)
        assert seen == ["instrument", "fill", "fill"]
        # a reader resuming from its checkpoint sees nothing again
        stop2 = asyncio.Event()
        stop2.set()
        assert [e async for e in ledger.events(last, stop=stop2)] == []
        # and from an earlier checkpoint, exactly what follows it
        payloads = [orjson.loads(orjson.dumps(e.payload)) for e in await ledger.log(after=1)]
        assert [p["exec_id"] for p in payloads] == ["L1", "L2"]
        assert all(isinstance(event_from_stored(p), FillRecorded) for p in payloads)


def test_connect_without_a_url_uses_the_environment(cli_env: dict[str, str]) -> None:
    with Ledger.connect_sync() as ledger:
        assert ledger.ingest([instrument(ES, "0.25", "12.50")]).appended == 1
        assert ledger.stats().received == 1
        assert ledger.stats().consistent
        assert ledger.verify().ok


def test_connect_to_an_unmigrated_database_names_db_init(empty_db_url: str) -> None:
    from ledger.errors import NotMigrated

    with pytest.raises(NotMigrated, match="no ledger schema"):
        SyncLedger(empty_db_url)
