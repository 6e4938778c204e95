"""Two partial indexes for as-of queries: a stream's fills by event time, its adjustments.

An as-of answer (event time T, today's knowledge) is a snapshot plus the stream's rows
logged after it: its fills up to T, and its busts and corrections. Found through
``(stream, stream_version)`` alone, that read visited every later row of the stream on
the heap and filtered on ``occurred_at`` and ``type`` there: 14 ms for an early T on a
3,000-fill stream, and up to three snapshots tried per query (p99 25 ms).

- ``ix_events_stream_fills`` (stream, occurred_at, global_position), fills only: the
  fills up to T come from a range of it, filtered on position in the index, and only
  the rows wanted are fetched.
- ``ix_events_stream_adjustments`` (stream, global_position), busts and corrections
  only (about 1% of a log): a stream's adjustments after a snapshot without a scan.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX ix_events_stream_fills ON events (stream, occurred_at, global_position) "
        "WHERE type = 'fill'"
    )
    op.execute(
        "CREATE INDEX ix_events_stream_adjustments ON events (stream, global_position) "
        "WHERE type IN ('bust', 'correction')"
    )


def downgrade() -> None:
    op.execute("DROP INDEX ix_events_stream_adjustments")
    op.execute("DROP INDEX ix_events_stream_fills")
