"""The metadata database: SQLAlchemy 2 tables, one schema for SQLite and PostgreSQL
(docs/scaling.md).

``PLANNER_DATABASE_URL`` selects it: SQLite in ``PLANNER_DATA_DIR`` by default,
``postgresql+psycopg://user@host:5432/db`` scaled out.  The schema is created
and upgraded by Alembic migrations (``app/migrations``), run at start under a
lock (a PostgreSQL advisory lock, a file lock beside a SQLite database), so
replicas that start together migrate once.  Rows are the truth about jobs: a
prior is claimed and completed by conditional updates (``app.store``).
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Base", "PlanJobRow", "PlanRow", "PriorRow", "TeacherRow", "engine_for", "migrate"]

#: The advisory lock that serialises migrations of replicas starting together.
_MIGRATION_LOCK = 0x706C616E6E6572  # "planner"


class Base(DeclarativeBase):
    type_annotation_map: ClassVar = {dict[str, Any]: JSON, list[Any]: JSON}


class TeacherRow(Base):
    __tablename__ = "teachers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(Text)
    structure: Mapped[dict[str, Any]]
    format: Mapped[str] = mapped_column(String(16))
    arrays: Mapped[dict[str, Any]]
    created: Mapped[float] = mapped_column(Float)


class PlanRow(Base):
    __tablename__ = "plans"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    teacher_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("teachers.id", ondelete="CASCADE"), index=True
    )
    student: Mapped[dict[str, Any]]
    criterion: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int | None] = mapped_column(BigInteger)
    ops: Mapped[list[Any]]
    cost: Mapped[float] = mapped_column(Float)
    info: Mapped[dict[str, Any]]
    created: Mapped[float] = mapped_column(Float)


class _JobColumns:
    """What every job's row holds besides its own data: when it ran, and its bookkeeping
    (who holds it, until when, how many times it was claimed, when it was last handed
    to the executor)."""

    created: Mapped[float] = mapped_column(Float)
    started: Mapped[float | None] = mapped_column(Float)
    finished: Mapped[float | None] = mapped_column(Float)
    claim: Mapped[str | None] = mapped_column(String(32))
    lease_until: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    submitted: Mapped[float | None] = mapped_column(Float)


class PriorRow(_JobColumns, Base):
    __tablename__ = "priors"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    plan_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("plans.id", ondelete="CASCADE"), unique=True
    )
    status: Mapped[str] = mapped_column(String(16))
    cost: Mapped[float | None] = mapped_column(Float)
    problem: Mapped[dict[str, Any] | None]
    arrays: Mapped[dict[str, Any]]
    #: where its arrays are: ``priors/<id>/<claim>/``, written by the claim that completed it
    location: Mapped[str | None] = mapped_column(String(128))

    __table_args__ = (Index("priors_status", "status"),)


class PlanJobRow(_JobColumns, Base):
    """A plan computed as a job (``Prefer: respond-async``): the request, its state and,
    once done, the plan it made."""

    __tablename__ = "plan_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    teacher_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("teachers.id", ondelete="CASCADE"), index=True
    )
    request: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16))
    plan_id: Mapped[str | None] = mapped_column(String(32))
    problem: Mapped[dict[str, Any] | None]

    __table_args__ = (Index("plan_jobs_status", "status"),)


def engine_for(url: str) -> Engine:
    """One engine per process; SQLite with WAL, foreign keys and a busy timeout."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def migrate(engine: Engine) -> None:
    """Upgrade the schema to the latest Alembic revision, once across replicas."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with _migration_lock(engine) as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@contextlib.contextmanager
def _migration_lock(engine: Engine):
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK})
            conn.commit()
            try:
                yield conn
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK})
                conn.commit()
        return
    path = engine.url.database
    lock = Path(f"{path}.migrate.lock") if path and path != ":memory:" else None
    fh = open(lock, "w") if lock else None  # noqa: SIM115 - closed below
    try:
        if fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
        with engine.connect() as conn:
            yield conn
    finally:
        if fh:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
