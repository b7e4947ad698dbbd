"""The OpenAPI document is the contract: schemathesis, every check and every phase
(examples, coverage, fuzzing, stateful through the document's links), against a real
server. Any finding fails the suite."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx

from app.arrays import NAME

CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_schemathesis_finds_nothing(server, tmp_path):
    st = Path(sys.executable).with_name("schemathesis")
    out = subprocess.run(
        [
            str(st), "--config-file", str(CONFIG), "run", f"{server.url}/openapi.json",
            "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
            "--max-examples", "30", "--seed", "20261128", "--no-color",
        ],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-20000:] + out.stderr[-5000:]
    assert "Stateful" in out.stdout  # the stateful phase ran


def test_every_route_documents_problems_as_problem_json(server):
    doc = httpx.get(f"{server.url}/openapi.json").json()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                if status[0] in "45":
                    assert list(response["content"]) == ["application/problem+json"], (
                        method,
                        path,
                        status,
                    )
            if "{id}" in path:
                assert "404" in op["responses"], (method, path)
    links = doc["paths"]["/v1/teachers"]["post"]["responses"]["201"]["links"]
    assert links["CreatePlan"]["operationId"] == "create_plan"


def test_405_lists_every_method_of_the_path(server):
    r = httpx.put(f"{server.url}/v1/teachers/t123")
    assert r.status_code == 405
    assert set(r.headers["allow"].split(", ")) >= {"GET", "DELETE"}
    assert r.headers["content-type"] == "application/problem+json"


def test_integral_numbers_are_integers_and_part_names_follow_the_schema(server):
    """JSON Schema's ``integer`` includes ``93.0``: what the schema accepts, the server
    accepts; booleans and fractions stay refused. Upload part names are constrained in the
    schema itself (``propertyNames``) exactly as the server checks them."""
    url = f"{server.url}/v1/structures/sequences"
    ok = {"teacher": {"widths": [10, 6.0, 10]}, "student": {"widths": [10, 4.0, 10]}, "limit": 2.0}
    r = httpx.post(url, json=ok)
    assert r.status_code == 200, r.text
    for bad, field in ((True, "teacher.widths[1]"), (6.5, "teacher.widths[1]")):
        body = {"teacher": {"widths": [10, bad, 10]}, "student": {"widths": [10, 4, 10]}}
        r = httpx.post(url, json=body)
        assert r.status_code == 422 and r.json()["field"] == field, r.text
    doc = httpx.get(f"{server.url}/openapi.json").json()
    upload = doc["paths"]["/v1/teachers"]["post"]["requestBody"]["content"]
    names = upload["multipart/form-data"]["schema"]["propertyNames"]
    assert names["pattern"] == NAME.pattern
    assert re.fullmatch(names["pattern"], "covariance") and not re.fullmatch(
        names["pattern"], "../x"
    )
    for path, status in (
        ("/v1/priors/{id}/arrays/{name}", "200"),
        ("/v1/priors/{id}/archive", "206"),
    ):
        content = doc["paths"][path]["get"]["responses"][status]["content"]
        assert list(content) == ["application/octet-stream"], (path, content)
