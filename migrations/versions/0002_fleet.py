"""Fleet: JSONB on PostgreSQL, device routing, the workers table.

Recommendations get the device a request asks for (routing columns), a waiting reason, and a partial
index over queued jobs for the claim's scan.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from service.db.models import UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUEUED = sa.text("status = 'queued'")
# (table, column, nullable) of every JSON column: JSONB on PostgreSQL, unchanged (JSON text) on SQLite.
JSON_COLUMNS = [
    ("recommendations", "request", False),
    ("recommendations", "result", True),
    ("trials", "detail", True),
    ("artifacts", "meta", False),
]


def _json_type(new: sa.types.TypeEngine, old: sa.types.TypeEngine) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    using = "jsonb" if isinstance(new, postgresql.JSONB) else "json"
    for table, column, nullable in JSON_COLUMNS:
        op.alter_column(
            table,
            column,
            type_=new,
            existing_type=old,
            existing_nullable=nullable,
            postgresql_using=f"{column}::{using}",
        )


def upgrade() -> None:
    _json_type(postgresql.JSONB(), sa.JSON())
    with op.batch_alter_table("recommendations") as batch:
        batch.add_column(sa.Column("device_type", sa.String(16), nullable=True))
        batch.add_column(sa.Column("device_name_like", sa.String(256), nullable=True))
        batch.add_column(sa.Column("device_memory_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(
            sa.Column("allow_extrapolation", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("waiting_reason", sa.Text(), nullable=True))
        batch.create_index(
            "ix_recommendations_queued",
            ["created_at", "id"],
            sqlite_where=QUEUED,
            postgresql_where=QUEUED,
        )

    op.create_table(
        "workers",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("device_type", sa.String(16), nullable=False),
        sa.Column("device_name", sa.String(256), nullable=False),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("device_count", sa.Integer(), nullable=False),
        sa.Column("current_job", sa.String(32), nullable=True),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    with op.batch_alter_table("workers") as batch:
        batch.create_index(batch.f("ix_workers_heartbeat_at"), ["heartbeat_at"])


def downgrade() -> None:
    op.drop_table("workers")
    with op.batch_alter_table("recommendations") as batch:
        batch.drop_index("ix_recommendations_queued")
        batch.drop_column("waiting_reason")
        batch.drop_column("allow_extrapolation")
        batch.drop_column("device_memory_bytes")
        batch.drop_column("device_name_like")
        batch.drop_column("device_type")
    _json_type(sa.JSON(), postgresql.JSONB())
