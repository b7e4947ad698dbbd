"""Convolutional and residual teachers through the service (docs/service.md): upload, plan by
student and by ops, prior, steps, the plan page, sequences, and bad structures answered with
the stage and field."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

from planner import FullPosterior, Network, Plan
from planner.network_lattice import count_network_sequences
from planner.search import search
from tests.app.conftest import assert_problem, upload, wait_done
from tests.strategies import spd

pytestmark = pytest.mark.anyio

BLOCK = {
    "type": "residual",
    "activation": "relu",
    "branch": [
        {"type": "conv", "out": 3, "kernel": 3, "padding": 1, "activation": "relu"},
        {"type": "conv", "out": 4, "kernel": 3, "padding": 1},
    ],
}
TEACHER = {
    "input": [2, 4, 4],
    "stages": [
        {"type": "conv", "out": 4, "kernel": 3, "padding": 1, "activation": "relu"},
        BLOCK,
        BLOCK,
        {"type": "pool", "mode": "avg", "global": True},
        {"type": "flatten"},
        {"type": "linear", "out": 2},
    ],
}


def _student() -> dict:
    s = copy.deepcopy(TEACHER)
    s["stages"][0]["out"] = 3
    s["stages"][1]["branch"][0]["out"] = 2
    s["stages"][1]["branch"][1]["out"] = 3
    del s["stages"][2]
    return s


async def test_a_residual_cnn_is_uploaded_planned_and_aligned_as_the_core_does(svc):
    net = Network.from_json(TEACHER)
    rng = np.random.default_rng(0)
    p = net.n_params
    arrays = {"mean": rng.normal(size=p), "covariance": spd(rng, p)}
    r = await upload(svc.client, TEACHER, "full", arrays, name="resnet")
    assert r.status_code == 201, r.text
    t = r.json()
    assert t["structure"]["kind"] == "network" and t["structure"]["n_params"] == p

    r = await svc.client.post(f"/v1/teachers/{t['id']}/plans", json={"student": _student()})
    assert r.status_code == 201, r.text
    plan = r.json()
    post = FullPosterior.from_dense(net, arrays["mean"], arrays["covariance"])
    core = search(post, Network.from_json(_student()))
    assert plan["ops"] == core.plan.to_json()
    assert plan["cost"] == pytest.approx(core.cost, rel=1e-12)
    assert plan["surviving"] == core.plan.compiled.surviving
    assert len(plan["surviving"]["blocks"]) == 1
    assert [q["teacher_space"] for q in plan["provenance"]] == [
        q.teacher_position for q in core.plan.compiled.provenance
    ]
    assert plan["student"]["kind"] == "network"

    # the same ops, given as ops, score the same
    r = await svc.client.post(
        f"/v1/teachers/{t['id']}/plans", json={"student": _student(), "ops": plan["ops"]}
    )
    assert r.status_code == 201, r.text
    assert r.json()["cost"] == pytest.approx(plan["cost"], rel=1e-12)

    r = await svc.client.get(f"/v1/plans/{plan['id']}/steps")
    assert r.status_code == 200, r.text
    steps = r.json()["steps"]
    assert sum(s["cost"] for s in steps) == pytest.approx(plan["cost"], rel=1e-9)
    assert {s.get("space") or ("block", s.get("block")) for s in steps}

    page = await svc.client.get(f"/ui/plans/{plan['id']}")
    assert page.status_code == 200
    assert "id='stages'" in page.text and "class='stage removed'" in page.text
    assert "teacher-space" in page.text

    r = await svc.client.post(f"/v1/plans/{plan['id']}/prior")
    done = await wait_done(svc.client, r.json()["id"])
    assert done["status"] == "done", done
    r = await svc.client.get(f"/v1/priors/{done['id']}/arrays/mean")
    mean = np.load(io.BytesIO(r.content), allow_pickle=False)
    np.testing.assert_allclose(mean, Plan(net, core.plan.ops).apply(post).mean, rtol=1e-12)


PLAIN = {
    "input": [1, 5, 5],
    "stages": [
        {"type": "conv", "out": 4, "kernel": 3, "padding": 1, "activation": "relu"},
        {"type": "conv", "out": 4, "kernel": 3, "padding": 1, "activation": "relu"},
        {"type": "conv", "out": 3, "kernel": 1, "activation": "relu"},
        {"type": "pool", "mode": "avg", "global": True},
        {"type": "flatten"},
        {"type": "linear", "out": 2},
    ],
}


async def test_a_plain_conv_layer_is_removed_by_psi_with_its_pairing(svc):
    """A student with one conv layer fewer: ψ on a plain layer (its two spaces shrunk to
    their common width, then its kernel conditioned to a δ-kernel pairing) is searched,
    reported in the route, drawn on the page and aligned as the core does."""
    net = Network.from_json(PLAIN)
    student = copy.deepcopy(PLAIN)
    student["stages"][0]["out"] = 3
    del student["stages"][1]
    rng = np.random.default_rng(3)
    p = net.n_params
    arrays = {"mean": rng.normal(size=p), "covariance": spd(rng, p)}
    t = (await upload(svc.client, PLAIN, "full", arrays, name="plain")).json()
    r = await svc.client.post(f"/v1/teachers/{t['id']}/plans", json={"student": student})
    assert r.status_code == 201, r.text
    plan = r.json()
    post = FullPosterior.from_dense(net, arrays["mean"], arrays["covariance"])
    core = search(post, Network.from_json(student))
    assert plan["ops"] == core.plan.to_json()
    assert plan["cost"] == pytest.approx(core.cost, rel=1e-12)
    assert next(o for o in plan["ops"] if o["op"] == "psi")["layer"] == 2
    assert plan["search"]["route"] == {"removed_blocks": [], "removed_layers": [2]}
    assert plan["surviving"]["layers"] == [1, 3, 4]

    page = await svc.client.get(f"/ui/plans/{plan['id']}")
    assert "class='stage removed'" in page.text and "layer 2 (ψ)" in page.text

    r = await svc.client.post(
        "/v1/structures/sequences", json={"teacher": PLAIN, "student": student}
    )
    assert r.status_code == 200 and "layers [2] removed" in r.json()["count_note"], r.text
    first = copy.deepcopy(student)
    first["stages"][0]["activation"] = "identity"  # the stem reads the input: not ψ-able
    r = await svc.client.post("/v1/structures/sequences", json={"teacher": PLAIN, "student": first})
    assert "activation" in assert_problem(r, 422, "student")["detail"]

    r = await svc.client.post(f"/v1/plans/{plan['id']}/prior")
    done = await wait_done(svc.client, r.json()["id"])
    r = await svc.client.get(f"/v1/priors/{done['id']}/arrays/mean")
    mean = np.load(io.BytesIO(r.content), allow_pickle=False)
    np.testing.assert_allclose(mean, Plan(net, core.plan.ops).apply(post).mean, rtol=1e-12)


async def test_sequences_say_member_count_and_list_them(svc):
    r = await svc.client.post(
        "/v1/structures/sequences", json={"teacher": TEACHER, "student": _student()}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["member"] and "2 way(s)" in body["count_note"]
    assert body["count"] == count_network_sequences(
        Network.from_json(TEACHER), Network.from_json(_student()), 10**6
    )
    assert body["sequences"] and all(
        {"op": "psi", "block": 1} in q or {"op": "psi", "block": 2} in q for q in body["sequences"]
    )
    bad = _student()
    bad["stages"][0]["kernel"] = 5
    r = await svc.client.post("/v1/structures/sequences", json={"teacher": TEACHER, "student": bad})
    assert "kernel" in assert_problem(r, 422, "student")["detail"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["stages"].pop(4), "spec.structure.stages[4].type"),
        (lambda d: d["stages"][0].update(kernel=9), "spec.structure.stages[0].kernel"),
        (
            lambda d: d["stages"][1]["branch"][1].update(out=5),
            "spec.structure.stages[1].branch[1].out",
        ),
        (lambda d: d["stages"][0].update(groups=2), "spec.structure.stages[0].groups"),
        (lambda d: d["stages"][0].update(out=0), "spec.structure.stages[0].out"),
    ],
)
async def test_bad_networks_name_the_stage_and_field(svc, change, field):
    d = copy.deepcopy(TEACHER)
    change(d)
    p = 10
    r = await upload(svc.client, d, "diag", {"mean": np.zeros(p), "variance": np.ones(p)})
    assert_problem(r, 422, field)


def _kron_arrays(net: Network, rng) -> dict[str, np.ndarray]:
    """K-FAC arrays as laplace-torch's Conv2d factors have them: per layer l, ``row{l}``
    (out × out) and ``col{l}`` ((in·kh·kw) × (in·kh·kw)), ``bias{l}`` its own block."""
    arrays = {"mean": rng.normal(size=net.n_params)}
    for u in net.graph.units:
        (seg,) = u.segments
        arrays[f"row{u.layer}"] = spd(rng, u.rows)
        arrays[f"col{u.layer}"] = spd(rng, seg.width * seg.group)
        if u.bias is not None:
            arrays[f"bias{u.layer}"] = spd(rng, u.rows)
    return arrays


async def test_a_kron_residual_cnn_is_uploaded_planned_and_aligned_as_the_core_does(svc):
    from planner.posterior import KronPosterior

    net = Network.from_json(TEACHER)
    arrays = _kron_arrays(net, np.random.default_rng(3))
    r = await upload(svc.client, TEACHER, "kron", arrays, name="resnet-kfac")
    assert r.status_code == 201, r.text
    t = r.json()
    r = await svc.client.post(f"/v1/teachers/{t['id']}/plans", json={"student": _student()})
    assert r.status_code == 201, r.text
    plan = r.json()
    post = KronPosterior.from_arrays(net, arrays)
    core = search(post, Network.from_json(_student()))
    assert plan["ops"] == core.plan.to_json()
    assert plan["cost"] == pytest.approx(core.cost, rel=1e-12)
    r = await svc.client.post(f"/v1/plans/{plan['id']}/prior")
    done = await wait_done(svc.client, r.json()["id"])
    assert done["status"] == "done", done
    want = Plan(net, core.plan.ops).apply(post).to_arrays()
    assert set(done["arrays"]) == set(want)
    for name in ("mean", "col1", "row2"):
        r = await svc.client.get(f"/v1/priors/{done['id']}/arrays/{name}")
        got = np.load(io.BytesIO(r.content), allow_pickle=False)
        np.testing.assert_allclose(got, want[name], rtol=1e-12)


async def test_a_kron_network_upload_missing_a_factor_names_it(svc):
    net = Network.from_json(TEACHER)
    arrays = _kron_arrays(net, np.random.default_rng(4))
    del arrays["col3"]
    r = await upload(svc.client, TEACHER, "kron", arrays)
    assert "col3" in assert_problem(r, 422)["detail"]


async def test_an_mlp_student_for_a_network_teacher_says_how_to_write_it(svc):
    net = Network.from_json(TEACHER)
    p = net.n_params
    r = await upload(svc.client, TEACHER, "diag", {"mean": np.zeros(p), "variance": np.ones(p)})
    t = r.json()
    r = await svc.client.post(f"/v1/teachers/{t['id']}/plans", json={"student": {"widths": [2, 2]}})
    assert r.status_code == 422
    r = await svc.client.post(
        f"/v1/teachers/{t['id']}/plans", json={"student": {"widths": [32, 4, 2]}}
    )
    assert "network" in assert_problem(r, 422)["detail"]


async def test_a_student_by_budget_fits_and_matches_the_core(svc):
    from planner.search import search_budget

    net = Network.from_json(TEACHER)
    rng = np.random.default_rng(2)
    p = net.n_params
    arrays = {"mean": rng.normal(size=p), "covariance": spd(rng, p)}
    t = (await upload(svc.client, TEACHER, "full", arrays)).json()
    body = {"budget": {"keep": 0.5, "floors": {"2": 3}}}
    r = await svc.client.post(f"/v1/teachers/{t['id']}/plans", json=body)
    assert r.status_code == 201, r.text
    plan = r.json()
    post = FullPosterior.from_dense(net, arrays["mean"], arrays["covariance"])
    core = search_budget(post, p // 2, floors={2: 3})
    assert plan["ops"] == core.plan.to_json()
    assert plan["student"]["n_params"] == core.plan.student.n_params <= p // 2
    assert plan["student"]["kind"] == "network"
    # as a job too
    r = await svc.client.post(
        f"/v1/teachers/{t['id']}/plans", json=body, headers={"Prefer": "respond-async"}
    )
    assert r.status_code == 202, r.text
    assert r.json()["student"] is None and r.json()["budget"]["keep"] == 0.5


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "student"),
        ({"student": _student(), "budget": {"keep": 0.5}}, "budget"),
        ({"budget": {"keep": 0.5, "max_params": 3}}, "budget"),
        ({"budget": {"keep": 1.5}}, "budget.keep"),
        ({"budget": {"keep": 0.5, "floors": {"1": 2}}}, "budget.floors"),
        ({"budget": {"max_params": 3}}, "budget"),
    ],
)
async def test_bad_budgets_name_the_field(svc, body, field):
    p = Network.from_json(TEACHER).n_params
    t = (
        await upload(svc.client, TEACHER, "diag", {"mean": np.zeros(p), "variance": np.ones(p)})
    ).json()
    r = await svc.client.post(f"/v1/teachers/{t['id']}/plans", json=body)
    assert_problem(r, 422, field)
