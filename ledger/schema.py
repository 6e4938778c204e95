"""The write side's tables: the event log, stream heads, the dead letter and counters.

Alembic revisions in ``migrations/`` create these tables; this module describes them
for queries. The immutability triggers, the NOTIFY trigger and the application role
live in the migration, as SQL that PostgreSQL enforces for every client.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.types import UserDefinedType

__all__ = ["APP_ROLE", "NOTIFY_CHANNEL", "counters", "events", "metadata", "rejected", "streams"]

NOTIFY_CHANNEL = "ledger_events"
APP_ROLE = "ledger_app"

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class Xid8(UserDefinedType[int]):
    """PostgreSQL's 64-bit transaction id (``xid8``), for gap-free reading."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "xid8"


events = Table(
    "events",
    metadata,
    Column("global_position", BigInteger, Identity(always=False), primary_key=True),
    Column("stream", Text, nullable=False),
    Column("stream_version", Integer, nullable=False),
    Column("event_id", UUID(as_uuid=False), nullable=False),
    Column("type", Text, nullable=False),
    Column("schema_version", SmallInteger, nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("tx_id", Xid8, nullable=False, server_default=text("pg_current_xact_id()")),
    Column("causation_id", UUID(as_uuid=False)),
    Column("correlation_id", UUID(as_uuid=False)),
    Column("content_digest", LargeBinary, nullable=False),
    Column("hash", LargeBinary, nullable=False),
    UniqueConstraint("stream", "stream_version"),
    UniqueConstraint("event_id"),
    Index(None, "tx_id", "global_position"),
    Index(None, "recorded_at"),
)

streams = Table(
    "streams",
    metadata,
    Column("stream", Text, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("last_hash", LargeBinary, nullable=False),
)

rejected = Table(
    "rejected",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("source", Text, nullable=False),
    Column("line", BigInteger),
    Column("idx", Integer),
    Column("raw", LargeBinary, nullable=False),
    Column("reason", Text, nullable=False),
    Column("message", Text, nullable=False),
    Column("status", Text, nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_retry_at", DateTime(timezone=True)),
    Column("retry_outcome", Text),
    # the record's key (source, line, index, raw): a re-ingest or redelivery finds it
    Column("dead_key", LargeBinary),
    # how the record was read, so that a retry reads it the same way
    Column("input_format", Text),
    Column("csv_header", Text),
    Index(None, "status"),
    Index("uq_rejected_dead_key", "dead_key", unique=True),
)

counters = Table(
    "counters",
    metadata,
    Column("name", Text, primary_key=True),
    Column("value", BigInteger, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("note", Text),
)
