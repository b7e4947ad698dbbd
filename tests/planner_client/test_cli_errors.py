"""The CLI's answers a user can act on, without a service."""

from __future__ import annotations

import socket

from planner_client.cli import main
from planner_client.errors import error_for


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_service_is_one_line_naming_the_url_and_how_to_set_it(capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["--url", url, "teacher", "list"]) == 3
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert url in err and "--url" in err and "PLANNER_URL" in err


def test_client_errors_name_the_field():
    problem = {"status": 422, "detail": "width 9 exceeds the teacher's 6", "field": "student"}
    exc = error_for(422, problem)
    assert str(exc) == "422 [student]: width 9 exceeds the teacher's 6"
    assert exc.field == "student"
