"""The read side's tables. Every row belongs to a generation of the projections.

A rebuild fills a new generation from zero while the serving one keeps answering, then
swaps the two in one transaction; an interrupted rebuild leaves its generation in
``building`` and the serving one untouched. Queries read the serving generation only.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    Table,
    Text,
    Uuid,
    func,
)

__all__ = [
    "faults",
    "history",
    "metadata",
    "pnl_daily",
    "positions",
    "projection_checkpoint",
    "projection_partition",
    "snapshots",
]

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "pk": "pk_%(table_name)s",
    }
)

projection_checkpoint = Table(
    "projection_checkpoint",
    metadata,
    Column("generation", Integer, primary_key=True),
    Column("status", Text, nullable=False),  # building | serving | retired
    Column("tx_id", BigInteger, nullable=False, server_default="0"),
    Column("position", BigInteger, nullable=False, server_default="0"),
    Column("events", BigInteger, nullable=False, server_default="0"),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("swapped_at", DateTime(timezone=True)),
)

# One row per worker of a parallel rebuild while it runs (projections.partition).
projection_partition = Table(
    "projection_partition",
    metadata,
    Column(
        "generation",
        Integer,
        ForeignKey("projection_checkpoint.generation", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("part", Integer, primary_key=True),
    Column("parts", Integer, nullable=False),
    Column("tx_id", BigInteger, nullable=False, server_default="0"),
    Column("position", BigInteger, nullable=False, server_default="0"),
    Column("events", BigInteger, nullable=False, server_default="0"),
    Column("end_tx_id", BigInteger, nullable=False),
    Column("end_position", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("part >= 0 AND part < parts", name="part"),
    CheckConstraint("(tx_id, position) <= (end_tx_id, end_position)", name="within_end"),
)

positions = Table(
    "proj_positions",
    metadata,
    Column("generation", Integer, primary_key=True),
    Column("stream", Text, primary_key=True),
    Column("account", Text, nullable=False),
    Column("contract", Text, nullable=False),
    Column("signed_qty", Numeric, nullable=False),
    Column("avg_open_price_fifo", Numeric),
    Column("avg_open_price_wac", Numeric),
    Column("realized_fifo", Numeric, nullable=False),
    Column("realized_wac", Numeric, nullable=False),
    Column("fees", Numeric, nullable=False),
    Column("opened_at", DateTime(timezone=True)),
    Column("closed_at", DateTime(timezone=True)),
    Column("last_fill_at", DateTime(timezone=True)),
    Column("fill_count", Integer, nullable=False),
    Column("last_position", BigInteger, nullable=False),
    Column("state", Text, nullable=False),  # the runner's JSON (migration 0008)
    Index(None, "generation", "account", "contract"),
)

history = Table(
    "proj_history",
    metadata,
    Column("generation", Integer, primary_key=True),
    Column("stream", Text, primary_key=True),
    Column("position", BigInteger, primary_key=True),
    Column("kind", Text, primary_key=True),  # detail | eod
    Column("account", Text, nullable=False),
    Column("contract", Text, nullable=False),
    Column("exec_id", Text),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("day", Date, nullable=False),
    Column("side", Text),
    Column("qty", Numeric),
    Column("price", Numeric),
    Column("qty_before", Numeric, nullable=False),
    Column("qty_after", Numeric, nullable=False),
    Column("realized_fifo", Numeric, nullable=False),
    Column("realized_wac", Numeric, nullable=False),
    Column("cum_realized_fifo", Numeric, nullable=False),
    Column("cum_realized_wac", Numeric, nullable=False),
    Column("fees", Numeric, nullable=False),
    Index(None, "generation", "kind", "day"),
)

pnl_daily = Table(
    "proj_pnl_daily",
    metadata,
    Column("generation", Integer, primary_key=True),
    Column("stream", Text, primary_key=True),
    Column("day", Date, primary_key=True),
    Column("account", Text, nullable=False),
    Column("contract", Text, nullable=False),
    Column("realized_fifo", Numeric, nullable=False),
    Column("realized_wac", Numeric, nullable=False),
    Column("fees", Numeric, nullable=False),
    Column("fills", Integer, nullable=False),
)

snapshots = Table(
    "proj_snapshots",
    metadata,
    Column("generation", Integer, primary_key=True),
    Column("stream", Text, primary_key=True),
    Column("known_position", BigInteger, primary_key=True),
    Column("key_position", BigInteger, primary_key=True),
    Column("key_occurred_at", DateTime(timezone=True), nullable=False),
    Column("known_recorded_at", DateTime(timezone=True), nullable=False),
    Column("state", Text, nullable=False),  # the runner's JSON (migration 0008)
    Index(None, "generation", "stream", "key_occurred_at"),
    Index(None, "generation", "stream", "known_recorded_at"),
)

# A stream whose events cannot be folded: set aside with the offending event, until a
# correction or bust of its execution heals it (projections.runner, projections.faults).
faults = Table(
    "proj_faults",
    metadata,
    Column("generation", Integer, primary_key=True),
    Column("stream", Text, primary_key=True),
    Column("account", Text, nullable=False),
    Column("contract", Text, nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("event_id", Uuid),
    Column("exec_id", Text),
    Column("reason", Text, nullable=False),
    Column("faulted_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
