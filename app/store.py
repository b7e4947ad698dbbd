"""The store: metadata in SQLite, arrays as files, behind one interface.

:class:`Store` is what routes and jobs use; :class:`LocalStore` is the embedded
default (a data folder, no set-up).  A shared deployment can implement the same
interface over PostgreSQL and shared storage.

Layout of the data folder::

    planner.sqlite3            metadata (teachers, plans, priors)
    teachers/<id>/<name>.npy   validated float64 arrays of a teacher
    priors/<id>/<name>.npy     arrays of a computed prior (+ cached archives)
    tmp/                       uploads and results in progress (swept at start)

A teacher's or prior's folder appears by one atomic rename of a complete
folder, then its row is written; anything without a row is swept at start-up,
so an interrupted upload leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .arrays import fsync_path

__all__ = ["ID", "LocalStore", "PlanRecord", "PriorRecord", "Store", "TeacherRecord", "new_id"]

#: Columns that hold JSON.
_JSON = frozenset({"structure", "arrays", "student", "ops", "info", "problem"})
#: What ids look like: a kind letter and 24 hex digits.  Anything else is a 404.
ID = r"^[tpr]_[0-9a-f]{24}$"


def new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class TeacherRecord:
    id: str
    owner: str
    name: str
    structure: dict
    format: str
    arrays: dict[str, dict]  # name -> {shape, dtype, bytes, sha256}
    created: float


@dataclass(frozen=True)
class PlanRecord:
    id: str
    owner: str
    teacher_id: str
    student: dict
    criterion: str | None
    seed: int | None
    ops: list[dict]
    cost: float
    info: dict  # provenance, |B|, search statistics
    created: float


@dataclass(frozen=True)
class PriorRecord:
    id: str
    owner: str
    plan_id: str
    status: str  # queued | running | done | failed
    cost: float | None
    problem: dict | None
    arrays: dict[str, dict] = field(default_factory=dict)
    created: float = 0.0
    started: float | None = None
    finished: float | None = None


class Store(ABC):
    """Everything the service keeps.  Every read takes the caller's ``owner``."""

    @abstractmethod
    def tmp_dir(self) -> Path:
        """A fresh private folder for an upload or a result in progress."""

    # teachers
    @abstractmethod
    def add_teacher(self, rec: TeacherRecord, folder: Path) -> None:
        """Adopt the complete ``folder`` of arrays and record the teacher."""

    @abstractmethod
    def teacher(self, owner: str, id: str) -> TeacherRecord | None: ...

    @abstractmethod
    def teachers(self, owner: str) -> list[TeacherRecord]: ...

    @abstractmethod
    def delete_teacher(self, owner: str, id: str) -> bool:
        """Delete a teacher with its plans, priors and files."""

    @abstractmethod
    def teacher_array(self, id: str, name: str) -> Path: ...

    # plans
    @abstractmethod
    def add_plan(self, rec: PlanRecord) -> None: ...

    @abstractmethod
    def plan(self, owner: str, id: str) -> PlanRecord | None: ...

    # priors
    @abstractmethod
    def prior_for_plan(self, owner: str, plan_id: str) -> tuple[PriorRecord, bool]:
        """The plan's prior, created as ``queued`` if there is none (True when created)."""

    @abstractmethod
    def prior(self, owner: str, id: str) -> PriorRecord | None: ...

    @abstractmethod
    def update_prior(self, id: str, **changes: Any) -> None: ...

    @abstractmethod
    def adopt_prior_arrays(self, id: str, folder: Path) -> None:
        """Make the complete ``folder`` the prior's arrays (atomically)."""

    @abstractmethod
    def prior_dir(self, id: str) -> Path: ...

    @abstractmethod
    def unfinished_priors(self) -> list[PriorRecord]: ...

    @abstractmethod
    def bytes_stored(self) -> int: ...

    @abstractmethod
    def plan_for_job(self, plan_id: str) -> PlanRecord | None:
        """A plan whatever its owner (for the job runner)."""

    @abstractmethod
    def teacher_for_job(self, teacher_id: str) -> TeacherRecord | None:
        """A teacher whatever its owner (for the job runner)."""

    @abstractmethod
    def prior_for_job(self, prior_id: str) -> PriorRecord | None:
        """A prior whatever its owner (for the job runner)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS teachers (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT NOT NULL, structure TEXT NOT NULL,
    format TEXT NOT NULL, arrays TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS plans (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL,
    teacher_id TEXT NOT NULL REFERENCES teachers(id) ON DELETE CASCADE,
    student TEXT NOT NULL, criterion TEXT, seed INTEGER, ops TEXT NOT NULL, cost REAL NOT NULL,
    info TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS priors (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL,
    plan_id TEXT NOT NULL UNIQUE REFERENCES plans(id) ON DELETE CASCADE,
    status TEXT NOT NULL, cost REAL, problem TEXT, arrays TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL, started REAL, finished REAL);
CREATE INDEX IF NOT EXISTS teachers_owner ON teachers(owner);
CREATE INDEX IF NOT EXISTS plans_teacher ON plans(teacher_id);
"""


