"""Torch adapters for convolutional and residual networks (docs/torch.md): structures from and
to modules against the core's layout and forward pass, BatchNorm folded exactly, clear errors,
laplace-torch posteriors of conv models in every dense format, and a prior on a conv student."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from planner import FullPosterior, Network
from planner.network import forward
from planner.posterior import DiagPosterior, PrecisionPosterior
from planner.search import search_budget
from planner_client.torch import (
    PriorPenalty,
    Residual,
    fold_batchnorm,
    from_laplace,
    load_mean,
    module_of,
    structure_of,
    student_module,
)
from tests.planner.test_networks import network_json
from tests.planner_client.test_torch import _kron_reference

F64 = torch.float64


def resnet(bn: bool = False, width: int = 4) -> nn.Sequential:
    def block():
        branch = [nn.Conv2d(width, 3, 3, padding=1)]
        branch += [nn.BatchNorm2d(3)] if bn else []
        branch += [nn.ReLU(), nn.Conv2d(3, width, 3, padding=1, bias=not bn)]
        branch += [nn.BatchNorm2d(width)] if bn else []
        return Residual(nn.Sequential(*branch), activation=nn.ReLU())

    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        *([nn.BatchNorm2d(width)] if bn else []),
        nn.ReLU(),
        block(),
        nn.MaxPool2d(2),
        block(),
        Residual(nn.Conv2d(width, 6, 1, stride=2), nn.Conv2d(width, 6, 1, stride=2, bias=False)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(6, 3),
    ).double()


def test_structure_of_and_module_of_agree_with_the_core_and_each_other():
    torch.manual_seed(0)
    model = resnet().eval()
    s = structure_of(model, input_shape=[1, 6, 6])
    net = Network.from_json(s)
    theta = nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
    assert net.n_params == theta.size
    X = torch.randn(5, 1, 6, 6, dtype=F64)
    with torch.no_grad():
        want = model(X).numpy()
    np.testing.assert_allclose(forward(net, theta, X.numpy()), want, rtol=1e-10, atol=1e-12)
    rebuilt = module_of(s, F64).eval()
    assert structure_of(rebuilt, input_shape=[1, 6, 6]) == s
    load_mean(rebuilt, {"mean": theta})
    with torch.no_grad():
        np.testing.assert_allclose(rebuilt(X).numpy(), want, rtol=1e-12, atol=1e-12)
    assert Network.from_json(module_json := structure_of(rebuilt, input_shape=[1, 6, 6])) == net
    assert module_json["stages"][4]["shortcut"]["stride"] == [2, 2]


def test_fold_batchnorm_is_exact_in_evaluation_mode():
    torch.manual_seed(1)
    model = resnet(bn=True)
    model.train()
    for _ in range(3):  # running statistics away from their defaults
        model(torch.randn(8, 1, 6, 6, dtype=F64))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    model.eval()
    folded = fold_batchnorm(model).eval()
    X = torch.randn(4, 1, 6, 6, dtype=F64)
    with torch.no_grad():
        np.testing.assert_allclose(folded(X).numpy(), model(X).numpy(), rtol=1e-10, atol=1e-12)
    s = structure_of(folded, input_shape=[1, 6, 6])
    assert all(st.get("bias", True) for st in s["stages"][3]["branch"])  # folded: a bias
    with pytest.raises(ValueError, match="fold_batchnorm"):
        structure_of(model, input_shape=[1, 6, 6])


@pytest.mark.parametrize(
    ("module", "words"),
    [
        (nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)), "grouped"),
        (nn.Sequential(nn.Conv2d(2, 4, 3, dilation=2), nn.Flatten(), nn.Linear(4, 2)), "dilated"),
        (nn.Sequential(nn.Conv2d(2, 4, 3), nn.MultiheadAttention(4, 1)), "MultiheadAttention"),
        (nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(5, 2)), "does not run"),
        (nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.ReLU()), "must follow"),
    ],
)
def test_what_the_lattice_cannot_describe_is_named(module, words):
    with pytest.raises(ValueError, match=words):
        structure_of(module, input_shape=[2, 3, 3])


def test_a_conv_network_needs_its_input_shape():
    with pytest.raises(ValueError, match="input_shape"):
        structure_of(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)))


def _fitted(kind: str, subset: str = "all", bias: bool = True, **kwargs):
    from laplace import Laplace

    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, bias=bias),
        nn.ReLU(),
        Residual(
            nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 3, 1, bias=bias))
        ),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 2),
    ).double()
    X, y = torch.randn(20, 1, 4, 4, dtype=F64), torch.randint(0, 2, (20,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=10)
    la = Laplace(
        model, "classification", subset_of_weights=subset, hessian_structure=kind, **kwargs
    )
    if "damping" in kwargs:  # laplace-torch's last-layer K-FAC drops it from its constructor
        la.damping = kwargs["damping"]
    la.fit(loader)
    return model, la


def _kfac_matrix(la, damping: bool) -> np.ndarray:
    """laplace-torch's own K-FAC posterior precision, damped or not, densely."""
    M = _kron_reference(la, damping, exponent=1)
    return (M + M.T) / 2


