"""``/v1/structures``: the lattice 𝔖_f (docs/theory.md §5)."""

from __future__ import annotations

from fastapi import APIRouter

from planner import NotInLattice, PlannerError, TooLarge
from planner.lattice import count_sequences, enumerate_sequences, membership
from planner.network_lattice import network_routes

from ...problems import Problem, problem_from_planner_error
from ...schemas import SequencesRequest, SequencesResponse
from ..deps import OwnerDep, SettingsDep

router = APIRouter(prefix="/v1/structures", tags=["structures"])


@router.post("/sequences", response_model=SequencesResponse)
def sequences(body: SequencesRequest, settings: SettingsDep, owner: OwnerDep):
    """Membership of the student in the teacher's lattice, the number of
    structure-level sequences and up to ``limit`` of them."""
    try:
        teacher = body.teacher.build()
    except PlannerError as exc:
        raise problem_from_planner_error(exc, "teacher") from None
    try:
        student = body.student.build(parent=teacher)
    except PlannerError as exc:
        raise problem_from_planner_error(exc, "student") from None
    if teacher.kind == "network" or student.kind == "network":
        return _network_sequences(teacher, student)
    m = membership(teacher, student)
    if not m.member:
        raise Problem(
            422,
            "not-in-lattice",
            "Student not in the teacher's lattice",
            m.reason or "",
            field="student",
            member=False,
        )
    count, note = None, None
    try:
        count = count_sequences(teacher, student, settings.max_count_states)
    except TooLarge as exc:
        note = exc.reason
    # every sequence has at most this many steps: bound the answer's size
    longest = sum(teacher.widths) - sum(student.widths) + teacher.T
    limit = min(body.limit, settings.max_sequence_steps // max(longest, 1))
    if limit < body.limit:
        note = (note + "; " if note else "") + f"sequences truncated to {limit} (answer size)"
    seqs = enumerate_sequences(teacher, student, limit)
    return {
        "member": True,
        "count": count,
        "count_note": note,
        "sequences": [[{"op": k, "layer": t} for k, t in s] for s in seqs],
    }


def _network_sequences(teacher, student) -> dict:
    """A network's membership, with its reason when not; its step sequences are not
    counted (each channel of each space, interleaved with the blocks: far too many to
    list, and no cheap count is implemented yet), so ``count`` is null and says why."""
    try:
        if teacher.kind != "network":
            raise NotInLattice("the student is a network but the teacher is not", field="student")
        routes = network_routes(teacher, student)
    except NotInLattice as exc:
        raise Problem(
            422,
            "not-in-lattice",
            "Student not in the teacher's lattice",
            exc.reason,
            field="student",
            member=False,
        ) from None
    removed = "; ".join(r.describe() for r in routes[:8])
    return {
        "member": True,
        "count": None,
        "count_note": (
            f"{len(routes)} way(s) to match the student's stages ({removed}); the sequences "
            "of φ on channels and ψ on blocks and layers are not counted for networks (one "
            "sequence per order of every channel removed: too many to list)"
        ),
        "sequences": [],
    }
