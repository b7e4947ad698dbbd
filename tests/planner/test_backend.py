"""The torch backend (planner.backend) against the numpy path: the same plans applied to
the same ``full`` and ``precision`` posteriors agree to 1e-9 relative (torch on the CPU
here; the same code runs on a GPU with ``PLANNER_DEVICE=cuda``), singular plans are
refused the same way, and the search's plans are unchanged, its dense greedy's kernels
on the device included."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings

from planner import FullPosterior, Network, Plan, SingularConstraint, Structure
from planner.backend import current, use
from planner.posterior import PrecisionPosterior
from planner.search import search
from tests.helpers import close
from tests.planner.test_network_search import search_cases as network_search_cases
from tests.reference import ref_apply
from tests.strategies import cases, search_cases, spd, to_ops, to_structure


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


@contextmanager
def _device_everywhere():
    """torch on the CPU with every kernel of the search sent to it (``DEVICE_ENTRIES`` 0:
    the sizes that stay in numpy otherwise), counting the stages of the dense greedy and
    those that held their rows on the device."""
    from planner import backend
    from planner.posterior import scoring

    calls = Counter()
    rows, stages = backend.TorchBackend.rows, scoring._DenseDrops.__init__

    def on_device(self, *args):
        held = rows(self, *args)
        calls["rows"] += isinstance(held, backend._TorchRows)
        return held

    def stage(self, *args, **kwargs):
        stages(self, *args, **kwargs)
        calls["stages"] += self.G.size > 0

    with (
        mock.patch.object(backend, "DEVICE_ENTRIES", 0),
        mock.patch.object(backend.TorchBackend, "rows", on_device),
        mock.patch.object(scoring._DenseDrops, "__init__", stage),
        use("cpu"),
    ):
        yield calls


def _greedy_on_both(post, student, effort):
    """The search, and its constructive greedy alone (``work=0``: no branch and bound or
    exchange to make up for a wrong step), on numpy and on the device."""
    for work in (None, 0):
        base = search(post, student, effort=effort, work=work)
        with _device_everywhere() as calls:
            got = search(post, student, effort=effort, work=work)
        assert current().name == "numpy"
        assert calls["rows"] == calls["stages"], "a stage of the dense greedy stayed in numpy"
        assert got.plan.student == student
        # the same cost (plans of equal cost may list their ops in another order), and
        # the plan found on the device costs what it says
        close(got.cost, base.cost, rtol=1e-9)
        close(got.cost, got.plan.cost(post), rtol=1e-9)


@pytest.mark.parametrize("effort", ["fast", "thorough"])
@settings(max_examples=25, deadline=None)
@given(case=search_cases(max_T=4, max_width=5))
def test_the_dense_greedy_on_the_torch_backend_searches_as_numpy_does(effort, case):
    """The dense greedy's kernels on the device (a stage's start, its products with the
    rows it holds there, the commits another stage makes, compactions, a merged layer's
    block): the search finds a plan of the numpy path's cost, in ``full`` and
    ``precision``, whichever effort."""
    net, student_net, seed = case
    s = to_structure(net)
    student = to_structure(student_net)
    rng = np.random.default_rng(seed)
    p = s.n_params
    mean, cov = rng.normal(size=p), spd(rng, p)
    prec = np.linalg.inv(cov)
    for post in (
        FullPosterior.from_dense(s, mean, cov),
        PrecisionPosterior.from_arrays(s, {"mean": mean, "precision": (prec + prec.T) / 2}),
    ):
        _greedy_on_both(post, student, effort)


def test_exchange_rounds_set_up_anew_on_a_device_and_update_in_numpy():
    """On a device backend a round's set-up runs there, so the next round is set up anew
    (the updates are host products); in numpy, past ``_UPDATE_WORK``, it is updated."""
    from planner import backend
    from planner.search import improvement

    s = Structure.mlp((3, 9, 8, 1))
    rng = np.random.default_rng(4)
    p = s.n_params
    post = FullPosterior.from_dense(s, rng.normal(size=p), spd(rng, p))
    student = s.inherit((3, 4, 3, 1))
    moved = improvement.DenseEvaluator.moved
    calls = Counter()

    def spy(self, *args, **kwargs):
        calls[current().name] += 1
        return moved(self, *args, **kwargs)

    for device in (None, "cpu"):
        with (
            mock.patch.object(improvement, "_UPDATE_WORK", 0.0),
            mock.patch.object(backend, "DEVICE_ENTRIES", 0),
            mock.patch.object(improvement.DenseEvaluator, "moved", spy),
            use(device),
        ):
            found = search(post, student, effort="thorough")
        close(found.cost, found.plan.cost(post))
    assert calls["numpy"] > 0 and calls["torch-cpu"] == 0, calls


@settings(max_examples=20, deadline=None)
@given(case=network_search_cases())
def test_a_network_search_on_the_torch_backend_is_the_numpy_search(case):
    """Convolutional and residual teachers: the global greedy's stages take in each
    other's commits on the device (``left``), with the same plan cost."""
    d, s, seed = case
    teacher, student = Network.from_json(d), Network.from_json(s)
    rng = np.random.default_rng(seed)
    p = teacher.n_params
    post = FullPosterior.from_dense(teacher, rng.normal(size=p), spd(rng, p))
    _greedy_on_both(post, student, "fast")


