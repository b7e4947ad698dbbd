"""The structured formats through the service (docs/theory.md §7): end to end and bad inputs."""

from __future__ import annotations

import io
from unittest import mock

import numpy as np
import pytest

from planner import FullPosterior, Plan, Structure, from_arrays
from planner.search import search
from tests.app.conftest import (
    assert_problem,
    key_of,
    make_plan,
    make_prior,
    start,
    stored,
    upload,
    wait_done,
)
from tests.helpers import make

pytestmark = pytest.mark.anyio


def arrays_of(post) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in post.to_arrays().items()}


@pytest.mark.parametrize("fmt", ["lowrank", "kron", "precision"])
async def test_every_format_end_to_end(svc, fmt):
    teacher = Structure.mlp((3, 5, 4, 4, 2), bias=True)
    post, _, _ = make(fmt, teacher, np.random.default_rng(21))
    arrays = arrays_of(post)
    r = await upload(svc.client, {"widths": [3, 5, 4, 4, 2], "bias": True}, fmt, arrays)
    assert r.status_code == 201, r.text
    t = r.json()
    assert set(t["arrays"]) == set(arrays)
    plan = await svc.client.post(
        f"/v1/teachers/{t['id']}/plans", json={"student": {"widths": [3, 3, 3, 2]}}
    )
    assert plan.status_code == 201, plan.text
    core_post = from_arrays(fmt, teacher, arrays)
    core = search(core_post, teacher.inherit((3, 3, 3, 2)))
    assert plan.json()["ops"] == core.plan.to_json()
    assert plan.json()["cost"] == pytest.approx(core.cost, rel=1e-12)
    prior = (await svc.client.post(f"/v1/plans/{plan.json()['id']}/prior")).json()
    done = await wait_done(svc.client, prior["id"])
    assert done["status"] == "done", done
    expect = core.plan.apply(core_post).to_arrays()
    assert set(done["arrays"]) == set(expect)  # the same form, the same names (docs/theory.md §7)
    for name, value in expect.items():
        r = await svc.client.get(f"/v1/priors/{prior['id']}/arrays/{name}")
        assert np.array_equal(np.load(io.BytesIO(r.content)), value), name
    if fmt == "precision":  # the covariance on request
        r = await svc.client.get(f"/v1/priors/{prior['id']}/arrays/covariance")
        cov = np.load(io.BytesIO(r.content))
        np.testing.assert_allclose(cov @ expect["precision"], np.eye(len(cov)), atol=1e-9)


@pytest.mark.parametrize(
    ("fmt", "change", "field"),
    [
        ("lowrank", {"factor": np.ones((10, 2))}, "factor"),
        ("lowrank", {"variance": -np.ones(41)}, "variance"),
        ("kron", {"row2": -np.eye(5)}, "row2"),
        ("kron", {"col3": np.ones((5, 5))}, "col3"),
        ("kron", {"bias2": -np.ones(5)}, "bias2"),
        ("kron", {"row9": np.eye(2)}, "row9"),
        ("precision", {"precision": -np.eye(41)}, "precision"),
    ],
)
async def test_bad_structured_inputs(svc, fmt, change, field):
    teacher = Structure.mlp((3, 5, 4, 2), bias=True)  # 41 parameters
    post, _, _ = make(fmt, teacher, np.random.default_rng(22))
    arrays = {**arrays_of(post), **change}
    r = await upload(svc.client, {"widths": [3, 5, 4, 2], "bias": True}, fmt, arrays)
    assert_problem(r, 422, field)
    assert stored(svc) == []


async def test_kron_for_an_rnn_is_refused(svc):
    rnn = Structure.rnn((3, 4, 2))
    arrays = {
        "mean": np.zeros(rnn.n_params),
        "row2": np.eye(4),
        "col2": np.eye(3),
        "row3": np.eye(2),
        "col3": np.eye(4),
    }
    r = await upload(svc.client, {"widths": [3, 4, 2], "kind": "rnn"}, "kron", arrays)
    assert_problem(r, 422, "posterior.format")
    assert stored(svc) == []


