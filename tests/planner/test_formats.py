"""Structured formats (docs/theory.md §7) against the slow dense reference.

Each format is aligned in its own closed form; the reference conditions the
densified covariance step by step.  Mean, covariance and cost agree to 1e-9.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner import InvalidPosterior, Plan, Structure
from planner.posterior import KronPosterior, LowRankPosterior, PrecisionPosterior, kron, lowrank
from planner.search import search
from tests.helpers import close, make
from tests.reference import ref_apply
from tests.strategies import nets, sequences, to_ops, to_structure


@st.composite
def format_cases(draw, fmt):
    net = draw(nets(max_T=5, max_width=4, rnn=False if fmt == "kron" else None))
    ops = draw(sequences(net, max_steps=6))
    return net, ops, draw(st.integers(0, 2**32 - 1))


def check(fmt, case):
    net, ops, seed = case
    s = to_structure(net)
    post, mean, cov = make(fmt, s, np.random.default_rng(seed))
    plan = Plan(s, to_ops(ops))
    out = plan.apply(post)
    _, ref_mean, ref_cov, costs = ref_apply(net, mean, cov, ops)
    assert type(out) is type(post) and out.structure == plan.student
    close(out.mean, ref_mean)
    close(out.dense_covariance(), ref_cov)
    close(plan.cost(post), sum(costs))


@given(format_cases("lowrank"))
def test_lowrank_equals_the_reference(case):
    check("lowrank", case)


@given(format_cases("precision"))
def test_precision_equals_the_reference(case):
    check("precision", case)


@given(format_cases("kron"))
def test_kron_equals_the_reference(case):
    check("kron", case)


@settings(max_examples=30)
@given(format_cases("kron"))
def test_kron_column_factors_kept_from_validation_give_the_same_plans(case):
    """Validation's Cholesky factors of the column factors, and the diagonals of their
    inverses, kept beside the arrays (as the service stores them) and given back: every
    cost, search and alignment equals factorising afresh; a kept factor that is not
    numerically positive definite is refactorised as a fresh one would be."""
    net, ops, seed = case
    s = to_structure(net)
    post, _, _ = make("kron", s, np.random.default_rng(seed))
    arrays = post.to_arrays()
    derived = KronPosterior.from_arrays(s, arrays).derived_arrays()
    assert set(derived) == set(KronPosterior.derived_names(s))
    for t, A in post.A.items():
        L = derived[f"colfactor{t}"]
        close(L @ L.T, A)
        close(derived[f"colinv{t}"], np.diag(np.linalg.inv(A)))
    broken = {f"colfactor{t}": np.eye(A.shape[0]) * 1e-200 for t, A in post.A.items()}
    plan = Plan(s, to_ops(ops))
    plain = KronPosterior.from_validated(s, arrays)
    for kept in (derived, broken):
        p = KronPosterior.from_validated(s, {**arrays, **kept})
        close(plan.cost(p), plan.cost(plain))
        a, b = plan.apply(p), plan.apply(KronPosterior.from_validated(s, arrays))
        close(a.mean, b.mean)
        close(a.dense_covariance(), b.dense_covariance())
        # the Kronecker scorer (not the dense one small posteriors get), and 0 work: the
        # construction's own costs, its merges' blocks from the column factors
        with mock.patch.object(kron, "DENSE_PARAMS", 0):
            for work in (None, 0.0):
                found = search(
                    KronPosterior.from_validated(s, {**arrays, **kept}), plan.student, work=work
                )
                expect = search(KronPosterior.from_validated(s, arrays), plan.student, work=work)
                assert found.plan.ops == expect.plan.ops
                close(found.cost, expect.cost)


@pytest.mark.parametrize("fmt", ["kron", "lowrank"])
@settings(max_examples=30)
@given(data=st.data())
def test_a_structured_scorer_searches_as_the_dense_scorer_does(fmt, data):
    """The Kronecker and Woodbury scorers (a posterior too large to score densely;
    forced here) find plans of the dense scorer's cost on the same Gaussian, the
    branch and bound included.  On kron a merge's rows are conditioned all at once
    there: the walk had conditioned them row by row, which a Kronecker state cannot
    (a 422 for a valid plan request)."""
    net, ops, seed = data.draw(format_cases(fmt))
    module, native = {"kron": (kron, kron.KronScorer), "lowrank": (lowrank, lowrank.LowRankScorer)}[
        fmt
    ]
    s = to_structure(net)
    post, _, _ = make(fmt, s, np.random.default_rng(seed))
    student = Plan(s, to_ops(ops)).student
    dense = search(post, student)
    with mock.patch.object(module, "DENSE_PARAMS", 0):
        assert isinstance(post.scorer(), native)
        found = search(post, student)
    close(found.cost, found.plan.cost(post))
    if found.exhaustive and dense.exhaustive:  # both the optimum
        close(found.cost, dense.cost)
    else:  # a walk cut at its node budget (a node's charge counts its scorer's bytes,
        # which differ by format): a finished walk's optimum bounds the other's cost
        if dense.exhaustive:
            assert found.cost >= dense.cost * (1 - 1e-9) - 1e-12
        if found.exhaustive:
            assert dense.cost >= found.cost * (1 - 1e-9) - 1e-12


@pytest.mark.parametrize("fmt", ["lowrank", "precision", "kron"])
def test_small_block_access_equals_the_dense_form(fmt):
    from planner.ops import Tracked

    s = Structure.mlp((3, 5, 4, 2), bias=True)
    post, mean, cov = make(fmt, s, np.random.default_rng(3))
    from planner import FullPosterior

    dense = FullPosterior.from_dense(s, mean, cov)
    tr = Tracked.start(s)
    groups, rows = tr.outgoing_all(2), tr.weights(3)
    close(post.group_costs(groups), dense.group_costs(groups))
    close(post.precision_diagonal(), dense.precision_diagonal())
    close(post.variance(), dense.variance())
    idx = np.array([0, 7, 20, 21, 40])
    close(post.cov_block(idx), dense.cov_block(idx))
    other = np.array([3, 7, 33, 45, 46])
    close(post.cov_cross(idx, other), cov[np.ix_(idx, other)])
    close(post.inverse_block(rows.ravel()), np.linalg.inv(cov[np.ix_(rows.ravel(), rows.ravel())]))


@given(
    st.sampled_from(["full", "diag", "lowrank", "precision", "kron"]),
    st.integers(0, 2**32 - 1),
    st.integers(1, 6),
    st.integers(0, 5),
    st.integers(0, 5),
)
@settings(max_examples=40, deadline=None)
def test_cov_blocks_read_every_pair_of_the_dense_covariance(fmt, seed, n, a, b):
    """``cov_blocks(rows, cols)[k] = Σ[rows[k]][:, cols[k]]`` in every format, with indices
    repeated within a row and across rows (the exchange moves' pattern blocks, a criterion's
    groups)."""
    from planner import FullPosterior
    from planner.posterior import DiagPosterior

    s = Structure.mlp((3, 5, 4, 2), bias=True)
    rng = np.random.default_rng(seed)
    if fmt in ("full", "diag"):
        post, mean, cov = make("precision", s, rng)
        if fmt == "diag":
            cov = np.diag(np.diag(cov))
            post = DiagPosterior.from_arrays(s, {"mean": mean, "variance": np.diag(cov).copy()})
        else:
            post = FullPosterior.from_dense(s, mean, cov)
    else:
        post, mean, cov = make(fmt, s, rng)
    rows = rng.integers(0, s.n_params, size=(n, a))
    cols = rng.integers(0, s.n_params, size=(n, b))
    got = post.cov_blocks(rows, cols)
    assert got.shape == (n, a, b)
    for k in range(n):
        close(got[k], cov[np.ix_(rows[k], cols[k])])


S = Structure.mlp((2, 3, 2), bias=True)  # 17 parameters


@pytest.mark.parametrize(
    ("arrays", "field"),
    [
        ({"mean": np.zeros(17), "variance": np.ones(17), "factor": np.ones((16, 2))}, "factor"),
        ({"mean": np.zeros(17), "variance": np.ones(17), "factor": np.ones(17)}, "factor"),
        ({"mean": np.zeros(17), "variance": -np.ones(17), "factor": np.ones((17, 2))}, "variance"),
        (
            {"mean": np.zeros(17), "variance": np.ones(17), "factor": np.full((17, 2), np.nan)},
            "factor",
        ),
        ({"mean": np.zeros(17), "variance": np.ones(17)}, "factor"),
    ],
)
def test_bad_lowrank(arrays, field):
    with pytest.raises(InvalidPosterior) as err:
        LowRankPosterior.from_arrays(S, arrays)
    assert err.value.field == field


def _kron_arrays(**change):
    a = {
        "mean": np.zeros(17),
        "row2": np.eye(3),
        "col2": np.eye(2),
        "bias2": np.ones(3),
        "row3": np.eye(2),
        "col3": np.eye(3),
        "bias3": np.eye(2),
    }
    a.update(change)
    return {k: v for k, v in a.items() if v is not None}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"row2": -np.eye(3)}, "row2"),
        ({"col3": np.eye(2)}, "col3"),
        ({"bias2": -np.ones(3)}, "bias2"),
        ({"bias3": np.array([[1.0, 2.0], [2.0, 1.0]])}, "bias3"),
        ({"row3": None}, "row3"),
    ],
)
def test_bad_kron(change, field):
    with pytest.raises(InvalidPosterior) as err:
        KronPosterior.from_arrays(S, _kron_arrays(**change))
    assert err.value.field == field


def test_kron_is_for_mlps_only():
    rnn = Structure.rnn((2, 3, 2))
    with pytest.raises(InvalidPosterior, match="MLP") as err:
        KronPosterior.from_arrays(rnn, {"mean": np.zeros(rnn.n_params)})
    assert err.value.field == "posterior.format"


def test_bad_precision():
    with pytest.raises(InvalidPosterior) as err:
        PrecisionPosterior.from_arrays(S, {"mean": np.zeros(17), "precision": -np.eye(17)})
    assert err.value.field == "precision"


def test_every_spec_format_is_registered():
    from planner import FORMATS, from_arrays

    assert set(FORMATS) == {"full", "diag", "lowrank", "kron", "precision"}
    with pytest.raises(InvalidPosterior) as err:
        from_arrays("dense", S, {})
    assert err.value.field == "posterior.format"


@given(format_cases("diag"))
def test_diag_plan_cost_by_blocks_equals_the_flat_sum(case):
    from planner import DiagPosterior
    from planner.posterior.base import Posterior

    net, ops, seed = case
    s = to_structure(net)
    rng = np.random.default_rng(seed)
    post = DiagPosterior.from_arrays(
        s, {"mean": rng.normal(size=s.n_params), "variance": rng.uniform(0.3, 2, s.n_params)}
    )
    plan = Plan(s, to_ops(ops))
    close(post.plan_cost(plan.compiled), Posterior.plan_cost(post, plan.compiled))


def test_a_kron_posterior_refuses_arbitrary_conditioning_with_a_typed_error():
    from planner import Unsupported

    s = Structure.mlp((3, 4, 2))
    post, _, _ = make("kron", s, np.random.default_rng(0))
    with pytest.raises(Unsupported) as err:
        post.condition(np.array([0]), np.zeros(1), np.array([1, 2]), s)
    assert err.value.field == "posterior.format"


@pytest.mark.parametrize("fmt", ["full", "lowrank", "kron"])
def test_a_numerically_singular_constraint_is_refused(fmt):
    """Two outgoing weights that are numerically one variable, conditioned along it: the
    dense formula meets a vanishing pivot, Woodbury a cancellation, kron a singular
    column factor; each refuses with a typed error naming the plan (docs/theory.md §8)."""
    from planner import FullPosterior, SingularConstraint

    s = Structure.mlp((1, 2, 1))  # U_2 (2 params), then U_3 (2 params: indices 2, 3)
    mean = np.array([0.3, -0.2, 1.0, 1.0])
    B = np.array([2, 3])
    if fmt == "kron":
        arrays = {"mean": mean, "row2": np.eye(2), "col2": np.eye(1), "row3": np.eye(1)}
        arrays["col3"] = np.array([[1.0, 1.0], [1.0, 1.0]])
        post = KronPosterior.from_validated(s, arrays)
        with pytest.raises(SingularConstraint) as err:
            post.constraint_cost(B, np.zeros(2))
    else:
        var = np.array([1.0, 1.0, 1e-12, 1e-12])
        F = np.zeros((4, 1))
        F[2:, 0] = 1e4
        if fmt == "lowrank":
            post = LowRankPosterior.from_arrays(s, {"mean": mean, "variance": var, "factor": F})
        else:
            post = FullPosterior(s, mean, np.diag(var) + F @ F.T)
        with pytest.raises(SingularConstraint) as err:
            post.constraint_cost(B, np.zeros(2))
    assert err.value.field == "ops"


def test_a_precision_whose_cost_is_lost_to_cancellation_is_refused():
    """A precision that rounding has made indefinite along B (a float32 round trip of an
    ill-conditioned Laplace precision can): its cost formula cancels to nothing."""
    from planner import SingularConstraint

    s = Structure.mlp((1, 1, 1))  # two parameters
    lam = np.array([[1.0, 1.0], [1.0, 1.0 - 1e-15]])
    post = PrecisionPosterior(s, np.array([0.0, 1.0]), lam)
    with pytest.raises(SingularConstraint):
        post.constraint_cost(np.array([1]), np.zeros(1))


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(30, 60, 50, 3), (24, 48, 40, 30, 3)]))
def test_a_lowrank_alignment_from_the_searchs_scorer_equals_a_fresh_one(seed, widths):
    """A search on a lowrank posterior large enough for its Woodbury scorer hands the
    scorer of the plan it returns to the posterior (``adopt``): aligning that posterior
    gives the alignment of a posterior that never searched, and the plan's cost is the
    search's."""
    s = Structure.mlp(widths, bias=bool(seed % 2))
    rng = np.random.default_rng(seed)
    p = s.n_params
    mean, var = rng.normal(size=p), rng.uniform(0.5, 2.0, size=p)
    F = rng.normal(size=(p, 3)) * 0.3
    post = LowRankPosterior(s, mean, var, F)
    assert p > lowrank.DENSE_PARAMS  # the Woodbury scorer, not dense blocks
    student = s.inherit((widths[0], *[w // 2 for w in widths[1:-2]], widths[-1]))
    found = search(post, student)
    adopted = found.plan.apply(post)
    assert post._last[0]() is found.plan.compiled  # it was adopted
    fresh = found.plan.apply(LowRankPosterior(s, mean, var, F))
    close(adopted.mean, fresh.mean)
    close(adopted.var, fresh.var)
    close(adopted.factor @ adopted.factor.T, fresh.factor @ fresh.factor.T)
    close(found.plan.cost(post), found.cost)
    close(found.plan.cost(LowRankPosterior(s, mean, var, F)), found.cost)


@given(format_cases("lowrank"))
def test_lowrank_read_in_small_chunks_equals_the_reference(case):
    """The alignment's Woodbury sums, read a few rows of the factor at a time."""
    with mock.patch.object(lowrank, "_CHUNK_ROWS", 3):
        check("lowrank", case)


@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.booleans())
def test_kron_reads_of_a_lower_triangle_equal_the_symmetric_matrix(seed, n, fortran):
    """A Kronecker column factor's Schur complement keeps only its lower triangle
    current: its columns, cross blocks and sub-blocks read from it equal those of the
    whole symmetric matrix (the upper triangle holding noise)."""
    from planner.posterior.kron import _lower_columns, _lower_cross, _lower_part

    rng = np.random.default_rng(seed)
    S = rng.normal(size=(n, n))
    S = S + S.T
    A = np.tril(S) + np.triu(rng.normal(size=(n, n)), 1)  # upper: not current
    A = np.asfortranarray(A) if fortran else np.ascontiguousarray(A)
    C = np.flatnonzero(rng.random(n) < 0.5)
    R = np.setdiff1d(np.arange(n), C)
    close(_lower_columns(A, C), S[:, C])
    close(_lower_cross(A, R, C), S[np.ix_(R, C)])
    close(np.tril(_lower_part(A, C)), np.tril(S[np.ix_(C, C)]))
