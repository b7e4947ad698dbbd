"""Posterior validation (docs/theory.md §7, §8), in memory and with a disk-backed workspace."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from planner import DiagPosterior, FullPosterior, InvalidPosterior, Structure, from_arrays
from tests.strategies import spd

S = Structure.mlp((3, 4, 2))  # 20 parameters


def workspace(tmp_path):
    made = []

    def alloc(shape):
        path = tmp_path / f"ws{len(made)}.npy"
        made.append(path)
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=shape)

    return alloc, made


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("with_workspace", [False, True])
def test_valid_covariances_are_accepted_and_symmetrised(tmp_path, dtype, with_workspace):
    rng = np.random.default_rng(0)
    cov = spd(rng, 20).astype(dtype)
    cov[0, 1] *= 1 + (1e-9 if dtype == np.float64 else 1e-6)
    ws = workspace(tmp_path)[0] if with_workspace else None
    post = FullPosterior.from_arrays(S, {"mean": np.zeros(20), "covariance": cov}, ws)
    assert post.covariance.dtype == np.float64
    np.testing.assert_array_equal(post.covariance, post.covariance.T)
    np.testing.assert_allclose(post.covariance, cov.astype(np.float64), rtol=1e-5)


@pytest.mark.parametrize("with_workspace", [False, True])
@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda c: c + np.triu(np.full_like(c, 1e-3), 1), "not symmetric"),
        (lambda c: c - 10 * np.eye(20), "not positive definite"),
        (lambda c: np.where(np.eye(20, dtype=bool), np.nan, c), "NaN"),
        (lambda c: c[:-1], "shape"),
    ],
)
def test_bad_covariances_are_refused(tmp_path, with_workspace, mutate, words):
    cov = mutate(spd(np.random.default_rng(1), 20))
    ws = workspace(tmp_path)[0] if with_workspace else None
    with pytest.raises(InvalidPosterior, match=words) as err:
        FullPosterior.from_arrays(S, {"mean": np.zeros(20), "covariance": cov}, ws)
    assert err.value.field == "covariance"


def test_the_workspace_holds_the_large_arrays(tmp_path):
    alloc, made = workspace(tmp_path)
    cov = spd(np.random.default_rng(2), 20)
    cov[0, 1] += 1e-12  # needs symmetrising: the copy goes to the workspace too
    post = FullPosterior.from_arrays(S, {"mean": np.zeros(20), "covariance": cov}, alloc)
    assert len(made) == 2  # the symmetrised matrix and the factorisation scratch
    assert isinstance(post.covariance, np.memmap)


def test_diag_and_vector_checks():
    with pytest.raises(InvalidPosterior, match="> 0") as err:
        DiagPosterior.from_arrays(S, {"mean": np.zeros(20), "variance": -np.ones(20)})
    assert err.value.field == "variance"
    with pytest.raises(InvalidPosterior, match="missing") as err:
        DiagPosterior.from_arrays(S, {"variance": np.ones(20)})
    assert err.value.field == "mean"
    with pytest.raises(InvalidPosterior, match="float32 or float64"):
        DiagPosterior.from_arrays(S, {"mean": np.zeros(20, complex), "variance": np.ones(20)})


def test_errors_keep_their_field_across_processes():
    err = InvalidPosterior("is wrong", field="covariance")
    back = pickle.loads(pickle.dumps(err))
    assert (
        type(back) is InvalidPosterior and back.field == "covariance" and back.reason == "is wrong"
    )


def test_bad_arrays_are_explained_where_and_what_to_do():
    """A size off by the bias gives the arithmetic and the hint; an asymmetric or
    indefinite matrix says which parameters, and what to do."""
    s = Structure.mlp((3, 4, 2))
    p = s.n_params
    with pytest.raises(InvalidPosterior) as err:
        from_arrays("full", s, {"mean": np.zeros(26), "covariance": np.eye(26)})
    assert "4·3 + 2·4 = 20" in err.value.reason and '"bias": true' in err.value.reason
    A = np.eye(p)
    A[5, 0] = 0.5
    with pytest.raises(InvalidPosterior) as err:
        from_arrays("full", s, {"mean": np.zeros(p), "covariance": A})
    assert "U_2[1, 2]" in err.value.reason and "(A + Aᵀ) / 2" in err.value.reason
    B = np.eye(p)
    B[13, 13] = -1.0
    for fmt in ("full", "precision"):
        with pytest.raises(InvalidPosterior) as err:
            from_arrays(fmt, s, {"mean": np.zeros(p), "covariance" if fmt == "full" else fmt: B})
        assert "[13, 13], U_3[0, 1] (layer 3)" in err.value.reason, err.value.reason
        assert "prior precision" in err.value.reason
