"""Smoke: the schema migrates and an append reads back."""

from __future__ import annotations

from ledger.events import parse_event
from ledger.store import Checkpoint, UncheckedEventStore


async def test_append_and_read_back(store: UncheckedEventStore) -> None:
    fill = parse_event(
        {
            "type": "fill",
            "account": "A",
            "contract": "ES",
            "exec_id": "X1",
            "side": "BUY",
            "qty": "1",
            "price": "6065.250000000",
            "occurred_at": "2026-11-23T14:30:00Z",
        }
    )
    result = await store.append([fill])
    assert result.appended == 1
    again = await store.append([fill])
    assert again.duplicates == 1 and again.positions == result.positions
    rows, cp = await store.read_all(Checkpoint())
    assert [r.payload["price"] for r in rows] == ["6065.250000000"]
    assert cp.position == result.positions[0]
