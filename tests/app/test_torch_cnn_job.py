"""A torch training job for a residual CNN through a real service (docs/torch.md): a
laplace-torch posterior of a fitted model (BatchNorm folded) uploaded, a student asked by
budget, built with the prior's mean, trained with the prior as a penalty, and its own
Laplace posterior fitted with the aligned prior."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from planner_client import PlannerClient
from planner_client.torch import (
    PriorPenalty,
    Residual,
    fold_batchnorm,
    from_laplace,
    laplace_prior,
    structure_of,
    student_module,
)


def test_a_residual_cnn_job_uploads_plans_by_budget_and_trains_with_the_prior(server):
    from laplace import Laplace

    torch.manual_seed(0)
    F64 = torch.float64
    block = Residual(
        nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
        ),
        activation=nn.ReLU(),
    )
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), block, block.__class__(
            nn.Sequential(nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1)),
            activation=nn.ReLU(),
        ),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).double()  # fmt: skip
    X = torch.randn(48, 1, 6, 6, dtype=F64)
    y = (X.mean(dim=(1, 2, 3)) > 0).long() + (X[:, 0, 0, 0] > 1).long()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    model = fold_batchnorm(model.eval())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="full")
    la.fit(loader)
    fmt, arrays = from_laplace(la, "precision")

    with PlannerClient(server.url) as client:
        t = client.upload_teacher("cnn", structure_of(model, input_shape=[1, 6, 6]), fmt, arrays)
        plan, prior = client.align(t["id"], None, budget={"keep": 0.6})
    p = t["structure"]["n_params"]
    assert plan["student"]["n_params"] <= 0.6 * p
    assert prior["mean"].shape == (plan["student"]["n_params"],)

    student = student_module(plan, prior, F64)
    theta = nn.utils.parameters_to_vector(student.parameters()).detach().numpy()
    np.testing.assert_array_equal(theta, prior["mean"])
    penalty = PriorPenalty(student, "precision", prior)
    opt = torch.optim.Adam(student.parameters(), lr=0.01)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(student(X[:16]), y[:16]) + penalty() / 16
        first = float(loss) if first is None else first
        loss.backward()
        opt.step()
    assert float(loss) < first  # it trains
    la_student = Laplace(
        student,
        "classification",
        hessian_structure="diag",
        **laplace_prior("precision", prior, F64),
    )
    la_student.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16))
    assert torch.isfinite(la_student.posterior_variance).all()
