"""The torch backend (planner.backend) against the numpy path: the same plans applied to
the same ``full`` and ``precision`` posteriors agree to 1e-9 relative (torch on the CPU
here; the same code runs on a GPU with ``PLANNER_DEVICE=cuda``), singular plans are
refused the same way, and the search's plans are unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from planner import FullPosterior, Plan, SingularConstraint, Structure
from planner.backend import current, use
from planner.posterior import PrecisionPosterior
from planner.search import search
from tests.helpers import close
from tests.reference import ref_apply
from tests.strategies import cases, to_ops, to_structure


def _both(case):
    net, ops, mean, cov = case
    s = to_structure(net)
    prec = np.linalg.inv(cov)
    prec = (prec + prec.T) / 2
    return (
        s,
        to_ops(ops),
        {
            "full": FullPosterior.from_dense(s, mean, cov),
            "precision": PrecisionPosterior.from_arrays(s, {"mean": mean, "precision": prec}),
        },
        (net, ops, mean, cov),
    )


@settings(max_examples=30, deadline=None)
@given(cases())
def test_the_torch_apply_equals_the_numpy_apply(case):
    s, ops, posts, (net, ref_ops, mean, cov) = _both(case)
    plan = Plan(s, ops)
    _, ref_mean, ref_cov, _ = ref_apply(net, mean, cov, ref_ops)
    for fmt, post in posts.items():
        base = plan.apply(post)
        with use("cpu"):
            assert current().name == "torch-cpu"
            got = plan.apply(post)
        assert type(got) is type(base) and got.structure == base.structure
        close(got.mean, base.mean)
        close(got.dense_covariance(), base.dense_covariance())
        assert got.format == fmt
        close(got.mean, ref_mean)  # and both are the reference's
        close(got.dense_covariance(), ref_cov)
    assert current().name == "numpy"


def test_a_singular_plan_is_refused_on_the_torch_backend_too():
    s = Structure.mlp((2, 3, 2))
    p = s.n_params
    rng = np.random.default_rng(0)
    A = rng.normal(size=(p, 3))
    cov = A @ A.T  # its first 6 × 6 block has rank 3: conditioning on it is singular
    cov[np.arange(6, p), np.arange(6, p)] += 1.0
    post = FullPosterior(s, rng.normal(size=p), cov)
    B, v = np.arange(6), np.zeros(6)
    with pytest.raises(SingularConstraint):
        post.condition(B, v, np.arange(6, p), s)
    with use("cpu"), pytest.raises(SingularConstraint):
        post.condition(B, v, np.arange(6, p), s)


def test_searched_plans_are_the_same_on_either_backend():
    rng = np.random.default_rng(5)
    s = Structure.mlp((5, 12, 8, 3))
    p = s.n_params
    A = rng.normal(size=(p, p))
    post = FullPosterior.from_dense(s, rng.normal(size=p), A @ A.T / p + 0.2 * np.eye(p))
    student = s.inherit((5, 6, 3))
    a = search(post, student)
    with use("cpu"):
        b = search(post, student)
        got = b.plan.apply(post)
    assert a.plan.ops == b.plan.ops
    close(got.mean, a.plan.apply(post).mean)
