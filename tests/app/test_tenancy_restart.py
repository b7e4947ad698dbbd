"""API keys isolate tenants; a restart serves everything and finishes cut-off jobs."""

from __future__ import annotations

import pytest

from tests.app.conftest import (
    assert_problem,
    make_plan,
    make_prior,
    posterior,
    start,
    stop,
    upload,
    wait_done,
)

pytestmark = pytest.mark.anyio

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


async def test_keys_isolate_tenants(tmp_path):
    svc, ctx = await start(tmp_path / "data", api_keys="key-a, key-b")
    try:
        c = svc.client
        assert (await c.get("/healthz")).status_code == 200  # always open
        body = assert_problem(await c.get("/v1/teachers"), 401, "authorization")
        assert body["type"].endswith("unauthorized")
        r = await c.get("/v1/teachers", headers={"Authorization": "Bearer nope"})
        assert_problem(r, 401)
        assert "Bearer" in r.headers["www-authenticate"]
        assert_problem(
            await c.get("/v1/teachers", headers={"Authorization": "Basic a2V5LWE="}), 401
        )

        structure, arrays = posterior((3, 4, 4, 2), "diag")
        t = (await upload(c, structure, "diag", arrays, headers=A)).json()
        plan = await make_plan(c, t["id"], [3, 3, 2], headers=A)
        prior = await make_prior(c, plan["id"], headers=A)

        assert [x["id"] for x in (await c.get("/v1/teachers", headers=A)).json()] == [t["id"]]
        assert (await c.get("/v1/teachers", headers=B)).json() == []
        for url in (
            f"/v1/teachers/{t['id']}",
            f"/v1/plans/{plan['id']}",
            f"/v1/priors/{prior['id']}",
            f"/v1/priors/{prior['id']}/arrays/mean",
            f"/v1/priors/{prior['id']}/archive",
        ):
            assert_problem(await c.get(url, headers=B), 404)
            assert (await c.get(url, headers=A)).status_code == 200
        assert_problem(await c.delete(f"/v1/teachers/{t['id']}", headers=B), 404)
        assert_problem(
            await c.post(
                f"/v1/teachers/{t['id']}/plans", json={"student": {"widths": [3, 3, 2]}}, headers=B
            ),
            404,
        )
        assert_problem(await c.post(f"/v1/plans/{plan['id']}/prior", headers=B), 404)
        assert (await c.get(f"/v1/teachers/{t['id']}", headers=A)).status_code == 200
    finally:
        await svc.client.aclose()
        await ctx.__aexit__(None, None, None)


async def test_a_restart_serves_everything_bit_for_bit(tmp_path):
    data = tmp_path / "data"
    svc, ctx = await start(data)
    structure, arrays = posterior((3, 4, 4, 2), "full", seed=5)
    t = (await upload(svc.client, structure, "full", arrays)).json()
    plan = await make_plan(svc.client, t["id"], [3, 3, 2])
    prior = await make_prior(svc.client, plan["id"])
    before = {
        u: (await svc.client.get(u)).content
        for u in (
            f"/v1/teachers/{t['id']}",
            f"/v1/plans/{plan['id']}",
            f"/v1/priors/{prior['id']}",
            f"/v1/priors/{prior['id']}/arrays/mean",
            f"/v1/priors/{prior['id']}/arrays/covariance",
        )
    }
    # a second plan whose prior is cut off by the restart while "running"
    plan2 = await make_plan(svc.client, t["id"], [3, 2, 2])
    rec, _ = svc.app.state.store.prior_for_plan("public", plan2["id"])
    assert svc.store.claim(rec.id, "cut-off", 3600.0) is not None
    await stop(svc, ctx)

    svc, ctx = await start(data)
    try:
        for url, content in before.items():
            assert (await svc.client.get(url)).content == content, url
        done = await wait_done(svc.client, rec.id)  # re-queued at start-up, then computed
        assert done["status"] == "done"
    finally:
        await svc.client.aclose()
        await ctx.__aexit__(None, None, None)
