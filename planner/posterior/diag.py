"""The ``diag`` format: mean and variances (docs/theory.md §7).

Coordinates are independent, so conditioning leaves the others untouched:
alignment is selection.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..structure import Structure
from . import _validate as v
from .base import Posterior

__all__ = ["DiagPosterior", "diagonal_cross"]


def diagonal_cross(d: np.ndarray, rows, cols) -> np.ndarray:
    """``diag(d)[rows][:, cols]`` (each of ``rows``, ``cols`` without repeats)."""
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    out = np.zeros((rows.size, cols.size))
    if rows.size and cols.size:
        order = np.argsort(cols, kind="stable")
        pos = np.minimum(np.searchsorted(cols[order], rows), cols.size - 1)
        hit = cols[order][pos] == rows
        out[np.flatnonzero(hit), order[pos[hit]]] = d[rows[hit]]
    return out


class DiagPosterior(Posterior):
    """``N(mean, diag(variance))``."""

    format = "diag"
    array_names = ("variance",)
    independent = True

    def __init__(self, structure: Structure, mean: np.ndarray, var: np.ndarray) -> None:
        super().__init__(structure, mean)
        self.var = var

    @classmethod
    def from_arrays(
        cls, structure: Structure, arrays: Mapping[str, np.ndarray], workspace=None
    ) -> DiagPosterior:
        v.require(arrays, ("mean", "variance"), cls.format)
        p = structure.n_params
        return cls(
            structure,
            v.vector(arrays["mean"], "mean", p, structure.size_hint),
            v.positive_vector(arrays["variance"], "variance", p, structure.size_hint),
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "variance": self.var}

    def condition(self, B, values, keep, structure) -> DiagPosterior:
        keep = np.asarray(keep, dtype=np.int64)
        return DiagPosterior(structure, self.mean[keep], self.var[keep])

    def constraint_cost(self, B, values) -> float:
        B = np.asarray(B, dtype=np.int64)
        d = values - self.mean.take(B)
        d *= d
        d /= self.var.take(B)
        return 0.5 * float(d.sum())

    def group_costs(self, groups: np.ndarray) -> np.ndarray:
        z = self.mean[groups]
        np.square(z, out=z)
        z /= self.var[groups]
        return 0.5 * z.sum(axis=-1)

    def plan_cost(self, plan) -> float:
        """Independent coordinates: the cost is a sum over the conditioned blocks, read
        block by block from the plan's layer events (MLPs; RNNs use the flat sets)."""
        s = self.structure
        if s.kind != "mlp":
            return super().plan_cost(plan)
        total = 0.0
        for ev in plan.events:
            if ev.kind == "rows":
                continue
            n, m, start = s.width(ev.layer), s.width(ev.layer - 1), s.layer_offset(ev.layer)
            block = np.ix_(ev.rows, ev.cols)  # one gather per array, arithmetic in place
            d = self.mean[start : start + n * m].reshape(n, m)[block]
            if ev.target is not None:
                d -= ev.target
            np.square(d, out=d)
            d /= self.var[start : start + n * m].reshape(n, m)[block]
            total += float(d.sum())
            if ev.kind == "layer" and s.bias:
                b = slice(start + n * m, start + n * m + n)
                total += float(np.sum(self.mean[b][ev.rows] ** 2 / self.var[b][ev.rows]))
        return 0.5 * total

    @classmethod
    def align_bytes_of(cls, structure, shapes, conditioned: int, kept: int) -> int:
        return 8 * 3 * kept

    def cov_block(self, idx) -> np.ndarray:
        return np.diag(self.var[np.asarray(idx, dtype=np.int64)])

    def cov_cross(self, rows, cols) -> np.ndarray:
        return diagonal_cross(self.var, rows, cols)

    def scorer(self):
        from .scoring import DiagScorer

        return DiagScorer(self)

    def one_shot_work(self, conditioned: int, kept: int) -> float:
        return float(conditioned + kept)

    def variance(self) -> np.ndarray:
        return self.var

    def precision_diagonal(self) -> np.ndarray:
        return 1.0 / self.var

    def dense_covariance(self) -> np.ndarray:
        return np.diag(self.var)
