"""``alignment-planner``: the command line, a thin layer over :class:`PlannerClient`.

Every command prints JSON on stdout.  The service address comes from ``--url``
or ``$PLANNER_URL`` (default ``http://127.0.0.1:8000``), the key from
``--api-key`` or ``$PLANNER_API_KEY``.  Exit status: 0 done, 1 the service
answered a problem (printed on stderr), 2 a usage error, 3 no service reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx

from .client import PlannerClient, structure
from .errors import PlannerAPIError


def _widths(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def _structure(args, prefix: str) -> dict | None:
    """The structure an option gives: comma-separated widths (an MLP or RNN, with the other
    ``--{prefix}-…`` options), or a JSON file of any structure (a network's ``input`` and
    ``stages``), as ``@file.json`` or a path ending in ``.json``."""
    text = getattr(args, prefix)
    if text is None:
        return None
    if text.startswith("@") or text.endswith(".json"):
        return json.loads(Path(text.removeprefix("@")).read_text())
    s = structure(
        _widths(text),
        getattr(args, f"{prefix}_activation", None),
        getattr(args, f"{prefix}_output_activation", None),
        getattr(args, f"{prefix}_bias", None),
        getattr(args, f"{prefix}_kind", None),
    )
    return s


def _add_structure(
    p: argparse.ArgumentParser, prefix: str, help: str, required: bool = True
) -> None:
    p.add_argument(
        f"--{prefix}",
        required=required,
        help=f"{help}: comma-separated widths, or @FILE.json (any structure, e.g. a network)",
    )
    p.add_argument(f"--{prefix}-activation", dest=f"{prefix}_activation")
    p.add_argument(f"--{prefix}-output-activation", dest=f"{prefix}_output_activation")
    p.add_argument(
        f"--{prefix}-bias",
        dest=f"{prefix}_bias",
        action=argparse.BooleanOptionalAction,
        default=None,
    )
    p.add_argument(f"--{prefix}-kind", dest=f"{prefix}_kind", choices=["mlp", "rnn"])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="alignment-planner", description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get("PLANNER_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--api-key", default=None)
    sub = ap.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service (uvicorn)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", default=None, help="sets PLANNER_DATA_DIR")

    teacher = sub.add_parser("teacher", help="teachers").add_subparsers(
        dest="action", required=True
    )
    up = teacher.add_parser("upload", help="upload a teacher posterior")
    up.add_argument("--name", required=True)
    _add_structure(up, "structure", "the teacher")
    up.add_argument("--format", required=True, help="posterior format: full, diag, …")
    up.add_argument("--array", action="append", default=[], metavar="NAME=FILE.npy")
    up.add_argument("--archive", help=".npz or .safetensors holding every array")
    teacher.add_parser("list", help="list teachers")
    rm = teacher.add_parser("delete", help="delete a teacher with its plans and priors")
    rm.add_argument("teacher_id")

    plan = sub.add_parser("plan", help="plan an alignment to a student")
    plan.add_argument("teacher_id")
    _add_structure(plan, "student", "the student (or a budget: --keep, --max-params)", False)
    plan.add_argument("--keep", type=float, help="a budget: this fraction of the teacher's params")
    plan.add_argument("--max-params", type=int, help="a budget: at most this many parameters")
    plan.add_argument(
        "--floor",
        action="append",
        default=[],
        metavar="SPACE=N",
        help="with a budget: space (an MLP's position) SPACE keeps at least N channels",
    )
    plan.add_argument("--criterion", default="posterior_ratio")
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--ops", help="a JSON file of explicit ops to validate and score")
    plan.add_argument("--effort", choices=("fast", "thorough"), default="fast")
    plan.add_argument("--seconds", type=float, default=None, help="the search's deadline")
    plan.add_argument(
        "--async",
        dest="later",
        action="store_true",
        help="run the search as a job (Prefer: respond-async): print the job and return",
    )

    job = sub.add_parser("plan-job", help="plans run as jobs").add_subparsers(
        dest="action", required=True
    )
    wait = job.add_parser("wait", help="wait for a plan job; print its plan")
    wait.add_argument("job_id")
    wait.add_argument("--timeout", type=float, default=3600.0)
    show = job.add_parser("get", help="a plan job's status")
    show.add_argument("job_id")
    stop = job.add_parser("cancel", help="cancel a queued or running plan job")
    stop.add_argument("job_id")

    prior = sub.add_parser("prior", help="priors").add_subparsers(dest="action", required=True)
    get = prior.add_parser("get", help="compute (or reuse) a plan's prior and download it")
    get.add_argument("plan_id")
    get.add_argument("--out", required=True, help="a file (the archive) or, with --name, a .npy")
    get.add_argument("--name", help="one array instead of the archive")
    get.add_argument("--format", default="npz", choices=["npz", "safetensors"])
    get.add_argument("--dtype", choices=["float64", "float32"])
    get.add_argument("--timeout", type=float, default=3600.0)
    get.add_argument("--no-progress", action="store_true")

    seq = sub.add_parser("sequences", help="the φ/ψ sequences from a teacher to a student")
    _add_structure(seq, "teacher", "the teacher")
    _add_structure(seq, "student", "the student")
    seq.add_argument("--limit", type=int, default=100)
    return ap


def _serve(args) -> int:
    if args.data_dir:
        os.environ["PLANNER_DATA_DIR"] = args.data_dir
    try:
        from app.server import serve
    except ImportError as exc:
        print(
            f"the service is not installed ({exc.name} is missing): "
            "pip install 'alignment-planner[service]'",
            file=sys.stderr,
        )
        return 2
    print(f"alignment-planner on http://{args.host}:{args.port}", file=sys.stderr)
    serve(args.host, args.port)
    return 0


def run(args, client: PlannerClient) -> object:
    if args.command == "teacher":
        if args.action == "list":
            return client.teachers()
        if args.action == "delete":
            client.delete_teacher(args.teacher_id)
            return {"deleted": args.teacher_id}
        arrays = dict(a.split("=", 1) for a in args.array) or None
        return client.upload_teacher(
            args.name, _structure(args, "structure"), args.format, arrays, archive=args.archive
        )
    if args.command == "plan":
        ops = json.loads(Path(args.ops).read_text()) if args.ops else None
        ask = client.submit_plan if args.later else client.plan
        budget = None
        if args.keep is not None or args.max_params is not None:
            budget = {"keep": args.keep, "max_params": args.max_params}
            budget = {k: v for k, v in budget.items() if v is not None}
            if args.floor:
                budget["floors"] = {k: int(v) for k, v in (f.split("=", 1) for f in args.floor)}
        return ask(
            args.teacher_id,
            _structure(args, "student"),
            args.criterion,
            args.seed,
            ops,
            effort=args.effort,
            seconds=args.seconds,
            budget=budget,
        )
    if args.command == "plan-job":
        if args.action == "wait":
            return client.wait_plan(args.job_id, timeout=args.timeout)
        if args.action == "cancel":
            client.cancel_plan(args.job_id)
            return client.plan_job(args.job_id)
        return client.plan_job(args.job_id)
    if args.command == "prior":
        rec = client.request_prior(args.plan_id)
        rec = client.wait_prior(rec["id"], timeout=args.timeout)
        path = client.download(
            rec["id"],
            args.out,
            args.name,
            format=args.format,
            dtype=args.dtype,
            progress=not args.no_progress,
        )
        return {**rec, "saved": str(path)}
    if args.command == "sequences":
        return client.sequences(
            _structure(args, "teacher"), _structure(args, "student"), args.limit
        )
    raise AssertionError(args.command)  # pragma: no cover


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    try:
        with PlannerClient(args.url, args.api_key) as client:
            out = run(args, client)
    except PlannerAPIError as exc:
        print(json.dumps(exc.problem, indent=1), file=sys.stderr)
        return 1
    except httpx.TransportError as exc:  # no service there: one line, and how to point at one
        why = str(exc) or type(exc).__name__
        print(
            f"alignment-planner: cannot reach the service at {args.url} ({why}); "
            "start one (alignment-planner serve) or point at yours with --url URL or "
            "PLANNER_URL=URL",
            file=sys.stderr,
        )
        return 3
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
