"""The initial schema: teachers, plans and priors (with job bookkeeping).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "teachers",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("structure", sa.JSON, nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("arrays", sa.JSON, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
    )
    op.create_index("ix_teachers_owner", "teachers", ["owner"])
    op.create_table(
        "plans",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column(
            "teacher_id",
            sa.String(32),
            sa.ForeignKey("teachers.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("student", sa.JSON, nullable=False),
        sa.Column("criterion", sa.String(64)),
        sa.Column("seed", sa.BigInteger),
        sa.Column("ops", sa.JSON, nullable=False),
        sa.Column("cost", sa.Float, nullable=False),
        sa.Column("info", sa.JSON, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
    )
    op.create_index("ix_plans_teacher_id", "plans", ["teacher_id"])
    op.create_table(
        "priors",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column(
            "plan_id",
            sa.String(32),
            sa.ForeignKey("plans.id", ondelete="CASCADE"),
            nullable=False,
            unique=True,
        ),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("cost", sa.Float),
        sa.Column("problem", sa.JSON),
        sa.Column("arrays", sa.JSON, nullable=False),
        sa.Column("location", sa.String(128)),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("started", sa.Float),
        sa.Column("finished", sa.Float),
        sa.Column("claim", sa.String(32)),
        sa.Column("lease_until", sa.Float),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("submitted", sa.Float),
    )
    op.create_index("priors_status", "priors", ["status"])


def downgrade() -> None:
    op.drop_table("priors")
    op.drop_table("plans")
    op.drop_table("teachers")
