"""The torch adapters (docs/torch.md) against real laplace-torch objects and dense formulas."""

from __future__ import annotations

import copy

import laplace  # the torch extra: make test installs it, as it does torch
import numpy as np
import pytest
import scipy.linalg as sla
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from planner_client.torch import (
    PriorPenalty,
    from_laplace,
    laplace_prior,
    load_mean,
    structure_of,
    to_distribution,
)

REL = 1e-9


def close(a, b, rel=REL) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.abs(b).max(), 1e-300)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= rel * scale, np.abs(a - b).max() / scale


def mlp(widths=(3, 5, 4, 2), bias=True, act=nn.Tanh, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


def loader(widths, n=40, seed=0, classification=False):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, widths[0], generator=g, dtype=torch.float64)
    if classification:
        y = torch.randint(0, widths[-1], (n,), generator=g)
    else:
        y = torch.randn(n, widths[-1], generator=g, dtype=torch.float64)
    ds = torch.utils.data.TensorDataset(X, y)
    return torch.utils.data.DataLoader(ds, batch_size=10)


def fitted(structure: str, bias=True, classification=False, **kw):
    widths = (3, 5, 4, 2)
    model = mlp(widths, bias=bias)
    la = laplace.Laplace(
        model,
        "classification" if classification else "regression",
        subset_of_weights="all",
        hessian_structure=structure,
        prior_precision=kw.pop("prior_precision", 0.7),
        **kw,
    )
    la.fit(loader(widths, classification=classification))
    return model, la


def dense_cov(fmt: str, arrays: dict) -> np.ndarray:
    """The covariance of a prior in any format, written out densely (the slow reference)."""
    if fmt == "full":
        return arrays["covariance"]
    if fmt == "precision":
        return np.linalg.inv(arrays["precision"])
    if fmt == "diag":
        return np.diag(arrays["variance"])
    if fmt == "lowrank":
        return np.diag(arrays["variance"]) + arrays["factor"] @ arrays["factor"].T
    blocks, t = [], 2
    while f"row{t}" in arrays:
        blocks.append(np.kron(arrays[f"row{t}"], arrays[f"col{t}"]))
        if f"bias{t}" in arrays:
            b = arrays[f"bias{t}"]
            blocks.append(np.diag(b) if b.ndim == 1 else b)
        t += 1
    return sla.block_diag(*blocks)


# -- structure_of ---------------------------------------------------------------------------------


def test_structure_of_sequential():
    m = nn.Sequential(
        nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Dropout(0.1),
        nn.Sequential(nn.Linear(6, 5), nn.GELU()), nn.Linear(5, 2), nn.Sigmoid(),
    )  # fmt: skip
    assert structure_of(m) == {
        "widths": [8, 6, 5, 2],
        "activation": ["relu", "gelu"],
        "output_activation": "sigmoid",
        "bias": True,
        "kind": "mlp",
    }
    s = structure_of(nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 1, bias=False)))
    assert s["activation"] == ["identity"] and s["bias"] is False
    assert structure_of(nn.Sequential(nn.Linear(2, 2), nn.ReLU6(), nn.Linear(2, 1)))[
        "activation"
    ] == ["relu6"]


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (nn.Sequential(nn.Linear(4, 3), nn.Conv1d(1, 1, 1), nn.Linear(3, 1)), "Conv1d"),
        (nn.Sequential(nn.Linear(4, 3), nn.Linear(2, 1)), "in_features 2"),
        (nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1, bias=False)), "bias"),
        (nn.Sequential(nn.Linear(4, 3)), "two Linear"),
        (nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Tanh(), nn.Linear(3, 1)), "one activation"),
        (nn.Sequential(nn.Linear(4, 3), nn.LeakyReLU(0.2), nn.Linear(3, 1)), "LeakyReLU"),
        (nn.Sequential(nn.ReLU(), nn.Linear(4, 3), nn.Linear(3, 1)), "start with a Linear"),
        (nn.Linear(3, 1), "nn.Sequential"),
    ],
)
def test_structure_of_refuses_what_the_lattice_cannot_describe(module, message):
    with pytest.raises(ValueError, match=message):
        structure_of(module)