async def test_a_prior_too_large_for_the_machine_is_refused_before_starting(tmp_path):
    svc, ctx = await start(tmp_path / "data", job_memory=10_000)
    try:
        teacher = Structure.mlp((3, 6, 6, 2))
        post, _, _ = make("precision", teacher, np.random.default_rng(23))
        t = (
            await upload(svc.client, {"widths": [3, 6, 6, 2]}, "precision", arrays_of(post))
        ).json()
        plan = await make_plan(svc.client, t["id"], [3, 6, 2])
        body = assert_problem(await svc.client.post(f"/v1/plans/{plan['id']}/prior"), 413, "plan")
        assert "GiB" in body["detail"]
    finally:
        await svc.client.aclose()
        await ctx.__aexit__(None, None, None)


async def test_a_precision_keeps_its_factor_beside_its_arrays(svc):
    """Validation factorises Λ; the factor is kept (unlisted) so no search repeats it."""
    teacher = Structure.mlp((3, 6, 5, 2))
    post, _, _ = make("precision", teacher, np.random.default_rng(2))
    r = await upload(svc.client, {"widths": [3, 6, 5, 2]}, "precision", arrays_of(post))
    assert r.status_code == 201, r.text
    t = r.json()
    assert set(t["arrays"]) == {"mean", "precision"}
    L = svc.store.storage.load_npy(key_of(svc, t["id"], "cholesky"))
    np.testing.assert_allclose(L @ L.T, post.precision, rtol=1e-10, atol=1e-12)
    plan = await svc.client.post(
        f"/v1/teachers/{t['id']}/plans", json={"student": {"widths": [3, 3, 3, 2]}}
    )
    assert plan.status_code == 201, plan.text
    core = search(post, teacher.inherit((3, 3, 3, 2)))
    assert plan.json()["cost"] == pytest.approx(core.cost, rel=1e-12)


async def test_a_kron_keeps_its_column_factors_beside_its_arrays(svc):
    """Validation factorises each layer's column factor; the factors and the diagonals
    of their inverses are kept (unlisted), so no search or alignment repeats them.  The
    teacher is past the size scored densely and its plan merges a layer: the branch and
    bound conditions the merged layer's rows all at once there."""
    teacher = Structure.mlp((10, 500, 3, 3, 1))
    post, _, _ = make("kron", teacher, np.random.default_rng(5))
    arrays = arrays_of(post)
    r = await upload(svc.client, {"widths": [10, 500, 3, 3, 1]}, "kron", arrays)
    assert r.status_code == 201, r.text
    t = r.json()
    assert set(t["arrays"]) == set(arrays)
    for layer, A in post.A.items():
        L = svc.store.storage.load_npy(key_of(svc, t["id"], f"colfactor{layer}"))
        np.testing.assert_allclose(L @ L.T, A, rtol=1e-10, atol=1e-12)
        ai = svc.store.storage.load_npy(key_of(svc, t["id"], f"colinv{layer}"))
        np.testing.assert_allclose(ai, np.diag(np.linalg.inv(A)), rtol=1e-9)
    plan = await svc.client.post(
        f"/v1/teachers/{t['id']}/plans", json={"student": {"widths": [10, 500, 3, 1]}}
    )
    assert plan.status_code == 201, plan.text
    core = search(post, teacher.inherit((10, 500, 3, 1)))
    assert plan.json()["ops"] == core.plan.to_json()
    assert plan.json()["cost"] == pytest.approx(core.cost, rel=1e-12)


async def test_a_deadline_before_the_first_plan_is_a_503_problem(tmp_path):
    service, ctx = await start(tmp_path / "data", plan_seconds=1e-6)
    try:
        teacher = Structure.mlp((6, 30, 20, 8))
        post, _, _ = make("precision", teacher, np.random.default_rng(3))
        t = (
            await upload(service.client, {"widths": [6, 30, 20, 8]}, "precision", arrays_of(post))
        ).json()
        r = await service.client.post(
            f"/v1/teachers/{t['id']}/plans", json={"student": {"widths": [6, 18, 12, 8]}}
        )
        body = assert_problem(r, 503, "seconds")
        assert body["type"].endswith("deadline-exceeded") and "first plan" in body["detail"]
        assert service.store.plans_of("public", t["id"]) == []
    finally:
        await service.client.aclose()
        await ctx.__aexit__(None, None, None)


