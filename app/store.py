"""The store: metadata rows (``app.db``) and arrays in storage (``app.storage``), one interface.

Routes and jobs use :class:`Store`; they never know whether SQLite and a folder
or PostgreSQL and S3 are behind it.  Keys in storage::

    teachers/<id>/upload/<name>     the parts of an upload (adopted as arrays when they are)
    teachers/<id>/<name>.npy        validated float64 arrays of a teacher (written)
    priors/<id>/<claim>/<name>.npy  a prior's arrays, written by the claim that computed it
    priors/<id>/derived/<file>      files derived on request (float32 copies, archives)

A teacher exists when its row does: its arrays are written first, each object
committed whole, then the row is inserted; a prior's arrays are written under
its claim's own prefix, then the row points at them, by a conditional update
that only the current claimant can make.  Anything no row owns is swept once
it is older than the grace period.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, fields
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from .db import PlanJobRow, PlanRow, PriorRow, TeacherRow, engine_for, migrate
from .storage import Storage

__all__ = [
    "ID",
    "PlanJobRecord",
    "PlanRecord",
    "PriorRecord",
    "Store",
    "TeacherRecord",
    "new_id",
]

#: What ids look like: a kind letter and 24 hex digits.  Anything else is a 404.
ID = r"^[tprj]_[0-9a-f]{24}$"


def worker_lost_problem(attempts: int) -> dict:
    """The problem recorded on a job whose workers died on every attempt."""
    return {
        "type": "urn:alignment-planner:problem:worker-lost",
        "title": "Worker lost",
        "status": 503,
        "detail": f"the worker computing this job died on each of {attempts} attempts "
        "(killed for memory, or past its hard time limit); it was given up. Ask again to "
        "retry, or raise PLANNER_JOB_MEMORY / PLANNER_JOB_SECONDS",
    }


def new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class TeacherRecord:
    id: str
    owner: str
    name: str
    structure: dict
    format: str
    arrays: dict[str, dict]  # name -> {shape, dtype, bytes, sha256[, derived]}
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


@dataclass(frozen=True, kw_only=True)
class _JobFields:
    """What every job's record holds besides its own data (the rows' ``_JobColumns``)."""

    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    claim: str | None = None
    lease_until: float | None = None
    attempts: int = 0
    submitted: float | None = None


@dataclass(frozen=True)
class PlanJobRecord(_JobFields):
    id: str
    owner: str
    teacher_id: str
    request: dict  # the plan request: student, criterion, seed, ops, seconds, effort
    status: str  # queued | running | done | failed | cancelled
    plan_id: str | None = None
    problem: dict | None = None


@dataclass(frozen=True)
class PriorRecord(_JobFields):
    id: str
    owner: str
    plan_id: str
    status: str  # queued | running | done | failed
    cost: float | None
    problem: dict | None
    arrays: dict[str, dict] = field(default_factory=dict)
    location: str | None = None


_ROWS = {
    TeacherRecord: TeacherRow,
    PlanRecord: PlanRow,
    PriorRecord: PriorRow,
    PlanJobRecord: PlanJobRow,
}
_RECORDS = {row: rec for rec, row in _ROWS.items()}
#: The jobs' tables, by the kind letter of their ids: priors (``r_``), plan jobs (``j_``).
_JOBS = {"r": PriorRow, "j": PlanJobRow}


def _jobs(id: str):
    return _JOBS[id[0]]


def pack_ops(ops: list[dict]) -> list:
    """A plan's ops as the database keeps them: ``[t, i]`` for φ(t, i), ``[t]`` or
    ``[t, [π…]]`` for ψ: about a sixth of the JSON of the ops' public form; a network's
    φ(space, channel) and ψ(block) as ``["s", s, c]`` and ``["b", b]``."""
    out: list = []
    for o in ops:
        if "space" in o:  # a network's φ(space, channel), ψ(block): tagged
            out.append(["s", o["space"], o["channel"]])
        elif "block" in o:
            out.append(["b", o["block"]])
        elif o["op"] == "phi":
            out.append([o["layer"], o["neuron"]])
        elif o.get("pairing") is None:
            out.append([o["layer"]])
        else:
            out.append([o["layer"], list(o["pairing"])])
    return out


def unpack_ops(raw: list) -> list[dict]:
    """The public form of stored ops (rows written before packing hold it already)."""
    out: list[dict] = []
    for o in raw:
        if isinstance(o, dict):
            out.append(o)
        elif o[0] == "s":
            out.append({"op": "phi", "space": o[1], "channel": o[2]})
        elif o[0] == "b":
            out.append({"op": "psi", "block": o[1]})
        elif len(o) == 2 and isinstance(o[1], int):
            out.append({"op": "phi", "layer": o[0], "neuron": o[1]})
        elif len(o) == 1:
            out.append({"op": "psi", "layer": o[0]})
        else:
            out.append({"op": "psi", "layer": o[0], "pairing": o[1]})
    return out


def _values(rec) -> dict:
    """A record's fields as its row's columns (a plan's ops packed)."""
    values = {f.name: getattr(rec, f.name) for f in fields(rec)}
    if isinstance(rec, PlanRecord):
        values["ops"] = pack_ops(rec.ops)
    return values


def _record(cls, row):
    values = {f.name: getattr(row, f.name) for f in fields(cls)}
    if cls is PlanRecord:
        values["ops"] = unpack_ops(values["ops"])
    return cls(**values)


class Store:
    """Metadata and arrays of one service (every replica shares both)."""

    def __init__(self, database_url: str, storage: Storage, *, migrate_schema: bool = True):
        self.engine = engine_for(database_url)
        if migrate_schema:
            migrate(self.engine)
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        self.storage = storage

    def close(self) -> None:
        self.engine.dispose()
        self.storage.close()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # -- keys -------------------------------------------------------------------------------
    @staticmethod
    def teacher_key(id: str, name: str) -> str:
        """Where an array of a teacher is written (unless an uploaded part is adopted)."""
        return f"teachers/{id}/{name}.npy"

    @staticmethod
    def teacher_array_key(rec: TeacherRecord, name: str) -> str:
        """Where an array of a teacher is: its record says."""
        return rec.arrays[name].get("key") or Store.teacher_key(rec.id, name)

    def load_teacher_array(self, rec: TeacherRecord, name: str):
        """A teacher's array as a read-only memory map (through this process's cache when
        storage is remote)."""
        return self.storage.load_npy(self.teacher_array_key(rec, name))

    @staticmethod
    def prior_key(rec: PriorRecord, name: str) -> str:
        return f"{rec.location}/{name}.npy"

    @staticmethod
    def derived_key(prior_id: str, name: str) -> str:
        return f"priors/{prior_id}/derived/{name}"

    # -- helpers ----------------------------------------------------------------------------
    def _get(self, cls, **where):
        row_cls = _ROWS[cls]
        with self.session() as s:
            row = s.scalars(select(row_cls).filter_by(**where)).first()
            return None if row is None else _record(cls, row)

    def _insert(self, rec) -> None:
        row = _ROWS[type(rec)](**_values(rec))
        with self.session.begin() as s:
            s.add(row)

    # -- teachers ---------------------------------------------------------------------------
    def add_teacher(self, rec: TeacherRecord) -> None:
        """Record a teacher whose arrays are already in storage (``teacher_key``)."""
        self._insert(rec)

    def teacher(self, owner: str, id: str) -> TeacherRecord | None:
        return self._get(TeacherRecord, id=id, owner=owner)

    def teachers(self, owner: str) -> list[TeacherRecord]:
        with self.session() as s:
            rows = s.scalars(select(TeacherRow).filter_by(owner=owner).order_by(TeacherRow.created))
            return [_record(TeacherRecord, r) for r in rows]

    def delete_teacher(self, owner: str, id: str) -> bool:
        """Delete a teacher with its plans and priors (rows, then their arrays)."""
        with self.session.begin() as s:
            priors = s.scalars(
                select(PriorRow.id)
                .join(PlanRow, PriorRow.plan_id == PlanRow.id)
                .where(PlanRow.teacher_id == id)
            ).all()
            gone = s.execute(delete(TeacherRow).filter_by(id=id, owner=owner)).rowcount
        if not gone:
            return False
        self.storage.delete(f"teachers/{id}")
        for p in priors:
            self.storage.delete(f"priors/{p}")
        return True

    # -- plans ------------------------------------------------------------------------------
    def add_plan(self, rec: PlanRecord) -> None:
        self._insert(rec)

    def set_plan_steps(self, id: str, steps: list[dict] | None) -> None:
        """Keep a plan's step costs (computed on request) in its row's ``info``."""
        with self.session.begin() as s:
            row = s.get(PlanRow, id)
            if row is not None:
                row.info = {**row.info, "steps": steps}

    def plan(self, owner: str, id: str) -> PlanRecord | None:
        return self._get(PlanRecord, id=id, owner=owner)

    def plans_of(self, owner: str, teacher_id: str) -> list[PlanRecord]:
        """The teacher's plans, oldest first."""
        with self.session() as s:
            rows = s.scalars(
                select(PlanRow)
                .filter_by(owner=owner, teacher_id=teacher_id)
                .order_by(PlanRow.created)
            )
            return [_record(PlanRecord, r) for r in rows]

    def plans_page(
        self, owner: str, teacher_id: str, limit: int, after: str | None = None
    ) -> list[PlanRecord]:
        """Up to ``limit`` of the teacher's plans, oldest first, after the plan ``after``
        (keyset paging on (created, id): stable while plans are added)."""
        q = select(PlanRow).filter_by(owner=owner, teacher_id=teacher_id)
        return [_record(PlanRecord, r) for r in self._page(q, PlanRow, limit, after)]

    def priors_page(
        self, owner: str, teacher_id: str, limit: int, after: str | None = None
    ) -> list[PriorRecord]:
        """Up to ``limit`` of the priors of the teacher's plans, oldest first, after the
        prior ``after``."""
        q = (
            select(PriorRow)
            .join(PlanRow, PriorRow.plan_id == PlanRow.id)
            .where(PriorRow.owner == owner, PlanRow.teacher_id == teacher_id)
        )
        return [_record(PriorRecord, r) for r in self._page(q, PriorRow, limit, after)]

    def _page(self, q, row_cls, limit: int, after: str | None) -> list:
        with self.session() as s:
            if after is not None:
                mark = s.execute(
                    select(row_cls.created, row_cls.id).where(row_cls.id == after)
                ).first()
                if mark is None:
                    return []
                q = q.where(
                    (row_cls.created > mark.created)
                    | ((row_cls.created == mark.created) & (row_cls.id > mark.id))
                )
            return list(s.scalars(q.order_by(row_cls.created, row_cls.id).limit(limit)))

    # -- priors -----------------------------------------------------------------------------
    def prior_of(self, owner: str, plan_id: str) -> PriorRecord | None:
        """The plan's prior if one was requested (never creates one)."""
        return self._get(PriorRecord, plan_id=plan_id, owner=owner)

    def prior_for_plan(self, owner: str, plan_id: str) -> tuple[PriorRecord, bool]:
        """The plan's prior, created as ``queued`` if there is none (True when created)."""
        rec = self._get(PriorRecord, plan_id=plan_id, owner=owner)
        if rec is not None:
            return rec, False
        rec = PriorRecord(new_id("r"), owner, plan_id, "queued", None, None, created=time.time())
        try:
            self._insert(rec)
        except IntegrityError:  # another replica created it meanwhile
            return self._get(PriorRecord, plan_id=plan_id, owner=owner), False
        return rec, True

    def prior(self, owner: str, id: str) -> PriorRecord | None:
        return self._get(PriorRecord, id=id, owner=owner)

    def requeue_failed(self, id: str) -> bool:
        """A failed prior goes back to the queue (True when this call did it)."""
        return self._update(
            id,
            {"status": "failed"},
            status="queued",
            problem=None,
            started=None,
            finished=None,
            submitted=None,
        )

    def _update(self, id: str, where: dict[str, Any], **values: Any) -> bool:
        """A conditional update of a job's row (a prior or a plan job, by its id)."""
        row = _jobs(id)
        with self.session.begin() as s:
            q = update(row).where(row.id == id)
            for k, v in where.items():
                q = q.where(getattr(row, k) == v)
            return s.execute(q.values(**values)).rowcount == 1

    # -- jobs (priors, plan jobs): the rows are the truth ---------------------------------------
    def claim(self, id: str, token: str, lease: float):
        """Claim a queued job (a prior, a plan job) for ``token`` (a conditional update: one
        claimant wins); its record, or None."""
        now = time.time()
        row = _jobs(id)
        with self.session.begin() as s:
            won = s.execute(
                update(row)
                .where(row.id == id, row.status == "queued")
                .values(
                    status="running",
                    claim=token,
                    lease_until=now + lease,
                    started=now,
                    attempts=row.attempts + 1,
                )
            ).rowcount
        return self._get(_RECORDS[row], id=id) if won == 1 else None

    def renew(self, id: str, token: str, lease: float) -> bool:
        """Extend the lease while the claim is still ``token``'s (False: it was lost, or the
        job was cancelled)."""
        return self._update(
            id, {"claim": token, "status": "running"}, lease_until=time.time() + lease
        )

    def complete(self, id: str, token: str, **values: Any) -> bool:
        """Finish a job (``done`` or ``failed``) if ``token`` still holds it."""
        return self._update(
            id, {"claim": token, "status": "running"}, finished=time.time(), **values
        )

    def mark_submitted(self, id: str) -> None:
        self._update(id, {}, submitted=time.time())

    def lost_jobs(
        self, now: float, resubmit_after: float, limit: int = 100, max_attempts: int = 3
    ) -> list[str]:
        """Jobs (priors and plan jobs) to hand to the executor (again): running ones whose
        lease expired are put back in the queue (or, after ``max_attempts`` claims whose
        workers all died, marked failed with a problem that says so: a job that kills its
        worker is not run for ever), then queued ones never submitted, or submitted long
        enough ago that their submission may be lost (with the scheduler or the replica
        that made it).  ``FOR UPDATE SKIP LOCKED`` (PostgreSQL) lets replicas reap side
        by side."""
        out: list[str] = []
        for row in _JOBS.values():
            with self.session.begin() as s:
                expired = s.execute(
                    select(row.id, row.attempts)
                    .where(row.status == "running", row.lease_until < now)
                    .with_for_update(skip_locked=True)
                    .limit(limit)
                ).all()
                self._put_back(s, row, expired, max_attempts, now)
                stale = s.scalars(
                    select(row.id)
                    .where(row.status == "queued")
                    .where((row.submitted.is_(None)) | (row.submitted < now - resubmit_after))
                    .with_for_update(skip_locked=True)
                    .limit(limit)
                ).all()
                if stale:
                    s.execute(update(row).where(row.id.in_(stale)).values(submitted=now))
            out += stale
        return out

    @staticmethod
    def _put_back(s, row, rows, max_attempts: int, now: float) -> None:
        """Running jobs whose worker is gone: queued again, or failed once they have been
        claimed ``max_attempts`` times."""
        again = [pid for pid, n in rows if n < max_attempts]
        given_up = [pid for pid, n in rows if n >= max_attempts]
        if again:
            s.execute(
                update(row)
                .where(row.id.in_(again), row.status == "running")
                .values(status="queued", claim=None, submitted=None)
            )
        if given_up:
            s.execute(
                update(row)
                .where(row.id.in_(given_up), row.status == "running")
                .values(
                    status="failed",
                    claim=None,
                    finished=now,
                    problem=worker_lost_problem(max_attempts),
                )
            )

    def release(self, id: str, max_attempts: int = 3) -> str | None:
        """A job whose worker is known to be dead: if it was running, back to the queue, or
        failed once it was claimed ``max_attempts`` times. Returns its status now
        (``queued``: hand it to the executor again; it may never have been claimed), or
        None when it is gone."""
        row = _jobs(id)
        with self.session.begin() as s:
            rows = s.execute(select(row.id, row.attempts).filter_by(id=id, status="running")).all()
            self._put_back(s, row, rows, max_attempts, time.time())
            return s.scalar(select(row.status).filter_by(id=id))

    def queued(self) -> list[str]:
        """Every queued job (priors and plan jobs)."""
        with self.session() as s:
            return [
                i
                for row in _JOBS.values()
                for i in s.scalars(select(row.id).filter_by(status="queued"))
            ]

    def requeue_running(self, max_attempts: int = 3) -> list[str]:
        """Put every running job back in the queue (for an executor that knows it is the
        only one: whatever runs belonged to a process that is gone), or fail those already
        claimed ``max_attempts`` times; the ids put back."""
        out: list[str] = []
        for row in _JOBS.values():
            with self.session.begin() as s:
                rows = s.execute(select(row.id, row.attempts).filter_by(status="running")).all()
                self._put_back(s, row, rows, max_attempts, time.time())
            out += [pid for pid, n in rows if n < max_attempts]
        return out

    # -- plan jobs ------------------------------------------------------------------------------
    def add_plan_job(self, rec: PlanJobRecord) -> None:
        self._insert(rec)

    def plan_job(self, owner: str, id: str) -> PlanJobRecord | None:
        return self._get(PlanJobRecord, id=id, owner=owner)

    def plan_job_for_job(self, id: str) -> PlanJobRecord | None:
        return self._get(PlanJobRecord, id=id)

    def cancel_plan_job(self, owner: str, id: str) -> bool:
        """Cancel a queued or running plan job (True when this call did it): its worker
        notices at its next lease renewal and stops; no plan is recorded."""
        with self.session.begin() as s:
            q = (
                update(PlanJobRow)
                .where(PlanJobRow.id == id, PlanJobRow.owner == owner)
                .where(PlanJobRow.status.in_(("queued", "running")))
                .values(status="cancelled", claim=None, finished=time.time())
            )
            return s.execute(q).rowcount == 1

    def complete_plan_job(self, id: str, token: str, plan: PlanRecord) -> bool:
        """Record the job's plan and mark the job done, in one transaction, if ``token``
        still holds the job (False: it was cancelled or another claim took it; nothing
        is recorded)."""
        row = PlanRow(**_values(plan))
        with self.session.begin() as s:
            won = s.execute(
                update(PlanJobRow)
                .where(PlanJobRow.id == id, PlanJobRow.claim == token)
                .where(PlanJobRow.status == "running")
                .values(status="done", plan_id=plan.id, finished=time.time())
            ).rowcount
            if won != 1:
                return False
            s.add(row)
        return True

    def plan_for_job(self, plan_id: str) -> PlanRecord | None:
        """A plan whatever its owner (for jobs)."""
        return self._get(PlanRecord, id=plan_id)

    def teacher_for_job(self, teacher_id: str) -> TeacherRecord | None:
        return self._get(TeacherRecord, id=teacher_id)

    def prior_for_job(self, prior_id: str) -> PriorRecord | None:
        return self._get(PriorRecord, id=prior_id)

    # -- housekeeping -----------------------------------------------------------------------
    def bytes_stored(self) -> int:
        """Bytes of arrays the rows account for (no listing of storage)."""
        total = 0
        with self.session() as s:
            for arrays in s.scalars(select(TeacherRow.arrays)):
                total += sum(int(a.get("bytes", 0)) for a in arrays.values())
            for arrays in s.scalars(select(PriorRow.arrays)):
                total += sum(int(a.get("bytes", 0)) for a in (arrays or {}).values())
        return total

    def sweep(self, grace: float) -> int:
        """Remove from storage what no row owns and is older than ``grace`` seconds:
        abandoned uploads (and unfinished multipart uploads), results of lost claims,
        arrays of deleted records."""
        st, now, removed = self.storage, time.time(), 0

        def old(key: str) -> bool:  # nothing under it was written within the grace period
            m = st.modified(key)
            return m is not None and now - m > grace

        with self.session() as s:
            teachers = set(s.scalars(select(TeacherRow.id)))
            locations = dict(s.execute(select(PriorRow.id, PriorRow.location)).all())
        for name in st.children("teachers"):
            if name not in teachers and old(f"teachers/{name}"):
                st.delete(f"teachers/{name}")
                removed += 1
        for pid in st.children("priors"):
            if pid not in locations:
                if old(f"priors/{pid}"):
                    st.delete(f"priors/{pid}")
                    removed += 1
                continue
            for claim in st.children(f"priors/{pid}"):
                key = f"priors/{pid}/{claim}"
                if claim != "derived" and key != locations[pid] and old(key):
                    st.delete(key)
                    removed += 1
        return removed + st.abort_uploads(grace)

    def counts(self) -> dict[str, int]:
        with self.session() as s:
            return {
                "teachers": s.scalar(select(func.count()).select_from(TeacherRow)) or 0,
                "priors": s.scalar(select(func.count()).select_from(PriorRow)) or 0,
            }
