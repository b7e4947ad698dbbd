"""``/v1/structures``: the lattice 𝔖_f (docs/theory.md §5)."""

from __future__ import annotations

from fastapi import APIRouter

from planner import NotInLattice, PlannerError, TooLarge
from planner.lattice import count_sequences, enumerate_sequences, membership
from planner.network_lattice import (
    count_network_sequences,
    enumerate_network_sequences,
    network_routes,
)

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
        return _network_sequences(teacher, student, settings, body.limit)
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


def _network_sequences(teacher, student, settings, limit: int) -> dict:
    """A network's membership, with its reason when not; its structure-level sequences (φ on
    a space, ψ on a block or a layer, in the teacher's numbering) counted when at most
    ``max_count_states`` states must be visited (else ``count`` is null and says why), and
    up to ``limit`` of them."""
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
    count, note = None, None
    try:
        count = count_network_sequences(teacher, student, settings.max_count_states)
    except TooLarge as exc:
        note = exc.reason
    ways = "; ".join(r.describe() for r in routes[:8])
    note = f"{len(routes)} way(s) to match the student's stages ({ways})" + (
        f"; {note}" if note else ""
    )
    g = teacher.graph
    longest = sum(g.widths) + len(g.blocks) + len(g.units)
    cap = min(limit, settings.max_sequence_steps // max(longest, 1))
    if cap < limit:
        note += f"; sequences truncated to {cap} (answer size)"
    kinds = {"phi": ("phi", "space"), "block": ("psi", "block"), "layer": ("psi", "layer")}
    seqs = enumerate_network_sequences(teacher, student, cap)
    return {
        "member": True,
        "count": count,
        "count_note": note,
        "sequences": [[{"op": kinds[k][0], kinds[k][1]: x} for k, x in seq] for seq in seqs],
    }
