"""The scoring kernels (docs/theory.md §6) against one another and against dense conditioning.

Every format's scorer must give the exact increments and costs of the dense
formulas: the Woodbury kernel (``lowrank``), the per-layer matrix-normal kernel
(``kron``), independence (``diag``) and the dense kernel on every format.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from planner import DiagPosterior, FullPosterior, Structure
from planner.ops import Tracked
from planner.posterior import KronPosterior, LowRankPosterior, PrecisionPosterior, precision
from planner.posterior.kron import KronScorer
from planner.posterior.lowrank import LowRankScorer
from planner.posterior.scoring import DenseScorer, DiagScorer, LayerBlock
from tests.helpers import close, make
from tests.strategies import spd


def dense_cost(mean, cov, B, v) -> float:
    if len(B) == 0:
        return 0.0
    d = np.asarray(v) - mean[B]
    return 0.5 * float(d @ np.linalg.solve(cov[np.ix_(B, B)], d))


def kernels(fmt: str, s: Structure, rng: np.random.Generator):
    """(posterior, its dense mean and covariance, the scorers to check)."""
    if fmt == "diag":
        mean, var = rng.normal(size=s.n_params), rng.uniform(0.3, 2, size=s.n_params)
        post = DiagPosterior.from_arrays(s, {"mean": mean, "variance": var})
        return post, mean, np.diag(var), [DiagScorer(post), DenseScorer(post)]
    post, mean, cov = make(fmt, s, rng)
    native = {"lowrank": LowRankScorer, "kron": KronScorer}.get(fmt)
    return post, mean, cov, [DenseScorer(post)] + ([native(post)] if native else [])


@given(
    st.sampled_from(["diag", "lowrank", "kron", "precision"]),
    st.integers(0, 2**32 - 1),
    st.booleans(),
    st.integers(1, 3),
    st.integers(1, 3),
)
def test_stages_and_blocks_score_exactly(fmt, seed, bias, drop3, drop2):
    """Teacher (3, 5, 4, 4, 2): remove neurons of position 4 by exact increments, then
    merge layer 3 into position 2 (a block of unit-vector rows), as the search does;
    every increment and cost equals dense conditioning from scratch."""
    rng = np.random.default_rng(seed)
    s = Structure.mlp((3, 5, 4, 4, 2), bias=bias)
    _, mean, cov, scorers = kernels(fmt, s, rng)
    for sc in scorers:
        tr = Tracked.start(s)
        B, v = [], []
        groups = tr.outgoing_all(4)
        drops = sc.drops(groups)
        for _ in range(drop3):
            inc = drops.increments()
            for i in np.flatnonzero(np.isfinite(inc)):
                g = groups[i]
                close(inc[i], dense_cost(mean, cov, B + list(g), v + [0.0] * g.size) - sc.cost)
            i = int(np.argmin(inc))
            drops.take(np.array([i]))
            B += list(groups[i])
            v += [0.0] * groups.shape[1]
            close(sc.cost, dense_cost(mean, cov, B, v))
        taken = sorted((i for i in range(groups.shape[0]) if groups[i][0] in B), reverse=True)
        tr.apply_phis(4, taken)
        # position 3 down to position 2's width (4), then layer 3 as a block
        U = tr.weights(3)
        P = [U.ravel()] + ([tr.biases(3)] if bias else [])
        P = np.concatenate(P)
        block = sc.block(P)
        if isinstance(sc, KronScorer):  # a merge's own description: the same numbers
            lay = tr.layers[3 - 2]
            assert np.array_equal(LayerBlock(s, lay.src, lay.rows, lay.cols).indices(), P)
            r, c = rng.permutation(lay.rows), rng.permutation(lay.cols)
            Q = LayerBlock(s, lay.src, r, c)
            where = {int(i): k for k, i in enumerate(P)}
            order = np.array([where[int(i)] for i in Q.indices()])
            close(sc.block(Q).linear, block.linear[order])
        t = np.zeros(P.size)
        pi = rng.permutation(U.shape[1])[: U.shape[0]]
        t[np.arange(U.shape[0]) * U.shape[1] + pi] = 1.0
        base = dense_cost(mean, cov, B, v)
        for q in range(0, P.size, 5):  # the linear term: one target from 0 to 1
            e = np.zeros(P.size)
            e[q] = 1.0
            want = dense_cost(mean, cov, B + list(P), v + list(e))
            want -= dense_cost(mean, cov, B + list(P), v + [0.0] * P.size)
            close(block.linear[q], want)
        close(block.cost(t), dense_cost(mean, cov, B + list(P), v + list(t)) - base)
        block.commit(t)
        close(sc.cost, dense_cost(mean, cov, B + list(P), v + list(t)))


def test_the_formats_choose_their_kernel_by_size():
    small = Structure.mlp((3, 5, 2))
    rng = np.random.default_rng(0)
    for fmt in ("lowrank", "kron"):
        post, _, _ = make(fmt, small, rng)
        assert isinstance(post.scorer(), DenseScorer)
    big = Structure.mlp((64, 64, 2))
    p = big.n_params
    lr = LowRankPosterior(big, np.zeros(p), np.ones(p), np.zeros((p, 2)))
    assert isinstance(lr.scorer(), LowRankScorer)
    arrays = {"mean": np.zeros(p)}
    for t in (2, 3):
        arrays[f"row{t}"], arrays[f"col{t}"] = np.eye(big.width(t)), np.eye(big.width(t - 1))
    assert isinstance(KronPosterior.from_validated(big, arrays).scorer(), KronScorer)
    _ = (FullPosterior, PrecisionPosterior)


@given(st.sampled_from(["full", "precision"]), st.integers(0, 2**32 - 1), st.integers(4, 10))
def test_a_stage_taken_in_any_order_scores_exactly(fmt, seed, n_take):
    """The dense kernel computes rows of C for the next cheapest candidates ahead of
    their turn (none, one or several) and compacts the columns of taken ones: taken in
    any order (not the cheapest first, several at once), every increment and cost is
    still exact."""
    rng = np.random.default_rng(seed)
    s = Structure.mlp((3, 2, 12, 3), bias=bool(seed % 2))
    if fmt == "full":
        mean = rng.normal(size=s.n_params)
        cov = spd(rng, s.n_params)
        post = FullPosterior.from_dense(s, mean, cov)
    else:
        post, mean, cov = make(fmt, s, rng)
        post.prepare(s.layer_offset(3), s.layer_size(3) + s.layer_size(4))  # views of Σ
    sc = DenseScorer(post)
    groups = Tracked.start(s).outgoing_all(3)
    drops = sc.drops(groups)
    # wide candidates compute no rows ahead (SPECULATE_ROWS): that path too
    drops.SPECULATE_ROWS = [300, 3, 6][seed % 3]
    order = rng.permutation(groups.shape[0])[:n_take]
    B: list[int] = []
    k = 0
    while k < order.size:
        inc = drops.increments()
        for i in np.flatnonzero(np.isfinite(inc)):
            close(
                inc[i], dense_cost(mean, cov, B + list(groups[i]), [0.0] * (len(B) + 3)) - sc.cost
            )
        pick = order[k : k + (2 if rng.random() < 0.3 else 1)]
        # the stage's last step may commit its own block alone (no rows of C: never read)
        drops.take(pick, last=k + pick.size == order.size and rng.random() < 0.5)
        for i in pick:
            B += list(groups[i])
        k += pick.size
        close(sc.cost, dense_cost(mean, cov, B, [0.0] * len(B)))


@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 7))
def test_kron_rows_leave_by_either_route_exactly(seed, n_cols, n_rows):
    """Rows a kron layer loses after some of its columns were conditioned leave its state
    by a Schur complement of ``G⁻¹`` (a few) or by refactorising the teacher's ``G`` on the
    rows left (most): either way every column's increment is dense conditioning's."""
    from planner.posterior.scoring import Columns

    rng = np.random.default_rng(seed)
    s = Structure.mlp((3, 5, 8, 2))
    post, mean, cov = make("kron", s, rng)
    sc = KronScorer(post)
    rows, cols = np.arange(8), np.arange(5)
    first = sc.drops(Columns(s, 3, rows, cols))
    taken = rng.permutation(5)[:n_cols]
    first.take(taken)
    B = list(Columns(s, 3, rows, cols).indices()[taken].ravel())
    left = np.sort(rng.permutation(8)[:n_rows])
    groups = Columns(s, 3, left, cols)
    inc = sc.drops(groups).increments()
    base = dense_cost(mean, cov, B, [0.0] * len(B))
    close(sc.cost, base)
    for i in np.flatnonzero(np.isfinite(inc)):
        g = list(groups.indices()[i])
        close(inc[i], dense_cost(mean, cov, B + g, [0.0] * (len(B) + len(g))) - base)
    assert np.isinf(inc[taken]).all()


@given(st.integers(0, 2**32 - 1), st.integers(1, 2))
def test_kept_factors_bound_every_later_increment_from_below(seed, n_other):
    """A stage keeping its factors (a network's global greedy) offers ``½ cᵀ S_then⁻¹ c``:
    equal to the increments just scored, and never above them after commits elsewhere
    (taken in by ``absorb``, its blocks' updates deferred) or by the stage itself; before
    any scoring and once its groups shrink, the Cauchy–Schwarz bounds, never above either."""
    rng = np.random.default_rng(seed)
    s = Structure.mlp((3, 4, 6, 3), bias=bool(seed % 2))
    mean, cov = rng.normal(size=s.n_params), spd(rng, s.n_params)
    sc = DenseScorer(FullPosterior.from_dense(s, mean, cov))
    tr = Tracked.start(s)
    mine, other = sc.drops(tr.outgoing_all(3)), sc.drops(tr.outgoing_all(2))
    mine.keep_factors = True
    first = mine.bounds()  # nothing scored yet: (cᵀc)² / cᵀSc, below the increments too
    exact = mine.increments()
    assert np.all(first[mine.live] <= exact[mine.live] * (1 + 1e-12) + 1e-12)
    close(mine.bounds()[mine.live], exact[mine.live])
    for j in rng.permutation(other.live.size)[:n_other]:
        n0 = sc.n
        other.take(int(j))
        mine.absorb(sc.n - n0)
        b, now = mine.bounds(), mine.increments()
        live = mine.live
        assert np.all(b[live] <= now[live] * (1 + 1e-12) + 1e-12)
        mine.keep_factors = False  # the same numbers without the factors kept
        close(mine.increments()[live], now[live])
        mine.keep_factors = True
        mine.increments()
    g = int(np.argmin(mine.increments()))
    n0 = sc.n
    mine.take(g)
    other.absorb(sc.n - n0)
    b, now = mine.bounds(), mine.increments()
    assert np.all(b[mine.live] <= now[mine.live] * (1 + 1e-12) + 1e-12)
    # the groups lose entries (their readers' rows went elsewhere): the factors no longer
    # bound, the last solutions do; the increments are those of the smaller groups.  A
    # commit taken in before (its update of the blocks still waiting) and one after: the
    # blocks and the waiting updates are cut to the entries left when next read
    groups = tr.outgoing_all(3)
    keep = rng.random(groups.shape[1]) < 0.6
    keep[rng.integers(keep.size)] = True
    n0 = sc.n
    other.take(int(np.flatnonzero(other.live)[0]))
    mine.absorb(sc.n - n0)
    mine.restrict(keep)
    n0 = sc.n
    other.take(int(np.flatnonzero(other.live)[0]))
    mine.absorb(sc.n - n0)
    b, now = mine.bounds(), mine.increments()
    live = np.flatnonzero(mine.live)
    assert np.all(b[live] <= now[live] * (1 + 1e-12) + 1e-12)
    B, base = list(sc.B[: sc.n]), sc.cost
    for i in live:
        g = list(groups[i][keep])
        close(now[i], dense_cost(mean, cov, B + g, [0.0] * (len(B) + len(g))) - base)
    # the columns restricted away count as dead, and go once they are 30 % of the stage's:
    # taking from the smaller groups then conditions exactly the entries left
    assert mine.G.size - mine.dead == np.unique(mine.pos[mine.live]).size
    assert mine.dead <= 0.3 * mine.G.size
    i = int(live[-1])
    mine.take(i)
    g = list(groups[i][keep])
    close(sc.cost, dense_cost(mean, cov, B + g, [0.0] * (len(B) + len(g))))
    if mine.live.any():
        close(
            mine.increments()[mine.live],
            [
                dense_cost(mean, cov, B + g + list(groups[j][keep]), [0.0] * (len(B) + 2 * len(g)))
                - sc.cost
                for j in np.flatnonzero(mine.live)
            ],
        )


@given(st.integers(0, 2**32 - 1), st.booleans())
def test_the_precision_side_of_a_block_is_exact_by_either_route(seed, with_b):
    """``conditional_precision``'s two routes (the factor of Λ_MM, or the trailing block
    of the cached factor of Λ) give ``diag Q`` and ``Q c`` of dense conditioning."""
    rng = np.random.default_rng(seed)
    s = Structure.mlp((3, 4, 5, 3), bias=bool(seed % 2))
    post, mean, cov = make("precision", s, rng)
    L3 = s.layer(3)
    P = np.sort(L3.U.ravel())
    B = s.layer(4).U[:, rng.permutation(5)[: int(rng.integers(1, 4))]].ravel() if with_b else []
    B = np.asarray(B, dtype=np.int64)
    v = rng.normal(size=B.size)
    M, _ = post._rest(B, P)
    S = cov[np.ix_(P, P)]
    c = mean[P].copy()
    if B.size:
        K = np.linalg.solve(cov[np.ix_(B, B)], cov[np.ix_(B, P)])
        S -= cov[np.ix_(P, B)] @ K
        c += K.T @ (v - mean[B])
    Q = np.linalg.inv(S)
    routes = [post._native_schur(B, v, P, M), post._trailing_schur(B, v, P, M)]
    was = precision._BLOCK_BYTES
    try:  # the factor's rows read a few at a time, as for a large teacher
        precision._BLOCK_BYTES = 8 * (s.n_params - int(min(P.min(), B.min(initial=P.min()))))
        precision._BLOCK_BYTES *= int(rng.integers(1, 7))
        routes.append(post._trailing_schur(B, v, P, M))
    finally:
        precision._BLOCK_BYTES = was
    for q, Qc in routes:
        np.testing.assert_allclose(q, np.diag(Q), rtol=1e-9, atol=1e-9 * np.abs(Q).max())
        np.testing.assert_allclose(Qc, Q @ c, rtol=1e-9, atol=1e-9 * np.abs(Q @ c).max())


@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 5, 70]))
def test_batched_cholesky_solves_equal_dense_solves(seed, k):
    """``cho_solve_batched`` (vectorised substitution up to order 64, one triangular solve
    each above) gives ``S⁻¹ r`` for every member of a batch."""
    from planner.posterior.scoring import cho_solve_batched

    rng = np.random.default_rng(seed)
    S = np.stack([spd(rng, k) for _ in range(3)])
    r = rng.normal(size=(3, k))
    close(cho_solve_batched(np.linalg.cholesky(S), r), np.linalg.solve(S, r[..., None])[..., 0])


@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 10, 64, 65]), st.booleans())
def test_bordered_increments_equal_dense_solves(seed, k, singular):
    """The increments ``½ rᵀ S⁻¹ r`` of a batch (small blocks factorised bordered, with the
    solve in the factor's last row; larger ones factorised and solved) equal dense solves,
    their factors are the blocks' Cholesky factors, and a block that is not positive
    definite gets no increment while the others keep theirs."""
    from planner.posterior.scoring import _factored_increments

    rng = np.random.default_rng(seed)
    S = np.stack([spd(rng, k) for _ in range(4)])
    r = rng.normal(size=(4, k))
    if singular:
        S[1] = -np.eye(k)
    inc, L, ok = _factored_increments(S, r)
    good = np.arange(4) != 1 if singular else np.ones(4, dtype=bool)
    assert np.array_equal(ok, good)
    assert np.isinf(inc[~good]).all()
    want = [0.5 * r[i] @ np.linalg.solve(S[i], r[i]) for i in np.flatnonzero(good)]
    close(inc[good], want)
    close(np.matmul(L[good], np.swapaxes(L[good], 1, 2)), S[good])


@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 3, 12]), st.integers(0, 9), st.booleans())
def test_direct_lapack_helpers_equal_scipy(seed, k, n, fortran):
    """``cholesky_lower`` and ``lower_solve`` (LAPACK and BLAS without scipy's checking
    wrappers) equal scipy's Cholesky and triangular solves, for factors in either memory
    order and right-hand sides of one or several columns; a matrix that is not positive
    definite has no factor."""
    import scipy.linalg as sla

    from planner.linalg import cholesky_lower, lower_solve

    rng = np.random.default_rng(seed)
    S = spd(rng, k)
    L = cholesky_lower(S)
    close(L, sla.cholesky(S, lower=True))
    L = np.asfortranarray(L) if fortran else np.ascontiguousarray(L)
    for b in (rng.normal(size=k), rng.normal(size=(k, n))):
        x = lower_solve(L, b)
        assert x.shape == b.shape
        close(x, sla.solve_triangular(L, b, lower=True))
    assert cholesky_lower(-S) is None


@given(st.integers(0, 2**32 - 1), st.integers(1, 30), st.integers(0, 6), st.booleans())
def test_gram_downdate_equals_dense(seed, n, k, view):
    """``gram_downdate(S, X)`` is ``S − XᵀX``: written over a C-ordered ``S`` (no copy),
    and right for a strided view too (then on a copy, ``S`` left as it was), rank 0
    included."""
    from planner.linalg import gram_downdate

    rng = np.random.default_rng(seed)
    A = spd(rng, n + 2)
    S = A[1:-1, 1:-1] if view else A[1:-1, 1:-1].copy()
    X = rng.normal(size=(k, n))
    before = S.copy()
    want = before - X.T @ X
    out = gram_downdate(S, X)
    close(out, want)
    if S.flags.c_contiguous:  # in place
        assert np.shares_memory(out, S) or not k
        close(S, want)
    else:
        assert np.array_equal(S, before)


@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([(3, 4, 2), (1, 130, 130), (20, 60, 40), (12, 100, 80)]),
    st.booleans(),
)
def test_block_updates_by_every_path_equal_dense(seed, shape, every):
    """``S[at] −= Y Yᵀ`` a candidate: a small batch in one product, one large block on
    every core, a large batch split over threads (small blocks batched, larger ones one
    by one), for some blocks or (``at`` a slice) every one: the same numbers as dense
    products."""
    from threadpoolctl import threadpool_limits

    from planner._threads import single_threaded
    from planner.posterior.scoring import _gram_update

    rng = np.random.default_rng(seed)
    n, k, r = shape
    S = rng.normal(size=(n + 3, k, k))
    ids = np.arange(n + 3) if every else np.sort(rng.permutation(n + 3)[:n])
    Y = rng.normal(size=(ids.size, k, r))
    want = S.copy()
    for i, a in enumerate(ids):
        want[a] -= Y[i] @ Y[i].T
    with threadpool_limits(2, user_api="blas"), single_threaded():
        _gram_update(S, slice(None) if every else ids, Y)
    np.testing.assert_allclose(S, want, rtol=1e-12, atol=1e-9)