def test_structure_of_rnn():
    rnn = nn.RNN(3, 5, num_layers=2, nonlinearity="relu", bias=False)
    head = nn.Linear(5, 2, bias=False)
    assert structure_of(rnn, head) == {
        "widths": [3, 5, 5, 2],
        "activation": ["relu", "relu"],
        "output_activation": "identity",
        "bias": False,
        "kind": "rnn",
    }
    with pytest.raises(ValueError, match="b_ih, b_hh"):
        structure_of(nn.RNN(3, 5), nn.Linear(5, 2, bias=False))
    with pytest.raises(ValueError, match="output layer"):
        structure_of(rnn)


def test_structure_of_matches_the_planner_layout():
    from planner import Structure

    m = mlp((3, 5, 4, 2), bias=True)
    s = structure_of(m)
    planner_s = Structure.build(
        s["widths"], s["activation"], s["output_activation"], s["bias"], s["kind"]
    )
    assert planner_s.n_params == sum(p.numel() for p in m.parameters())


# -- from_laplace: checked against the covariance laplace-torch defines ------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("classification", [False, True])
def test_from_laplace_full(bias, classification):
    model, la = fitted("full", bias=bias, classification=classification)
    fmt, arrays = from_laplace(la)
    assert fmt == "precision"
    close(arrays["mean"], torch.nn.utils.parameters_to_vector(model.parameters()).detach())
    close(arrays["precision"], la.posterior_precision.detach())
    fmt, arrays = from_laplace(la, "full")
    assert fmt == "full"
    close(arrays["covariance"], la.posterior_covariance.detach(), 1e-8)


@pytest.mark.parametrize("bias", [True, False])
def test_from_laplace_diag(bias):
    _, la = fitted("diag", bias=bias)
    fmt, arrays = from_laplace(la)
    assert fmt == "diag"
    close(arrays["variance"], la.posterior_variance.detach())
    with pytest.raises(ValueError, match="diag"):
        from_laplace(la, "full")


def _kron_reference(la, damping: bool, exponent: float = -1) -> np.ndarray:
    from laplace.utils.matrix import KronDecomposed

    P = la.posterior_precision
    K = KronDecomposed(P.eigenvectors, P.eigenvalues, P.deltas, damping=damping)
    return K.to_matrix(exponent=exponent).detach().numpy()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("prior_precision", [0.7, torch.tensor([0.5, 1.5, 2.0, 0.9, 3.0, 1.1])])
def test_from_laplace_kron(bias, prior_precision):
    if not bias and isinstance(prior_precision, torch.Tensor):
        prior_precision = prior_precision[:3]  # one per parameter tensor
    _, la = fitted("kron", bias=bias, damping=True, prior_precision=prior_precision)
    fmt, arrays = from_laplace(la)
    assert fmt == "kron"
    assert ("bias2" in arrays) == bias
    close(dense_cov(fmt, arrays), _kron_reference(la, damping=True), 1e-8)
    # the exact dense form of the undamped posterior, for a teacher small enough
    _, la = fitted("kron", bias=bias, prior_precision=prior_precision)
    with pytest.raises(ValueError, match="damping=True"):
        from_laplace(la)
    fmt, arrays = from_laplace(la, "precision")
    close(arrays["precision"], la.posterior_precision.to_matrix().detach())
    fmt, arrays = from_laplace(la, "full")
    close(arrays["covariance"], _kron_reference(la, damping=False), 1e-8)


