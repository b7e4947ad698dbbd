"""A training job end to end, as docs/torch.md shows it: teacher → laplace-torch →
service → student.

    python -m experiments.training_job [--url URL]

A torch teacher is trained on scikit-learn's digits, its K-FAC Laplace posterior
(laplace-torch) is uploaded, the service plans and aligns it to a smaller
student, the student is built from the plan, starts from the aligned mean, is
trained on 100 images with the aligned prior's exact energy as its penalty, and
gets its own Laplace posterior with the aligned prior's mean and precision
diagonal. Without ``--url`` an embedded service runs on a free port.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from laplace import Laplace
from sklearn.datasets import load_digits
from torch import nn

from planner_client import PlannerClient
from planner_client.torch import (
    PriorPenalty,
    from_laplace,
    laplace_prior,
    load_mean,
    module_of,
    structure_of,
)


def job(url: str, steps: int = 300) -> dict:
    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    (X_big, y_big), (X_small, y_small), (X_test, y_test) = (
        (X[:1000], y[:1000]), (X[1000:1100], y[1000:1100]), (X[1100:], y[1100:])
    )  # fmt: skip

    # 1. the teacher, trained on plenty of data, and its K-FAC Laplace posterior
    teacher = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                            nn.Linear(32, 10))  # fmt: skip
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(teacher(X_big), y_big).backward()
        opt.step()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X_big, y_big), batch_size=250
    )
    la = Laplace(teacher, "classification", subset_of_weights="all",
                 hessian_structure="kron", damping=True, prior_precision=1.0)  # fmt: skip
    la.fit(loader)

    with PlannerClient(url) as client:
        # 2. upload it, plan the student, fetch the aligned prior
        fmt, arrays = from_laplace(la)  # "kron": the damped K-FAC factors, exactly
        t = client.upload_teacher("digits-teacher", structure_of(teacher), fmt, arrays)
        plan, prior = client.align(t["id"], [64, 32, 16, 10])

    # 3. the student, from the plan, starting at the aligned mean, with its penalty
    student = load_mean(module_of(plan["student"]), prior)
    penalty = PriorPenalty(student, fmt, prior)
    n = len(X_small)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(student(X_small), y_small) + penalty() / n
        loss.backward()
        opt.step()

    # 4. the student's own Laplace posterior, under the aligned prior (its diagonal)
    la_s = Laplace(student, "classification", hessian_structure="diag",
                   **laplace_prior(fmt, prior))  # fmt: skip
    la_s.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X_small, y_small)))
    probs = la_s(X_test, pred_type="glm", link_approx="probit")
    return {
        "plan_cost": plan["cost"],
        "ops": len(plan["ops"]),
        "student_map_accuracy": float((student(X_test).argmax(1) == y_test).float().mean()),
        "student_laplace_accuracy": float((probs.argmax(1) == y_test).float().mean()),
        "student_laplace_nll": float(F.nll_loss(probs.clamp_min(1e-12).log(), y_test)),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running service (else an embedded one)")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)
    from experiments.seed_synthetic import local_service

    with tempfile.TemporaryDirectory() as d:
        ctx = contextlib.nullcontext(args.url) if args.url else local_service(Path(d) / "data")
        with ctx as url:
            result = job(url, args.steps)
    print(result)
    return result


if __name__ == "__main__":
    main()
