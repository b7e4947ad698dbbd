"""Posterior formats behind one Gaussian interface (docs/theory.md §7)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import InvalidPosterior
from ..structure import Structure
from ._validate import asymmetry_report
from .base import Posterior
from .diag import DiagPosterior
from .full import FullPosterior
from .kron import KronPosterior
from .lowrank import LowRankPosterior
from .precision import PrecisionPosterior

__all__ = [
    "FORMATS",
    "DiagPosterior",
    "FullPosterior",
    "KronPosterior",
    "LowRankPosterior",
    "Posterior",
    "PrecisionPosterior",
    "asymmetry_report",
    "from_arrays",
]

#: Registered formats by their docs/theory.md §7 name.
FORMATS: dict[str, type[Posterior]] = {
    cls.format: cls
    for cls in (FullPosterior, DiagPosterior, LowRankPosterior, KronPosterior, PrecisionPosterior)
}


def from_arrays(fmt: str, structure: Structure, arrays: Mapping[str, np.ndarray]) -> Posterior:
    """Build and validate a posterior of format ``fmt`` from its named arrays."""
    try:
        cls = FORMATS[fmt]
    except KeyError:
        raise InvalidPosterior(
            f"unknown posterior format {fmt!r}; known: {sorted(FORMATS)}", field="posterior.format"
        ) from None
    return cls.from_arrays(structure, arrays)
