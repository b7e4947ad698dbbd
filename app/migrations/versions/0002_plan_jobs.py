"""Plan jobs: a plan requested with ``Prefer: respond-async``, run under a lease.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "plan_jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column(
            "teacher_id",
            sa.String(32),
            sa.ForeignKey("teachers.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("plan_id", sa.String(32)),
        sa.Column("problem", sa.JSON),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("started", sa.Float),
        sa.Column("finished", sa.Float),
        sa.Column("claim", sa.String(32)),
        sa.Column("lease_until", sa.Float),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("submitted", sa.Float),
    )
    op.create_index("plan_jobs_status", "plan_jobs", ["status"])
    op.create_index("ix_plan_jobs_teacher_id", "plan_jobs", ["teacher_id"])


def downgrade() -> None:
    op.drop_table("plan_jobs")