def lowrank_laplace(model, loader, k: int, prior_precision: float):
    """A LowRankLaplace of laplace-torch's own class. Its fit needs the old asdfghjkl from
    GitHub (not on PyPI, and GitHub is out of this machine's reach), so its H, the top-k
    eigenpairs of the Hessian, comes from a FullLaplace's GGN here."""
    from laplace import FullLaplace, LowRankLaplace
    from laplace.baselaplace import BaseLaplace

    full = FullLaplace(model, "regression", prior_precision=prior_precision)
    full.fit(loader)
    lam, U = torch.linalg.eigh(full.H)
    la = LowRankLaplace.__new__(LowRankLaplace)
    BaseLaplace.__init__(la, model, "regression", prior_precision=prior_precision)
    la.H = (U[:, -k:].contiguous(), lam[-k:].clamp_min(1e-6))
    la.mean, la.n_data = full.mean, full.n_data
    return la


@pytest.mark.parametrize("bias", [True, False])
def test_from_laplace_lowrank(bias):
    widths = (3, 5, 4, 2)
    model = mlp(widths, bias=bias)
    la = lowrank_laplace(model, loader(widths), k=6, prior_precision=0.8)
    fmt, arrays = from_laplace(la)
    assert fmt == "precision"
    (U, lam), p0 = la.posterior_precision
    close(arrays["precision"], (U * lam @ U.T + torch.diag(p0)).detach())
    _, arrays = from_laplace(la, "full")
    p = la.n_params
    eye = torch.eye(p, dtype=torch.float64).reshape(1, p, p)
    close(arrays["covariance"], la.functional_variance(eye)[0].detach(), 1e-8)
    with pytest.raises(ValueError, match="lowrank"):
        from_laplace(la, "lowrank")


def test_from_laplace_refuses_partial_and_unfitted():
    model = mlp()
    la = laplace.Laplace(model, "regression", subset_of_weights="all", hessian_structure="full")
    with pytest.raises(ValueError, match="not fitted"):
        from_laplace(la)
    la = laplace.Laplace(model, "regression", subset_of_weights="last_layer")
    la.fit(loader((3, 5, 4, 2)))
    with pytest.raises(ValueError, match="covers only its 'last_layer' weights: pass rest="):
        from_laplace(la)


# -- load_mean ----------------------------------------------------------------------------------


def test_load_mean_round_trips():
    model = mlp(bias=True, seed=1)
    other = mlp(bias=True, seed=2).float()
    vec = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
    load_mean(other, {"mean": vec})
    got = torch.nn.utils.parameters_to_vector(other.parameters()).detach().double().numpy()
    close(got, vec.astype(np.float32), 0)  # float32 parameters hold the rounded mean
    load_mean(model, {"mean": 2 * vec})
    close(torch.nn.utils.parameters_to_vector(model.parameters()).detach(), 2 * vec, 0)
    with pytest.raises(ValueError, match="parameters"):
        load_mean(model, {"mean": vec[:-1]})
    _, la = fitted("kron", bias=True, damping=True)
    _, arrays = from_laplace(la)
    arrays["row3"] = np.eye(3)
    with pytest.raises(ValueError, match="row3"):
        load_mean(copy.deepcopy(model), arrays)


# -- PriorPenalty, laplace_prior, to_distribution -----------------------------------------------


def random_prior(fmt: str, widths, bias: bool, rng: np.random.Generator, bias_cov: bool):
    from planner import Structure

    p = Structure.mlp(widths, bias=bias).n_params
    mean = rng.standard_normal(p)

    def spd(n):
        A = rng.standard_normal((n, n + 2))
        return A @ A.T / n + 0.3 * np.eye(n)

    if fmt in ("full", "precision"):
        return {"mean": mean, "covariance" if fmt == "full" else "precision": spd(p)}
    if fmt == "diag":
        return {"mean": mean, "variance": rng.uniform(0.2, 2.0, p)}
    if fmt == "lowrank":
        return {
            "mean": mean,
            "variance": rng.uniform(0.2, 2.0, p),
            "factor": rng.standard_normal((p, 3)),
        }
    arrays = {"mean": mean}
    for t in range(2, len(widths) + 1):
        arrays[f"row{t}"], arrays[f"col{t}"] = spd(widths[t - 1]), spd(widths[t - 2])
        if bias:
            n = widths[t - 1]
            arrays[f"bias{t}"] = spd(n) if bias_cov else rng.uniform(0.2, 2.0, n)
    return arrays


