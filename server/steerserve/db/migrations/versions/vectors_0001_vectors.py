"""vectors: the table of releases before --database-url (adopted as it is when it exists)."""

import sqlalchemy as sa
from alembic import op

revision = "vectors_0001"
down_revision = None
branch_labels = ("vectors",)
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("vectors"):
        return
    op.create_table(
        "vectors",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("layer", sa.Integer, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("description", sa.Text),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("vectors")