async def test_a_plan_cut_by_the_memory_bound_says_so_and_still_answers(tmp_path):
    service, ctx = await start(tmp_path / "data", job_memory=1)
    try:
        teacher = Structure.mlp((6, 30, 20, 8))
        post, _, _ = make("precision", teacher, np.random.default_rng(3))
        t = (
            await upload(service.client, {"widths": [6, 30, 20, 8]}, "precision", arrays_of(post))
        ).json()
        r = await service.client.post(
            f"/v1/teachers/{t['id']}/plans", json={"student": {"widths": [6, 18, 12, 8]}}
        )
        assert r.status_code == 201, r.text
        plan = r.json()
        assert plan["search"]["cut"] is True and plan["search"]["cut_by"] == "memory"
        assert plan["student"]["widths"] == [6, 18, 12, 8]
        from planner import Plan

        exact = Plan.from_json(teacher, plan["ops"]).cost(post)
        assert plan["cost"] == pytest.approx(exact, rel=1e-9)
    finally:
        await service.client.aclose()
        await ctx.__aexit__(None, None, None)


async def test_a_request_can_ask_for_a_shorter_deadline(svc):
    teacher = Structure.mlp((6, 30, 20, 8))
    post, _, _ = make("precision", teacher, np.random.default_rng(3))
    t = (await upload(svc.client, {"widths": [6, 30, 20, 8]}, "precision", arrays_of(post))).json()
    url = f"/v1/teachers/{t['id']}/plans"
    r = await svc.client.post(url, json={"student": {"widths": [6, 18, 12, 8]}, "seconds": 1e-6})
    assert_problem(r, 503, "seconds")
    r = await svc.client.post(url, json={"student": {"widths": [6, 18, 12, 8]}, "seconds": 0})
    assert_problem(r, 422, "seconds")


async def test_thorough_effort_is_never_worse(svc):
    teacher = Structure.mlp((6, 30, 20, 8))
    _, mean, cov = make("precision", teacher, np.random.default_rng(5))
    cov = (cov + cov.T) / 2
    post = FullPosterior.from_dense(teacher, mean, cov)
    t = (await upload(svc.client, {"widths": [6, 30, 20, 8]}, "full", arrays_of(post))).json()
    url = f"/v1/teachers/{t['id']}/plans"
    costs = {}
    for effort in ("fast", "thorough"):
        r = await svc.client.post(
            url, json={"student": {"widths": [6, 12, 8, 8]}, "effort": effort}
        )
        assert r.status_code == 201, r.text
        assert r.json()["search"]["effort"] == effort
        costs[effort] = r.json()["cost"]
        core = search(post, teacher.inherit((6, 12, 8, 8)), effort=effort)
        assert costs[effort] == pytest.approx(core.cost, rel=1e-12)
    assert costs["thorough"] <= costs["fast"] * (1 + 1e-9)
    r = await svc.client.post(url, json={"student": {"widths": [6, 12, 8, 8]}, "effort": "max"})
    assert_problem(r, 422, "effort")