class LocalStore(Store):
    """The embedded default: SQLite and files in one data folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in ("teachers", "priors", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.root / "planner.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _q(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- housekeeping ------------------------------------------------------------------
    def sweep(self) -> None:
        """Remove what no row owns: interrupted uploads, results, orphan folders."""
        shutil.rmtree(self.root / "tmp", ignore_errors=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        for kind, table in (("teachers", "teachers"), ("priors", "priors")):
            known = {r["id"] for r in self._q(f"SELECT id FROM {table}")}
            for d in (self.root / kind).iterdir():
                if d.name not in known:
                    shutil.rmtree(d, ignore_errors=True)

    def tmp_dir(self) -> Path:
        d = self.root / "tmp" / secrets.token_hex(12)
        d.mkdir()
        return d

    def bytes_stored(self) -> int:
        total = 0
        for kind in ("teachers", "priors"):
            for f in (self.root / kind).glob("*/*"):
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                    total += f.stat().st_size
        return total

    # -- teachers ----------------------------------------------------------------------
    def add_teacher(self, rec: TeacherRecord, folder: Path) -> None:
        dst = self.root / "teachers" / rec.id
        folder.rename(dst)
        fsync_path(dst.parent)
        self._insert("teachers", rec)

    @staticmethod
    def _record(cls, r: sqlite3.Row):
        """A record from its row: columns are named as the record's fields, and the
        JSON columns (``_JSON``) are decoded."""
        values = {}
        for f in fields(cls):
            v = r[f.name]
            values[f.name] = json.loads(v) if f.name in _JSON and v is not None else v
        return cls(**values)

    def _insert(self, table: str, rec) -> None:
        """The row of a record (the inverse of :meth:`_record`)."""
        names = [f.name for f in fields(rec)]
        values = [json.dumps(getattr(rec, n)) if n in _JSON else getattr(rec, n) for n in names]
        cols, marks = ", ".join(names), ", ".join("?" * len(names))
        self._q(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(values))

    def _teacher(self, r: sqlite3.Row) -> TeacherRecord:
        return self._record(TeacherRecord, r)

    def teacher(self, owner: str, id: str) -> TeacherRecord | None:
        rows = self._q("SELECT * FROM teachers WHERE id=? AND owner=?", (id, owner))
        return self._teacher(rows[0]) if rows else None

    def teachers(self, owner: str) -> list[TeacherRecord]:
        rows = self._q("SELECT * FROM teachers WHERE owner=? ORDER BY created", (owner,))
        return [self._teacher(r) for r in rows]

    def delete_teacher(self, owner: str, id: str) -> bool:
        with self._lock:
            priors = [
                r["id"]
                for r in self._q(
                    "SELECT priors.id FROM priors JOIN plans ON priors.plan_id = plans.id "
                    "WHERE plans.teacher_id=?",
                    (id,),
                )
            ]
            cur = self._db.execute("DELETE FROM teachers WHERE id=? AND owner=?", (id, owner))
            if cur.rowcount == 0:
                return False
        shutil.rmtree(self.root / "teachers" / id, ignore_errors=True)
        for p in priors:
            shutil.rmtree(self.root / "priors" / p, ignore_errors=True)
        return True

    def teacher_array(self, id: str, name: str) -> Path:
        return self.root / "teachers" / id / f"{name}.npy"

    # -- plans -------------------------------------------------------------------------
    def add_plan(self, rec: PlanRecord) -> None:
        self._insert("plans", rec)

    def plan(self, owner: str, id: str) -> PlanRecord | None:
        rows = self._q("SELECT * FROM plans WHERE id=? AND owner=?", (id, owner))
        return self._record(PlanRecord, rows[0]) if rows else None

    # -- priors ------------------------------------------------------------------------
    def _prior(self, r: sqlite3.Row) -> PriorRecord:
        return self._record(PriorRecord, r)

    def prior_for_plan(self, owner: str, plan_id: str) -> tuple[PriorRecord, bool]:
        with self._lock:
            rows = self._q("SELECT * FROM priors WHERE plan_id=? AND owner=?", (plan_id, owner))
            if rows:
                return self._prior(rows[0]), False
            pid = new_id("r")
            self._q(
                "INSERT INTO priors (id, owner, plan_id, status, created) VALUES (?,?,?,?,?)",
                (pid, owner, plan_id, "queued", time.time()),
            )
            return self._prior(self._q("SELECT * FROM priors WHERE id=?", (pid,))[0]), True

    def prior(self, owner: str, id: str) -> PriorRecord | None:
        rows = self._q("SELECT * FROM priors WHERE id=? AND owner=?", (id, owner))
        return self._prior(rows[0]) if rows else None

    def update_prior(self, id: str, **changes: Any) -> None:
        cols = {
            k: json.dumps(v) if k in ("problem", "arrays") and v is not None else v
            for k, v in changes.items()
        }
        sets = ", ".join(f"{k}=?" for k in cols)
        self._q(f"UPDATE priors SET {sets} WHERE id=?", (*cols.values(), id))

    def adopt_prior_arrays(self, id: str, folder: Path) -> None:
        dst = self.root / "priors" / id
        if dst.exists():  # a re-run after a restart: replace the old result whole
            shutil.rmtree(dst)
        folder.rename(dst)
        fsync_path(dst.parent)

    def prior_dir(self, id: str) -> Path:
        return self.root / "priors" / id

    def unfinished_priors(self) -> list[PriorRecord]:
        rows = self._q("SELECT * FROM priors WHERE status IN ('queued', 'running')")
        return [self._prior(r) for r in rows]

    def plan_for_job(self, plan_id: str) -> PlanRecord | None:
        rows = self._q("SELECT * FROM plans WHERE id=?", (plan_id,))
        return self._record(PlanRecord, rows[0]) if rows else None

    def teacher_for_job(self, teacher_id: str) -> TeacherRecord | None:
        rows = self._q("SELECT * FROM teachers WHERE id=?", (teacher_id,))
        return self._teacher(rows[0]) if rows else None

    def prior_for_job(self, prior_id: str) -> PriorRecord | None:
        rows = self._q("SELECT * FROM priors WHERE id=?", (prior_id,))
        return self._prior(rows[0]) if rows else None
