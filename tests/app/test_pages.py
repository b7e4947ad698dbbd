"""The plan and teacher pages in a real browser: Debian's Chromium, driven by Playwright."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from planner_client import PlannerClient
from tests.app.cluster import Server, need
from tests.app.conftest import posterior

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: Where the screenshots go (a test artefact; README's picture is docs/plan-page.png).
ARTIFACTS = Path(os.environ.get("PLANNER_TEST_ARTIFACTS", Path(__file__).parents[2] / "build"))
ARGS = [  # as root, on a closed network (the machine notes)
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
KEY, OTHER = "page-key", "other-key"


@pytest.fixture(scope="module")
def browser():
    need(Path(CHROMIUM).exists(), "Chromium is not installed (apt-get install chromium)")
    from playwright import sync_api  # a dev dependency: installed by make test

    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("pages") / "data", PLANNER_API_KEYS=f"{KEY},{OTHER}")
    srv.start()
    yield srv
    srv.stop()


def _page(browser, key: str | None):
    ctx = browser.new_context(
        viewport={"width": 1200, "height": 900},
        extra_http_headers={"Authorization": f"Bearer {key}"} if key else {},
    )
    return ctx, ctx.new_page()


def test_the_plan_page_draws_the_plan(browser, service):
    structure, arrays = posterior((5, 8, 8, 3), "full", seed=2)
    with PlannerClient(service.url, api_key=KEY) as c:
        t = c.upload_teacher("<script>alert(1)</script>", structure, "full", arrays)
        plan = c.plan(t["id"], [5, 4, 3])  # φ at two positions, then ψ with a pairing
        prior = c.wait_prior(c.request_prior(plan["id"])["id"])
    ctx, page = _page(browser, KEY)
    try:
        r = page.goto(f"{service.url}/ui/plans/{plan['id']}")
        assert r.status == 200
        assert page.locator("svg#network").count() == 1
        assert page.locator(".teacher-position").count() == 4
        assert page.locator(".student-position").count() == 3
        assert page.locator(".teacher-position circle.neuron").count() == 5 + 8 + 8 + 3
        kept = sum(len(p["teacher_neurons"]) for p in plan["provenance"])
        assert page.locator(".teacher-position circle.neuron:not([fill='#fff'])").count() == kept
        assert float(page.locator("#cost").inner_text()) == pytest.approx(plan["cost"], rel=1e-5)
        steps = page.locator("#steps tr.step")
        psi = [op for op in plan["ops"] if op["op"] == "psi"]
        assert steps.count() == len({(o["op"], o["layer"]) for o in plan["ops"]})
        assert page.locator("#psi li").count() == len(psi) >= 1
        # π drawn: one line per pair of the merged layer
        assert page.locator("line.pairing").count() == sum(
            len(op.get("pairing") or []) or plan["student"]["widths"][op["layer"] - 2] for op in psi
        )
        assert page.locator("#cost-chart rect.cost-bar").count() == 4
        assert page.locator(f"#prior a[href='/v1/priors/{prior['id']}/archive?format=npz']").count()
        # the teacher's name is text, never markup
        assert page.locator("script").count() == 0
        assert "<script>alert(1)</script>" in page.locator("body").inner_text()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "plan-page.png"), full_page=True)
        assert "nats" in page.locator("#cost-words").inner_text()
        r = page.goto(f"{service.url}/ui/teachers/{t['id']}")
        assert r.status == 200
        assert page.locator(f"#plans a[href='/ui/plans/{plan['id']}']").count() == 1
        assert page.locator(f"#plans a[href='/v1/priors/{prior['id']}']").count() == 1
        # the index lists the tenant's teachers, plans and priors
        for url in (f"{service.url}/", f"{service.url}/ui/"):
            assert page.goto(url).status == 200
            assert page.locator(f"#teachers a[href='/ui/teachers/{t['id']}']").count() == 1
            assert page.locator(f"#teachers a[href='/ui/plans/{plan['id']}']").count() == 1
            assert page.locator(f"#teachers a[href='/v1/priors/{prior['id']}']").count() == 1
    finally:
        ctx.close()


def test_a_network_plan_page_draws_stages_spaces_and_removed_blocks(browser, service):
    from planner import Network
    from tests.app.test_networks_service import TEACHER

    teacher = TEACHER
    p = Network.from_json(teacher).n_params
    rng = np.random.default_rng(5)
    arrays = {"mean": rng.normal(size=p), "variance": rng.uniform(0.5, 2, size=p)}
    with PlannerClient(service.url, api_key=KEY) as c:
        t = c.upload_teacher("cnn", teacher, "diag", arrays)
        student = {**teacher, "stages": [teacher["stages"][0], *teacher["stages"][2:]]}
        plan = c.plan(t["id"], student)  # one block fewer: which one is the planner's choice
    ctx, page = _page(browser, KEY)
    try:
        assert page.goto(f"{service.url}/ui/plans/{plan['id']}").status == 200
        assert page.locator("#stages li").count() == 6
        assert len(plan["surviving"]["blocks"]) == 1
        assert page.locator("#stages li.removed").count() == 1
        assert page.locator(".teacher-space").count() == 5  # input, stem, two inner, output
        kept = sum(len(q["teacher_channels"]) for q in plan["provenance"])
        assert page.locator(".teacher-space circle.neuron:not([fill='#fff'])").count() == kept
        assert page.locator("#cost-chart rect.cost-bar").count() >= 1
        assert float(page.locator("#cost").inner_text()) == pytest.approx(plan["cost"], rel=1e-5)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "network-plan-page.png"), full_page=True)
        assert page.goto(f"{service.url}/ui/teachers/{t['id']}").status == 200
        assert "network[2, 4, 4]" in page.locator("body").inner_text()
    finally:
        ctx.close()


def test_the_api_docs_are_served_without_internet(browser, service):
    """/docs and /redoc load their scripts and styles from the service itself (a packaged
    Swagger UI and Redoc), so they render on a closed network; Chromium here has no
    internet. (Redoc's footer logo is an image from its maker's site: it may be missing.)"""
    ctx, page = _page(browser, None)
    try:
        failed: list[str] = []  # scripts, styles and data the pages could not load
        page.on(
            "requestfailed",
            lambda req: (
                req.resource_type in ("script", "stylesheet", "fetch", "xhr", "font")
                and failed.append(req.url)
            ),
        )
        assert page.goto(f"{service.url}/docs").status == 200
        page.wait_for_selector(".swagger-ui .opblock", timeout=20_000)
        assert page.locator(".opblock").count() >= 10
        assert page.goto(f"{service.url}/redoc").status == 200
        page.wait_for_selector("[role=navigation], .menu-content", timeout=20_000)
        assert not [u for u in failed if not u.startswith(service.url)], failed
    finally:
        ctx.close()


def test_a_wide_teacher_is_drawn_in_bands(browser, service):
    widths = (4, 500, 40, 2)
    p = 4 * 500 + 500 * 40 + 40 * 2
    rng = np.random.default_rng(0)
    arrays = {"mean": rng.normal(size=p), "variance": rng.uniform(0.1, 1.0, size=p)}
    with PlannerClient(service.url, api_key=KEY) as c:
        t = c.upload_teacher("wide", {"widths": list(widths)}, "diag", arrays)
        plan = c.plan(t["id"], [4, 60, 40, 2])
    ctx, page = _page(browser, KEY)
    try:
        page.goto(f"{service.url}/ui/plans/{plan['id']}")
        bands = page.locator(".teacher-position[data-position='2'] rect.band")
        assert 0 < bands.count() <= 48  # 500 neurons in at most 48 bands
        assert page.locator(".teacher-position[data-position='3'] circle.neuron").count() == 40
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "plan-page-wide.png"), full_page=True)
    finally:
        ctx.close()


def test_pages_need_the_key_and_keep_tenants_apart(browser, service):
    structure, arrays = posterior((3, 4, 2), "diag", seed=1)
    with PlannerClient(service.url, api_key=KEY) as c:
        t = c.upload_teacher("mine", structure, "diag", arrays)
        plan = c.plan(t["id"], [3, 2, 2])
    for key, status in ((None, 401), (OTHER, 404), (KEY, 200)):
        ctx, page = _page(browser, key)
        try:
            assert page.goto(f"{service.url}/ui/plans/{plan['id']}").status == status
            assert page.goto(f"{service.url}/ui/teachers/{t['id']}").status == status
        finally:
            ctx.close()
