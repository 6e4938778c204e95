"""The event log: immutable, idempotent, gap-free; stream heads; dead letter; counters.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APP_ROLE = "ledger_app"


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("global_position", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column("stream_version", sa.Integer(), nullable=False),
        sa.Column("event_id", postgresql.UUID(as_uuid=False), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("schema_version", sa.SmallInteger(), nullable=False),
        sa.Column("payload", postgresql.JSONB(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "recorded_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("causation_id", postgresql.UUID(as_uuid=False), nullable=True),
        sa.Column("correlation_id", postgresql.UUID(as_uuid=False), nullable=True),
        sa.Column("content_digest", sa.LargeBinary(), nullable=False),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("global_position", name="pk_events"),
        sa.UniqueConstraint("stream", "stream_version", name="uq_events_stream_stream_version"),
        sa.UniqueConstraint("event_id", name="uq_events_event_id"),
        sa.CheckConstraint("stream_version > 0", name="ck_events_stream_version_positive"),
    )
    # The writing transaction's id orders reads so that a late commit is never skipped.
    op.execute("ALTER TABLE events ADD COLUMN tx_id xid8 NOT NULL DEFAULT pg_current_xact_id()")
    op.create_index("ix_events_tx_id_global_position", "events", ["tx_id", "global_position"])
    op.create_index("ix_events_recorded_at", "events", ["recorded_at"])
    # A log grows by appends only: keep its statistics fresh so plans use the indexes.
    op.execute(
        "ALTER TABLE events SET (autovacuum_analyze_scale_factor = 0.01, "
        "autovacuum_analyze_threshold = 1000, autovacuum_vacuum_insert_scale_factor = 0.05)"
    )

    op.create_table(
        "streams",
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("last_hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("stream", name="pk_streams"),
    )
    op.create_table(
        "rejected",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column(
            "received_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("line", sa.BigInteger(), nullable=True),
        sa.Column("idx", sa.Integer(), nullable=True),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_retry_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retry_outcome", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_rejected"),
    )
    op.create_index("ix_rejected_status", "rejected", ["status"])
    op.create_table(
        "counters",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("value", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("note", sa.Text(), nullable=True),  # e.g. the last error's text
        sa.PrimaryKeyConstraint("name", name="pk_counters"),
    )

    # Immutability, enforced by PostgreSQL for every role, the owner included.
    op.execute(
        """
        CREATE FUNCTION ledger_reject_mutation() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'the event log is append-only: % on events is not allowed', TG_OP
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'correct a mistake with a new event (a bust or a correction)';
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON events "
        "FOR EACH ROW EXECUTE FUNCTION ledger_reject_mutation()"
    )
    op.execute(
        "CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events "
        "FOR EACH STATEMENT EXECUTE FUNCTION ledger_reject_mutation()"
    )
    # A wake-up for live readers, delivered by PostgreSQL at commit.
    op.execute(
        """
        CREATE FUNCTION ledger_notify_append() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('ledger_events', '');
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER events_notify AFTER INSERT ON events "
        "FOR EACH STATEMENT EXECUTE FUNCTION ledger_notify_append()"
    )
    # A reader that waits on an abandoned transaction would stall: end idle ones.
    op.execute(
        """
        DO $$ BEGIN
            EXECUTE format('ALTER DATABASE %I SET idle_in_transaction_session_timeout = %L',
                           current_database(), '5min');
        END $$
        """
    )
    # The application role: INSERT and SELECT on the log, nothing more.
    op.execute(
        f"""
        DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
                CREATE ROLE {APP_ROLE} NOLOGIN;
            END IF;
        END $$
        """
    )
    op.execute(f"GRANT SELECT, INSERT ON events TO {APP_ROLE}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE ON streams TO {APP_ROLE}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE ON rejected, counters TO {APP_ROLE}")
    op.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {APP_ROLE}")


def downgrade() -> None:
    op.execute(
        f"""
        DO $$ BEGIN
            IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
                EXECUTE 'REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {APP_ROLE}';
                EXECUTE 'REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {APP_ROLE}';
            END IF;
        END $$
        """
    )
    # Dropping the log is the one way out, and it is explicit: TRUNCATE stays refused.
    op.execute("DROP TRIGGER events_notify ON events")
    op.execute("DROP TRIGGER events_no_truncate ON events")
    op.execute("DROP TRIGGER events_no_update_delete ON events")
    op.execute("DROP FUNCTION ledger_notify_append()")
    op.execute("DROP FUNCTION ledger_reject_mutation()")
    op.drop_table("counters")
    op.drop_index("ix_rejected_status", table_name="rejected")
    op.drop_table("rejected")
    op.drop_table("streams")
    op.drop_index("ix_events_recorded_at", table_name="events")
    op.drop_index("ix_events_tx_id_global_position", table_name="events")
    op.drop_table("events")
    # The role is cluster-wide; other databases may still use it, so keep it when they do.
    op.execute(
        f"""
        DO $$ BEGIN
            DROP ROLE IF EXISTS {APP_ROLE};
        EXCEPTION WHEN dependent_objects_still_exist THEN
            RAISE NOTICE 'role {APP_ROLE} is still used by another database; kept';
        END $$
        """
    )
