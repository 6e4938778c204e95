"""position-ledger: an event-sourced position ledger on PostgreSQL.

The public API is :class:`Ledger` (async) and :class:`SyncLedger` (for scripts and
notebooks), with their typed results; see :mod:`ledger.api`. They are imported lazily
(module ``__getattr__``): :mod:`ledger.api` sits above the read side (it imports
``projections``), and ``projections`` imports the core (``ledger.events``,
``ledger.store``, ...), so importing the core must not import the API.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ledger.api import (
        Explanation,
        HistoryEntry,
        IngestCounts,
        Ledger,
        Lot,
        PnlLine,
        Position,
        RejectedRecord,
        Stats,
        SyncLedger,
        TrailEntry,
        Verification,
    )

__all__ = [
    "Explanation",
    "HistoryEntry",
    "IngestCounts",
    "Ledger",
    "Lot",
    "PnlLine",
    "Position",
    "RejectedRecord",
    "Stats",
    "SyncLedger",
    "TrailEntry",
    "Verification",
]


def __getattr__(name: str) -> object:
    """Import the API on first use of one of its names."""
    if name in __all__:
        return getattr(import_module("ledger.api"), name)
    raise AttributeError(f"module 'ledger' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
