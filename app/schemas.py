"""Request and response models, one family per resource (docs/service.md)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, field_validator

from planner import FORMATS, Structure
from planner.criteria import CRITERIA
from planner.structure import ACTIVATIONS

__all__ = [
    "PlanCreate",
    "PlanJobPublic",
    "PlanPage",
    "PlanPublic",
    "PlanSteps",
    "PriorPage",
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
#: The largest integer every JSON parser reads exactly (seeds are at most this).
JSON_INT = 2**53 - 1

Activation = Literal[
    "identity", "relu", "relu6", "hardtanh", "step", "sigmoid", "tanh", "gelu", "leaky_relu"
]
Format = Literal["full", "diag", "lowrank", "kron", "precision"]
CriterionName = Literal["posterior_ratio", "obd", "belsley", "gradient_covariance", "random"]


def _integral(v: Any) -> Any:
    """A JSON number with no fractional part is an integer (JSON Schema says so: ``93.0``
    is an ``integer``); booleans, strings and fractions stay refused."""
    if isinstance(v, float) and v.is_integer() and abs(v) <= JSON_INT:
        return int(v)
    return v


# (the bounds before the validator: pydantic then writes them as minimum/maximum)
Width = Annotated[StrictInt, Field(ge=1, le=MAX_WIDTH), BeforeValidator(_integral)]
Index = Annotated[StrictInt, Field(ge=0, lt=MAX_WIDTH), BeforeValidator(_integral)]
Layer = Annotated[StrictInt, Field(ge=2, le=MAX_POSITIONS), BeforeValidator(_integral)]
# the request schema says exactly what the core accepts
assert set(get_args(Activation)) == ACTIVATIONS
assert set(get_args(Format)) == set(FORMATS)
assert set(get_args(CriterionName)) == set(CRITERIA)


class _Strict(BaseModel):
    """A request: unknown fields and lax coercions (``0`` for ``false``, ``"1"`` for ``1``)
    are refused, so the schema says exactly what is accepted."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StructureIn(_Strict):
    """A structure; fields left out are inherited (a student) or defaulted (a teacher)."""

    widths: list[Width] = Field(min_length=3, max_length=MAX_POSITIONS)
    activation: Activation | list[Activation] | None = None
    output_activation: Activation | None = None
    bias: bool | None = None
    kind: Literal["mlp", "rnn"] | None = None

    def build(self, parent: Structure | None = None) -> Structure:
        """The structure, inheriting unset fields from ``parent`` or the defaults
        (``docs/service.md``)."""
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


#: Names are printable: no C0 or C1 control characters (stored and echoed in pages).
_PRINTABLE = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
_CONTROL = re.compile("[\\u0000-\\u001f\\u007f-\\u009f]")


class PosteriorSpec(_Strict):
    format: Format


class TeacherSpec(_Strict):
    """The ``spec`` part of a teacher upload."""

    name: str = Field(
        min_length=1,
        max_length=200,
        description="a label for people: printable text, no control characters",
        json_schema_extra={"pattern": _PRINTABLE},
    )
    structure: StructureIn
    posterior: PosteriorSpec

    @field_validator("name")
    @classmethod
    def _printable(cls, v: str) -> str:
        bad = next((c for c in v if _CONTROL.match(c)), None)
        if bad is not None:
            raise ValueError(
                f"must not contain control characters; found U+{ord(bad):04X} at position "
                f"{v.index(bad)}: remove it"
            )
        return v


class ArrayInfo(BaseModel):
    shape: list[int]
    dtype: str
    bytes: int
    sha256: str
    #: a covariance or precision as uploaded: max|A − Aᵀ| / max|A| before symmetrising
    asymmetry: float | None = None


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
    limit: Annotated[StrictInt, Field(ge=0, le=1_000), BeforeValidator(_integral)] = 100


class SequencesResponse(BaseModel):
    member: bool
    reason: str | None = None
    count: int | None
    count_note: str | None = None
    sequences: list[list[dict[str, Any]]]


class PhiOp(_Strict):
    """φ(layer, neuron): remove neuron ``neuron`` (0-based, current order) of hidden
    position ``layer``."""

    op: Literal["phi"]
    layer: Layer
    neuron: Index


class PsiOp(_Strict):
    """ψ(layer, π): remove square layer ``layer``; ``pairing[k] = π(k)``, identity if absent."""

    op: Literal["psi"]
    layer: Layer
    pairing: list[Index] | None = Field(None, max_length=MAX_WIDTH)


Op = Annotated[PhiOp | PsiOp, Field(discriminator="op")]


class PlanCreate(_Strict):
    student: StructureIn
    criterion: CriterionName = "posterior_ratio"
    seed: Annotated[StrictInt, Field(ge=0, le=JSON_INT), BeforeValidator(_integral)] = 0
    ops: list[Op] | None = Field(None, max_length=10_000_000)
    seconds: float | None = Field(
        None,
        gt=0,
        le=86_400,
        description="this request's deadline for the search, at most the service's "
        "PLANNER_PLAN_SECONDS: when it cuts the search after a first plan, the best plan "
        "found comes back marked search.cut (search.cut_by says which bound); before a "
        "first plan, the answer is a 503 deadline-exceeded problem",
    )
    #: ``fast`` (default): plan time within about 3 one-shot conditionings of the plan's
    #: own B; ``thorough``: a fixed floor of improvement work (lower costs on small B)
    effort: Literal["fast", "thorough"] = "fast"

    def ops_json(self) -> list[dict[str, Any]] | None:
        return None if self.ops is None else [o.model_dump(exclude_none=True) for o in self.ops]


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


class StepCost(BaseModel):
    #: index of the run's first op in ``ops``, how many ops it has, its kind
    first: int
    count: int
    op: Literal["phi", "psi"]
    #: its layer in the structure current at that step, and the teacher position
    layer: int
    teacher_position: int
    #: the exact cost the run adds
    cost: float


class PlanSteps(BaseModel):
    plan: str
    cost: float
    steps: list[StepCost] | None
    note: str | None = None


class PlanPage(BaseModel):
    """One page of a teacher's plans, oldest first; ``next`` is the next page's URL."""

    items: list[PlanPublic]
    next: str | None


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


class PriorPage(BaseModel):
    """One page of the priors of a teacher's plans, oldest first."""

    items: list[PriorPublic]
    next: str | None


PlanJobStatus = Literal["queued", "running", "done", "failed", "cancelled"]


class PlanJobPublic(BaseModel):
    """A plan computed as a job (``Prefer: respond-async``)."""

    id: str
    teacher: str
    status: PlanJobStatus
    student: StructurePublic
    criterion: str
    seconds: float
    effort: str
    #: the plan's id once the job is done
    plan: str | None
    problem: dict[str, Any] | None
    #: how many times a worker took it (more than one: a worker was lost)
    attempts: int
    created: float
    started: float | None
    finished: float | None
