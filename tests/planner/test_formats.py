"""Structured formats (SPEC §7) against the slow dense reference.

Each format is aligned in its own closed form; the reference conditions the
densified covariance step by step.  Mean, covariance and cost agree to 1e-9.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from planner import InvalidPosterior, Plan, Structure
from planner.posterior import KronPosterior, LowRankPosterior, PrecisionPosterior
from tests.planner.test_plan import close
from tests.reference import ref_apply
from tests.strategies import nets, sequences, spd, to_ops, to_structure


def make(fmt: str, s: Structure, rng: np.random.Generator):
    """(posterior in ``fmt``, its dense mean and covariance)."""
    p = s.n_params
    mean = rng.normal(size=p)
    if fmt == "lowrank":
        var = rng.uniform(0.3, 2.0, size=p)
        F = 0.7 * rng.normal(size=(p, int(rng.integers(1, 4))))
        post = LowRankPosterior.from_arrays(s, {"mean": mean, "variance": var, "factor": F})
        return post, mean, np.diag(var) + F @ F.T
    if fmt == "precision":
        cov = spd(rng, p)
        prec = np.linalg.inv(cov)
        prec = (prec + prec.T) / 2
        post = PrecisionPosterior.from_arrays(s, {"mean": mean, "precision": prec})
        return post, mean, np.linalg.inv(prec)
    arrays = {"mean": mean}
    for t in range(2, s.T + 1):
        arrays[f"row{t}"] = spd(rng, s.width(t))
        arrays[f"col{t}"] = spd(rng, s.width(t - 1))
        if s.bias:
            n = s.width(t)
            arrays[f"bias{t}"] = rng.uniform(0.5, 2, n) if rng.random() < 0.5 else spd(rng, n)
    post = KronPosterior.from_arrays(s, arrays)
    return post, mean, post.dense_covariance()


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


@pytest.mark.parametrize("fmt", ["lowrank", "precision", "kron"])
def test_small_block_access_equals_the_dense_form(fmt):
    from planner.ops import Tracked

    s = Structure.mlp((3, 5, 4, 2), bias=True)
    post, mean, cov = make(fmt, s, np.random.default_rng(3))
    from planner import FullPosterior

    dense = FullPosterior.from_dense(s, mean, cov)
    tr = Tracked.start(s)
    groups, rows = tr.outgoing_all(2), tr._U(3)
    close(post.group_costs(groups), dense.group_costs(groups))
    close(post.assignment_costs(rows), dense.assignment_costs(rows))
    close(post.precision_diagonal(), dense.precision_diagonal())
    close(post.variance(), dense.variance())
    idx = np.array([0, 7, 20, 21, 40])
    close(post.cov_block(idx), dense.cov_block(idx))


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
