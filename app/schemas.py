"""Request and response models, one family per resource (docs/service.md)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    Tag,
    field_validator,
    model_validator,
)

from planner import FORMATS, InvalidStructure, Network, Structure
from planner.criteria import CRITERIA
from planner.structure import ACTIVATIONS

__all__ = [
    "AnyStructureIn",
    "NetworkIn",
    "NetworkPublic",
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
MAX_STAGES = 512
MAX_KERNEL = 1024
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
    """An MLP or Elman RNN; fields left out are inherited (a student) or defaulted (a
    teacher)."""

    widths: list[Width] = Field(min_length=3, max_length=MAX_POSITIONS)
    activation: Activation | list[Activation] | None = None
    output_activation: Activation | None = None
    bias: bool | None = None
    kind: Literal["mlp", "rnn"] | None = None

    def build(self, parent: Structure | Network | None = None) -> Structure:
        """The structure, inheriting unset fields from ``parent`` or the defaults
        (``docs/service.md``)."""
        for w in self.widths:
            if w > MAX_WIDTH:
                raise InvalidStructure(f"widths above {MAX_WIDTH} are not served", field="widths")
        if parent is not None and parent.kind == "network":
            raise InvalidStructure(
                'the teacher is a network: give the student as {"input": [...], "stages": '
                "[...]} (docs/service.md)",
                field="stages",
            )
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


# -- convolutional and residual networks (docs/theory.md §13) --------------------------------
Size = Annotated[StrictInt, Field(ge=1, le=MAX_KERNEL), BeforeValidator(_integral)]
Pad = Annotated[StrictInt, Field(ge=0, le=MAX_KERNEL), BeforeValidator(_integral)]
SizePair = Size | Annotated[list[Size], Field(min_length=2, max_length=2)]
PadPair = Pad | Annotated[list[Pad], Field(min_length=2, max_length=2)]


class ConvIn(_Strict):
    """A ``Conv2d`` (groups 1, dilation 1) and its activation; ``in`` is the channels it
    reads."""

    type: Literal["conv"]
    out: Width
    kernel: SizePair = 3
    stride: SizePair = 1
    padding: PadPair = 0
    bias: bool = True
    activation: Activation = "identity"


class LinearIn(_Strict):
    """A ``Linear`` layer and its activation."""

    type: Literal["linear"]
    out: Width
    bias: bool = True
    activation: Activation = "identity"


class PoolIn(_Strict):
    """Max or average pooling; ``global: true`` is the global average (``AdaptiveAvgPool2d(1)``)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    type: Literal["pool"]
    mode: Literal["max", "avg"] | None = None
    kernel: SizePair | None = None
    stride: SizePair | None = None
    padding: PadPair | None = None
    glob: bool | None = Field(None, alias="global")


class FlattenIn(_Strict):
    """``(C, H, W)`` to ``C·H·W`` features, channel-major."""

    type: Literal["flatten"]


LayerIn = Annotated[ConvIn | LinearIn, Field(discriminator="type")]


class ResidualIn(_Strict):
    """``y = activation(shortcut(x) + branch(x))``; no ``shortcut``: the identity."""

    type: Literal["residual"]
    branch: list[LayerIn] = Field(min_length=1, max_length=64)
    shortcut: LayerIn | None = None
    activation: Activation = "identity"


StageIn = Annotated[
    ConvIn | LinearIn | PoolIn | FlattenIn | ResidualIn, Field(discriminator="type")
]


class NetworkIn(_Strict):
    """A convolutional or residual network: its input shape and its stages (docs/service.md)."""

    input: list[Width] = Field(min_length=1, max_length=3)
    stages: list[StageIn] = Field(min_length=1, max_length=MAX_STAGES)

    def build(self, parent: Structure | Network | None = None) -> Network:
        return Network.from_json(self.model_dump(by_alias=True, exclude_none=True))


def _structure_kind(v: Any) -> str:
    return "network" if isinstance(v, dict) and ("stages" in v or "input" in v) else "mlp"


#: A structure: an MLP or RNN (``widths``), or a network (``input`` and ``stages``).
AnyStructureIn = Annotated[
    Annotated[StructureIn, Tag("mlp")] | Annotated[NetworkIn, Tag("network")],
    Discriminator(_structure_kind),
]


class StructurePublic(BaseModel):
    kind: Literal["mlp", "rnn"]
    widths: list[int]
    activation: str | list[str]
    output_activation: str
    bias: bool
    n_params: int


class NetworkPublic(BaseModel):
    kind: Literal["network"]
    input: list[int]
    stages: list[dict[str, Any]]
    n_params: int


AnyStructurePublic = StructurePublic | NetworkPublic


def structure_json(s: Structure | Network) -> dict[str, Any]:
    if isinstance(s, Network):
        d = s.to_json()
        return NetworkPublic(
            kind="network", input=d["input"], stages=d["stages"], n_params=s.n_params
        ).model_dump()
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
    structure: AnyStructureIn
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
    structure: AnyStructurePublic
    posterior: dict[str, Any]
    arrays: dict[str, ArrayInfo]
    created: float


