"""The seed's synthetic Bayesian distillation experiment (docs/experiments.md), through the service.

    python -m experiments.seed_synthetic [--quick] [--out DIR] [--url URL]

Data ``X ~ N(0, I)`` (10 features), ``y = Xw + 0.1 ε``, 900 train / 124 test.
Teacher (10,100,50,1) ReLU, trained to convergence; its Laplace posterior with
the generalised Gauss-Newton Hessian, uploaded to the service twice: as the
full covariance and as its diagonal.  Students (10,10,10,1) and (10,50,1), VI
with a diagonal q, batch 8, 100 epochs, test log-likelihood every 100 steps,
under five priors:

* ``none``: N(0, I);
* ``shortcut_partial`` / ``shortcut_full``: the authors' shortcut, random kept
  neurons (criterion ``random``) on the *diagonal* posterior, i.e. selection:
  the mean with unit variance / the mean and the variances;
* ``planned_partial`` / ``planned_full``: this project, the searched plan
  (``posterior_ratio``) on the *full* posterior: the mean with unit variance /
  the mean and the aligned covariance.

Students start from their prior's mean when it comes from the teacher (the
teacher's knowledge), from a He initialisation otherwise.  The metric is
``S = ∫ loglik(distilled) − ∫ loglik(none)`` over steps (trapezoid rule), mean
± std over 5 seeds.  Without ``--url`` an embedded service is started on a
free port with a temporary data folder, and stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from experiments.nn import Prior, ggn_precision, train_teacher, train_vi
from planner import Structure
from planner_client import PlannerClient

PRIORS = ("none", "shortcut_partial", "shortcut_full", "planned_partial", "planned_full")
RESULTS = Path(__file__).parent / "results"


@contextlib.contextmanager
def local_service(data: Path):
    """An embedded service (uvicorn subprocess) on a free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PLANNER_DATA_DIR": str(data), "PLANNER_WORKERS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=Path(__file__).parents[1],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def make_data(rng, n_train=900, n_test=124, features=10):
    w = rng.normal(size=features)
    X = rng.normal(size=(n_train + n_test, features))
    y = X @ w + 0.1 * rng.normal(size=len(X))
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def run(url: str, quick: bool, seeds: int, epochs: int, tmp: Path, log=print) -> dict:
    if quick:
        tw, students, teacher_steps = (10, 20, 10, 1), [(10, 5, 5, 1), (10, 10, 1)], 300
    else:
        tw, students, teacher_steps = (10, 100, 50, 1), [(10, 10, 10, 1), (10, 50, 1)], 4000
    rng = np.random.default_rng(0)
    data = make_data(rng)
    X, y = data[0], data[1]
    teacher = Structure.mlp(tw)
    t0 = time.perf_counter()
    theta = train_teacher(teacher, X, y, rng, teacher_steps)
    prec = ggn_precision(teacher, theta, X, noise=0.1, prior_prec=1.0)
    cov = np.linalg.inv(prec)
    cov = 0.5 * (cov + cov.T)
    from experiments.nn import gaussian_loglik
    from planner.network import forward

    fit = {
        "train_rmse": float(np.sqrt(np.mean((forward(teacher, theta, X)[:, 0] - y) ** 2))),
        "test_rmse": float(
            np.sqrt(np.mean((forward(teacher, theta, data[2])[:, 0] - data[3]) ** 2))
        ),
        "test_loglik": gaussian_loglik(teacher, theta, data[2], data[3], 0.1),
        "noise": 0.1,
    }
    log(f"teacher {tw}: trained and Laplace in {time.perf_counter() - t0:.0f} s, {fit}")
    np.save(tmp / "mean.npy", theta)
    np.save(tmp / "covariance.npy", cov)
    np.save(tmp / "variance.npy", 1.0 / np.diag(prec))  # the diagonal Laplace
    structure = {"widths": list(tw), "activation": "relu"}
    out: dict = {"teacher": list(tw), "teacher_fit": fit, "students": {}}
    with PlannerClient(url, timeout=3600) as client:
        full = client.upload_teacher(
            "seed-teacher-full",
            structure,
            "full",
            {"mean": tmp / "mean.npy", "covariance": tmp / "covariance.npy"},
        )
        diag = client.upload_teacher(
            "seed-teacher-diag",
            structure,
            "diag",
            {"mean": tmp / "mean.npy", "variance": tmp / "variance.npy"},
        )
        for sw in students:
            s = Structure.mlp(sw)
            planned_plan, planned = client.align(full["id"], list(sw), "posterior_ratio")
            runs: dict[str, list] = {p: [] for p in PRIORS}
            for seed in range(seeds):
                _, short = client.align(diag["id"], list(sw), "random", seed=seed)
                priors = {
                    "none": (Prior(np.zeros(s.n_params), np.ones(s.n_params)), None),
                    "shortcut_partial": (Prior(short["mean"], np.ones(s.n_params)), short["mean"]),
                    "shortcut_full": (Prior(short["mean"], short["variance"]), short["mean"]),
                    "planned_partial": (
                        Prior(planned["mean"], np.ones(s.n_params)),
                        planned["mean"],
                    ),
                    "planned_full": (
                        Prior(planned["mean"], covariance=planned["covariance"]),
                        planned["mean"],
                    ),
                }
                for name, (prior, init) in priors.items():
                    steps, curve = train_vi(
                        s, prior, data, np.random.default_rng(1000 + seed), epochs, init=init
                    )
                    runs[name].append({"steps": steps.tolist(), "loglik": curve.tolist()})
                log(f"student {sw}: seed {seed} done")
            base = [np.trapezoid(r["loglik"], r["steps"]) for r in runs["none"]]
            summary = {}
            for name in PRIORS:
                S = [
                    np.trapezoid(r["loglik"], r["steps"]) - b
                    for r, b in zip(runs[name], base, strict=True)
                ]
                summary[name] = {"S": S, "mean": float(np.mean(S)), "std": float(np.std(S))}
            out["students"][str(list(sw))] = {
                "n_params": s.n_params,
                "planned_cost": planned_plan["cost"],
                "S": summary,
                "runs": runs,
            }
    return out