@pytest.mark.parametrize("bias", [True, False])
def test_kfac_of_conv2d_is_read_as_kron_exactly_when_damped(bias):
    """laplace-torch's K-FAC factors of Conv2d ([out × out, in·kh·kw × in·kh·kw]) are the
    kron format's rows and columns of layers 1, 2, …; the posterior equals laplace-torch's
    matrix; a plan by budget and a penalty on the conv student in kron."""
    from planner.posterior import KronPosterior

    model, la = _fitted("kron", bias=bias, damping=True)
    got = from_laplace(la)
    fmt, arrays = got
    assert fmt == "kron" and got.meta == {}
    assert arrays["col1"].shape == (9, 9) and arrays["col2"].shape == (27, 27)
    assert ("bias1" in arrays) == bias and "bias4" in arrays
    net = Network.from_json(structure_of(model, input_shape=[1, 4, 4]))
    post = KronPosterior.from_arrays(net, arrays)
    np.testing.assert_allclose(
        np.linalg.inv(post.dense_covariance()), _kfac_matrix(la, True), rtol=1e-8, atol=1e-8
    )
    found = search_budget(post, int(0.7 * net.n_params))
    aligned = found.plan.apply(post)
    prior = aligned.to_arrays()
    student = student_module({"student": found.plan.student.to_json()}, prior, F64)
    penalty = PriorPenalty(student, "kron", prior)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05)
    d = nn.utils.parameters_to_vector(student.parameters()).detach().numpy() - aligned.mean
    want = 0.5 * d @ np.linalg.solve(aligned.dense_covariance(), d)
    assert float(penalty()) == pytest.approx(want, rel=1e-9)


def test_undamped_kfac_of_a_conv_model_converts_with_the_exact_kl():
    model, la = _fitted("kron", damping=False)
    with pytest.raises(ValueError, match="kron='damped'"):
        from_laplace(la)
    got = from_laplace(la, kron="damped")
    from planner.posterior import KronPosterior

    net = Network.from_json(structure_of(model, input_shape=[1, 4, 4]))
    Ld = np.linalg.inv(KronPosterior.from_arrays(net, got[1]).dense_covariance())
    np.testing.assert_allclose(Ld, _kfac_matrix(la, True), rtol=1e-8, atol=1e-8)
    Lu = _kfac_matrix(la, False)
    p = Lu.shape[0]
    kl = 0.5 * (
        np.trace(Ld @ np.linalg.inv(Lu)) - p + np.linalg.slogdet(Lu)[1] - np.linalg.slogdet(Ld)[1]
    )
    assert got.meta["kl"] == pytest.approx(kl, rel=1e-8) and got.meta["kl"] > 0


@pytest.mark.parametrize(
    ("kind", "fmt"), [("full", "precision"), ("full", "full"), ("diag", "diag")]
)
def test_laplace_posteriors_of_conv_models_are_read_in_the_core(kind, fmt):
    model, la = _fitted(kind)
    got_fmt, arrays = from_laplace(la, fmt)
    assert got_fmt == fmt
    net = Network.from_json(structure_of(model, input_shape=[1, 4, 4]))
    cls = {"precision": PrecisionPosterior, "full": FullPosterior, "diag": DiagPosterior}[fmt]
    post = cls.from_arrays(net, arrays)
    P = la.posterior_precision
    P = np.diag(P.numpy()) if kind == "diag" else P.numpy()
    np.testing.assert_allclose(
        np.linalg.inv(post.dense_covariance()), (P + P.T) / 2, rtol=1e-8, atol=1e-8
    )
    # a student by budget, and a prior on it whose penalty is the dense energy
    found = search_budget(post, int(0.6 * net.n_params))
    aligned = found.plan.apply(post)
    plan = {"student": found.plan.student.to_json()}
    prior = {"mean": aligned.mean}
    if fmt == "diag":
        prior["variance"] = aligned.var
    else:
        prior["covariance"] = aligned.dense_covariance()
    student = student_module(plan, prior, F64)
    theta = nn.utils.parameters_to_vector(student.parameters()).detach().numpy()
    np.testing.assert_array_equal(theta, aligned.mean)
    pen_fmt = "diag" if fmt == "diag" else "full"
    penalty = PriorPenalty(student, pen_fmt, prior)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1)
    theta = nn.utils.parameters_to_vector(student.parameters()).detach().numpy()
    d = theta - aligned.mean
    want = 0.5 * d @ np.linalg.solve(aligned.dense_covariance(), d)
    assert float(penalty()) == pytest.approx(want, rel=1e-9)


