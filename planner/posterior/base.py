"""The Gaussian interface every posterior format implements (SPEC §3, §7).

A posterior is an immutable Gaussian ``N(m, Σ)`` over the flat parameters of a
structure.  Formats differ in how Σ is held; they agree on this interface:

* :meth:`Posterior.condition` -- condition a block ``B`` on values ``v`` and
  keep the coordinates ``keep`` (in that order), in one pass, returning a
  posterior of the same format;
* :meth:`Posterior.constraint_cost` -- ``½ (v − m_B)ᵀ Σ_BB⁻¹ (v − m_B)``;
* small-block access for criteria (:meth:`cov_block`, :meth:`variance`,
  :meth:`precision_diagonal`);
* :meth:`to_arrays` and the named constructor :meth:`from_arrays`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from ..structure import Structure

__all__ = ["Posterior"]


class Posterior(ABC):
    """A Gaussian posterior over the parameters of ``structure``."""

    format: ClassVar[str]
    #: Array names of the format besides ``mean`` (SPEC §7).
    array_names: ClassVar[tuple[str, ...]]

    def __init__(self, structure: Structure, mean: np.ndarray) -> None:
        self.structure = structure
        self.mean = mean

    @property
    def n(self) -> int:
        return self.mean.shape[0]

    @property
    def size(self) -> int:
        """How many numbers the posterior holds (a measure of the work one pass costs)."""
        return sum(int(np.asarray(a).size) for a in self.to_arrays().values())

    # -- construction -------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_arrays(
        cls, structure: Structure, arrays: Mapping[str, np.ndarray], workspace=None
    ) -> Posterior:
        """Validate the arrays of this format against ``structure`` (SPEC §7, §8).

        ``workspace``, when given, allocates the large scratch arrays validation
        needs (e.g. as disk-backed memory maps); formats without any ignore it.
        """

    @classmethod
    def names(cls, structure: Structure) -> tuple[str, ...]:
        """Every array name of this format for ``structure`` (SPEC §7)."""
        return ("mean", *cls.array_names)

    @classmethod
    def from_validated(cls, structure: Structure, arrays: Mapping[str, np.ndarray]) -> Posterior:
        """Trusted construction from arrays that passed :meth:`from_arrays` before
        (e.g. float64 files a service stored after validating them): no checks."""
        return cls(structure, arrays["mean"], *(arrays[n] for n in cls.array_names))

    @abstractmethod
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of this format, by their SPEC §7 names."""

    # -- the Gaussian operations --------------------------------------------------------
    @abstractmethod
    def condition(
        self, B: np.ndarray, values: np.ndarray, keep: np.ndarray, structure: Structure
    ) -> Posterior:
        """Condition ``x_B = values`` jointly and keep ``x_keep`` as the new parameters.

        Coordinates in neither ``B`` nor ``keep`` are marginalised.  The result
        is a posterior of the same format over ``structure``, whose parameter j
        is the old parameter ``keep[j]``.
        """

    @abstractmethod
    def constraint_cost(self, B: np.ndarray, values: np.ndarray) -> float:
        """``½ (v − m_B)ᵀ Σ_BB⁻¹ (v − m_B)`` (SPEC §4)."""

    def align(self, plan) -> Posterior:
        """The aligned posterior of a compiled plan (``planner.plan.CompiledPlan``).

        By default one joint conditioning on the plan's index sets; formats
        that keep per-layer structure override it with the plan's ``events``.
        """
        return self.condition(plan.conditioned, plan.targets, plan.kept, plan.student)

    def align_bytes(self, conditioned: int, kept: int) -> int:
        """Working memory (bytes) an alignment conditioning ``conditioned`` parameters and
        keeping ``kept`` needs, at most; dense by default (Σ_BB, Σ_Ba, Σ_aa)."""
        return 8 * (conditioned**2 + conditioned * kept + 2 * kept**2)

    def plan_cost(self, plan) -> float:
        """The plan's cost ``½ (v − m_B)ᵀ Σ_BB⁻¹ (v − m_B)``; see :meth:`align`."""
        return self.constraint_cost(plan.conditioned, plan.targets)

    # -- small-block access -------------------------------------------------------------
    @abstractmethod
    def cov_block(self, idx: np.ndarray) -> np.ndarray:
        """``Σ[idx, idx]`` as a dense array (small blocks only)."""

    @abstractmethod
    def variance(self) -> np.ndarray:
        """The diagonal of Σ."""

    @abstractmethod
    def precision_diagonal(self) -> np.ndarray:
        """The diagonal of Σ⁻¹ (the Laplace Hessian's diagonal, for OBD)."""

    def surrogate(self) -> Posterior:
        """A diagonal posterior with this one's mean and marginal variances: cheap to score,
        for ranking choices before they are rescored exactly (the search's route proxy)."""
        from .diag import DiagPosterior

        return DiagPosterior(self.structure, self.mean, np.asarray(self.variance()))

    @abstractmethod
    def dense_covariance(self) -> np.ndarray:
        """Σ as a dense matrix (for small posteriors and tests)."""

    # -- batched small-group costs (criteria and pairing) ----------------------------------
    def group_costs(self, groups: np.ndarray) -> np.ndarray:
        """``½ m_gᵀ Σ_gg⁻¹ m_g`` for each row ``g`` of ``groups`` (n × k indices).

        The cost of conditioning each group to zero on its own: the
        ``posterior_ratio`` score of SPEC §6.  Formats override this with a
        vectorised kernel; this generic one factorises one block at a time.
        """
        out = np.empty(len(groups))
        for r, g in enumerate(groups):
            L = np.linalg.cholesky(self.cov_block(g))
            z = np.linalg.solve(L, self.mean[g])
            out[r] = 0.5 * float(z @ z)
        return out

    def assignment_costs(self, rows: np.ndarray) -> np.ndarray:
        """``C[k, l] = ½ (e_l − m_r)ᵀ Σ_rr⁻¹ (e_l − m_r)`` for each row ``r = rows[k]``.

        The cost of conditioning one row of a square layer to the unit vector
        ``e_l`` (SPEC §3 ψ with ``π(k) = l``), each row on its own: the matrix
        of the linear assignment that chooses π (SPEC §6).
        """
        out = np.empty(rows.shape)
        for r, g in enumerate(rows):
            P = np.linalg.inv(self.cov_block(g))
            m = self.mean[g]
            Pm = P @ m
            out[r] = 0.5 * (m @ Pm - 2 * Pm + np.diag(P))
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.structure.describe()} p={self.n}>"
