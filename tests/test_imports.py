"""Import helpers against the covariances their libraries define."""

import numpy as np
import pytest

from planner import Structure
from planner.posterior import KronPosterior, LowRankPosterior
from planner_client.imports import from_laplace_kron, from_swag


def test_swag_covariance():
    rng = np.random.default_rng(0)
    p, K, scale = 12, 5, 0.5
    snapshots = rng.normal(size=(20, p))
    mean, sq_mean = snapshots.mean(0), (snapshots**2).mean(0)
    D = snapshots[-K:] - mean
    arrays = from_swag(mean, sq_mean, D, scale)
    post = LowRankPosterior.from_arrays(Structure.mlp((2, 3, 2)), arrays)  # 12 parameters
    expect = scale * (0.5 * np.diag(sq_mean - mean**2) + D.T @ D / (2 * (K - 1)))
    np.testing.assert_allclose(post.dense_covariance(), expect, rtol=1e-12)
    with pytest.raises(ValueError):
        from_swag(mean, sq_mean, D[:1])


def test_laplace_kron_covariance():
    rng = np.random.default_rng(1)
    widths, delta = (3, 4, 2), 0.7
    s = Structure.mlp(widths, bias=True)

    def psd(n):
        X = rng.normal(size=(n, n + 2))
        return X @ X.T

    factors = [[psd(4), psd(3)], [psd(4)], [psd(2), psd(4)], [psd(2)]]
    arrays = from_laplace_kron(widths, rng.normal(size=s.n_params), factors, delta, bias=True)
    post = KronPosterior.from_arrays(s, arrays)
    r = np.sqrt(delta)
    blocks = [
        np.kron(
            np.linalg.inv(factors[0][0] + r * np.eye(4)),
            np.linalg.inv(factors[0][1] + r * np.eye(3)),
        ),
        np.linalg.inv(factors[1][0] + delta * np.eye(4)),
        np.kron(
            np.linalg.inv(factors[2][0] + r * np.eye(2)),
            np.linalg.inv(factors[2][1] + r * np.eye(4)),
        ),
        np.linalg.inv(factors[3][0] + delta * np.eye(2)),
    ]
    from scipy.linalg import block_diag

    np.testing.assert_allclose(post.dense_covariance(), block_diag(*blocks), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError):
        from_laplace_kron(widths, np.zeros(s.n_params), factors[:2], delta, bias=True)
