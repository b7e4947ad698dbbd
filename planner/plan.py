"""Plans: a sequence of φ/ψ compiled to one joint conditioning (docs/theory.md §4).

Applying a plan step by step is the definition.  Equivalently the plan fixes a
set ``B`` of teacher parameters with targets ``v`` and the set ``a`` of
parameters that survive into the student; the aligned prior is the teacher's
posterior conditioned jointly on ``B = v``, restricted to ``a`` in the
student's layout.  :meth:`Plan.compile` computes ``B``, ``v`` and ``a`` by index
bookkeeping alone; :meth:`Plan.apply` does the Gaussian arithmetic once.

Examples
--------
>>> import numpy as np
>>> from planner import Structure, FullPosterior, Plan, Phi
>>> teacher = Structure.mlp((2, 3, 1))
>>> post = FullPosterior.from_dense(teacher, np.zeros(9), np.eye(9))
>>> plan = Plan(teacher, (Phi(2, 0),))
>>> plan.student.widths, plan.apply(post).n
((2, 2, 1), 6)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .errors import InvalidOperation, InvalidPlan
from .ops import Effect, Event, Op, Phi, PhiSpace, Psi, PsiBlock, Tracked
from .posterior import Posterior
from .stages import Network
from .structure import Structure

__all__ = ["CompiledPlan", "Plan", "Provenance", "op_from_json", "step_costs"]


@dataclass(frozen=True)
class Provenance:
    """Where the neurons of one student position come from."""

    position: int  # student position (1-based)
    teacher_position: int
    teacher_neurons: tuple[int, ...]
    network: bool = False  # a network's spaces and channels (docs/theory.md §13)

    def to_json(self) -> dict:
        if self.network:
            return {
                "space": self.position,
                "teacher_space": self.teacher_position,
                "teacher_channels": list(self.teacher_neurons),
            }
        return {
            "position": self.position,
            "teacher_position": self.teacher_position,
            "teacher_neurons": list(self.teacher_neurons),
        }


class CompiledPlan:
    """A plan as index sets: condition ``conditioned = targets``, keep ``kept``.

    ``kept[j]`` is the teacher index of the student's parameter j; every
    teacher index is in exactly one of ``conditioned``, ``marginalised``, ``kept``.
    Every set is gathered on first use (``n_conditioned`` counts B without it):
    structured formats score and align a plan from its ``events`` alone.
    """

    def __init__(
        self,
        teacher: Structure | Network,
        ops: Sequence[Op],
        applied: tuple[Tracked, Sequence[Effect]] | None = None,
    ) -> None:
        """Compile ``ops``; or take ``applied``, the state and effects of having applied
        exactly these ops already (the search builds plans that way)."""
        self.teacher = teacher
        #: the operations, in order
        self.ops: tuple[Op, ...] = tuple(ops)
        if applied is None:
            self._state = Tracked.start(teacher)
            effects = [eff for _, eff in _effects(self._state, self.ops)]
        else:
            self._state, effects = applied[0], list(applied[1])
        self._effects = effects
        #: the plan's steps in teacher-layer terms, in order (see ``ops.Event``)
        self.events: tuple[Event, ...] = tuple(ev for eff in effects for ev in eff.events)
        self.student: Structure = self._state.structure
        #: |B|, the number of conditioned parameters
        self.n_conditioned = sum(int(eff.conditioned.size) for eff in effects)

    @cached_property
    def conditioned(self) -> np.ndarray:
        """B: the conditioned teacher parameters, step by step."""
        return np.concatenate(
            [np.zeros(0, dtype=np.int64), *(e.conditioned for e in self._effects)]
        )

    @cached_property
    def targets(self) -> np.ndarray:
        """v: the values B is conditioned on."""
        return np.concatenate([np.zeros(0), *(e.targets for e in self._effects)])

    @cached_property
    def kept(self) -> np.ndarray:
        return self._state.kept()

    @cached_property
    def student_layers(self) -> tuple[tuple[int, np.ndarray, np.ndarray], ...]:
        """For each student layer 2..T': (teacher layer, teacher row ids, teacher col ids)."""
        return tuple((lay.src, lay.rows, lay.cols) for lay in self._state.layers)

    @cached_property
    def provenance(self) -> tuple[Provenance, ...]:
        tr = self._state
        return tuple(
            Provenance(j + 1, tr.positions[j], tuple(int(x) for x in tr.neurons[j]), tr.is_network)
            for j in range(len(tr.positions))
        )

    @cached_property
    def surviving(self) -> dict:
        """A network's teacher layers and residual blocks that survive (docs/theory.md §13)."""
        g, gone = self.teacher.graph, self._state.gone
        return {
            "layers": [u.layer for u in g.units if u.index not in gone],
            "blocks": [b.number for b in g.blocks if b.branch[0] not in gone],
        }

    @cached_property
    def marginalised(self) -> np.ndarray:
        """Replays the plan, collecting what each step marginalises."""
        parts = [np.zeros(0, dtype=np.int64)]
        parts += [
            eff.marginalised for _, eff in _effects(Tracked.start(self.teacher, True), self.ops)
        ]
        return np.concatenate(parts)


