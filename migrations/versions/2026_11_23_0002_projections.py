"""Projections: positions, history, daily P&L, snapshots, generation checkpoints.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APP_ROLE = "ledger_app"
TABLES = (
    "projection_checkpoint",
    "proj_positions",
    "proj_history",
    "proj_pnl_daily",
    "proj_snapshots",
)


def upgrade() -> None:
    op.create_table(
        "projection_checkpoint",
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("tx_id", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("position", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("events", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("swapped_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("generation", name="pk_projection_checkpoint"),
        sa.CheckConstraint(
            "status IN ('building', 'serving', 'retired')", name="ck_projection_checkpoint_status"
        ),
    )
    # At most one serving generation, enforced by the database.
    op.create_index(
        "ix_projection_checkpoint_one_serving",
        "projection_checkpoint",
        ["status"],
        unique=True,
        postgresql_where=sa.text("status = 'serving'"),
    )
    # Checkpoints only move forward: a runner can never re-apply what it has written.
    op.execute(
        """
        CREATE FUNCTION ledger_checkpoint_forward_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF (NEW.tx_id, NEW.position) < (OLD.tx_id, OLD.position) THEN
                RAISE EXCEPTION 'projection checkpoint of generation % cannot move back from '
                    '(%, %) to (%, %)', OLD.generation, OLD.tx_id, OLD.position,
                    NEW.tx_id, NEW.position
                    USING ERRCODE = 'check_violation';
            END IF;
            RETURN NEW;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER projection_checkpoint_forward_only BEFORE UPDATE ON projection_checkpoint "
        "FOR EACH ROW EXECUTE FUNCTION ledger_checkpoint_forward_only()"
    )

    op.create_table(
        "proj_positions",
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("contract", sa.Text(), nullable=False),
        sa.Column("signed_qty", sa.Numeric(), nullable=False),
        sa.Column("avg_open_price_fifo", sa.Numeric(), nullable=True),
        sa.Column("avg_open_price_wac", sa.Numeric(), nullable=True),
        sa.Column("realized_fifo", sa.Numeric(), nullable=False),
        sa.Column("realized_wac", sa.Numeric(), nullable=False),
        sa.Column("fees", sa.Numeric(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_fill_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("fill_count", sa.Integer(), nullable=False),
        sa.Column("last_position", sa.BigInteger(), nullable=False),
        sa.Column("state", postgresql.JSONB(), nullable=False),
        sa.PrimaryKeyConstraint("generation", "stream", name="pk_proj_positions"),
    )
    op.create_index(
        "ix_proj_positions_generation_account_contract",
        "proj_positions",
        ["generation", "account", "contract"],
    )
    op.create_table(
        "proj_history",
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("contract", sa.Text(), nullable=False),
        sa.Column("exec_id", sa.Text(), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("side", sa.Text(), nullable=True),
        sa.Column("qty", sa.Numeric(), nullable=True),
        sa.Column("price", sa.Numeric(), nullable=True),
        sa.Column("qty_before", sa.Numeric(), nullable=False),
        sa.Column("qty_after", sa.Numeric(), nullable=False),
        sa.Column("realized_fifo", sa.Numeric(), nullable=False),
        sa.Column("realized_wac", sa.Numeric(), nullable=False),
        sa.Column("cum_realized_fifo", sa.Numeric(), nullable=False),
        sa.Column("cum_realized_wac", sa.Numeric(), nullable=False),
        sa.Column("fees", sa.Numeric(), nullable=False),
        sa.PrimaryKeyConstraint("generation", "stream", "position", "kind", name="pk_proj_history"),
        sa.CheckConstraint("kind IN ('detail', 'eod')", name="ck_proj_history_kind"),
    )
    op.create_index(
        "ix_proj_history_generation_kind_day", "proj_history", ["generation", "kind", "day"]
    )
    op.create_table(
        "proj_pnl_daily",
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("contract", sa.Text(), nullable=False),
        sa.Column("realized_fifo", sa.Numeric(), nullable=False),
        sa.Column("realized_wac", sa.Numeric(), nullable=False),
        sa.Column("fees", sa.Numeric(), nullable=False),
        sa.Column("fills", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("generation", "stream", "day", name="pk_proj_pnl_daily"),
    )
    op.create_table(
        "proj_snapshots",
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column("known_position", sa.BigInteger(), nullable=False),
        sa.Column("key_position", sa.BigInteger(), nullable=False),
        sa.Column("key_occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("known_recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", postgresql.JSONB(), nullable=False),
        sa.PrimaryKeyConstraint(
            "generation", "stream", "known_position", "key_position", name="pk_proj_snapshots"
        ),
    )
    op.create_index(
        "ix_proj_snapshots_generation_stream_key_occurred_at",
        "proj_snapshots",
        ["generation", "stream", "key_occurred_at"],
    )
    op.create_index(
        "ix_proj_snapshots_generation_stream_known_recorded_at",
        "proj_snapshots",
        ["generation", "stream", "known_recorded_at"],
    )
    for table in TABLES:
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {APP_ROLE}")


def downgrade() -> None:
    op.drop_table("proj_snapshots")
    op.drop_table("proj_pnl_daily")
    op.drop_table("proj_history")
    op.drop_table("proj_positions")
    op.execute("DROP TRIGGER projection_checkpoint_forward_only ON projection_checkpoint")
    op.execute("DROP FUNCTION ledger_checkpoint_forward_only()")
    op.drop_table("projection_checkpoint")
