"""batches: files, batches, their lines and results as releases before --database-url had them.

A data dir of those releases has the tables, perhaps without the columns added over time (they
were added by hand-written ALTER TABLEs at open): whatever is missing is created or added here.
"""

import sqlalchemy as sa
from alembic import op

revision = "batches_0001"
down_revision = None
branch_labels = ("batches",)
depends_on = None

TIMESTAMPS = ("in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
              "cancelling_at", "cancelled_at")


def _tables():
    meta = sa.MetaData()
    return [
        sa.Table("files", meta,
                 sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
                 sa.Column("id", sa.Text, nullable=False, unique=True),
                 sa.Column("filename", sa.Text, nullable=False),
                 sa.Column("purpose", sa.Text, nullable=False),
                 sa.Column("bytes", sa.BigInteger, nullable=False),
                 sa.Column("created_at", sa.BigInteger, nullable=False),
                 sa.Column("status", sa.Text, nullable=False, server_default="processed"),
                 sqlite_autoincrement=True),
        sa.Table("batches", meta,
                 sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
                 sa.Column("id", sa.Text, nullable=False, unique=True),
                 sa.Column("input_file_id", sa.Text, nullable=False),
                 sa.Column("endpoint", sa.Text, nullable=False),
                 sa.Column("completion_window", sa.Text, nullable=False),
                 sa.Column("status", sa.Text, nullable=False, index=True),
                 sa.Column("metadata", sa.Text),
                 sa.Column("errors", sa.Text),
                 sa.Column("output_file_id", sa.Text),
                 sa.Column("error_file_id", sa.Text),
                 sa.Column("total", sa.Integer, nullable=False, server_default="0"),
                 sa.Column("created_at", sa.BigInteger, nullable=False),
                 *(sa.Column(name, sa.BigInteger) for name in TIMESTAMPS),
                 sqlite_autoincrement=True),
        sa.Table("batch_lines", meta,
                 sa.Column("batch_id", sa.Text, primary_key=True),
                 sa.Column("line_index", sa.Integer, primary_key=True),
                 sa.Column("custom_id", sa.Text),
                 sa.Column("url", sa.Text),
                 sa.Column("body", sa.Text),
                 sqlite_with_rowid=False),
        sa.Table("batch_results", meta,
                 sa.Column("batch_id", sa.Text, primary_key=True),
                 sa.Column("line_index", sa.Integer, primary_key=True),
                 sa.Column("ok", sa.Integer, nullable=False),
                 sa.Column("record", sa.Text, nullable=False),
                 sa.Column("created_at", sa.BigInteger, nullable=False),
                 sqlite_with_rowid=False),
    ]


# Columns added by releases after the first (nullable or defaulted, so ADD COLUMN works everywhere).
ADDED = {
    "batch_lines": [("attempts", sa.Integer, {"nullable": False, "server_default": "0"})],
    "batches": [("reserved_output_file_id", sa.Text, {}), ("reserved_error_file_id", sa.Text, {}),
                ("server_id", sa.Text, {})],
}


def upgrade() -> None:
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    for table in _tables():
        if table.name not in existing:
            table.create(bind)
    inspector = sa.inspect(bind)
    for table, columns in ADDED.items():
        present = {c["name"] for c in inspector.get_columns(table)}
        for name, type_, kwargs in columns:
            if name not in present:
                op.add_column(table, sa.Column(name, type_, **kwargs))


def downgrade() -> None:
    for name in ("batch_results", "batch_lines", "batches", "files"):
        op.drop_table(name)
