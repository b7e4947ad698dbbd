"""Formats held by one dense SPD matrix (``full``: Σ, ``precision``: Λ)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property

import numpy as np
import scipy.linalg as sla

from ..structure import Structure
from . import _validate as v
from .base import Posterior


class DensePosterior(Posterior):
    """A Gaussian held by one dense SPD matrix, named ``array_names[0]``: validated once
    (SPEC §8), its lower Cholesky factor computed at most once."""

    def __init__(
        self,
        structure: Structure,
        mean: np.ndarray,
        matrix: np.ndarray,
        _chol: np.ndarray | None = None,
    ) -> None:
        super().__init__(structure, mean)
        self.matrix = matrix
        if _chol is not None:
            self.__dict__["_chol"] = _chol

    @classmethod
    def from_arrays(
        cls,
        structure: Structure,
        arrays: Mapping[str, np.ndarray],
        workspace: v.Workspace | None = None,
    ):
        name = cls.array_names[0]
        v.require(arrays, ("mean", name), cls.format)
        p = structure.n_params
        mean = v.vector(arrays["mean"], "mean", p)
        matrix, chol = v.spd_matrix(arrays[name], name, p, workspace)
        return cls(structure, mean, matrix, chol)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, self.array_names[0]: self.matrix}

    @cached_property
    def _chol(self) -> np.ndarray:
        return sla.cholesky(self.matrix, lower=True, check_finite=False)