def test_a_last_layer_laplace_of_a_conv_model_is_completed():
    model, la = _fitted("full", "last_layer")
    got = from_laplace(la, "precision", rest="prior")
    net = Network.from_json(structure_of(model, input_shape=[1, 4, 4]))
    post = PrecisionPosterior.from_arrays(net, got[1])
    assert post.n == net.n_params and got.meta["rest"]


def test_a_last_layer_kfac_of_a_conv_model_is_completed_in_kron():
    from planner.posterior import KronPosterior

    model, la = _fitted("kron", "last_layer", damping=True)
    got = from_laplace(la, rest=0.5)
    fmt, arrays = got
    assert fmt == "kron" and got.meta["rest"]["variance"] == 0.5
    net = Network.from_json(structure_of(model, input_shape=[1, 4, 4]))
    post = KronPosterior.from_arrays(net, arrays)
    cov = post.dense_covariance()
    head = net.graph.units[-1]
    fitted = np.arange(head.start, net.n_params)
    np.testing.assert_allclose(
        np.linalg.inv(cov[np.ix_(fitted, fitted)]), _kfac_matrix(la, True), rtol=1e-8, atol=1e-8
    )
    rest = np.arange(head.start)
    np.testing.assert_allclose(cov[np.ix_(rest, rest)], 0.5 * np.eye(rest.size), atol=1e-12)
    assert not cov[np.ix_(rest, fitted)].any()


# -- priors on conv students in every format --------------------------------------------------
def _conv_prior(fmt: str, d: dict, rng: np.random.Generator):
    """(a random prior over the network ``d`` in ``fmt``, its dense covariance, written
    from the definitions: the kron one by the reference's keys)."""
    from tests.reference_networks import RefNetwork
    from tests.strategies import spd

    ref = RefNetwork(d)
    p = len(ref.keys())
    mean = rng.standard_normal(p)
    if fmt in ("full", "precision"):
        S = spd(rng, p)
        return {"mean": mean, "covariance": S} if fmt == "full" else {
            "mean": mean,
            "precision": np.linalg.inv(S),
        }, S
    if fmt == "diag":
        v = rng.uniform(0.2, 2.0, p)
        return {"mean": mean, "variance": v}, np.diag(v)
    if fmt == "lowrank":
        v, F = rng.uniform(0.2, 2.0, p), rng.standard_normal((p, 2))
        return {"mean": mean, "variance": v, "factor": F}, np.diag(v) + F @ F.T
    arrays, G, A, B = {"mean": mean}, {}, {}, {}
    for L in ref.layers:
        n = L.number
        G[n] = arrays[f"row{n}"] = spd(rng, L.out)
        A[n] = arrays[f"col{n}"] = spd(rng, L.inp * L.group)
        if L.bias:
            B[n] = arrays[f"bias{n}"] = (
                spd(rng, L.out) if rng.random() < 0.5 else rng.uniform(0.2, 2.0, L.out)
            )
    return arrays, ref.kron_covariance(G, A, B)


@settings(max_examples=25, deadline=None)
@given(
    d=network_json(),
    fmt=st.sampled_from(["full", "precision", "diag", "lowrank", "kron"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_priors_on_conv_students_are_the_dense_formulas(d, fmt, seed):
    """PriorPenalty (with a temperature), its gradient, laplace_prior and to_distribution
    on random conv/residual students, against the dense Gaussian (1e-9)."""
    from planner_client.torch import laplace_prior, to_distribution
    from tests.helpers import close

    rng = np.random.default_rng(seed)
    prior, S = _conv_prior(fmt, d, rng)
    model = module_of(d, F64)
    tau = float(rng.choice([0.5, 1.0, 3.0]))
    penalty = PriorPenalty(model, fmt, prior, temperature=tau)
    theta = nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
    dev = theta - prior["mean"]
    Sinv_d = np.linalg.solve(S, dev)
    value = penalty()
    close(value.item(), 0.5 * dev @ Sinv_d / tau)
    value.backward()
    close(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy(), Sinv_d / tau)
    close(laplace_prior(fmt, prior, F64)["prior_precision"], np.diag(np.linalg.inv(S)))
    if fmt == "kron":
        with pytest.raises(ValueError, match="matrix-normal"):
            to_distribution(fmt, prior)
        return
    dist = to_distribution(fmt, prior)
    other = theta + rng.standard_normal(theta.size)
    lp = dist.log_prob(torch.from_numpy(theta)) - dist.log_prob(torch.from_numpy(other))
    d_o = other - prior["mean"]
    close(lp.item(), 0.5 * d_o @ np.linalg.solve(S, d_o) - 0.5 * dev @ Sinv_d, 1e-8)
