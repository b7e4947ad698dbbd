"""Request and response models, one family per resource (SPEC §9)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from planner import Structure

__all__ = [
    "PlanCreate",
    "PlanPublic",
    "PriorPublic",
    "PriorStatus",
    "SequencesRequest",
    "SequencesResponse",
    "StructureIn",
    "StructurePublic",
    "TeacherPublic",
    "TeacherSpec",
    "structure_json",
]

MAX_POSITIONS = 256
MAX_WIDTH = 1 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StructureIn(_Strict):
    """A structure; fields left out are inherited (a student) or defaulted (a teacher)."""

    widths: list[int] = Field(min_length=1, max_length=MAX_POSITIONS)
    activation: str | list[str] | None = None
    output_activation: str | None = None
    bias: bool | None = None
    kind: Literal["mlp", "rnn"] | None = None

    def build(self, parent: Structure | None = None) -> Structure:
        """The structure, inheriting unset fields from ``parent`` or the SPEC defaults."""
        for w in self.widths:
            if w > MAX_WIDTH:
                from planner import InvalidStructure

                raise InvalidStructure(f"widths above {MAX_WIDTH} are not served", field="widths")
        if parent is None:
            return Structure.build(
                self.widths,
                "relu" if self.activation is None else self.activation,
                self.output_activation or "identity",
                bool(self.bias),
                self.kind or "mlp",
            )
        s = parent.inherit(self.widths, self.activation, self.output_activation)
        if self.bias is not None or self.kind is not None:
            s = Structure(
                s.widths,
                s.activations,
                s.bias if self.bias is None else self.bias,
                s.kind if self.kind is None else self.kind,
            )
        return s


class StructurePublic(BaseModel):
    kind: str
    widths: list[int]
    activation: str | list[str]
    output_activation: str
    bias: bool
    n_params: int


def structure_json(s: Structure) -> dict[str, Any]:
    act = s.hidden_activation
    return StructurePublic(
        kind=s.kind,
        widths=list(s.widths),
        activation=act if isinstance(act, str) else list(act),
        output_activation=s.output_activation,
        bias=s.bias,
        n_params=s.n_params,
    ).model_dump()


class PosteriorSpec(_Strict):
    format: str


class TeacherSpec(_Strict):
    """The ``spec`` part of a teacher upload."""

    name: str = Field(min_length=1, max_length=200)
    structure: StructureIn
    posterior: PosteriorSpec


class ArrayInfo(BaseModel):
    shape: list[int]
    dtype: str
    bytes: int
    sha256: str


class TeacherPublic(BaseModel):
    id: str
    name: str
    structure: StructurePublic
    posterior: dict[str, Any]
    arrays: dict[str, ArrayInfo]
    created: float


class SequencesRequest(_Strict):
    teacher: StructureIn
    student: StructureIn
    limit: int = Field(100, ge=0, le=10_000)


class SequencesResponse(BaseModel):
    member: bool
    reason: str | None = None
    count: int | None
    count_note: str | None = None
    sequences: list[list[dict[str, Any]]]


class PlanCreate(_Strict):
    student: StructureIn
    criterion: str = "posterior_ratio"
    seed: int = Field(0, ge=0, le=2**63 - 1)
    ops: list[dict[str, Any]] | None = Field(None, max_length=10_000_000)


class PlanPublic(BaseModel):
    id: str
    teacher: str
    student: StructurePublic
    criterion: str | None
    seed: int | None
    ops: list[dict[str, Any]]
    cost: float
    conditioned: int
    provenance: list[dict[str, Any]]
    search: dict[str, Any] | None
    created: float


PriorStatus = Literal["queued", "running", "done", "failed"]


class PriorPublic(BaseModel):
    id: str
    plan: str
    status: PriorStatus
    student: StructurePublic
    posterior: dict[str, Any]
    cost: float | None
    arrays: dict[str, ArrayInfo]
    problem: dict[str, Any] | None
    created: float
    started: float | None
    finished: float | None