@given(
    fmt=st.sampled_from(["full", "precision", "diag", "lowrank", "kron"]),
    widths=st.lists(st.integers(1, 5), min_size=3, max_size=4),
    bias=st.booleans(),
    bias_cov=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_prior_penalty_is_the_dense_energy(fmt, widths, bias, bias_cov, seed):
    rng = np.random.default_rng(seed)
    prior = random_prior(fmt, widths, bias, rng, bias_cov)
    model = mlp(widths, bias=bias, seed=seed % 1000)
    penalty = PriorPenalty(model, fmt, prior)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
    S = dense_cov(fmt, prior)
    d = theta - prior["mean"]
    Sinv_d = np.linalg.solve(S, d)
    value = penalty()
    close(value.item(), 0.5 * d @ Sinv_d)
    value.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
    close(grad, Sinv_d)
    close(laplace_prior(fmt, prior, torch.float64)["prior_precision"], np.diag(np.linalg.inv(S)))
    if fmt == "kron":
        with pytest.raises(ValueError, match="matrix-normal"):
            to_distribution(fmt, prior)
    else:
        dist = to_distribution(fmt, prior)
        other = theta + rng.standard_normal(len(theta))
        lp = dist.log_prob(torch.from_numpy(theta)) - dist.log_prob(torch.from_numpy(other))
        close(lp.item(), penalty.energy(torch.from_numpy(other)).item() - value.item(), 1e-8)


def test_prior_penalty_refuses_mismatches():
    model = mlp((3, 5, 4, 2), bias=True)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="params"):
        PriorPenalty(model, "diag", random_prior("diag", (3, 5, 2), True, rng, False))
    with pytest.raises(ValueError, match="row2"):
        PriorPenalty(model, "kron", random_prior("kron", (3, 4, 5, 2), True, rng, False) | {
            "mean": np.zeros(sum(p.numel() for p in model.parameters()))
        })  # fmt: skip
    with pytest.raises(ValueError, match="format"):
        PriorPenalty(model, "dense", {"mean": np.zeros(3)})


def test_a_student_laplace_fit_takes_laplace_prior():
    """laplace-torch accepts the arguments and its posterior precision adds exactly them."""
    widths = (3, 4, 2)
    student = mlp(widths, bias=True, seed=3)
    rng = np.random.default_rng(1)
    prior = random_prior("full", widths, True, rng, False)
    args = laplace_prior("full", prior, torch.float64)
    la = laplace.Laplace(student, "regression", hessian_structure="diag", **args)
    la.fit(loader(widths, seed=2))
    close(la.prior_mean.detach(), prior["mean"])
    close((la.posterior_precision - la.H).detach(), np.diag(np.linalg.inv(prior["covariance"])))
    # the log marginal likelihood uses the prior mean: it changes when the mean moves
    lml = la.log_marginal_likelihood().item()
    la.prior_mean = torch.zeros_like(la.prior_mean)
    assert la.log_marginal_likelihood().item() != lml


# -- the posteriors people fit: undamped K-FAC, last layer ---------------------------------------
def _kron_precision(model, arrays) -> np.ndarray:
    from planner import Structure
    from planner.posterior import KronPosterior

    s = structure_of(model)
    post = KronPosterior.from_arrays(
        Structure.build(s["widths"], s["activation"], s["output_activation"], s["bias"], "mlp"),
        arrays,
    )
    return np.linalg.inv(post.dense_covariance())


