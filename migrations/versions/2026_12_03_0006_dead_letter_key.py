"""Dead letters keyed by their source: a re-ingest or a redelivery does not add them twice.

Each dead letter gets a key, the SHA-256 of its source, line, index and raw bytes
(``ledger.ingest.dead_letter_key``: for a file its path as given, the physical line and
the record's bytes; for the live feed ``nats:<subject>``, the JetStream stream sequence
and the message's bytes), under a unique index. The ingester inserts with ``ON CONFLICT
DO NOTHING`` and counts what was already there as "already dead-lettered".

Rows of older versions get their key computed here the same way. Where an older
version dead-lettered the same record more than once (a re-ingested file, a message
redelivered after a consumer was killed), one row is kept (a resolved one if any, else
the first) and the copies are deleted; the counters move the copies from ``rejected``
(and ``rejected.<REASON>``) to ``duplicates`` and ``already_rejected``, so that
``received = appended + duplicates + rejected`` still holds.

Also kept per dead letter from now on: how the record was read (``input_format``) and,
for a CSV row, its file's header (``csv_header``, the column names joined by commas),
so that ``ledger rejected --retry`` reads it again the same way. Old rows have NULL
(read as JSON, as before).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The same bytes as ledger.ingest.dead_letter_key: source, line, index, raw, NUL-separated.
_KEY = (
    "sha256(convert_to(source, 'UTF8') || '\\x00'::bytea"
    " || convert_to(coalesce(line::text, ''), 'UTF8') || '\\x00'::bytea"
    " || convert_to(coalesce(idx::text, ''), 'UTF8') || '\\x00'::bytea || raw)"
)


def upgrade() -> None:
    op.add_column("rejected", sa.Column("dead_key", sa.LargeBinary(), nullable=True))
    op.add_column("rejected", sa.Column("input_format", sa.Text(), nullable=True))
    op.add_column("rejected", sa.Column("csv_header", sa.Text(), nullable=True))
    op.execute(f"UPDATE rejected SET dead_key = {_KEY}")
    op.execute(
        """
        CREATE TEMPORARY TABLE rejected_copies ON COMMIT DROP AS
        SELECT id, reason FROM (
            SELECT id, reason, row_number() OVER (
                PARTITION BY dead_key ORDER BY (status = 'resolved') DESC, id
            ) AS n
            FROM rejected
        ) ranked
        WHERE n > 1
        """
    )
    op.execute(
        """
        INSERT INTO counters (name, value)
        SELECT name, sum(value)::bigint FROM (
            SELECT 'rejected' AS name, -count(*) AS value FROM rejected_copies
            UNION ALL SELECT 'duplicates', count(*) FROM rejected_copies
            UNION ALL SELECT 'already_rejected', count(*) FROM rejected_copies
            UNION ALL SELECT 'rejected.' || reason, -count(*) FROM rejected_copies GROUP BY reason
        ) moves
        WHERE EXISTS (SELECT 1 FROM rejected_copies)
          AND EXISTS (SELECT 1 FROM counters WHERE counters.name = 'rejected')
        GROUP BY name
        ON CONFLICT (name) DO UPDATE
        SET value = counters.value + excluded.value, updated_at = now()
        """
    )
    op.execute("DELETE FROM rejected WHERE id IN (SELECT id FROM rejected_copies)")
    op.create_index("uq_rejected_dead_key", "rejected", ["dead_key"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_rejected_dead_key", table_name="rejected")
    op.drop_column("rejected", "csv_header")
    op.drop_column("rejected", "input_format")
    op.drop_column("rejected", "dead_key")
