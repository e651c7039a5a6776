"""batches: line leases (a fleet's runners claim lines) and file contents in the database.

batch_lines.lease_owner / lease_until: the runner that claimed the line and until when (the
database's clock, in seconds); a line whose lease has passed is claimed again by any runner.
file_contents: the bytes of files when the database is shared (PostgreSQL), in chunks; the
embedded SQLite keeps them in the data dir as before (batch/contents.py).
"""

import sqlalchemy as sa
from alembic import op

revision = "batches_0002"
down_revision = "batches_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batch_lines", sa.Column("lease_owner", sa.Text))
    op.add_column("batch_lines", sa.Column("lease_until", sa.Float))
    op.create_table(
        "file_contents",
        sa.Column("file_id", sa.Text, primary_key=True),
        sa.Column("chunk", sa.Integer, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("file_contents")
    op.drop_column("batch_lines", "lease_until")
    op.drop_column("batch_lines", "lease_owner")
