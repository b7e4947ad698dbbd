"""Torch adapters for training jobs (docs/torch.md): laplace-torch in, the aligned prior out.

>>> from planner_client.torch import structure_of, from_laplace, load_mean, PriorPenalty
>>> fmt, arrays = from_laplace(la)                              # doctest: +SKIP
>>> teacher = client.upload_teacher("t", structure_of(model), fmt, arrays)  # doctest: +SKIP
>>> plan, prior = client.align(teacher["id"], [64, 32, 16, 10])  # doctest: +SKIP
>>> load_mean(student, prior)                                   # doctest: +SKIP
>>> penalty = PriorPenalty(student, fmt, prior)                 # doctest: +SKIP
>>> loss = nll + penalty() / n_train                            # doctest: +SKIP

Every number is float64 inside, whatever the module's dtype; what goes back into
the module (the mean, the penalty's value) is cast to the parameters' dtype.
This module needs the client's ``torch`` extra (``pip install './client[torch]'``);
:func:`from_laplace` also needs laplace-torch, which that extra installs.
"""

from __future__ import annotations

from ._common import FORMATS, Prior
from .laplace import Converted, from_laplace
from .priors import (
    PriorPenalty,
    laplace_prior,
    load_mean,
    precision_diagonal,
    student_module,
    to_distribution,
)
from .structures import Residual, fold_batchnorm, module_of, structure_of

__all__ = [
    "FORMATS",
    "Converted",
    "Prior",
    "PriorPenalty",
    "Residual",
    "fold_batchnorm",
    "from_laplace",
    "laplace_prior",
    "load_mean",
    "module_of",
    "precision_diagonal",
    "structure_of",
    "student_module",
    "to_distribution",
]