def write(results: dict, out: Path, seeds: int, epochs: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "seed_synthetic.json").write_text(json.dumps(results))
    lines = [
        "# The seed's synthetic experiment, through the service",
        "",
        f"Teacher {tuple(results['teacher'])}; S = ∫ loglik(distilled) − ∫ loglik(no teacher) "
        f"over steps (trapezoid), mean ± std over {seeds} seeds, {epochs} epochs, batch 8.",
        "",
        "Teacher fit: train RMSE {train_rmse:.3f}, test RMSE {test_rmse:.3f} (noise 0.1), "
        "test log-likelihood {test_loglik:.1f}.".format(**results["teacher_fit"]),
        "",
        "| student | parameters | " + " | ".join(PRIORS[1:]) + " |",
        "| --- | --- | " + " | ".join("---" for _ in PRIORS[1:]) + " |",
    ]
    for sw, r in results["students"].items():
        cells = [f"{r['S'][p]['mean']:.0f} ± {r['S'][p]['std']:.0f}" for p in PRIORS[1:]]
        lines.append(f"| {sw} | {r['n_params']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The seed reports S = 25506 for (10,50,1) (its Bayesian distillation), and the",
        "authors' data 16864 for (10,10,10,1).",
    ]
    (out / "seed_synthetic.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(results["students"]), figsize=(12, 4))
    for ax, (sw, r) in zip(np.atleast_1d(axes), results["students"].items(), strict=False):
        for name in PRIORS:
            curves = np.array([run["loglik"] for run in r["runs"][name]])
            ax.plot(r["runs"][name][0]["steps"], curves.mean(0), label=name)
        ax.set_title(f"student {sw}")
        ax.set_xlabel("step")
        ax.set_ylabel("test log-likelihood")
        ax.set_ylim(bottom=max(ax.get_ylim()[0], curves.mean(0).min() - 500))
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "seed_synthetic.png", dpi=100)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small teacher, 2 seeds, 2 epochs")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--url", default=None, help="a running service (else an embedded one)")
    args = ap.parse_args(argv)
    seeds, epochs = (2, 2) if args.quick else (5, 100)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with contextlib.nullcontext(args.url) if args.url else local_service(tmp / "data") as url:
            results = run(url, args.quick, seeds, epochs, tmp)
    write(results, args.out, seeds, epochs)
    return results


if __name__ == "__main__":
    main()