def _effects(tr: Tracked, ops: tuple[Op, ...]):
    """Apply ``ops`` to ``tr`` run by run, yielding (index, effect); name a failing step."""
    for k, run in _runs(ops):
        op = run[0]
        try:
            if isinstance(op, Phi):
                eff = tr.apply_phis(op.layer, [o.neuron for o in run])
            elif isinstance(op, PhiSpace):
                eff = tr.apply_channels(op.space, [o.channel for o in run])
            else:
                eff = tr.apply(op)
        except InvalidOperation as exc:
            bad = k + _failing_step(tr.teacher, ops, k, len(run))
            field = f"ops[{bad}].{exc.field}" if exc.field else f"ops[{bad}]"
            raise InvalidOperation(
                f"step {bad} ({_label(ops[bad])}): {exc.reason}", field=field
            ) from None
        yield k, eff


def _index(d: Mapping, key: str) -> int:
    """An integer field of an operation: bools, floats and strings are refused, not cast."""
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | np.integer):
        raise InvalidOperation(f"{key} must be an integer; got {v!r}", field=key)
    return int(v)


def op_from_json(d: Mapping) -> Op:
    """``{"op": "phi", "layer", "neuron"}`` or ``{"op": "psi", "layer", "pairing"?}`` (MLP,
    RNN); for a network ``{"op": "phi", "space", "channel"}``, ``{"op": "psi", "block"}``
    and ``{"op": "psi", "layer", "pairing"?}`` (docs/theory.md §13)."""
    kind = d.get("op") if isinstance(d, Mapping) else None
    try:
        if kind == "phi" and "space" in d:
            return PhiSpace(_index(d, "space"), _index(d, "channel"))
        if kind == "phi":
            return Phi(_index(d, "layer"), _index(d, "neuron"))
        if kind == "psi" and "block" in d:
            return PsiBlock(_index(d, "block"))
        if kind == "psi":
            pairing = d.get("pairing")
            if pairing is None:
                return Psi(_index(d, "layer"), None)
            if not isinstance(pairing, list | tuple | np.ndarray):
                raise InvalidOperation(f"pairing must be a list; got {pairing!r}", field="pairing")
            return Psi(
                _index(d, "layer"), tuple(_index({"pairing": x}, "pairing") for x in pairing)
            )
    except KeyError as exc:
        raise InvalidOperation(f"{kind} operation without {exc}", field=str(exc.args[0])) from None
    raise InvalidOperation(f"unknown operation {kind!r}; expected 'phi' or 'psi'", field="op")


