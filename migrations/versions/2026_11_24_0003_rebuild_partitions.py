"""Rebuild partitions: where each worker of a parallel rebuild has got to.

A rebuild of a long log may split the streams between worker processes (see
projections.partition). Each worker projects its share of the log up to the same end
into the building generation and keeps its own checkpoint here, so a killed rebuild
resumes every worker where it stopped. When all are done, their rows are replaced by
the generation's own checkpoint at that end (projection_checkpoint), in one transaction.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APP_ROLE = "ledger_app"


def upgrade() -> None:
    op.create_table(
        "projection_partition",
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("part", sa.Integer(), nullable=False),
        sa.Column("parts", sa.Integer(), nullable=False),
        sa.Column("tx_id", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("position", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("events", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("end_tx_id", sa.BigInteger(), nullable=False),
        sa.Column("end_position", sa.BigInteger(), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("generation", "part", name="pk_projection_partition"),
        sa.ForeignKeyConstraint(
            ["generation"],
            ["projection_checkpoint.generation"],
            name="fk_projection_partition_generation",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint("part >= 0 AND part < parts", name="ck_projection_partition_part"),
        sa.CheckConstraint(
            "(tx_id, position) <= (end_tx_id, end_position)",
            name="ck_projection_partition_within_end",
        ),
    )
    # A worker's checkpoint moves forward only, as a generation's does (0002).
    op.execute(
        "CREATE TRIGGER projection_partition_forward_only BEFORE UPDATE ON projection_partition "
        "FOR EACH ROW EXECUTE FUNCTION ledger_checkpoint_forward_only()"
    )
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON projection_partition TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP TRIGGER projection_partition_forward_only ON projection_partition")
    op.drop_table("projection_partition")