async def test_dense_jobs_run_on_the_torch_backend_when_asked(tmp_path):
    """PLANNER_DEVICE=cpu: the dense formats' priors come from torch kernels (the path a
    GPU worker takes with cuda) and equal the core's numpy apply to rounding."""
    from planner import backend

    service, ctx = await start(tmp_path / "data", device="cpu")
    try:
        for fmt in ("full", "precision"):
            teacher = Structure.mlp((4, 7, 5, 2))
            post, mean, cov = make("precision", teacher, np.random.default_rng(7))
            if fmt == "full":
                post = FullPosterior.from_dense(teacher, mean, (cov + cov.T) / 2)
            t = await upload(service.client, {"widths": [4, 7, 5, 2]}, fmt, arrays_of(post))
            plan = await make_plan(service.client, t.json()["id"], [4, 3, 2])
            done = await make_prior(service.client, plan["id"])
            assert done["status"] == "done", done
            got = {
                n: np.load(io.BytesIO((await service.client.get(
                    f"/v1/priors/{done['id']}/arrays/{n}")).content))
                for n in done["arrays"]
            }  # fmt: skip
            expect = Plan.from_json(teacher, plan["ops"]).apply(post).to_arrays()
            for n, a in expect.items():
                np.testing.assert_allclose(got[n], a, rtol=1e-9, atol=1e-12)
        assert backend.current().name == "torch-cpu"  # the thread pool shares this process
    finally:
        await service.client.aclose()
        await ctx.__aexit__(None, None, None)
        backend.select(None)


async def test_a_device_out_of_memory_is_a_413_and_the_service_goes_on(tmp_path):
    """PLANNER_DEVICE=cpu, the device's memory exhausted (torch's out-of-memory error,
    raised here where a search's stage or a prior's factorisation asks the device for
    memory): a plan request and a prior each answer a 413 problem naming the device,
    never a 500, and the next request is served."""
    import torch

    from planner import backend

    teacher = Structure.mlp((4, 40, 30, 2))
    rng = np.random.default_rng(12)
    p = teacher.n_params
    A = rng.normal(size=(p, p))
    post = FullPosterior.from_dense(teacher, rng.normal(size=p), A @ A.T / p + 0.3 * np.eye(p))

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    service, ctx = await start(tmp_path / "data", device="cpu")
    try:
        t = await upload(service.client, {"widths": [4, 40, 30, 2]}, "full", arrays_of(post))
        url = f"/v1/teachers/{t.json()['id']}/plans"
        student = {"student": {"widths": [4, 10, 30, 2]}}
        with mock.patch.object(torch, "empty", exhausted):  # a stage's rows on the device
            body = assert_problem(await service.client.post(url, json=student), 413, "body")
        assert "device" in body["detail"] and "PLANNER_DEVICE" in body["detail"]
        plan = await make_plan(service.client, t.json()["id"], [4, 10, 30, 2])  # served
        with mock.patch.object(torch.linalg, "cholesky_ex", exhausted):
            done = await make_prior(service.client, plan["id"])
        assert done["status"] == "failed", done
        assert done["problem"]["status"] == 413 and "device" in done["problem"]["detail"]
        again = await make_prior(service.client, plan["id"])
        assert again["status"] == "done", again
    finally:
        await service.client.aclose()
        await ctx.__aexit__(None, None, None)
        backend.select(None)


async def test_plan_requests_search_on_the_torch_backend_when_asked(tmp_path):
    """PLANNER_DEVICE=cpu: a plan request's dense greedy runs its large kernels on torch
    (a stage over 1,200 columns holds its rows there) and answers the numpy search's
    plan cost."""
    from planner import backend

    teacher = Structure.mlp((4, 40, 30, 2))
    rng = np.random.default_rng(11)
    p = teacher.n_params
    A = rng.normal(size=(p, p))
    post = FullPosterior.from_dense(teacher, rng.normal(size=p), A @ A.T / p + 0.3 * np.eye(p))
    core = search(post, teacher.inherit((4, 10, 30, 2)))
    used = []
    gram = backend._TorchRows.gram

    def spy(self, *args):
        used.append(self.w)
        return gram(self, *args)

    service, ctx = await start(tmp_path / "data", device="cpu")
    try:
        t = await upload(service.client, {"widths": [4, 40, 30, 2]}, "full", arrays_of(post))
        with mock.patch.object(backend._TorchRows, "gram", spy):
            plan = await make_plan(service.client, t.json()["id"], [4, 10, 30, 2])
        assert used and max(used) == 1200  # the thread pool shares this process
        assert plan["cost"] == pytest.approx(core.cost, rel=1e-9)
    finally:
        await service.client.aclose()
        await ctx.__aexit__(None, None, None)
        backend.select(None)