@dataclass(frozen=True)
class Plan:
    """A sequence of operations on ``teacher``, validated at construction.

    Raises
    ------
    InvalidOperation
        If a step breaks a rule of docs/theory.md §3; ``field`` names the step (``ops[k]``).
    """

    teacher: Structure | Network
    ops: tuple[Op, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        _ = self.compiled  # validates every step

    @classmethod
    def from_compiled(cls, compiled: CompiledPlan) -> Plan:
        """The plan of a compilation (its ops were validated when they were applied)."""
        plan = object.__new__(cls)
        object.__setattr__(plan, "teacher", compiled.teacher)
        object.__setattr__(plan, "ops", compiled.ops)
        plan.__dict__["compiled"] = compiled
        return plan

    @classmethod
    def from_json(cls, teacher: Structure | Network, ops: Iterable[Mapping]) -> Plan:
        parsed = []
        for k, d in enumerate(ops):
            try:
                parsed.append(op_from_json(d))
            except InvalidOperation as exc:
                field = f"ops[{k}].{exc.field}" if exc.field else f"ops[{k}]"
                raise InvalidOperation(f"step {k}: {exc.reason}", field=field) from None
        return cls(teacher, tuple(parsed))

    def to_json(self) -> list[dict]:
        return [op.to_json() for op in self.ops]

    @cached_property
    def compiled(self) -> CompiledPlan:
        """B, v, the kept set in student order and the provenance of student neurons."""
        return CompiledPlan(self.teacher, self.ops)

    @property
    def student(self) -> Structure:
        return self.compiled.student

    def apply(self, posterior: Posterior) -> Posterior:
        """The aligned prior: one joint conditioning of ``posterior`` (docs/theory.md §4)."""
        self._check_posterior(posterior)
        return posterior.align(self.compiled)

    def cost(self, posterior: Posterior) -> float:
        """``½ (v − m_B)ᵀ Σ_BB⁻¹ (v − m_B)``, the plan's Mahalanobis cost (docs/theory.md §4)."""
        self._check_posterior(posterior)
        return posterior.plan_cost(self.compiled)

    def _check_posterior(self, posterior: Posterior) -> None:
        if posterior.n != self.teacher.n_params:
            raise InvalidPlan(
                f"posterior has {posterior.n} parameters; the plan's teacher has "
                f"{self.teacher.n_params}",
                field="posterior",
            )


def _runs(ops: Sequence[Op]):
    """Yield (index of first op, run) for maximal runs of φ at one layer, and single ψ."""
    k = 0
    while k < len(ops):
        op = ops[k]
        end = k + 1
        if isinstance(op, Phi):
            while end < len(ops) and isinstance(ops[end], Phi) and ops[end].layer == op.layer:
                end += 1
        elif isinstance(op, PhiSpace):
            while end < len(ops) and isinstance(ops[end], PhiSpace) and ops[end].space == op.space:
                end += 1
        yield k, ops[k:end]
        k = end


def _failing_step(teacher: Structure | Network, ops: Sequence[Op], first: int, length: int) -> int:
    """Offset, inside a failing run, of the step that breaks a rule (replayed one by one)."""
    tr = Tracked.start(teacher)
    for op in ops[:first]:
        tr.apply(op)
    for off in range(length):
        try:
            tr.apply(ops[first + off])
        except InvalidOperation:
            return off
    return 0  # pragma: no cover - the run failed, so one step does


def _label(op: Op) -> str:
    if isinstance(op, Phi):
        return f"φ({op.layer}, {op.neuron})"
    if isinstance(op, PhiSpace):
        return f"φ(space {op.space}, {op.channel})"
    if isinstance(op, PsiBlock):
        return f"ψ(block {op.block})"
    return f"ψ({op.layer})" if op.pairing is None else f"ψ({op.layer}, π)"


#: Step costs are reported per run when a plan has at most this many runs (each run
#: costs one exact evaluation of a prefix plan).
MAX_COST_RUNS = 64


def step_costs(plan: Plan, posterior: Posterior) -> list[dict] | None:
    """The cost each run of the plan adds (docs/theory.md §4: a plan's cost is the sum of its
    steps' costs, by the chain rule), as exact differences of prefix-plan costs.

    A run is a maximal sequence of φ at one layer, or one ψ. Each entry names the run's
    first op, its op count and kind, its layer in the current structure and the
    teacher position it acts on, and ``cost``; the costs sum to the plan's cost.
    ``None`` when the plan has more than :data:`MAX_COST_RUNS` runs (the page then
    shows the total only).
    """
    runs = list(_runs(plan.ops))
    if len(runs) > MAX_COST_RUNS:
        return None
    network = plan.teacher.kind == "network"
    alive = [] if network else list(range(1, plan.teacher.T + 1))  # teacher positions
    out, before = [], 0.0
    for k, run in runs:
        op = run[0]
        prefix = Plan.from_compiled(CompiledPlan(plan.teacher, plan.ops[: k + len(run)]))
        total = posterior.plan_cost(prefix.compiled)
        entry = {"first": k, "count": len(run), "op": op.to_json()["op"]}
        if network:  # a network's ops name teacher spaces, blocks and layers already
            entry.update({key: v for key, v in op.to_json().items() if key in _WHERE})
        else:
            entry.update(layer=op.layer, teacher_position=alive[op.layer - 1])
            if isinstance(op, Psi):
                alive.pop(op.layer - 1)
        entry["cost"] = float(total - before)
        out.append(entry)
        before = total
    return out


_WHERE = ("space", "block", "layer")
