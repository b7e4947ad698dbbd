"""``/v1/structures``: the lattice 𝔖_f (docs/theory.md §5)."""

from __future__ import annotations

from fastapi import APIRouter

from planner import PlannerError, TooLarge
from planner.lattice import count_sequences, enumerate_sequences, membership

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
