"""Upload → plan → prior → download through the app, compared with the core."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from planner import FullPosterior, Plan, Structure, step_costs
from planner.search import search
from tests.app.conftest import (
    BACKENDS,
    assert_problem,
    make_plan,
    make_prior,
    posterior,
    upload,
    wait_done,
)

#: every test here runs on the embedded service and on PostgreSQL + S3 + Dask
pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("backend", BACKENDS, indirect=True)]


async def test_upload_plan_prior_download_matches_the_core(svc):
    structure, arrays = posterior((3, 4, 4, 2), "full", seed=1, bias=True)
    r = await upload(svc.client, structure, "full", arrays, name="teacher-1")
    assert r.status_code == 201, r.text
    t = r.json()
    assert t["structure"]["n_params"] == Structure.mlp((3, 4, 4, 2), bias=True).n_params
    assert t["posterior"] == {"format": "full"}
    assert set(t["arrays"]) == {"mean", "covariance"}
    assert r.headers["location"] == f"/v1/teachers/{t['id']}"

    r = await svc.client.post(
        f"/v1/teachers/{t['id']}/plans", json={"student": {"widths": [3, 3, 2]}, "seed": 0}
    )
    assert r.status_code == 201, r.text
    plan = r.json()
    assert plan["student"]["widths"] == [3, 3, 2] and plan["student"]["bias"] is True

    # the same search in the core gives the same plan and cost
    teacher = Structure.mlp((3, 4, 4, 2), bias=True)
    post = FullPosterior.from_dense(teacher, arrays["mean"], arrays["covariance"])
    core = search(post, teacher.inherit((3, 3, 2)))
    assert plan["ops"] == core.plan.to_json()
    assert plan["cost"] == pytest.approx(core.cost, rel=1e-12)

    r = await svc.client.post(f"/v1/plans/{plan['id']}/prior")
    assert r.status_code in (201, 202), r.text
    prior_id = r.json()["id"]
    again = await svc.client.post(f"/v1/plans/{plan['id']}/prior")
    assert again.json()["id"] == prior_id  # one prior per plan
    done = await wait_done(svc.client, prior_id)
    assert done["status"] == "done", done
    assert done["posterior"] == {"format": "full"}
    assert (await svc.client.post(f"/v1/plans/{plan['id']}/prior")).status_code == 201

    expect = core.plan.apply(post)
    r = await svc.client.get(f"/v1/priors/{prior_id}/arrays/mean")
    assert r.status_code == 200
    mean = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert np.array_equal(mean, expect.mean)  # bit for bit
    r = await svc.client.get(f"/v1/priors/{prior_id}/arrays/covariance?dtype=float32")
    cov32 = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert cov32.dtype == np.float32
    assert np.array_equal(cov32, expect.covariance.astype(np.float32))

    # HTTP Range: a broken download resumes
    full = (await svc.client.get(f"/v1/priors/{prior_id}/arrays/covariance")).content
    r = await svc.client.get(
        f"/v1/priors/{prior_id}/arrays/covariance", headers={"Range": "bytes=100-"}
    )
    assert r.status_code == 206 and r.content == full[100:]

    r = await svc.client.get(f"/v1/priors/{prior_id}/archive?format=npz")
    z = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert sorted(z.files) == ["covariance", "mean"]
    assert np.array_equal(z["covariance"], expect.covariance)
    meta = json.loads(zipfile.ZipFile(io.BytesIO(r.content)).comment)
    assert meta["structure"]["widths"] == [3, 3, 2]

    from safetensors import safe_open
    from safetensors.numpy import load

    r = await svc.client.get(f"/v1/priors/{prior_id}/archive?format=safetensors")
    st = load(r.content)
    assert np.array_equal(st["mean"], expect.mean)
    assert np.array_equal(st["covariance"], expect.covariance)
    path = svc.data.parent / "st.safetensors"
    path.write_bytes(r.content)
    with safe_open(str(path), framework="numpy") as f:
        assert json.loads(f.metadata()["structure"])["widths"] == [3, 3, 2]
    if svc.settings.storage_url:  # scaled out: no array ever touched the replica's disk
        assert [p for p in svc.data.rglob("*") if p.is_file()] == []


async def test_explicit_ops_are_validated_and_scored(svc):
    structure, arrays = posterior((3, 4, 3, 2), "diag", seed=2)
    t = (await upload(svc.client, structure, "diag", arrays)).json()
    ops = [{"op": "phi", "layer": 2, "neuron": 1}, {"op": "psi", "layer": 3, "pairing": [2, 0, 1]}]
    r = await svc.client.post(
        f"/v1/teachers/{t['id']}/plans", json={"student": {"widths": [3, 3, 2]}, "ops": ops}
    )
    assert r.status_code == 201, r.text
    teacher = Structure.mlp((3, 4, 3, 2))
    from planner import DiagPosterior

    post = DiagPosterior.from_arrays(teacher, arrays)
    assert r.json()["cost"] == pytest.approx(Plan.from_json(teacher, ops).cost(post), rel=1e-12)
    assert r.json()["ops"] == ops
    assert r.json()["provenance"][1] == {
        "position": 2,
        "teacher_position": 2,
        "teacher_neurons": [0, 2, 3],
    }

    bad = [{"op": "phi", "layer": 2, "neuron": 9}]
    r = await svc.client.post(
        f"/v1/teachers/{t['id']}/plans", json={"student": {"widths": [3, 3, 3, 2]}, "ops": bad}
    )
    assert_problem(r, 422, "ops[0].neuron")
    r = await svc.client.post(
        f"/v1/teachers/{t['id']}/plans",
        json={"student": {"widths": [3, 2, 2]}, "ops": ops},
    )
    assert_problem(r, 422, "ops")
    r = await svc.client.post(
        f"/v1/teachers/{t['id']}/plans",
        json={"student": {"widths": [3, 3, 2]}, "ops": [{"op": "x"}]},
    )
    assert_problem(r, 422, "ops[0]")
    # integers are integers: 2.9 is not layer 2, true is not neuron 1, "10" no pairing
    # (10.0 is 10, as JSON Schema says: tests/app/test_contract.py)
    for op, field in (
        ({"op": "phi", "layer": 2.9, "neuron": 1}, "ops[0].layer"),
        ({"op": "phi", "layer": 2, "neuron": True}, "ops[0].neuron"),
        ({"op": "psi", "layer": 3, "pairing": "10"}, "ops[0].pairing"),
        ({"op": "psi", "layer": 3, "pairing": [1, 0.5, 2]}, "ops[0].pairing[1]"),
    ):
        r = await svc.client.post(
            f"/v1/teachers/{t['id']}/plans", json={"student": {"widths": [3, 3, 2]}, "ops": [op]}
        )
        assert_problem(r, 422, field)


async def test_plan_problems(svc):
    structure, arrays = posterior((3, 4, 4, 2), "diag")
    t = (await upload(svc.client, structure, "diag", arrays)).json()
    url = f"/v1/teachers/{t['id']}/plans"
    body = assert_problem(
        await svc.client.post(url, json={"student": {"widths": [3, 9, 2]}}), 422, "student"
    )
    assert "width 9" in body["detail"]
    assert_problem(
        await svc.client.post(url, json={"student": {"widths": [3, 3, 2]}, "criterion": "magic"}),
        422,
        "criterion",
    )
    assert_problem(
        await svc.client.post(
            url, json={"student": {"widths": [3, 3, 2]}, "criterion": "gradient_covariance"}
        ),
        422,
        "gradients",
    )
    assert_problem(await svc.client.post(url, json={"student": {"widths": [3, 0, 2]}}), 422)
    assert_problem(await svc.client.post(url, json={"student": {"widths": [3, 2]}}), 422)
    assert_problem(await svc.client.post(url, json={"student": {}}), 422, "student.widths")
    assert_problem(await svc.client.post(url, content=b"{not json"), 422)
    assert_problem(
        await svc.client.post(url, json={"student": {"widths": [3, 3, 2], "activation": "swish"}}),
        422,
        "student.activation",
    )


async def test_gradient_covariance_uses_uploaded_gradients(svc):
    structure, arrays = posterior((3, 4, 4, 2), "diag")
    p = len(arrays["mean"])
    arrays["gradients"] = np.random.default_rng(0).normal(size=(20, p))
    t = (await upload(svc.client, structure, "diag", arrays)).json()
    r = await svc.client.post(
        f"/v1/teachers/{t['id']}/plans",
        json={"student": {"widths": [3, 2, 3, 2]}, "criterion": "gradient_covariance"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["criterion"] == "gradient_covariance"


async def test_sequences_are_bounded(svc):
    """A T = 256 teacher of width-1 layers to (1, 1, 1): counting would visit more lattice
    states than PLANNER_MAX_COUNT_STATES, so the answer comes at once with count null and
    the reason, and with at most `limit` ≤ 1000 sequences."""
    body = {"teacher": {"widths": [1] * 256}, "student": {"widths": [1, 1, 1]}, "limit": 20}
    r = await svc.client.post("/v1/structures/sequences", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["count"] is None and "too many" in out["count_note"]
    assert len(out["sequences"]) == 20 and len(out["sequences"][0]) == 253
    assert_problem(
        await svc.client.post("/v1/structures/sequences", json={**body, "limit": 1001}),
        422,
        "limit",
    )


async def test_sequences(svc):
    body = {"teacher": {"widths": [10, 6, 7, 10]}, "student": {"widths": [10, 4, 6, 10]}}
    r = await svc.client.post("/v1/structures/sequences", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["member"] is True and out["count"] == 3 and len(out["sequences"]) == 3
    assert {"op": "phi", "layer": 3} in out["sequences"][0]
    r = await svc.client.post(
        "/v1/structures/sequences",
        json={"teacher": {"widths": [10, 6, 6, 10]}, "student": {"widths": [10, 6, 10]}},
    )
    assert r.json()["sequences"] == [[{"op": "psi", "layer": 3}]]
    r = await svc.client.post("/v1/structures/sequences", json={**body, "limit": 1})
    assert r.json()["count"] == 3 and len(r.json()["sequences"]) == 1
    body_bad = {"teacher": {"widths": [10, 6, 7, 10]}, "student": {"widths": [10, 8, 6, 10]}}
    p = assert_problem(
        await svc.client.post("/v1/structures/sequences", json=body_bad), 422, "student"
    )
    assert p["member"] is False and "width 8" in p["detail"]
    assert_problem(
        await svc.client.post(
            "/v1/structures/sequences",
            json={"teacher": {"widths": [10, 1]}, "student": {"widths": [10, 1]}},
        ),
        422,
        "teacher.widths",
    )
    assert_problem(
        await svc.client.post("/v1/structures/sequences", json={**body, "limit": -1}), 422, "limit"
    )


async def test_unknown_and_path_like_ids_are_not_found(svc):
    for url in (
        "/v1/teachers/t_000000000000000000000000",
        "/v1/teachers/..%2F..%2Fetc%2Fpasswd",
        "/v1/teachers/..",
        "/v1/plans/p_000000000000000000000000",
        "/v1/plans/t_000000000000000000000000",
        "/v1/priors/r_000000000000000000000000",
        "/v1/priors/r_000000000000000000000000/arrays/mean",
        "/v1/priors/%2e%2e/archive",
    ):
        r = await svc.client.get(url)
        assert_problem(r, 404)
    assert_problem(await svc.client.delete("/v1/teachers/t_000000000000000000000000"), 404)
    r = await svc.client.post("/v1/plans/p_000000000000000000000000/prior")
    assert_problem(r, 404)


async def test_arrays_of_an_unfinished_prior_are_a_conflict(svc):
    structure, arrays = posterior((3, 4, 4, 2), "diag")
    t = (await upload(svc.client, structure, "diag", arrays)).json()
    plan = await make_plan(svc.client, t["id"], [3, 3, 2])
    rec, _ = svc.app.state.store.prior_for_plan("public", plan["id"])  # queued, never run
    assert_problem(await svc.client.get(f"/v1/priors/{rec.id}/arrays/mean"), 409, "status")
    assert_problem(await svc.client.get(f"/v1/priors/{rec.id}/archive"), 409)
    r = await svc.client.get(f"/v1/priors/{rec.id}")
    assert r.json()["status"] == "queued"


async def test_delete_removes_plans_priors_and_files(svc):
    from tests.app.conftest import stored

    structure, arrays = posterior((3, 4, 4, 2), "full")
    t = (await upload(svc.client, structure, "full", arrays)).json()
    plan = await make_plan(svc.client, t["id"], [3, 3, 2])
    prior = await make_prior(svc.client, plan["id"])
    await svc.client.get(f"/v1/priors/{prior['id']}/archive")
    assert stored(svc)
    assert (await svc.client.delete(f"/v1/teachers/{t['id']}")).status_code == 204
    assert_problem(await svc.client.get(f"/v1/plans/{plan['id']}"), 404)
    assert_problem(await svc.client.get(f"/v1/priors/{prior['id']}"), 404)
    assert (await svc.client.get("/v1/teachers")).json() == []
    assert stored(svc) == []


async def test_health_ready_metrics_docs(svc):
    assert (await svc.client.get("/healthz")).json() == {"status": "ok"}
    assert (await svc.client.get("/readyz")).status_code == 200
    await svc.client.get("/v1/teachers")
    m = (await svc.client.get("/metrics")).text
    assert 'planner_requests_total{method="GET",route="/v1/teachers",status="200"}' in m
    assert "planner_bytes_stored" in m and "planner_job_seconds" in m
    assert (await svc.client.get("/docs")).status_code == 200
    assert "/v1/teachers" in (await svc.client.get("/openapi.json")).json()["paths"]


async def test_a_lattice_too_large_to_count_still_answers(svc, monkeypatch):
    from app.api.routes import structures
    from planner import TooLarge

    def too_large(*args, **kwargs):
        raise TooLarge("too many lattice states to count exactly", field="student")

    monkeypatch.setattr(structures, "count_sequences", too_large)
    body = {"teacher": {"widths": [10, 6, 7, 10]}, "student": {"widths": [10, 4, 6, 10]}}
    r = await svc.client.post("/v1/structures/sequences", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["count"] is None and "count exactly" in r.json()["count_note"]
    assert len(r.json()["sequences"]) == 3


async def test_step_costs_are_computed_on_request_and_sum_to_the_cost(svc):
    """A plan request does not cost its steps (that is a conditioning per run); the
    first GET …/steps does, keeps them, and they equal the core's prefix differences."""
    structure, arrays = posterior((4, 6, 5, 2), "full", seed=21)
    t = (await upload(svc.client, structure, "full", arrays)).json()
    plan = await make_plan(svc.client, t["id"], [4, 3, 2])
    assert "steps" not in (await svc.client.get(f"/v1/plans/{plan['id']}")).json()
    assert "steps" not in svc.store.plan("public", plan["id"]).info
    r = await svc.client.get(f"/v1/plans/{plan['id']}/steps")
    assert r.status_code == 200, r.text
    got = r.json()
    teacher = Structure.mlp((4, 6, 5, 2))
    post = FullPosterior.from_dense(teacher, arrays["mean"], arrays["covariance"])
    expect = step_costs(Plan.from_json(teacher, plan["ops"]), post)
    assert [s["cost"] for s in got["steps"]] == pytest.approx([s["cost"] for s in expect], rel=1e-9)
    assert sum(s["cost"] for s in got["steps"]) == pytest.approx(plan["cost"], rel=1e-9)
    assert svc.store.plan("public", plan["id"]).info["steps"] == got["steps"]
    assert_problem(await svc.client.get("/v1/plans/p_000000000000000000000000/steps"), 404)


async def test_a_teachers_plans_and_priors_are_listed_a_page_at_a_time(svc):
    structure, arrays = posterior((3, 5, 4, 2), "diag", seed=22)
    t = (await upload(svc.client, structure, "diag", arrays)).json()
    plans = [await make_plan(svc.client, t["id"], [3, w, 4, 2]) for w in (1, 2, 3, 4, 5)]
    priors = [await make_prior(svc.client, p["id"]) for p in plans[:3]]
    seen, url = [], f"/v1/teachers/{t['id']}/plans?limit=2"
    while url:
        page = (await svc.client.get(url)).json()
        assert len(page["items"]) <= 2
        seen += [p["id"] for p in page["items"]]
        url = page["next"]
    assert seen == [p["id"] for p in plans]
    page = (await svc.client.get(f"/v1/teachers/{t['id']}/priors?limit=10")).json()
    assert [r["id"] for r in page["items"]] == [r["id"] for r in priors] and page["next"] is None
    assert_problem(await svc.client.get(f"/v1/teachers/{t['id']}/plans?limit=0"), 422, "limit")
    other = "t_000000000000000000000000"
    assert_problem(await svc.client.get(f"/v1/teachers/{other}/plans"), 404)
