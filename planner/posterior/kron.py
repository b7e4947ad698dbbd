"""The ``kron`` format: per layer ``Cov(W[i,j], W[k,l]) = G[i,k] A[j,l]`` (docs/theory.md §7,
§13).

Layers are independent (and biases independent of weights).  A layer's columns
are its flattened input: one per input neuron of a linear layer, ``in·kh·kw``
for a conv (laplace-torch's K-FAC factors of ``Conv2d``), a channel owning a
group of ``kh·kw`` adjacent columns.  Arrays: ``mean`` and, per layer, ``row{l}``
(G, out × out), ``col{l}`` (A, columns × columns) and, with biases, ``bias{l}``:
variances ``(out,)`` or a covariance ``(out, out)``.  Layers are numbered as their
structure numbers them: an MLP's positions t = 2..T, a network's layers 1, 2, ….
RNN teachers are not ``kron``.

Every step of a plan keeps each layer matrix-normal, so a plan is replayed in
the layers' own terms (``CompiledPlan.events``), never densified:

* conditioning whole columns ``C`` (over the current rows) to zero keeps G and
  replaces A by its Schur complement ``A_kk − A_kC A_CC⁻¹ A_Ck``, the mean by
  ``M_k − M_C A_CC⁻¹ A_Ck``; cost ``½ tr(G⁻¹ D A_CC⁻¹ Dᵀ)``, ``D = −M_C``;
* marginalising rows drops them from G (and from the bias);
* ψ conditions a whole layer block to its target (the identity kernel for a
  merged layer, 0 for a residual block's last layer): cost ``½ tr(G⁻¹ D A⁻¹ Dᵀ)``
  plus the bias's own.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla
from scipy.linalg import blas

from .._threads import all_threads, single_threaded
from ..errors import InvalidPosterior, SingularConstraint, Unsupported
from ..graph import Consumers, Whole
from ..linalg import inverse_diagonal, pivots_ok
from . import _validate as v
from .base import Posterior
from .scoring import Columns, LayerBlock, indices

__all__ = ["KronPosterior", "KronScorer"]


#: Up to this many parameters the search scores on dense blocks of Σ.
DENSE_PARAMS = 4096


def _chol(S: np.ndarray, what: str) -> np.ndarray:
    """Cholesky factor of a block met while conditioning; a block that is not numerically
    positive definite makes the plan's constraint singular (docs/theory.md §8)."""
    try:
        L = sla.cholesky(S, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        L = None
    if L is None or not pivots_ok(L, S):
        raise SingularConstraint(
            f"the Kronecker factor {what} restricted to the conditioned parameters is "
            "numerically singular; this plan cannot be conditioned on",
            field="ops",
        )
    return L


@dataclass(frozen=True)
class Factored:
    """One Kronecker-factored layer of a structure: its number, where its weight
    (``rows × cols``, row-major) and bias lie in the flat vector, and how many adjacent
    columns each input channel owns (``group``: 1, or ``kh·kw`` for a conv)."""

    layer: int
    start: int
    rows: int
    cols: int
    group: int
    bias: int | None

    def columns(self, channels: np.ndarray) -> np.ndarray:
        """The column ids of input channels ``channels`` (teacher ids), in that order."""
        c = np.asarray(channels, dtype=np.int64)
        if self.group == 1:
            return c
        return (c[:, None] * self.group + np.arange(self.group)[None, :]).ravel()


def factored_layers(structure) -> tuple[Factored, ...]:
    """The Kronecker-factored layers of ``structure`` in layout order; an RNN has none (its
    recurrent weights read the space they write, which no Kronecker factor holds)."""
    if getattr(structure, "kind", None) == "rnn":
        raise InvalidPosterior(
            "the kron format is for MLP and network teachers; an RNN's recurrent weights are "
            "not Kronecker-factored",
            field="posterior.format",
        )
    out = []
    for u in structure.graph.units:
        (seg,) = u.segments
        out.append(Factored(u.layer, seg.offset, u.rows, seg.width * seg.group, seg.group, u.bias))
    return tuple(out)


def _bias_cost(bm: np.ndarray, bS: np.ndarray) -> float:
    if bS.ndim == 1:
        return 0.5 * float(np.sum(bm * bm / bS))
    L = _chol(bS, "bias")
    z = sla.solve_triangular(L, bm, lower=True, check_finite=False)
    return 0.5 * float(z @ z)


def _sub(bS: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Rows ``r`` of a bias's variances or covariance."""
    return bS[r] if bS.ndim == 1 else bS[np.ix_(r, r)]


class KronPosterior(Posterior):
    """Layer-wise Kronecker-factored Gaussian (K-FAC Laplace)."""

    format = "kron"
    array_names = ()

    def __init__(
        self,
        structure,
        mean: np.ndarray,
        G: dict[int, np.ndarray],
        A: dict[int, np.ndarray],
        bias: dict[int, np.ndarray],
    ) -> None:
        super().__init__(structure, mean)
        self.G, self.A, self.bias = G, A, bias
        self.factored = {f.layer: f for f in factored_layers(structure)}

    @classmethod
    def names(cls, structure) -> tuple[str, ...]:
        out = ["mean"]
        for f in factored_layers(structure):
            out += [f"row{f.layer}", f"col{f.layer}"] + ([f"bias{f.layer}"] if f.bias else [])
        return tuple(out)

    @classmethod
    def from_arrays(cls, structure, arrays: Mapping[str, np.ndarray], workspace=None):
        layers = factored_layers(structure)
        v.require(arrays, cls.names(structure), cls.format)
        mean = v.vector(arrays["mean"], "mean", structure.n_params, structure.size_hint)
        G, A, bias, factors = {}, {}, {}, {}
        for f in layers:
            t = f.layer
            G[t] = v.spd_matrix(arrays[f"row{t}"], f"row{t}", f.rows)[0]
            A[t], factors[t] = v.spd_matrix(arrays[f"col{t}"], f"col{t}", f.cols)
            if f.bias is not None:
                b = np.asarray(arrays[f"bias{t}"])
                bias[t] = (
                    v.positive_vector(b, f"bias{t}", f.rows)
                    if b.ndim == 1
                    else v.spd_matrix(b, f"bias{t}", f.rows)[0]
                )
        post = cls(structure, mean, G, A, bias)
        post._column_factors = {t: (L, None) for t, L in factors.items()}  # validation's
        return post

    @classmethod
    def derived_names(cls, structure) -> tuple[str, ...]:
        """Each layer's column factor ``A_t``: its lower Cholesky factor ``colfactor{t}``
        (validation computes it) and the diagonal of ``A_t⁻¹`` ``colinv{t}``. A search
        ranks merges and pairs a merged layer's rows with them, and an alignment
        conditions a merged layer with them: ``O(cols³)`` each, kept instead of redone."""
        return tuple(
            n
            for f in factored_layers(structure)
            for n in (f"colfactor{f.layer}", f"colinv{f.layer}")
        )

    def derived_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for t in self.__dict__.get("_column_factors", {}):
            L, ai = self.column_factor(t)
            out[f"colfactor{t}"], out[f"colinv{t}"] = L, ai
        return out

    @classmethod
    def from_validated(cls, structure, arrays: Mapping[str, np.ndarray]):
        """Trusted construction; stored column factors (:meth:`derived_names`) are reused."""
        layers = factored_layers(structure)
        post = cls(
            structure,
            arrays["mean"],
            {f.layer: arrays[f"row{f.layer}"] for f in layers},
            {f.layer: arrays[f"col{f.layer}"] for f in layers},
            {f.layer: arrays[f"bias{f.layer}"] for f in layers if f.bias is not None},
        )
        post._column_factors = {
            f.layer: (arrays[f"colfactor{f.layer}"], arrays.get(f"colinv{f.layer}"))
            for f in layers
            if f"colfactor{f.layer}" in arrays
        }
        return post

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self.mean}
        for t, f in self.factored.items():
            out[f"row{t}"], out[f"col{t}"] = self.G[t], self.A[t]
            if f.bias is not None:
                out[f"bias{t}"] = self.bias[t]
        return out

    # -- the replay -----------------------------------------------------------------------------
    def _weight(self, f: Factored) -> np.ndarray:
        return self.mean[f.start : f.start + f.rows * f.cols].reshape(f.rows, f.cols)

    def _replay(self, plan) -> KronScorer:
        """Replay ``plan``'s events; the last replay is kept for an :meth:`align` that
        follows a :meth:`plan_cost` of the same plan (the search's pattern)."""
        last = getattr(self, "_last", None)
        if last is not None and last[0]() is plan:
            return last[1]
        sc = self._replay_events(plan.events)
        self._last = (weakref.ref(plan), sc)
        return sc

    def _replay_events(self, events) -> KronScorer:
        """The events on the search's own per-layer state (:class:`KronScorer`): a run of
        column conditionings on a layer over the same rows is one joint conditioning (its
        cost the sum of theirs, by the chain rule), flushed when the layer's rows change;
        rows are marginalised when the layer is next touched; whole layers are
        conditioned to their targets."""
        with single_threaded():  # thin products mostly; the big ones ask for every core
            return self._replay_in(events)

    def _replay_in(self, events) -> KronScorer:
        sc = KronScorer(self)
        pending: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}

        def flush(t: int) -> None:
            if t in pending:
                rows, cols = pending.pop(t)
                st = sc._state(t, rows)
                sc._condition_columns(
                    t, st, np.sort(np.searchsorted(st.cols, np.concatenate(cols)))
                )

        for ev in events:
            f = self.factored[ev.layer]
            if ev.kind == "rows":  # the rows themselves go when the layer is next touched
                flush(ev.layer)
                continue
            rows = np.sort(ev.rows)
            if ev.kind == "columns":
                run = pending.get(ev.layer)
                if run is not None and not np.array_equal(run[0], rows):
                    flush(ev.layer)
                    run = None
                if run is None:
                    run = pending[ev.layer] = (rows, [])
                run[1].append(f.columns(ev.cols))
                continue
            flush(ev.layer)
            st = sc._state(ev.layer, rows)
            target = None
            if ev.target is not None:  # in the state's row and live-column order
                target = np.zeros((st.rows.size, int(st.live.sum())))
                r = np.searchsorted(st.rows, ev.rows)
                c = np.searchsorted(st.cols[st.live], f.columns(ev.cols))
                target[np.ix_(r, c)] = ev.target
            sc._condition_layer(ev.layer, st, target, sc._zero_bias(ev.layer, st))
        for t in list(pending):
            flush(t)
        return sc

    def align(self, plan) -> KronPosterior:
        sc = self._replay(plan)
        s = plan.student
        mean = np.empty(s.n_params)
        G, A, bias = {}, {}, {}
        for f, (src, rows, cols) in zip(factored_layers(s), plan.student_layers, strict=True):
            t = f.layer
            cols = self.factored[src].columns(cols)
            if src in sc.layers:
                st = sc._state(src, np.sort(rows))
                r = np.searchsorted(st.rows, rows)
                c = np.searchsorted(st.cols, cols)
                M = st.M[np.ix_(r, c)]
                A[t] = _lower_block(st.A, c)
            else:
                M = self._weight(self.factored[src])[np.ix_(rows, cols)]
                A[t] = np.asarray(self.A[src])[np.ix_(cols, cols)]
            mean[f.start : f.start + f.rows * f.cols] = M.ravel()
            G[t] = np.asarray(self.G[src])[np.ix_(rows, rows)]
            if f.bias is not None:
                b = self.factored[src].bias
                mean[f.bias : f.bias + f.rows] = self.mean[b + rows]
                bias[t] = _sub(np.asarray(self.bias[src]), rows)
        return KronPosterior(s, mean, G, A, bias)

    @classmethod
    def align_bytes_of(cls, structure, shapes, conditioned: int, kept: int) -> int:
        per = [f.rows**2 + f.cols**2 + f.rows * f.cols for f in factored_layers(structure)]
        return 8 * (3 * sum(per) + 2 * kept)

    def plan_cost(self, plan) -> float:
        return self._replay(plan).cost

    def constraint_cost(self, B, values) -> float:
        """For arbitrary (small) index sets; plans use the structured :meth:`plan_cost`."""
        B = np.asarray(B, dtype=np.int64)
        if B.size == 0:
            return 0.0
        L = v.cholesky_constraint(self.cov_block(B))
        z = sla.solve_triangular(L, values - self.mean[B], lower=True, check_finite=False)
        return 0.5 * float(z @ z)

    def condition(self, B, values, keep, structure):
        raise Unsupported(
            "a kron posterior is aligned by a plan's steps (Plan.apply), which keep every "
            "layer Kronecker-factored; conditioning arbitrary index sets would not",
            field="posterior.format",
        )

    # -- small blocks -------------------------------------------------------------------------
    def _locate(self, idx: np.ndarray):
        """For flat indices: (layer number, is_bias, row, col)."""
        fs = list(self.factored.values())
        starts = np.array([f.start for f in fs])
        k = np.searchsorted(starts, idx, side="right") - 1
        numbers = np.array([f.layer for f in fs])
        cols = np.array([f.cols for f in fs])[k]
        rows = np.array([f.rows for f in fs])[k]
        off = idx - starts[k]
        is_b = off >= rows * cols
        row = np.where(is_b, off - rows * cols, off // np.maximum(cols, 1))
        col = np.where(is_b, 0, off % np.maximum(cols, 1))
        return numbers[k], is_b, row, col

    def cov_block(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        return self.cov_cross(idx, idx)

    def cov_cross(self, rows, cols) -> np.ndarray:
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        ta, ba, ra, ca = self._locate(rows)
        tb, bb, rb, cb = self._locate(cols)
        out = np.zeros((rows.size, cols.size))
        for u in np.intersect1d(ta, tb):
            w, x = np.flatnonzero((ta == u) & ~ba), np.flatnonzero((tb == u) & ~bb)
            if w.size and x.size:
                G, A = self.G[u][np.ix_(ra[w], rb[x])], self.A[u][np.ix_(ca[w], cb[x])]
                out[np.ix_(w, x)] = G * A
            w, x = np.flatnonzero((ta == u) & ba), np.flatnonzero((tb == u) & bb)
            if w.size and x.size:
                b = self.bias[u]
                out[np.ix_(w, x)] = (
                    (ra[w][:, None] == rb[x][None, :]) * b[ra[w]][:, None]
                    if b.ndim == 1
                    else b[np.ix_(ra[w], rb[x])]
                )
        return out

    def column_factor(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Cholesky factor of layer t's column factor A_t and the diagonal of A_t⁻¹,
        computed once (searches ask for them route after route), or validation's kept
        (:meth:`derived_names`)."""
        cache = self.__dict__.setdefault("_column_factors", {})
        L, ai = cache.get(t, (None, None))
        if L is None or not pivots_ok(L, self.A[t]):  # a kept factor is checked as _chol does
            L, ai = _chol(np.asarray(self.A[t]), f"col{t}"), None
        if ai is None:
            ai = inverse_diagonal(L)
        cache[t] = (L, ai)
        return L, ai

    def scorer(self):
        """Per-layer matrix-normal state (:class:`KronScorer`); dense blocks while the
        posterior is small enough to be held dense (the same numbers either way)."""
        if self.n <= DENSE_PARAMS:
            return super().scorer()
        return KronScorer(self)

    def one_shot_work(self, conditioned: int, kept: int) -> float:
        return float(sum(f.rows**3 + f.cols**3 for f in self.factored.values()))

    def _column_groups(self, groups: np.ndarray):
        """(layer, rows, cols) when every group is one column of one layer over the same rows."""
        t, is_b, r, c = self._locate(groups.ravel())
        t, is_b, r, c = (a.reshape(groups.shape) for a in (t, is_b, r, c))
        if is_b.any() or (t != t[0, 0]).any() or (c != c[:, :1]).any() or (r != r[:1]).any():
            return None
        return int(t[0, 0]), r[0], c[:, 0]

    def group_costs(self, groups: np.ndarray) -> np.ndarray:
        """Columns of a layer: ``½ m_colᵀ G_R⁻¹ m_col / A_jj`` with one factor of G_R."""
        hit = self._column_groups(groups)
        if hit is None:
            return super().group_costs(groups)
        t, rows, cols = hit
        L = _chol(self.G[t][np.ix_(rows, rows)], f"row{t}")
        X = sla.solve_triangular(L, self.mean[groups].T, lower=True, check_finite=False)
        return 0.5 * np.sum(X * X, axis=0) / np.diag(self.A[t])[cols]

    def variance(self) -> np.ndarray:
        out = np.empty(self.n)
        for t, f in self.factored.items():
            out[f.start : f.start + f.rows * f.cols] = np.outer(
                np.diag(self.G[t]), np.diag(self.A[t])
            ).ravel()
            if f.bias is not None:
                b = self.bias[t]
                out[f.bias : f.bias + f.rows] = b if b.ndim == 1 else np.diag(b)
        return out

    def precision_diagonal(self) -> np.ndarray:
        out = np.empty(self.n)

        def inv_diag(S):
            return inverse_diagonal(_chol(S, "factor"))

        for t, f in self.factored.items():
            out[f.start : f.start + f.rows * f.cols] = np.outer(
                inv_diag(self.G[t]), inv_diag(self.A[t])
            ).ravel()
            if f.bias is not None:
                b = self.bias[t]
                out[f.bias : f.bias + f.rows] = 1.0 / b if b.ndim == 1 else inv_diag(b)
        return out

    def dense_covariance(self) -> np.ndarray:
        return self.cov_block(np.arange(self.n))


def _lower_columns(A: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Columns ``C`` (sorted) of a symmetric matrix of which only the lower triangle is
    current: each column's entries above the diagonal are its row's left of it, copied
    row by row (only the half that is needed: 12 ms against 40 ms for 300 columns of a
    4,096² Fortran-ordered matrix by a gather of whole rows and a mask)."""
    out = A[:, C]
    for j, c in enumerate(C.tolist()):
        out[:c, j] = A[c, :c]
    return out


def _lower_block(A: np.ndarray, C: np.ndarray) -> np.ndarray:
    """``A[C, C]`` from the lower triangle, the only current one (``C`` in any order: a
    merged layer's pairing permutes its readers' columns)."""
    order = np.argsort(C, kind="stable")
    B = np.tril(_lower_part(A, C[order]))
    B += np.tril(B, -1).T
    if np.array_equal(order, np.arange(C.size)):
        return B
    inv = np.empty_like(order)
    inv[order] = np.arange(C.size)
    return B[np.ix_(inv, inv)]


def _lower_part(A: np.ndarray, C: np.ndarray) -> np.ndarray:
    """``A[C, C]`` (``C`` sorted) with only its lower triangle current, in Fortran order: what
    a lower Cholesky factorisation reads (half the passes of :func:`_lower_block`)."""
    if A.flags.f_contiguous:  # gather columns of A as rows of its C-ordered transpose
        return A.T[np.ix_(C, C)].T
    return np.asfortranarray(A[np.ix_(C, C)])


def _lower_cross(A: np.ndarray, R: np.ndarray, C: np.ndarray) -> np.ndarray:
    """``A[R, C]`` of a symmetric matrix of which only the lower triangle is current."""
    return np.where(R[:, None] >= C[None, :], A[np.ix_(R, C)], A[np.ix_(C, R)].T)


def _lower_blocks(A: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """``A[Q_i, Q_i]`` for each row ``Q_i`` of ``Q`` (sorted), from the lower triangle."""
    hi = np.maximum(Q[:, :, None], Q[:, None, :])
    lo = np.minimum(Q[:, :, None], Q[:, None, :])
    return A[hi, lo]


#: ``|C|² · cols`` from which a conditioning of C columns runs on every core.
_THREADED_WORK = 1e9

#: A layer's Schur complement is compacted (its dead columns dropped) once fewer than
#: this share of its columns are live: each rank-k downdate touches every column, dead
#: or not (the (784, 4096×3, 10) search: 2.73 s at 0.7 against 2.87 s at 0.5, 2.77 s at
#: 0.6 and 3.00 s at 0.8, where the copies cost more than they save).
_COMPACT_BELOW = 0.7


@dataclass
class _LayerState:
    """A layer during a search: its current rows (teacher ids), its columns and which are
    still live (not conditioned), the inverse row factor on those rows ``Gi = G_R⁻¹``, the
    residual mean ``M'``, ``P = Gi M'``, and the column factor's Schur complement ``A'``
    (kept full-size, Fortran order, downdated in place in its lower triangle, which alone
    is current; conditioned columns are dead until a compaction drops them).  Until its
    first downdate ``A'`` is the posterior's own factor, read in place (``own`` False:
    copied when first written), so layers only scored, never conditioned, cost no copy.
    A few rows leave by a Schur complement of ``Gi`` (``O(rows · cols)`` each), most by
    refactorising G on the rows left."""

    rows: np.ndarray
    cols: np.ndarray
    live: np.ndarray
    LG: np.ndarray | None  # Cholesky factor of G_R while no row has left (else None)
    M: np.ndarray
    P: np.ndarray
    A: np.ndarray
    Gi_: np.ndarray | None = None  # G_R⁻¹, formed when first needed
    gone: bool = False
    #: increments already scored on this state (dropped whenever the state changes)
    cache: dict = field(default_factory=dict)
    own: bool = True  # A is this state's own copy (else the posterior's, read-only)

    def copy(self) -> _LayerState:
        return _LayerState(
            self.rows.copy(),
            self.cols.copy(),
            self.live.copy(),
            self.LG,
            self.M.copy(),
            self.P.copy(),
            np.asfortranarray(self.A.copy()) if self.own else self.A,  # shared: read-only
            self.Gi_,
            self.gone,
            dict(self.cache),
            self.own,
        )


def _column_increments(st: _LayerState, q: np.ndarray) -> np.ndarray:
    """``½ m_cᵀ G⁻¹ m_c / A'_cc`` for state columns ``q`` (inf where ``A'_cc`` is not
    positive)."""
    a = np.diagonal(st.A)[q]
    out = np.full(q.size, np.inf)
    ok = a > 0
    out[ok] = 0.5 * np.einsum("ij,ij->j", st.M[:, q[ok]], st.P[:, q[ok]]) / a[ok]
    return out


def _gi(st: _LayerState) -> np.ndarray:
    """``G_R⁻¹`` of a state, formed from its factor the first time it is needed."""
    if st.Gi_ is None:
        Gi = sla.cho_solve((st.LG, True), np.eye(st.LG.shape[0]), check_finite=False)
        st.Gi_ = 0.5 * (Gi + Gi.T)
    return st.Gi_


@dataclass(frozen=True)
class _Part:
    """Where a batch of candidate groups lies in one layer: whole columns (``Q``: each
    candidate's column ids, sorted) over ``rows``, or (``Q`` None) the whole layer."""

    layer: int
    rows: np.ndarray
    Q: np.ndarray | None
    bias: bool = False  # a whole layer's biases are part of it


class KronScorer:
    """Exact incremental conditioning of a layer-wise Kronecker posterior (docs/theory.md §6, §7).

    Layers are independent, so each keeps its own matrix-normal state.  The
    search's candidates are whole columns of a layer over its current rows (a
    neuron's outgoing weights, a channel's ``kh·kw`` columns of a conv, in every
    layer that reads it): conditioning columns C to zero keeps G and
    Schur-complements A, and the increment of C is ``½ tr(A'_CC⁻¹ M'_Cᵀ G⁻¹ M'_C)``
    (``½ m_cᵀ G⁻¹ m_c / A'_cc`` for one column): every candidate scored at once, a batch
    of commits one rank-|C| update.  Rows marginalised since a layer was scored leave
    its state by a Schur complement of ``G⁻¹``.  A whole layer's block
    (all its live columns over its current rows, and its biases) has precision
    ``G⁻¹ ⊗ A'⁻¹``.
    """

    def __init__(self, posterior: KronPosterior) -> None:
        self.post = posterior
        self.layers: dict[int, _LayerState] = {}
        self.cost = 0.0

    def copy(self) -> KronScorer:
        out = KronScorer(self.post)
        out.layers = {t: st.copy() for t, st in self.layers.items()}
        out.cost = self.cost
        return out

    independent = False
    #: a layer's rows are conditioned to targets all at once (its whole live block), never
    #: row by row: a merge's rows do not keep a Kronecker form one at a time
    whole_layers = True

    def step_work(self, n: int, k: int) -> float:
        # a step reads and writes the whole n × n Schur complement: memory, not flops
        return float(n * k + 100 * n * n)

    def _state(self, t: int, rows: np.ndarray) -> _LayerState:
        """Layer t's state over ``rows`` (sorted; its other rows marginalised)."""
        st = self.layers.get(t)
        if st is None:
            post = self.post
            M = post._weight(post.factored[t])[rows]
            LG = _chol(post.G[t][np.ix_(rows, rows)], f"row{t}")
            P = sla.cho_solve((LG, True), M, check_finite=False)
            A = np.asarray(post.A[t]).T  # symmetric: read in place until first written
            m = A.shape[0]
            st = _LayerState(rows, np.arange(m), np.ones(m, dtype=bool), LG, M, P, A, own=False)
            self.layers[t] = st
        elif not np.array_equal(st.rows, rows):
            keep = np.searchsorted(st.rows, rows)
            if keep.size and (keep[-1] >= st.rows.size or not np.array_equal(st.rows[keep], rows)):
                raise InvalidPosterior(
                    f"a kron search met rows of layer {t} it had marginalised", field="ops"
                )
            drop = np.setdiff1d(np.arange(st.rows.size), keep)
            if drop.size**3 > keep.size**2 * (keep.size + st.M.shape[1]):
                # most rows go: G_R is the teacher's G on the rows left (column conditioning
                # never changes it), so factorise that and solve for P afresh
                LG = _chol(self.post.G[t][np.ix_(rows, rows)], f"row{t}")
                st.M = np.ascontiguousarray(st.M[keep])
                st.P = sla.cho_solve((LG, True), st.M, check_finite=False)
                st.LG, st.Gi_ = LG, None
            else:  # marginalising rows D: (G_KK)⁻¹ = Gi_KK − Gi_KD Gi_DD⁻¹ Gi_DK, and P
                G0 = _gi(st)
                K = sla.solve(G0[np.ix_(drop, drop)], G0[drop][:, keep], assume_a="pos")
                Gi = G0[np.ix_(keep, keep)] - G0[np.ix_(keep, drop)] @ K
                st.P = st.P[keep] - K.T @ st.P[drop]
                st.Gi_, st.LG, st.M = 0.5 * (Gi + Gi.T), None, st.M[keep]
            st.rows, st.cache = rows, {}
        if st.gone:
            raise InvalidPosterior(f"a kron search scored layer {t} after removing it", field="ops")
        return st

    def _parts(self, groups: np.ndarray) -> list[_Part]:
        """Where candidate groups (one per row, the same layers in every row) lie."""
        n = groups.shape[0]
        t, is_b, r, c = self.post._locate(groups.ravel())
        t, is_b, r, c = (a.reshape(groups.shape) for a in (t, is_b, r, c))
        bad = InvalidPosterior(
            "a kron search scores whole columns of layers over their current rows, or whole layers",
            field="ops",
        )
        if (t != t[:1]).any() or (is_b != is_b[:1]).any():
            raise bad
        parts = []
        for u in np.unique(t[0]):
            P = np.flatnonzero(t[0] == u)
            w = P[~is_b[0, P]]
            rows = np.unique(r[0, w]) if w.size else np.unique(r[0, P])
            if is_b[0, P].any():  # a whole layer, its biases included
                if n != 1:
                    raise bad
                parts.append(_Part(int(u), rows, None, True))
                continue
            R = rows.size
            if w.size % R:
                raise bad
            Cs = np.sort(c[:, w], axis=1)
            Q = Cs[:, ::R]
            if not (
                np.array_equal(Cs, np.repeat(Q, R, axis=1))
                and np.array_equal(
                    np.sort(r[:, w], axis=1), np.tile(np.repeat(rows, Q.shape[1]), (n, 1))
                )
            ):
                raise bad
            parts.append(_Part(int(u), rows, Q))
        return parts

    def _increments(self, part: _Part) -> np.ndarray:
        """The part's increment for each candidate; kept on the layer's state until it
        changes (a step of the global greedy changes the layers of one space only)."""
        st = self._state(part.layer, part.rows)
        if part.Q is None:
            key = ("whole", part.bias)
            if key not in st.cache:
                bias = self._zero_bias(part.layer, st) if part.bias else None
                st.cache[key] = self._layer_cost(part.layer, st, None, bias)
            return np.array([st.cache[key]])
        Q = part.Q
        f = self.post.factored[part.layer]
        g = f.group
        if Q.shape[1] != g or (Q[:, 0] % g).any() or (Q[:, -1] - Q[:, 0] != g - 1).any():
            return self._score_columns(st, Q)  # not whole channels: not kept
        known = st.cache.get("columns")
        if known is None:
            known = st.cache["columns"] = np.full(f.cols // f.group, np.nan)
        first = Q[:, 0] // f.group
        need = np.isnan(known[first])
        if need.any():
            known[first[need]] = self._score_columns(st, Q[need])
        return known[first]

    def _score_columns(self, st: _LayerState, Q: np.ndarray) -> np.ndarray:
        """Increments of conditioning each row of ``Q`` (column ids) to zero."""
        n, g = Q.shape
        q = np.minimum(np.searchsorted(st.cols, Q), st.cols.size - 1)
        ok = (st.cols[q] == Q).all(axis=1) & st.live[q].all(axis=1)
        out = np.full(n, np.inf)
        if not ok.any():
            return out
        if g == 1:
            out[ok] = _column_increments(st, q[ok, 0])
            return out
        sel = q[ok]
        Acc = _lower_blocks(st.A, sel)  # (k, g, g)
        S = np.einsum("rkg,rkh->kgh", st.M[:, sel], st.P[:, sel])  # M'_Cᵀ G⁻¹ M'_C
        try:
            np.linalg.cholesky(Acc)  # every block positive definite
            out[ok] = 0.5 * np.einsum("kgg->k", np.linalg.solve(Acc, S))
        except np.linalg.LinAlgError:  # some block is not: that one is no candidate
            inc = np.full(sel.shape[0], np.inf)
            for i in range(sel.shape[0]):
                try:
                    np.linalg.cholesky(Acc[i])
                except np.linalg.LinAlgError:
                    continue
                inc[i] = 0.5 * float(np.trace(np.linalg.solve(Acc[i], S[i])))
            out[ok] = inc
        return out

    def _layer_cost(self, t: int, st: _LayerState, D, bias) -> float:
        """Layer t's whole live block conditioned: to ``M' + D`` (rows × live columns;
        ``None``: to 0); ``bias`` is ``(rows, d)``, its biases of ``rows`` conditioned to
        their means plus ``d``, or ``None`` (biases not conditioned)."""
        live = np.flatnonzero(st.live)
        out = 0.0
        if live.size and st.rows.size:
            LA = _chol(_lower_part(st.A, live), f"col{t}")
            if D is None:  # to 0: D = −M' (its sign cancels)
                D, GD = st.M[:, live], st.P[:, live]
            else:
                GD = _gi(st) @ D
            W = sla.cho_solve((LA, True), D.T, check_finite=False)
            out += 0.5 * float(np.sum(GD * W.T))
        if bias is not None:
            rb, db = bias
            out += _bias_cost(db, _sub(self.post.bias[t], rb))
        return out

    def _zero_bias(self, t: int, st: _LayerState):
        """Layer t's biases of its current rows conditioned to 0, as ``_layer_cost`` takes
        them (``None`` when the layer has none)."""
        f = self.post.factored[t]
        return None if f.bias is None else (st.rows, -self.post.mean[f.bias + st.rows])

    def _condition_layer(self, t: int, st: _LayerState, target, bias) -> None:
        """Layer t's whole live block conditioned to ``target`` (rows × live columns in the
        state's order; ``None``: 0) and its biases as ``bias`` says; the layer leaves."""
        D = None if target is None else target - st.M[:, st.live]
        self.cost += self._layer_cost(t, st, D, bias)
        st.gone, st.cache = True, {}

    def _condition_columns(self, t: int, st: _LayerState, C: np.ndarray) -> None:
        """Condition live columns at positions ``C`` (sorted) of layer t's state to zero: a
        rank-|C| Schur update of ``A'`` in place (its conditioned rows and columns fall to
        zero and are dead), compacted once most of it is dead (the work falls as the
        greedy goes).  The search and the replay run on one BLAS thread (a channel's
        ``kh·kw`` columns are thin products, which a thread pool slows several times);
        a conditioning of many columns takes every core."""
        big = C.size * C.size * st.A.shape[0] >= _THREADED_WORK
        with all_threads() if big else contextlib.nullcontext():
            LC = _chol(_lower_part(st.A, C), f"col{t}")
            YM = sla.solve_triangular(LC, st.M[:, C].T, lower=True, check_finite=False)
            YP = sla.solve_triangular(LC, st.P[:, C].T, lower=True, check_finite=False)
        self.cost += 0.5 * float(np.sum(YM * YP))
        st.cache = {}
        live = st.live.copy()
        live[C] = False
        keep = np.flatnonzero(live)
        if keep.size < _COMPACT_BELOW * st.live.size:  # most go: update what stays only
            with all_threads() if big else contextlib.nullcontext():
                W = sla.solve_triangular(
                    LC, _lower_cross(st.A, keep, C).T, lower=True, check_finite=False
                )
                # the lower triangle of what stays (keep is sorted), less a rank-|C| syrk
                A = _lower_part(st.A, keep)
                if keep.size:
                    A = blas.dsyrk(-1.0, W, beta=1.0, c=A, trans=1, lower=1, overwrite_c=True)
                st.M = np.ascontiguousarray(st.M[:, keep] - YM.T @ W)
                st.P = np.ascontiguousarray(st.P[:, keep] - YP.T @ W)
            st.A, st.own = A, True
            st.cols, st.live = st.cols[keep], np.ones(keep.size, dtype=bool)
            return
        with all_threads() if big else contextlib.nullcontext():
            W = sla.solve_triangular(LC, _lower_columns(st.A, C).T, lower=True, check_finite=False)
            st.M -= YM.T @ W
            st.P -= YP.T @ W
        # A' is symmetric: its lower triangle alone is kept (a rank-|C| syrk, half a gemm)
        if not st.own:  # the posterior's factor: this state's own copy from here on
            st.A, st.own = np.array(st.A, order="F"), True
        with all_threads() if st.A.shape[0] >= 1024 else contextlib.nullcontext():
            st.A = blas.dsyrk(-1.0, W, beta=1.0, c=st.A, trans=1, lower=1, overwrite_c=True)
        st.live[C] = False
        if st.live.mean() < _COMPACT_BELOW:
            keep = np.flatnonzero(st.live)
            st.A = _lower_part(st.A, keep)
            st.M = np.ascontiguousarray(st.M[:, keep])
            st.P = np.ascontiguousarray(st.P[:, keep])
            st.cols, st.live = st.cols[keep], st.live[keep]

    def drops(self, groups) -> _KronDrops | _GroupDrops:
        if isinstance(groups, Columns):
            t, rows, cols = groups.layer, groups.rows, groups.cols
            return _KronDrops(self, t, self._state(t, np.sort(rows)), np.asarray(cols))
        return _GroupDrops(self, groups)

    def block(self, idx) -> _KronBlock:
        return _KronBlock(self, idx)

    def commit(self, idx: np.ndarray, targets: np.ndarray) -> None:
        """Condition ``idx`` to ``targets``: in each layer, whole columns over its current
        rows to zero, or its whole live block (and biases) to any target."""
        idx = np.asarray(idx, dtype=np.int64)
        if not idx.size:
            return
        targets = np.asarray(targets, dtype=np.float64)
        t, is_b, r, c = self.post._locate(idx)
        for u in np.unique(t):
            P = np.flatnonzero(t == u)
            w, b = P[~is_b[P]], P[is_b[P]]
            rows = np.unique(r[w]) if w.size else np.unique(r[b])
            st = self._state(int(u), rows)
            C = np.unique(c[w])
            if w.size != rows.size * C.size:
                raise InvalidPosterior(
                    f"a kron posterior conditions whole columns of layer {u} over its current rows",
                    field="ops",
                )
            q = np.minimum(np.searchsorted(st.cols, C), st.cols.size - 1)
            if C.size and not (np.array_equal(st.cols[q], C) and st.live[q].all()):
                raise InvalidPosterior(
                    f"a kron posterior conditions columns of layer {u} once", field="ops"
                )
            live = np.flatnonzero(st.live)
            if not (b.size or np.any(targets[w])):
                self._condition_columns(int(u), st, q)
                continue
            if not np.array_equal(q, live):
                raise InvalidPosterior(
                    f"a kron posterior conditions columns of layer {u} to zero, or the whole "
                    "layer to any target",
                    field="ops",
                )
            target = np.zeros((rows.size, live.size))
            target[np.searchsorted(rows, r[w]), np.searchsorted(C, c[w])] = targets[w]
            bias = None
            if b.size:
                rb = r[b]
                bias = (rb, targets[b] - self.post.mean[self.post.factored[int(u)].bias + rb])
            self._condition_layer(int(u), st, target, bias)


class _KronDrops:
    """Whole columns of one layer over its current rows (an MLP position's neurons)."""

    def __init__(self, sc: KronScorer, t: int, st: _LayerState, cols: np.ndarray) -> None:
        self.sc, self.t, self.st = sc, t, st
        self.cand = np.asarray(cols)  # the candidates' teacher column ids
        self.live = np.isin(self.cand, st.cols[st.live])

    def increments(self) -> np.ndarray:
        out = np.full(self.cand.size, np.inf)
        st = self.st
        out[self.live] = _column_increments(st, np.searchsorted(st.cols, self.cand[self.live]))
        return out

    def take(self, which) -> None:
        """Condition the columns ``which`` at once (one rank-|C| update)."""
        which = np.atleast_1d(which)
        if not self.live[which].all():
            raise ValueError("a candidate was taken already")
        st = self.st
        C = np.sort(np.searchsorted(st.cols, self.cand[which]))
        self.sc._condition_columns(self.t, st, C)
        self.live[which] = False


class _GroupDrops:
    """Candidate groups spanning one or more layers (a network channel's consumer slices
    in every layer that reads it, or a residual block's last layer whole): increments
    summed over the layers, which are independent."""

    def __init__(self, sc: KronScorer, groups) -> None:
        self.sc = sc
        if isinstance(groups, Consumers):
            self.parts = [self._slice(sl) for sl in groups.slices]
            self.n = groups.width
        elif isinstance(groups, Whole):
            sl = groups.slice
            self.parts = [_Part(sl.layer, np.sort(sl.rows), None, groups.bias is not None)]
            self.n = 1
        else:
            groups = np.asarray(groups, dtype=np.int64)
            self.parts = sc._parts(groups) if groups.size else []
            self.n = groups.shape[0]
        self.groups = groups
        self.live = np.ones(self.n, dtype=bool)

    def _slice(self, sl) -> _Part:
        f = self.sc.post.factored[sl.layer]
        return _Part(sl.layer, np.sort(sl.rows), f.columns(sl.channels).reshape(-1, f.group))

    def increments(self) -> np.ndarray:
        out = np.zeros(self.n)
        for part in self.parts:
            out += self.sc._increments(part)
        out[~self.live] = np.inf
        return out

    def take(self, which) -> None:
        which = np.atleast_1d(which)
        if not self.live[which].all():
            raise ValueError("a candidate was taken already")
        idx = indices(self.groups)[which].ravel()
        self.sc.commit(idx, np.zeros(idx.size))
        self.live[which] = False


class _KronBlock:
    """A layer's whole live block (rows × live columns, and its biases) to a pattern."""

    def __init__(self, sc: KronScorer, block) -> None:
        post = sc.post
        idx = indices(block)
        bad = InvalidPosterior(
            "a kron block is all live columns of a layer over its rows", field="ops"
        )
        if isinstance(block, LayerBlock) and block.structure == post.structure:
            # rows × cols row-major, then the rows' biases: no flat index to take apart
            u, R, L = block.layer, block.rows.size, block.cols.size
            rows = np.unique(block.rows)
            st = sc._state(u, rows)
            cols = st.cols[st.live]
            if rows.size != R or not np.array_equal(np.sort(block.cols), cols):
                raise bad
            w = np.zeros(idx.size, dtype=bool)
            w[: R * L] = True
            ri = np.repeat(np.searchsorted(rows, block.rows), L)
            ci = np.tile(np.searchsorted(cols, block.cols), R)
            r = None
            in_order = np.array_equal(rows, block.rows) and np.array_equal(cols, block.cols)
        else:
            t, is_b, r, c = post._locate(idx)
            u = int(t[0])
            if (t != u).any():
                raise InvalidPosterior("a kron block lies in one layer", field="ops")
            w = ~is_b
            rows = np.unique(r[w])
            st = sc._state(u, rows)
            cols = st.cols[st.live]
            R, L = rows.size, cols.size
            if w.sum() != R * L or not np.array_equal(np.unique(c[w]), cols):
                raise bad
            ri, ci, in_order = np.searchsorted(rows, r[w]), np.searchsorted(cols, c[w]), False
        self.sc, self.t, self.st, self.idx = sc, u, st, idx
        self.w, self.b = np.flatnonzero(w), np.flatnonzero(~w)
        self.ri, self.ci = ri, ci
        live = np.flatnonzero(st.live)
        self.M, self.P = st.M[:, live], st.P[:, live]
        # Q = G⁻¹ ⊗ A'⁻¹ and c = M': linear = ½ diag(G⁻¹)_k diag(A'⁻¹)_l − (G⁻¹ M' A'⁻¹)_kl;
        # the diagonals from the inverse factors, G⁻¹ M' A⁻¹ by solves (never A⁻¹ whole)
        if live.size == st.cols.size and st.cols.size == post.factored[u].cols:
            self.LA, ai = post.column_factor(u)  # untouched: the layer's own, cached
        else:
            self.LA = _chol(_lower_part(st.A, live), f"col{u}")
            ai = inverse_diagonal(self.LA)
        gi = np.diag(_gi(st))
        GMA = sla.cho_solve((self.LA, True), self.P.T, check_finite=False).T
        lin = np.empty(idx.size)
        if in_order:  # the block's own order is the state's: no gather
            lin[: R * L] = (0.5 * np.outer(gi, ai) - GMA).ravel()
        else:
            lin[self.w] = 0.5 * gi[self.ri] * ai[self.ci] - GMA[self.ri, self.ci]
        self.bias = None
        if self.b.size:
            rb = block.rows if r is None else r[self.b]
            bm = post.mean[idx[self.b]]
            bS = post.bias[u]
            bS = bS[rb] if bS.ndim == 1 else bS[np.ix_(rb, rb)]
            Bi = np.diag(1.0 / bS) if bS.ndim == 1 else np.linalg.inv(bS)
            lin[self.b] = 0.5 * np.diag(Bi) - Bi @ bm
            self.bias = (bm, bS)
        self.linear = lin
        self.GMA = GMA
        self.quad0 = float(np.sum(GMA * self.M))  # tr(G⁻¹ M' A'⁻¹ M'ᵀ): the cost of 0

    def cost(self, targets: np.ndarray) -> float:
        """``½ tr(G⁻¹ D A'⁻¹ Dᵀ)`` with ``D = T − M'``.  A pattern with at most one entry a
        row (a merge's pairing, all zeros) is ``½ (tr(G⁻¹ T A'⁻¹ Tᵀ) − 2 ⟨G⁻¹ M' A'⁻¹, T⟩
        + tr(G⁻¹ M' A'⁻¹ M'ᵀ))``: ``A'⁻¹`` only at its columns (one triangular solve of
        that many right-hand sides), the rest known; any other, two solves of all D."""
        st = self.st
        tw = targets[self.w]
        nz = np.flatnonzero(tw)
        ri, ci = self.ri[nz], self.ci[nz]
        if nz.size <= self.M.shape[0] and np.unique(ri).size == nz.size:
            E = np.zeros((self.LA.shape[0], nz.size))
            E[ci, np.arange(nz.size)] = 1.0
            Y = sla.solve_triangular(self.LA, E, lower=True, check_finite=False)
            v = tw[nz]
            quad = float(v @ ((_gi(st)[np.ix_(ri, ri)] * (Y.T @ Y)) @ v))
            out = 0.5 * (quad - 2.0 * float(v @ self.GMA[ri, ci]) + self.quad0)
        else:
            D = np.zeros(self.M.shape)
            D[self.ri, self.ci] = tw
            D -= self.M
            W = sla.cho_solve((self.LA, True), D.T, check_finite=False)
            out = 0.5 * float(np.sum((_gi(st) @ D) * W.T))
        if self.bias is not None:
            bm, bS = self.bias
            out += _bias_cost(targets[self.b] - bm, bS)
        return out

    def commit(self, targets: np.ndarray) -> None:
        self.sc.cost += self.cost(np.asarray(targets, dtype=np.float64))
        self.st.gone = True