class SequencesRequest(_Strict):
    teacher: AnyStructureIn
    student: AnyStructureIn
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
    """ψ(layer, π): remove square layer ``layer`` (an MLP's position 2.., a network's layer
    1..); ``pairing[k] = π(k)``, identity if absent."""

    op: Literal["psi"]
    layer: Annotated[StrictInt, Field(ge=1, le=1 << 16), BeforeValidator(_integral)]
    pairing: list[Index] | None = Field(None, max_length=MAX_WIDTH)


class ChannelOp(_Strict):
    """φ(space, channel) on a network: remove channel ``channel`` (0-based, current order)
    of space ``space`` (the teacher's numbering, docs/theory.md §13)."""

    op: Literal["phi"]
    space: Annotated[StrictInt, Field(ge=1, le=1 << 16), BeforeValidator(_integral)]
    channel: Index


class BlockOp(_Strict):
    """ψ(block) on a network: remove residual block ``block`` (1-based, layout order)."""

    op: Literal["psi"]
    block: Annotated[StrictInt, Field(ge=1, le=1 << 16), BeforeValidator(_integral)]


def _op_kind(v: Any) -> str | None:
    """The op's branch: by ``op``, then by its fields (a network's ``space``/``channel`` φ,
    its ``block`` ψ); ``None`` (refused at the op itself) for an unknown ``op``."""
    if not isinstance(v, dict) or v.get("op") not in ("phi", "psi"):
        return None
    if v["op"] == "psi":
        return "block" if "block" in v else "psi"
    return "channel" if "space" in v or "channel" in v else "phi"


#: An MLP's or RNN's φ(layer, neuron) and ψ(layer, π), a network's φ(space, channel) and
#: ψ(block); a network's ψ(layer, π) is written as an MLP's ψ, its layer numbered 1, 2, …
Op = Annotated[
    Annotated[PhiOp, Tag("phi")]
    | Annotated[PsiOp, Tag("psi")]
    | Annotated[ChannelOp, Tag("channel")]
    | Annotated[BlockOp, Tag("block")],
    Discriminator(
        _op_kind,
        custom_error_type="invalid_op",
        custom_error_message="op must be 'phi' or 'psi'",
    ),
]


class BudgetIn(_Strict):
    """A student by budget (docs/theory.md §11): at most ``max_params`` parameters, or
    ``keep`` (a fraction of the teacher's); ``floors`` maps a teacher space (an MLP's
    position) to the fewest channels it keeps. The planner chooses the widths (and a
    network's residual blocks) of least exact cost within it."""

    max_params: (
        Annotated[StrictInt, Field(ge=1, le=JSON_INT), BeforeValidator(_integral)] | None
    ) = None
    keep: float | None = Field(None, gt=0, le=1)
    floors: dict[Annotated[str, Field(pattern="^[1-9][0-9]{0,5}$")], Width] | None = None

    @model_validator(mode="after")
    def _one(self) -> BudgetIn:
        if (self.max_params is None) == (self.keep is None):
            raise ValueError("give exactly one of max_params and keep")
        return self

    def request(self) -> dict[str, Any]:
        return {
            "max_params": self.max_params,
            "keep": self.keep,
            "floors": {int(k): v for k, v in (self.floors or {}).items()},
        }


class PlanCreate(_Strict):
    #: the student; or give ``budget`` and the planner chooses it
    student: AnyStructureIn | None = None
    budget: BudgetIn | None = None
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
    effort: Literal["fast", "thorough"] = Field(
        "fast",
        description="`fast` (default): a plan in about 3 one-shot conditionings of its own B; "
        "`thorough`: at least 3·10¹⁰ flops of improvement as well (the global greedy's sets "
        "and exchange rounds), for lower costs where B is small: up to about 30 one-shots "
        "there, about a second on a 6,201-parameter teacher",
    )

    def ops_json(self) -> list[dict[str, Any]] | None:
        return None if self.ops is None else [o.model_dump(exclude_none=True) for o in self.ops]


class PlanPublic(BaseModel):
    id: str
    teacher: str
    student: AnyStructurePublic
    criterion: str | None
    seed: int | None
    ops: list[dict[str, Any]]
    cost: float
    conditioned: int
    #: per student position (space): the teacher position (space) and the teacher neurons
    #: (channels) it keeps, in student order
    provenance: list[dict[str, Any]]
    #: a network's plan: the teacher layers and residual blocks that survive (docs/theory.md
    #: §13); absent for MLPs and RNNs
    surviving: dict[str, list[int]] | None = None
    search: dict[str, Any] | None
    created: float


class StepCost(BaseModel):
    #: index of the run's first op in ``ops``, how many ops it has, its kind
    first: int
    count: int
    op: Literal["phi", "psi"]
    #: an MLP's or RNN's run: its layer in the structure current at that step, and the
    #: teacher position; a network's: the teacher space, block or layer it acts on
    layer: int | None = None
    teacher_position: int | None = None
    space: int | None = None
    block: int | None = None
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
    student: AnyStructurePublic
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
    #: the student asked for (null for a plan by budget: the plan says which it chose)
    student: AnyStructurePublic | None
    budget: dict[str, Any] | None = None
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
