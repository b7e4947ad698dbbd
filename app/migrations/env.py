"""Alembic environment: migrations run on the connection ``app.db.migrate`` hands in."""

from __future__ import annotations

from alembic import context

from app.db import Base

target_metadata = Base.metadata


def run() -> None:
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


run()