@pytest.mark.parametrize("where", ["numpy", "torch"])
def test_rows_grow_multiply_and_compact_as_the_matrix_they_hold(where):
    """:class:`~planner.backend.Rows` on the host and mirrored on torch: appends (past
    their first room), products from any row (in ``X0`` and past it), products from the
    left and compactions agree with the dense matrix, and the host's copy is that
    matrix."""
    from planner.backend import NumpyBackend, TorchBackend, _TorchRows

    rng = np.random.default_rng(1)
    X0 = rng.normal(size=(3, 7))
    bk = NumpyBackend() if where == "numpy" else TorchBackend("cpu")
    with mock.patch.object(_TorchRows, "ROOM", 4):
        rows = bk.rows(X0, 2)
    R = X0.copy()
    for k in (2, 5, 4):  # 3 + 11 rows: past the first room (3 + 2 rows, 3 + 4 on torch)
        Y = rng.normal(size=(k, R.shape[1]))
        rows.append(Y)
        R = np.vstack([R, Y])
    assert rows.m == R.shape[0] == rows.host.m
    close(np.vstack([rows.host.X0, rows.host.W]), R)
    cols = np.array([0, 4, 6])
    close(rows.gram(cols, 0), R[:, cols].T @ R)
    close(rows.gram(cols, 2), R[2:, cols].T @ R[2:])
    close(rows.gram(cols, 5), R[5:, cols].T @ R[5:])
    X = rng.normal(size=(2, R.shape[0]))
    close(rows.left(X), X @ R)
    keep = np.array([1, 2, 5])
    rows.compact(keep)
    R = R[:, keep]
    close(rows.left(X), X @ R)
    close(np.vstack([rows.host.X0, rows.host.W]), R)
    Y = rng.normal(size=(1, 3))
    rows.append(Y)
    R = np.vstack([R, Y])
    close(rows.gram(np.array([2]), 1), R[1:, [2]].T @ R[1:])
    close(rows.gram(np.array([0, 2]), 4), R[4:, [0, 2]].T @ R[4:])


def test_a_compaction_of_many_rows_moves_them_in_place():
    """Past ``HostRows.SMALL`` entries a compaction moves the rows in place, row by row
    (no copy of W): the same matrix as the one vectorised copy."""
    from planner.backend import HostRows

    rng = np.random.default_rng(2)
    R = rng.normal(size=(9, 6))
    keep = np.array([0, 3, 4])
    for small in (1 << 20, 4):  # one vectorised copy; in place
        rows = HostRows(R[:2].copy(), 8)
        rows.append(R[2:])
        with mock.patch.object(HostRows, "SMALL", small):
            rows.compact(keep)
        close(np.vstack([rows.X0, rows.W]), R[:, keep])
        close(rows.left(np.eye(9)), R[:, keep])


def test_a_device_out_of_memory_is_a_memory_error():
    """torch's out-of-memory error on a device, in the apply or in a search's stage, is
    a ``MemoryError`` (``DeviceMemoryError``), as the host's allocations raise."""
    import torch

    from planner import backend

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    rng = np.random.default_rng(4)
    s = Structure.mlp((3, 8, 6, 2))
    p = s.n_params
    post = FullPosterior.from_dense(s, rng.normal(size=p), spd(rng, p))
    plan = search(post, s.inherit((3, 4, 2))).plan
    oom = pytest.raises(backend.DeviceMemoryError, match="cpu device ran out of memory")
    with use("cpu"):
        with mock.patch.object(torch.linalg, "cholesky_ex", exhausted), oom:
            plan.apply(post)
        small = mock.patch.object(backend, "DEVICE_ENTRIES", 0)  # the stage on the device
        with small, mock.patch.object(torch, "empty", exhausted), pytest.raises(MemoryError):
            search(post, s.inherit((3, 4, 2)))
        got = plan.apply(post)  # and the backend goes on
    close(got.mean, plan.apply(post).mean)


@settings(max_examples=20, deadline=None)
@given(case=cases(max_T=4, max_width=5))
def test_the_formats_dense_blocks_on_the_device_are_numpys(case):
    """What the search reads of a dense format, each kernel on the device: ``Σ_BB⁻¹`` for
    exchange moves (``inverse_block``) and their evaluator's ``H = Σ_BB⁻¹ Σ_{B,E}``, a
    precision's covariance blocks by solves with its factor and its trailing covariance
    held whole (``prepare``)."""
    from types import SimpleNamespace

    from planner import backend
    from planner.search.improvement import DenseEvaluator

    s, ops, posts, _ = _both(case)
    p = s.n_params
    rng = np.random.default_rng(p)
    idx = np.sort(rng.choice(p, size=max(1, p // 2), replace=False))
    rows, cols = rng.choice(p, size=3), rng.choice(p, size=4)
    first = int(rng.integers(p))
    built = SimpleNamespace(plan=Plan(s, ops))  # what the evaluator reads of a plan
    pool = rng.choice(p, size=max(1, p // 3), replace=False)
    for post in posts.values():
        ev = DenseEvaluator(post, built, pool)
        base = (post.inverse_block(idx), post.cov_cross(rows, cols), ev.P, ev.H)
        if isinstance(post, PrecisionPosterior):
            post.prepare(first, p - first)
            base += (post._trailing[1],)
            post.__dict__.pop("_trailing")
        fresh = type(post).from_arrays(s, post.to_arrays())
        with mock.patch.object(backend, "DEVICE_ENTRIES", 0), use("cpu"):
            ev = DenseEvaluator(fresh, built, pool)
            got = (fresh.inverse_block(idx), fresh.cov_cross(rows, cols), ev.P, ev.H)
            if isinstance(fresh, PrecisionPosterior):
                fresh.prepare(first, p - first)
                got += (fresh._trailing[1],)
        for a, b in zip(got, base, strict=True):
            close(a, b)
