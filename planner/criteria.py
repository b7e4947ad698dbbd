"""Named neuron criteria (SPEC §6) behind one callable interface.

A criterion maps a :class:`NeuronContext` (the posterior, the current tracked
layout, a position) to one score per neuron of that position: **the lowest
score is removed first**.  Scores are taken over the group a neuron's removal
conditions: its outgoing weights into the neurons that are still live.

As networkx normalises a pluggable weight once (``_weight_function``),
:func:`criterion_function` turns a name or a callable into the one callable the
search uses.

Examples
--------
>>> sorted(CRITERIA)
['belsley', 'gradient_covariance', 'obd', 'posterior_ratio', 'random']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .errors import MissingData, UnknownCriterion
from .ops import Tracked
from .posterior import Posterior

__all__ = ["CRITERIA", "Criterion", "NeuronContext", "criterion_function"]


@dataclass(frozen=True)
class NeuronContext:
    """What a criterion may look at to score the neurons of current position ``t``."""

    posterior: Posterior
    state: Tracked
    t: int
    rng: np.random.Generator
    gradients: np.ndarray | None = None

    @cached_property
    def groups(self) -> np.ndarray:
        """Teacher indices of each neuron's outgoing group, one row per neuron."""
        return self.state.outgoing_all(self.t)


Criterion = Callable[[NeuronContext], np.ndarray]


def random(ctx: NeuronContext) -> np.ndarray:
    """The seed's baseline: a seeded uniform order."""
    return ctx.rng.random(ctx.groups.shape[0])


def obd(ctx: NeuronContext) -> np.ndarray:
    """Optimal Brain Damage: ``Σ_j h_jj u_j² / 2`` with ``h`` the precision's diagonal."""
    h = ctx.posterior.precision_diagonal()
    u = ctx.posterior.mean
    g = ctx.groups
    return 0.5 * np.sum(h[g] * u[g] ** 2, axis=1)


def posterior_ratio(ctx: NeuronContext) -> np.ndarray:
    """``½ m_Oᵀ Σ_OO⁻¹ m_O``: minus the log of ``p(u_O = 0) / p(u_O = m_O)``."""
    return ctx.posterior.group_costs(ctx.groups)


_BELSLEY_BLOCK = 1536


def belsley(ctx: NeuronContext) -> np.ndarray:
    """Belsley's diagnostics: the neuron loading most on the worst-conditioned direction.

    The covariance of the position's outgoing weights is eigendecomposed
    (``Σ = V diag(λ) Vᵀ``); the worst-conditioned direction ``j*`` has the
    largest condition index ``λ_max / λ_j``; a parameter's variance
    decomposition proportion is ``q_ij* = (V_ij*² / λ_j*) / Σ_j V_ij² / λ_j``.
    A neuron's load is the sum over its parameters; the highest load is
    removed first.  Positions whose weights exceed ``_BELSLEY_BLOCK``
    parameters are decomposed in chunks of neurons.
    """
    g = ctx.groups
    n, k = g.shape
    per = max(1, _BELSLEY_BLOCK // max(k, 1))
    load = np.empty(n)
    for a in range(0, n, per):
        idx = g[a : a + per].ravel()
        lam, V = np.linalg.eigh(ctx.posterior.cov_block(idx))
        lam = np.maximum(lam, np.finfo(float).tiny)
        w = V**2 / lam
        q = w[:, 0] / w.sum(axis=1)  # eigh sorts ascending: column 0 is λ_min
        load[a : a + per] = q.reshape(-1, k).sum(axis=1)
    return -load


def gradient_covariance(ctx: NeuronContext) -> np.ndarray:
    """The diagonal of the per-example gradients' covariance over the neuron's group."""
    G = ctx.gradients
    if G is None:
        raise MissingData(
            "criterion 'gradient_covariance' needs per-example gradients", field="gradients"
        )
    if G.ndim != 2 or G.shape[1] != ctx.posterior.n:
        raise MissingData(
            f"gradients must have shape (examples, {ctx.posterior.n}); got {G.shape}",
            field="gradients",
        )
    var = G.var(axis=0)
    return var[ctx.groups].sum(axis=1)


#: Registered criteria by name.
CRITERIA: dict[str, Criterion] = {
    f.__name__: f for f in (random, obd, posterior_ratio, belsley, gradient_covariance)
}


def criterion_function(criterion: str | Criterion) -> Criterion:
    """Normalise a criterion name or callable into one callable."""
    if callable(criterion):
        return criterion
    try:
        return CRITERIA[criterion]
    except KeyError:
        raise UnknownCriterion(
            f"unknown criterion {criterion!r}; known: {sorted(CRITERIA)}", field="criterion"
        ) from None