def test_undamped_kfac_converts_to_its_damped_form_with_the_exact_kl():
    model, la = fitted("kron", damping=False)
    with pytest.raises(ValueError, match="kron='damped'"):
        from_laplace(la)
    fmt, arrays = got = from_laplace(la, kron="damped")
    assert fmt == "kron" and got.meta["kron"] == "damped"
    _, damped_la = fitted("kron", damping=True)  # the same model and data, damped by laplace
    _, expect = from_laplace(damped_la)
    for name, a in expect.items():
        close(arrays[name], a)
    # KL(N(m, Λu⁻¹) ‖ N(m, Λd⁻¹)) written out densely
    Lu = _sym_np(la.posterior_precision.to_matrix())
    Ld = _kron_precision(model, arrays)
    p = Lu.shape[0]
    kl = 0.5 * (
        np.trace(Ld @ np.linalg.inv(Lu)) - p + np.linalg.slogdet(Lu)[1] - np.linalg.slogdet(Ld)[1]
    )
    assert got.meta["kl"] == pytest.approx(kl, rel=1e-8, abs=1e-10)
    assert got.meta["kl"] > 0
    assert from_laplace(damped_la).meta == {}  # exact: nothing to report


def _sym_np(t) -> np.ndarray:
    a = t.detach().double().numpy()
    return 0.5 * (a + a.T)


def _last_layer(structure: str, **kw):
    widths = (3, 5, 4, 2)
    model = mlp(widths)
    la = laplace.Laplace(
        model, "regression", subset_of_weights="last_layer", hessian_structure=structure,
        prior_precision=0.7, **kw,
    )  # fmt: skip
    la.fit(loader(widths))
    return model, la


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_a_last_layer_posterior_is_completed_over_every_parameter(structure):
    model, la = _last_layer(structure)
    with pytest.raises(ValueError, match="rest="):
        from_laplace(la)
    rest = 0.25
    got = from_laplace(la, rest=rest, kron="damped" if structure == "kron" else None)
    fmt, arrays = got
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
    close(arrays["mean"], theta)
    p, k = theta.size, la.n_params  # the last layer is the tail of the layout
    cov = dense_cov(fmt, arrays) if fmt != "kron" else np.linalg.inv(_kron_precision(model, arrays))
    close(cov[: p - k, : p - k], rest * np.eye(p - k))
    assert np.abs(cov[: p - k, p - k :]).max() == 0.0
    if structure == "diag":
        close(np.diag(cov)[p - k :], 1.0 / la.posterior_precision.detach().numpy())
    elif structure == "full":
        close(np.linalg.inv(cov[p - k :, p - k :]), _sym_np(la.posterior_precision))
    else:
        P = la.posterior_precision
        damped = type(P)(P.eigenvectors, P.eigenvalues, P.deltas, damping=True)
        close(np.linalg.inv(cov[p - k :, p - k :]), _sym_np(damped.to_matrix()), rel=1e-8)
    assert got.meta["rest"]["variance"] == rest and got.meta["rest"]["fitted"] == k
    prior = from_laplace(la, rest="prior", kron="damped" if structure == "kron" else None)
    assert prior.meta["rest"]["variance"] == pytest.approx(1 / 0.7)


def test_the_penalty_temperature_scales_the_covariance():
    model = mlp(seed=3)
    p = sum(q.numel() for q in model.parameters())
    rng = np.random.default_rng(3)
    A = rng.normal(size=(p, p))
    prior = {"mean": rng.normal(size=p), "covariance": A @ A.T / p + 0.5 * np.eye(p)}
    base = PriorPenalty(model, "full", prior)()
    for tau in (0.25, 3.0):
        scaled = {**prior, "covariance": tau * prior["covariance"]}
        close(PriorPenalty(model, "full", prior, temperature=tau)().detach(),
              PriorPenalty(model, "full", scaled)().detach())  # fmt: skip
        close(PriorPenalty(model, "full", prior, temperature=tau)().detach(), base.detach() / tau)
    with pytest.raises(ValueError, match="temperature"):
        PriorPenalty(model, "full", prior, temperature=0.0)
