"""Named neuron criteria (docs/theory.md §6) behind one callable interface.

A criterion is data (:class:`Criterion`): a ``score`` callable mapping a
:class:`NeuronContext` (the posterior, the current tracked layout, a position)
to one score per neuron of that position (**the lowest is removed first**),
taken over the group a neuron's removal conditions (its outgoing weights into
the neurons that are still live), and what the search needs to know about it:

* ``incremental``: the search ranks by the *exact increment* of each removal
  given everything already conditioned (``posterior_ratio``, docs/theory.md §6), which
  its scorer computes; ``score`` is then the same quantity on the teacher's
  marginal, for callers outside the search;
* ``needs_gradients``: per-example gradients must be supplied;
* ``polished``: the search improves the plan by exact exchanges afterwards
  (every criterion but the seed's ``random`` baseline).

As networkx normalises a pluggable weight once (``_weight_function``),
:func:`criterion_function` turns a name, a :class:`Criterion` or a bare
callable into one :class:`Criterion`.

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

__all__ = ["CRITERIA", "Criterion", "NeuronContext", "Score", "criterion_function"]


@dataclass(frozen=True)
class NeuronContext:
    """What a criterion may look at to score the neurons of current position ``t``."""

    posterior: Posterior
    state: Tracked
    t: int
    rng: np.random.Generator
    gradients: np.ndarray | None = None
    #: ``gradients.var(axis=0)``, computed once per search by the caller when given
    gradient_variance: np.ndarray | None = None

    @cached_property
    def groups(self) -> np.ndarray:
        """Teacher indices of each neuron's outgoing group, one row per neuron."""
        return self.state.outgoing_all(self.t)


Score = Callable[[NeuronContext], np.ndarray]


@dataclass(frozen=True)
class Criterion:
    """A named neuron criterion and what the search needs to know about it."""

    name: str
    score: Score
    incremental: bool = False
    needs_gradients: bool = False
    polished: bool = True

    def __call__(self, ctx: NeuronContext) -> np.ndarray:
        return self.score(ctx)


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
    var = ctx.gradient_variance if ctx.gradient_variance is not None else G.var(axis=0)
    return var[ctx.groups].sum(axis=1)


#: Registered criteria by name.
CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion("random", random, polished=False),
        Criterion("obd", obd),
        Criterion("posterior_ratio", posterior_ratio, incremental=True),
        Criterion("belsley", belsley),
        Criterion("gradient_covariance", gradient_covariance, needs_gradients=True),
    )
}


def criterion_function(criterion: str | Criterion | Score) -> Criterion:
    """Normalise a criterion name, :class:`Criterion` or bare score callable."""
    if isinstance(criterion, Criterion):
        return criterion
    if callable(criterion):
        return Criterion(getattr(criterion, "__name__", "custom"), criterion)
    try:
        return CRITERIA[criterion]
    except KeyError:
        raise UnknownCriterion(
            f"unknown criterion {criterion!r}; known: {sorted(CRITERIA)}", field="criterion"
        ) from None
