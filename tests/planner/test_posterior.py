"""Posterior validation (docs/theory.md §7, §8), in memory and with a disk-backed workspace."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

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


@given(st.integers(0, 2**32 - 1), st.integers(0, 40), st.integers(0, 40))
def test_gather_is_fancy_indexing_whatever_the_runs(seed, n_rows, n_cols):
    """``gather`` copies long runs of consecutive indices block by block and falls back to
    fancy indexing for short ones: either way it is ``A[np.ix_(rows, cols)]``."""
    from planner.posterior._dense import gather

    rng = np.random.default_rng(seed)
    A = rng.normal(size=(60, 60))

    def indices(n: int) -> np.ndarray:  # a few runs of random lengths, or scattered
        if rng.random() < 0.3:
            return rng.choice(60, size=n, replace=False)
        cuts = np.sort(rng.choice(np.arange(1, 60), size=int(rng.integers(1, 4)), replace=False))
        runs = [np.arange(a, b) for a, b in zip(np.r_[0, cuts], np.r_[cuts, 60], strict=True)]
        picked = np.concatenate(
            [runs[i][: max(1, runs[i].size // 2)] for i in rng.permutation(len(runs))]
        )
        return picked[:n]

    rows, cols = indices(n_rows), indices(n_cols)
    np.testing.assert_array_equal(gather(A, rows, cols), A[np.ix_(rows, cols)])
    np.testing.assert_array_equal(gather(A, rows, cols, copy=False), A[np.ix_(rows, cols)])


@given(st.integers(0, 2**32 - 1), st.integers(1, 12), st.booleans())
def test_a_stage_reads_covariance_rows_and_blocks_exactly(seed, n_groups, own_matrix):
    """``covariance_over``'s reader (Σ in place from the format's matrix, or Σ over the set
    formed once): rows against the stage's columns, as those columns shrink (the positions
    of the last ones are kept), and each candidate's block, equal to Σ's own entries."""
    from planner.posterior._dense import HeldCovariance

    rng = np.random.default_rng(seed)
    A = rng.normal(size=(50, 50))
    groups = np.sort(rng.choice(np.arange(5, 50), size=(n_groups, 3), replace=False), axis=1)
    if n_groups > 6 and rng.random() < 0.5:  # one run: a layer's columns
        groups = np.arange(8, 8 + 3 * n_groups).reshape(n_groups, 3)
    G = np.unique(groups)
    reader = (
        HeldCovariance(A[5:, 5:], first=5) if own_matrix else HeldCovariance(A[np.ix_(G, G)], G)
    )
    np.testing.assert_array_equal(reader.blocks(groups), A[groups[:, :, None], groups[:, None, :]])
    cols = G
    for _ in range(3):
        rows = cols[rng.permutation(cols.size)[: rng.integers(1, cols.size + 1)]]
        np.testing.assert_array_equal(reader.cross(rows, cols), A[np.ix_(rows, cols)])
        np.testing.assert_array_equal(reader.cross(rows[:1], cols), A[np.ix_(rows[:1], cols)])
        cols = cols[rng.random(cols.size) < 0.7] if cols.size > 1 else cols
        if cols.size == 0:
            cols = G[:1]
