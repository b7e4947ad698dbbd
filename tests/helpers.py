"""Helpers the tests share: exact comparison at the suite's tolerance, and random
posteriors of every structured format with their dense mean and covariance."""

from __future__ import annotations

import numpy as np

from planner import Structure
from planner.posterior import KronPosterior, LowRankPosterior, PrecisionPosterior
from tests.strategies import spd

__all__ = ["RTOL", "close", "make"]

#: Relative tolerance of every exactness check against a reference (1e-9).
RTOL = 1e-9


def close(a, b, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    scale = max(1.0, float(np.abs(b).max(initial=0.0)))
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


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
