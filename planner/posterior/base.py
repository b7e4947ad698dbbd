"""The Gaussian interface every posterior format implements (docs/theory.md §3, §7).

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
    #: Array names of the format besides ``mean`` (docs/theory.md §7).
    array_names: ClassVar[tuple[str, ...]]
    #: Whether the coordinates are independent (a plan's cost is then a sum over its
    #: conditioned parameters, which the search's exchange moves use).
    independent: ClassVar[bool] = False

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
        """Validate the arrays of this format against ``structure`` (docs/theory.md §7, §8).

        ``workspace``, when given, allocates the large scratch arrays validation
        needs (e.g. as disk-backed memory maps); formats without any ignore it.
        """

    @classmethod
    def names(cls, structure: Structure) -> tuple[str, ...]:
        """Every array name of this format for ``structure`` (docs/theory.md §7)."""
        return ("mean", *cls.array_names)

    @classmethod
    def from_validated(cls, structure: Structure, arrays: Mapping[str, np.ndarray]) -> Posterior:
        """Trusted construction from arrays that passed :meth:`from_arrays` before
        (e.g. float64 files a service stored after validating them): no checks."""
        return cls(structure, arrays["mean"], *(arrays[n] for n in cls.array_names))

    @abstractmethod
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of this format, by their docs/theory.md §7 names."""

    @classmethod
    def derived_names(cls, structure: Structure) -> tuple[str, ...]:
        """Names of arrays derived from the format's own (e.g. a factorisation) that a
        store may keep beside them and give back to :meth:`from_validated`."""
        return ()

    def derived_arrays(self) -> dict[str, np.ndarray]:
        """Derived arrays computed so far (none by default): worth keeping when they cost
        a factorisation, since every later search or alignment would repeat it."""
        return {}

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
        """``½ (v − m_B)ᵀ Σ_BB⁻¹ (v − m_B)`` (docs/theory.md §4)."""

    def align(self, plan) -> Posterior:
        """The aligned posterior of a compiled plan (``planner.plan.CompiledPlan``).

        By default one joint conditioning on the plan's index sets; formats
        that keep per-layer structure override it with the plan's ``events``.
        """
        return self.condition(plan.conditioned, plan.targets, plan.kept, plan.student)

    def align_bytes(self, conditioned: int, kept: int) -> int:
        """Working memory (bytes) an alignment conditioning ``conditioned`` parameters and
        keeping ``kept`` needs, at most (see :meth:`align_bytes_of`)."""
        shapes = {k: np.shape(v) for k, v in self.to_arrays().items()}
        return self.align_bytes_of(self.structure, shapes, conditioned, kept)

    @classmethod
    def align_bytes_of(
        cls, structure: Structure, shapes: Mapping[str, tuple], conditioned: int, kept: int
    ) -> int:
        """The same from the structure and the arrays' shapes alone (no arrays loaded):
        dense by default (Σ_BB, Σ_Ba, Σ_aa)."""
        return 8 * (conditioned**2 + conditioned * kept + 2 * kept**2)

    def adopt(self, plan, scorer) -> None:
        """A hint from the search: ``scorer`` committed exactly ``plan``'s conditioning
        (a compiled plan), so a format whose alignment needs what the scorer holds may
        keep it for :meth:`align` and :meth:`plan_cost` of that plan.  The default keeps
        nothing."""
        return None

    def plan_cost(self, plan) -> float:
        """The plan's cost ``½ (v − m_B)ᵀ Σ_BB⁻¹ (v − m_B)``; see :meth:`align`."""
        return self.constraint_cost(plan.conditioned, plan.targets)

    # -- small-block access -------------------------------------------------------------
    @abstractmethod
    def cov_block(self, idx: np.ndarray) -> np.ndarray:
        """``Σ[idx, idx]`` as a dense array (small blocks only)."""

    def cov_cross(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``Σ[rows][:, cols]`` as a dense array (each of ``rows``, ``cols`` without
        repeats): the blocks :class:`~planner.posterior.scoring.DenseScorer` works on."""
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        S = self.cov_block(np.concatenate([rows, cols]))
        return S[: rows.size, rows.size :]

    def cov_blocks(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``Σ[rows[k]][:, cols[k]]`` for each k (``rows``: n × a, ``cols``: n × b indices):
        an (n, a, b) array.  By default one :meth:`cov_cross` over every index they use,
        read at each pair; a format holding Σ densely reads the pairs in place."""
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        u, inv = np.unique(np.concatenate([rows.ravel(), cols.ravel()]), return_inverse=True)
        inv = inv.ravel()
        pr, pc = inv[: rows.size].reshape(rows.shape), inv[rows.size :].reshape(cols.shape)
        return self.cov_cross(u, u)[pr[:, :, None], pc[:, None, :]]

    def covariance_over(self, idx: np.ndarray):
        """Σ over the parameters ``idx`` (ascending, no repeats) for a scorer stage, which
        reads rows and blocks of it many times (``cross(rows, cols)``, ``blocks(groups)``,
        :class:`~planner.posterior._dense.HeldCovariance`): formed once by default; a
        format holding Σ densely reads it in place instead (no copy of ``|idx|²``)."""
        from ._dense import HeldCovariance

        idx = np.asarray(idx, dtype=np.int64)
        return HeldCovariance(self.cov_cross(idx, idx), idx)

    def inverse_block(self, idx: np.ndarray) -> np.ndarray:
        """``Σ[idx, idx]⁻¹`` (for exchange moves): one Cholesky of the block by default,
        inverted on a device backend when large (planner.backend)."""
        from ..backend import for_size
        from ._validate import cholesky_constraint

        L = cholesky_constraint(self.cov_cross(idx, idx))
        if L.size == 0:
            return L
        # C order, as the exchange moves' products expect (LAPACK answers in F order)
        return np.ascontiguousarray(for_size(L.size).cholesky_inverse(L))

    def conditional_precision(self, B, values, P):
        """``(diag Q, Q c)`` with ``Q = Cov(x_P | x_B = v)⁻¹`` and ``c = E[x_P | x_B = v]``,
        when this format computes them more cheaply than through covariance blocks;
        ``None`` otherwise (the default)."""
        return None

    def prepare(self, first: int, count: int) -> None:
        """A hint from the search: it will ask for covariance blocks over ``count``
        parameters from index ``first`` on.  Formats that can compute such blocks more
        cheaply all at once do so here; the default does nothing."""
        return None

    def scorer(self):
        """The exact incremental conditioning the search uses (docs/theory.md §6): dense blocks
        of Σ by default; formats with structure supply their own."""
        from .scoring import DenseScorer

        return DenseScorer(self)

    def one_shot_work(self, conditioned: int, kept: int) -> float:
        """Flops of one alignment conditioning ``conditioned`` parameters and keeping
        ``kept`` (dense by default): what the search sizes its budget by."""
        return conditioned**3 / 3 + conditioned**2 * kept + conditioned * kept**2

    @abstractmethod
    def variance(self) -> np.ndarray:
        """The diagonal of Σ."""

    @abstractmethod
    def precision_diagonal(self) -> np.ndarray:
        """The diagonal of Σ⁻¹ (the Laplace Hessian's diagonal, for OBD)."""

    @abstractmethod
    def dense_covariance(self) -> np.ndarray:
        """Σ as a dense matrix (for small posteriors and tests)."""

    # -- batched small-group costs (criteria and pairing) ----------------------------------
    def group_costs(self, groups: np.ndarray) -> np.ndarray:
        """``½ m_gᵀ Σ_gg⁻¹ m_g`` for each row ``g`` of ``groups`` (n × k indices).

        The cost of conditioning each group to zero on its own: the
        ``posterior_ratio`` score of docs/theory.md §6.  Formats override this with a
        vectorised kernel; this generic one factorises one block at a time.
        """
        out = np.empty(len(groups))
        for r, g in enumerate(groups):
            L = np.linalg.cholesky(self.cov_block(g))
            z = np.linalg.solve(L, self.mean[g])
            out[r] = 0.5 * float(z @ z)
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.structure.describe()} p={self.n}>"
