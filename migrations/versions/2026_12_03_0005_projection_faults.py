"""Faulted streams: a stream whose events cannot be folded, set aside, not fatal.

An event that the position fold cannot apply (a fill off its instrument's tick grid, a
fill for a contract no instrument defines, ...) may be in the log anyway: an older
version wrote it, or someone with database rights did. The runner then marks that one
stream as faulted here, with the offending event's log position and id and the reason,
removes the stream's other projection rows, and goes on projecting every other stream.
A later correction or bust of the offending execution heals the stream: its row here is
deleted and the stream is projected again from its first event. Rows belong to a
generation of the projections, like every other proj_* table.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APP_ROLE = "ledger_app"


def upgrade() -> None:
    op.create_table(
        "proj_faults",
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("contract", sa.Text(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=True),
        sa.Column("exec_id", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column(
            "faulted_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("generation", "stream", name="pk_proj_faults"),
    )
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON proj_faults TO {APP_ROLE}")


def downgrade() -> None:
    op.drop_table("proj_faults")
