"""Plans: a sequence of φ/ψ compiled to one joint conditioning (SPEC §4).

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
from .ops import Op, Phi, Psi, Tracked
from .posterior import Posterior
from .structure import Structure

__all__ = ["CompiledPlan", "Plan", "Provenance", "op_from_json"]


@dataclass(frozen=True)
class Provenance:
    """Where the neurons of one student position come from."""

    position: int  # student position (1-based)
    teacher_position: int
    teacher_neurons: tuple[int, ...]

    def to_json(self) -> dict:
        return {
            "position": self.position,
            "teacher_position": self.teacher_position,
            "teacher_neurons": list(self.teacher_neurons),
        }


@dataclass(frozen=True)
class CompiledPlan:
    """A plan as index sets: condition ``conditioned = targets``, keep ``kept``.

    ``kept[j]`` is the teacher index of the student's parameter j; every
    teacher index is in exactly one of ``conditioned``, ``marginalised``, ``kept``.
    """

    teacher: Structure
    student: Structure
    conditioned: np.ndarray
    targets: np.ndarray
    marginalised: np.ndarray
    kept: np.ndarray
    provenance: tuple[Provenance, ...]


def op_from_json(d: Mapping) -> Op:
    """``{"op": "phi", "layer", "neuron"}`` or ``{"op": "psi", "layer", "pairing"?}``."""
    kind = d.get("op")
    try:
        if kind == "phi":
            return Phi(int(d["layer"]), int(d["neuron"]))
        if kind == "psi":
            pairing = d.get("pairing")
            return Psi(int(d["layer"]), None if pairing is None else tuple(int(x) for x in pairing))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidOperation(f"malformed {kind} operation {dict(d)!r}: {exc}", field="ops")
    raise InvalidOperation(f"unknown operation {kind!r}; expected 'phi' or 'psi'", field="ops")


@dataclass(frozen=True)
class Plan:
    """A sequence of operations on ``teacher``, validated at construction.

    Raises
    ------
    InvalidOperation
        If a step breaks a rule of SPEC §3; ``field`` names the step (``ops[k]``).
    """

    teacher: Structure
    ops: tuple[Op, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        _ = self.compiled  # validates every step

    @classmethod
    def from_json(cls, teacher: Structure, ops: Iterable[Mapping]) -> Plan:
        return cls(teacher, tuple(op_from_json(d) for d in ops))

    def to_json(self) -> list[dict]:
        return [op.to_json() for op in self.ops]

    @cached_property
    def compiled(self) -> CompiledPlan:
        """B, v, the kept set in student order and the provenance of student neurons."""
        tr = Tracked.start(self.teacher)
        cond, tgt, marg = [], [], []
        for k, op in enumerate(self.ops):
            try:
                eff = tr.apply(op)
            except InvalidOperation as exc:
                field = f"ops[{k}].{exc.field}" if exc.field else f"ops[{k}]"
                raise InvalidOperation(f"step {k} ({_label(op)}): {exc.reason}", field=field)
            cond.append(eff.conditioned)
            tgt.append(eff.targets)
            marg.append(eff.marginalised)
        empty = np.zeros(0, dtype=np.int64)
        prov = tuple(
            Provenance(j + 1, tr.positions[j], tuple(int(x) for x in tr.neurons[j]))
            for j in range(tr.structure.T)
        )
        return CompiledPlan(
            teacher=self.teacher,
            student=tr.structure,
            conditioned=np.concatenate([empty, *cond]),
            targets=np.concatenate([np.zeros(0), *tgt]),
            marginalised=np.concatenate([empty, *marg]),
            kept=tr.kept(),
            provenance=prov,
        )

    @property
    def student(self) -> Structure:
        return self.compiled.student

    def apply(self, posterior: Posterior) -> Posterior:
        """The aligned prior: one joint conditioning of ``posterior`` (SPEC §4)."""
        self._check_posterior(posterior)
        c = self.compiled
        return posterior.condition(c.conditioned, c.targets, c.kept, c.student)

    def cost(self, posterior: Posterior) -> float:
        """``½ (v − m_B)ᵀ Σ_BB⁻¹ (v − m_B)``, the plan's Mahalanobis cost (SPEC §4)."""
        self._check_posterior(posterior)
        c = self.compiled
        return posterior.constraint_cost(c.conditioned, c.targets)

    def _check_posterior(self, posterior: Posterior) -> None:
        if posterior.n != self.teacher.n_params:
            raise InvalidPlan(
                f"posterior has {posterior.n} parameters; the plan's teacher has "
                f"{self.teacher.n_params}",
                field="posterior",
            )

    def labels(self) -> list[str]:
        return [_label(op) for op in self.ops]


def _label(op: Op) -> str:
    if isinstance(op, Phi):
        return f"φ({op.layer}, {op.neuron})"
    return f"ψ({op.layer})" if op.pairing is None else f"ψ({op.layer}, π)"


def structure_sequence(ops: Sequence[Op]) -> tuple[tuple[str, int], ...]:
    """The structure-level sequence of a plan: ``(("phi", t), ("psi", t), …)``."""
    return tuple(("phi" if isinstance(op, Phi) else "psi", op.layer) for op in ops)
