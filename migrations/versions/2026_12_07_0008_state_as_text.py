"""Folded states stored as text, compressed with lz4: a position's write costs a third.

``proj_positions.state`` and ``proj_snapshots.state`` hold a stream's folded state (its
open lots, basis, totals) as the runner's JSON, read back only whole, as text, to load a
state (``PositionState.from_json``); nothing queries inside it. As ``jsonb`` every write
parsed the JSON into jsonb's binary form and compressed it with pglz (a state of 52 open
lots is ~6 KB, stored out of line). A live follower rewrites the state of every stream a
page touched: 100 such states upserted took 22.4 ms as jsonb, 13.5 ms as text, 8.0 ms as
text compressed with lz4 (of which ~4 ms is the client's), on this machine.

lz4 is used where the server was built with it (Debian's and most packages are); a server
without it keeps the default (pglz) and loses only the compression's share.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("proj_positions", "proj_snapshots")


def upgrade() -> None:
    for table in _TABLES:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN state TYPE text USING state::text")
        op.execute(
            f"""
            DO $$ BEGIN
                ALTER TABLE {table} ALTER COLUMN state SET COMPRESSION lz4;
            EXCEPTION WHEN feature_not_supported THEN
                RAISE NOTICE '{table}.state: lz4 not built into this server; pglz kept';
            END $$
            """
        )


def downgrade() -> None:
    for table in _TABLES:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN state SET COMPRESSION default")
        op.execute(f"ALTER TABLE {table} ALTER COLUMN state TYPE jsonb USING state::jsonb")
