"""Convolutional and residual networks (docs/theory.md §13): the layout against torch, every
format against the independent dense reference on random networks and op sequences, the
rules with their reasons, and function preservation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from planner import (
    DiagPosterior,
    FullPosterior,
    InvalidOperation,
    InvalidStructure,
    Network,
    PhiSpace,
    Plan,
    Psi,
    PsiBlock,
    op_from_json,
)
from planner.network import forward
from planner.posterior import KronPosterior, LowRankPosterior, PrecisionPosterior
from tests.helpers import close
from tests.reference_networks import RefNetwork, RefState
from tests.strategies import spd

ACTS = ["identity", "relu", "tanh"]


# -- random networks ----------------------------------------------------------------------
@st.composite
def network_json(draw) -> dict:
    """Small conv/residual networks: a stem, blocks with and without projection, a
    ψ-able conv, pools, a flatten or a global pool into a linear head, bias on and off."""
    c = draw(st.integers(1, 2))
    hw = draw(st.integers(3, 5))
    stages = []

    def conv(out, k=None, stride=1, act=None):
        k = draw(st.sampled_from([1, 3])) if k is None else k
        return {
            "type": "conv",
            "out": out,
            "kernel": k,
            "stride": stride,
            "padding": k // 2,
            "bias": draw(st.booleans()),
            "activation": draw(st.sampled_from(ACTS)) if act is None else act,
        }

    width = draw(st.integers(1, 3))
    stages.append(conv(width, act=draw(st.sampled_from(["identity", "relu"]))))
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["identity", "identity", "projection", "plain"]))
        if kind == "plain":  # a conv with in = out, stride 1, padded: ψ may remove it
            stages.append(conv(width, act=draw(st.sampled_from(["identity", "relu"]))))
            continue
        n = draw(st.integers(1, 2))
        inner = [draw(st.integers(1, 3)) for _ in range(n - 1)]
        out = width if kind == "identity" else draw(st.integers(1, 3))
        branch = [conv(w) for w in inner] + [conv(out)]
        block = {
            "type": "residual",
            "branch": branch,
            "activation": draw(st.sampled_from(["identity", "relu"])),
        }
        if kind == "projection":
            block["shortcut"] = {
                "type": "conv",
                "out": out,
                "kernel": 1,
                "bias": draw(st.booleans()),
            }
        stages.append(block)
        width = out
    if hw >= 4 and draw(st.booleans()):
        stages.append({"type": "pool", "mode": draw(st.sampled_from(["max", "avg"])), "kernel": 2})
    if draw(st.booleans()):
        stages.append({"type": "pool", "mode": "avg", "global": True})
    stages.append({"type": "flatten"})
    if draw(st.booleans()):
        stages.append(
            {
                "type": "linear",
                "out": draw(st.integers(1, 3)),
                "bias": draw(st.booleans()),
                "activation": draw(st.sampled_from(ACTS)),
            }
        )
    stages.append({"type": "linear", "out": draw(st.integers(1, 2)), "bias": draw(st.booleans())})
    return {"input": [c, hw, hw], "stages": stages}


@st.composite
def op_sequences(draw, d: dict, max_steps: int = 4):
    """Reference ops drawn from the reference's own validity rules."""
    ref = RefNetwork(d)
    p = len(ref.keys())
    state = RefState.start(ref, np.zeros(p), np.eye(p))
    ops = []
    for _ in range(draw(st.integers(0, max_steps))):
        choices = state.valid()
        if not choices:
            break
        kind, x = draw(st.sampled_from(choices))
        if kind == "phi":
            op = ("phi", x, draw(st.integers(0, state.spaces[x] - 1)))
            state.phi(x, op[2])
        elif kind == "block":
            op = ("block", x)
            state.psi_block(x)
        else:
            op = ("layer", x, list(draw(st.permutations(range(len(state.rows[x]))))))
            state.psi_layer(x, op[2])
        ops.append(op)
    return ops


def planner_ops(ops) -> tuple:
    out = []
    for op in ops:
        if op[0] == "phi":
            out.append(PhiSpace(op[1], op[2]))
        elif op[0] == "block":
            out.append(PsiBlock(op[1]))
        else:
            out.append(Psi(op[1], tuple(op[2])))
    return tuple(out)


def posterior(fmt: str, net: Network, rng: np.random.Generator):
    """(posterior in ``fmt``, its dense mean and covariance)."""
    p = net.n_params
    mean = rng.normal(size=p)
    if fmt == "diag":
        var = rng.uniform(0.3, 2.0, size=p)
        return DiagPosterior.from_arrays(net, {"mean": mean, "variance": var}), mean, np.diag(var)
    if fmt == "lowrank":
        var = rng.uniform(0.3, 2.0, size=p)
        F = 0.7 * rng.normal(size=(p, int(rng.integers(1, 4))))
        post = LowRankPosterior.from_arrays(net, {"mean": mean, "variance": var, "factor": F})
        return post, mean, np.diag(var) + F @ F.T
    cov = spd(rng, p)
    if fmt == "precision":
        prec = np.linalg.inv(cov)
        prec = (prec + prec.T) / 2
        post = PrecisionPosterior.from_arrays(net, {"mean": mean, "precision": prec})
        return post, mean, np.linalg.inv(prec)
    return FullPosterior.from_dense(net, mean, cov), mean, cov


def reference(d: dict, ops, mean, cov):
    state = RefState.start(RefNetwork(d), mean, cov)
    for op in ops:
        if op[0] == "phi":
            state.phi(op[1], op[2])
        elif op[0] == "block":
            state.psi_block(op[1])
        else:
            state.psi_layer(op[1], op[2])
    return state.result()


@st.composite
def cases(draw):
    d = draw(network_json())
    return d, draw(op_sequences(d)), draw(st.integers(0, 2**32 - 1))


# -- the layout is torch's ----------------------------------------------------------------
class _Residual(torch.nn.Module):
    """``act(shortcut(x) + branch(x))``, parameters branch first (written here from the
    definition, independently of the client's module)."""

    def __init__(self, branch, shortcut, act):
        super().__init__()
        self.branch, self.shortcut, self.act = branch, shortcut, act

    def forward(self, x):
        s = x if self.shortcut is None else self.shortcut(x)
        return self.act(s + self.branch(x))


_TORCH_ACTS = {"identity": torch.nn.Identity, "relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}


def _torch_module(d: dict) -> torch.nn.Module:
    shape = list(d["input"])

    def layer(stage):
        nonlocal shape
        if stage["type"] == "conv":
            k, s, p = stage["kernel"], stage.get("stride", 1), stage.get("padding", 0)
            m = torch.nn.Conv2d(shape[0], stage["out"], k, s, p, bias=stage.get("bias", True))
            shape = [stage["out"], (shape[1] + 2 * p - k) // s + 1, (shape[2] + 2 * p - k) // s + 1]
        else:
            m = torch.nn.Linear(shape[0], stage["out"], bias=stage.get("bias", True))
            shape = [stage["out"]]
        return [m, _TORCH_ACTS[stage.get("activation", "identity")]()]

    mods = []
    for stage in d["stages"]:
        if stage["type"] in ("conv", "linear"):
            mods += layer(stage)
        elif stage["type"] == "pool":
            if stage.get("global"):
                mods.append(torch.nn.AdaptiveAvgPool2d(1))
                shape = [shape[0], 1, 1]
            else:
                cls = torch.nn.MaxPool2d if stage["mode"] == "max" else torch.nn.AvgPool2d
                mods.append(cls(stage["kernel"]))
                shape = [shape[0], shape[1] // 2, shape[2] // 2]
        elif stage["type"] == "flatten":
            mods.append(torch.nn.Flatten())
            shape = [int(np.prod(shape))]
        else:
            before = list(shape)
            branch = torch.nn.Sequential(*[m for b in stage["branch"] for m in layer(b)])
            after = list(shape)
            sc = None
            if stage.get("shortcut") is not None:
                shape = before
                sc = layer(stage["shortcut"])[0]
            shape = after
            mods.append(_Residual(branch, sc, _TORCH_ACTS[stage["activation"]]()))
    return torch.nn.Sequential(*mods).double()


@settings(max_examples=25, deadline=None)
@given(network_json(), st.integers(0, 2**32 - 1))
def test_the_layout_and_forward_pass_are_torchs(d, seed):
    net = Network.from_json(d)
    module = _torch_module(d)
    theta = np.random.default_rng(seed).normal(size=net.n_params)
    assert sum(p.numel() for p in module.parameters()) == net.n_params
    torch.nn.utils.vector_to_parameters(torch.from_numpy(theta), module.parameters())
    X = np.random.default_rng(seed + 1).normal(size=(3, *d["input"]))
    with torch.no_grad():
        want = module(torch.from_numpy(X)).numpy()
    close(forward(net, theta, X), want)
    assert Network.from_json(net.to_json()) == net


# -- every format against the reference -----------------------------------------------------
@pytest.mark.parametrize("fmt", ["full", "precision", "lowrank", "diag"])
@settings(max_examples=30, deadline=None)
@given(case=cases())
def test_every_format_equals_the_dense_reference(fmt, case):
    d, ops, seed = case
    net = Network.from_json(d)
    post, mean, cov = posterior(fmt, net, np.random.default_rng(seed))
    plan = Plan(net, planner_ops(ops))
    want_mean, want_cov, want_cost = reference(d, ops, mean, cov)
    got = plan.apply(post)
    assert plan.student.n_params == got.n == want_mean.size
    close(got.mean, want_mean)
    close(got.dense_covariance(), want_cov)
    close(plan.cost(post), want_cost)
    assert Plan.from_json(net, plan.to_json()).ops == plan.ops


def test_order_matters_between_adjacent_spaces_and_a_stream_and_its_block():
    """φ on a block's stream then ψ on the block differs from the other order only in what
    the block's last layer still has to be conditioned on; both equal the reference."""
    d = {
        "input": [2, 3, 3],
        "stages": [
            {"type": "conv", "out": 3, "kernel": 1, "activation": "relu"},
            {
                "type": "residual",
                "activation": "relu",
                "branch": [
                    {"type": "conv", "out": 2, "kernel": 3, "padding": 1, "activation": "relu"},
                    {"type": "conv", "out": 3, "kernel": 1},
                ],
            },
            {"type": "flatten"},
            {"type": "linear", "out": 2},
        ],
    }
    net = Network.from_json(d)
    _, mean, cov = posterior("full", net, np.random.default_rng(5))
    post = FullPosterior.from_dense(net, mean, cov)
    orders = [
        [("phi", 2, 1), ("block", 1)],
        [("block", 1), ("phi", 2, 1)],
        [("phi", 3, 0), ("phi", 2, 0)],
        [("phi", 2, 0), ("phi", 3, 0)],
    ]
    costs = []
    for ops in orders:
        plan = Plan(net, planner_ops(ops))
        m, S, c = reference(d, ops, mean, cov)
        aligned = plan.apply(post)
        close(aligned.mean, m)
        close(aligned.dense_covariance(), S)
        close(plan.cost(post), c)
        costs.append(c)
    assert abs(costs[0] - costs[1]) > 1e-6 and abs(costs[2] - costs[3]) > 1e-6


# -- function preservation ------------------------------------------------------------------
def test_a_dead_block_and_dead_channels_are_removed_at_no_cost_and_keep_the_function():
    d = {
        "input": [2, 5, 5],
        "stages": [
            {"type": "conv", "out": 4, "kernel": 3, "padding": 1, "activation": "relu"},
            {
                "type": "residual",
                "activation": "relu",
                "branch": [
                    {"type": "conv", "out": 3, "kernel": 3, "padding": 1, "activation": "relu"},
                    {"type": "conv", "out": 4, "kernel": 3, "padding": 1},
                ],
            },
            {
                "type": "residual",
                "activation": "relu",
                "branch": [
                    {"type": "conv", "out": 3, "kernel": 3, "padding": 1, "activation": "relu"},
                    {"type": "conv", "out": 4, "kernel": 1},
                ],
            },
            {"type": "pool", "mode": "max", "kernel": 2},
            {"type": "flatten"},
            {"type": "linear", "out": 3},
        ],
    }
    net = Network.from_json(d)
    g = net.graph
    rng = np.random.default_rng(0)
    mean = rng.normal(size=net.n_params)
    var = np.full(net.n_params, 0.5)
    dead = []
    # block 2's branch ends in an exact 0: the block is the identity (its input passed relu)
    last = g.units[g.blocks[1].branch[-1]]
    dead.append(np.arange(last.start, last.start + last.size))
    # channel 1 of the stream (space 2) is read by nothing: every consumer slice is 0
    for ui, k in g.consumers(2):
        u = g.units[ui]
        seg = u.segments[k]
        rows = np.arange(u.rows)
        dead.append(seg.indices(rows, np.array([1])).ravel())
    # channel 0 inside block 1 (space 3) likewise
    for ui, k in g.consumers(3):
        u = g.units[ui]
        dead.append(u.segments[k].indices(np.arange(u.rows), np.array([0])).ravel())
    dead = np.concatenate(dead)
    mean[dead] = 0.0
    var[dead] = 1e-12
    post = DiagPosterior.from_arrays(net, {"mean": mean, "variance": var})
    plan = Plan(net, (PsiBlock(2), PhiSpace(2, 1), PhiSpace(3, 0)))
    assert plan.cost(post) == pytest.approx(0.0, abs=1e-18)
    student = plan.apply(post)
    X = rng.normal(size=(6, 2, 5, 5))
    close(forward(plan.student, student.mean, X), forward(net, mean, X))
    assert plan.compiled.surviving == {"layers": [1, 2, 3, 6], "blocks": [1]}
    assert [p.to_json()["teacher_channels"] for p in plan.compiled.provenance][:3] == [
        [0, 1],
        [0, 2, 3],
        [1, 2],
    ]


def _identity_conv(c: int, channels_in: int, seed: int, pi=None):
    """A stem, a middle conv that is the δ-kernel of a pairing ``pi`` (random if None)
    with tiny variance, a flatten and a linear head: (json, network, diag posterior,
    mean, pi, rng)."""
    d = {
        "input": [channels_in, 4, 4],
        "stages": [
            {"type": "conv", "out": c, "kernel": 3, "padding": 1, "activation": "relu"},
            {"type": "conv", "out": c, "kernel": 3, "padding": 1, "activation": "relu"},
            {"type": "flatten"},
            {"type": "linear", "out": 2},
        ],
    }
    net = Network.from_json(d)
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=net.n_params)
    u = net.graph.units[1]
    pi = rng.permutation(c) if pi is None else np.asarray(pi)
    W = np.zeros((c, c, 3, 3))
    W[np.arange(c), pi, 1, 1] = 1.0
    mean[u.start : u.start + c * c * 9] = W.ravel()
    mean[u.bias : u.bias + c] = 0.0
    var = np.full(net.n_params, 0.3)
    var[u.start : u.start + u.size] = 1e-12
    post = DiagPosterior.from_arrays(net, {"mean": mean, "variance": var})
    return d, net, post, mean, pi, rng


def test_psi_on_a_plain_conv_is_its_delta_kernel_and_keeps_the_function():
    _, net, post, mean, pi, rng = _identity_conv(3, 3, 1, pi=[2, 0, 1])
    plan = Plan(net, (Psi(2, tuple(int(x) for x in pi)),))
    assert plan.cost(post) == pytest.approx(0.0, abs=1e-12)
    X = rng.normal(size=(4, 3, 4, 4))
    close(forward(plan.student, plan.apply(post).mean, X), forward(net, mean, X))


@pytest.mark.parametrize("channels", [3, 8])  # every pairing costed; the assignment's
def test_the_search_finds_an_identity_conv_and_its_pairing(channels):
    """A teacher whose middle conv is a permuted δ-kernel (tiny variance): the search for the
    student without it removes it by ψ at cost ≈ 0 with that very pairing, and the
    student at the prior mean computes the teacher's function."""
    from planner.search import search

    c = channels
    d, net, post, mean, pi, rng = _identity_conv(c, 2, 2)
    student = Network.from_json({**d, "stages": [d["stages"][0], *d["stages"][2:]]})
    found = search(post, student)
    (psi,) = found.plan.ops
    assert psi == Psi(2, None if (pi == np.arange(c)).all() else tuple(int(x) for x in pi))
    assert found.cost == pytest.approx(0.0, abs=1e-9)
    X = rng.normal(size=(4, 2, 4, 4))
    close(forward(found.plan.student, found.plan.apply(post).mean, X), forward(net, mean, X))


# -- rules with reasons ---------------------------------------------------------------------
_RULES = {
    "input": [3, 8, 8],
    "stages": [
        {"type": "conv", "out": 4, "kernel": 3, "padding": 1, "activation": "relu"},
        {"type": "conv", "out": 4, "kernel": 3, "stride": 2, "padding": 1, "activation": "relu"},
        {
            "type": "residual",
            "activation": "relu",
            "branch": [{"type": "conv", "out": 6, "kernel": 3, "padding": 1}],
            "shortcut": {"type": "conv", "out": 6, "kernel": 1, "bias": False},
        },
        {
            "type": "residual",
            "activation": "tanh",
            "branch": [{"type": "conv", "out": 6, "kernel": 3, "padding": 1}],
        },
        {"type": "pool", "mode": "avg", "global": True},
        {"type": "flatten"},
        {"type": "linear", "out": 5},
    ],
}


@pytest.mark.parametrize(
    ("op", "field", "words"),
    [
        ({"op": "psi", "block": 1}, "block", "projection"),
        ({"op": "psi", "block": 2}, "block", "tanh"),
        ({"op": "psi", "block": 3}, "block", "has 2 residual blocks"),
        ({"op": "psi", "layer": 2}, "layer", "stride 1"),
        ({"op": "psi", "layer": 3}, "layer", "inside residual block 1"),
        ({"op": "psi", "layer": 6}, "layer", "output"),
        ({"op": "phi", "space": 1, "channel": 0}, "space", "input"),
        ({"op": "phi", "space": 2, "channel": 4}, "channel", "width 4"),
        ({"op": "phi", "space": 9, "channel": 0}, "space", "does not exist"),
        ({"op": "phi", "layer": 2, "neuron": 0}, "op", "space"),
    ],
)
def test_invalid_steps_name_the_rule(op, field, words):
    net = Network.from_json(_RULES)
    with pytest.raises(InvalidOperation) as exc:
        Plan.from_json(net, [op])
    assert exc.value.field == f"ops[0].{field}"
    assert words in exc.value.reason


def test_a_removed_space_and_a_removed_block_say_so():
    net = Network.from_json(
        {
            "input": [2, 4, 4],
            "stages": [
                {"type": "conv", "out": 2, "kernel": 1, "activation": "relu"},
                {
                    "type": "residual",
                    "activation": "relu",
                    "branch": [
                        {"type": "conv", "out": 3, "kernel": 1, "activation": "relu"},
                        {"type": "conv", "out": 2, "kernel": 1},
                    ],
                },
                {"type": "flatten"},
                {"type": "linear", "out": 2},
            ],
        }
    )
    for second, words in [(PhiSpace(3, 0), "removed with its block"), (PsiBlock(1), "already")]:
        with pytest.raises(InvalidOperation) as exc:
            Plan(net, (PsiBlock(1), second))
        assert words in exc.value.reason and exc.value.field.startswith("ops[1]")


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (lambda d: d["stages"].pop(5), "stages[5].type", "flatten"),
        (lambda d: d["stages"][0].update(kernel=11), "stages[0].kernel", "larger"),
        (lambda d: d["stages"][3]["branch"][0].update(out=5), "stages[3].branch[0].out", "width 6"),
        (lambda d: d["stages"][2]["shortcut"].update(stride=2), "stages[2].shortcut", "match"),
        (lambda d: d["stages"][2]["shortcut"].update(out=3), "stages[2].shortcut.out", "6"),
        (lambda d: d["stages"][0].update(groups=2), "stages[0].groups", "no field"),
        (lambda d: d["stages"].insert(0, {"type": "linear", "out": 3}), "stages[0].type", "image"),
        (lambda d: d.update(input=[3, 0, 8]), "input", "positive"),
        (lambda d: d["stages"][1].update(type="attention"), "stages[1].type", "unknown"),
    ],
)
def test_bad_networks_name_the_stage_and_field(change, field, words):
    import copy

    d = copy.deepcopy(_RULES)
    change(d)
    with pytest.raises(InvalidStructure) as exc:
        Network.from_json(d)
    assert exc.value.field == field
    assert words in exc.value.reason


def kron_posterior(d: dict, net: Network, rng: np.random.Generator):
    """(a kron posterior over ``net``, its mean and the reference's dense covariance)."""
    ref = RefNetwork(d)
    arrays, G, A, bias = {"mean": rng.normal(size=net.n_params)}, {}, {}, {}
    for L in ref.layers:
        n = L.number
        G[n] = arrays[f"row{n}"] = spd(rng, L.out)
        A[n] = arrays[f"col{n}"] = spd(rng, L.inp * L.group)
        if L.bias:
            b = rng.uniform(0.3, 2.0, L.out) if rng.random() < 0.5 else spd(rng, L.out)
            bias[n] = arrays[f"bias{n}"] = b
    post = KronPosterior.from_arrays(net, arrays)
    return post, arrays["mean"], ref.kron_covariance(G, A, bias)


@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_kron_equals_the_dense_reference(case):
    """laplace-torch's K-FAC of Conv2d: a channel's consumer slice is a group of kh·kw
    columns; every plan replayed in the layers' own terms equals the dense reference."""
    d, ops, seed = case
    net = Network.from_json(d)
    post, mean, cov = kron_posterior(d, net, np.random.default_rng(seed))
    close(post.dense_covariance(), cov)
    plan = Plan(net, planner_ops(ops))
    want_mean, want_cov, want_cost = reference(d, ops, mean, cov)
    got = plan.apply(post)
    assert isinstance(got, KronPosterior)
    close(got.mean, want_mean)
    close(got.dense_covariance(), want_cov)
    close(plan.cost(post), want_cost)
    again = KronPosterior.from_arrays(plan.student, got.to_arrays())
    close(again.dense_covariance(), want_cov)


@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_the_kron_scorer_equals_the_dense_scorer_step_by_step(case):
    """The kron scorer's increments of every channel of every space (its consumer slices
    in every layer that reads it) and of every block, after each step of a random plan
    (rows marginalised, columns conditioned, blocks and layers removed), equal the dense
    scorer's on the same Gaussian."""
    from planner.ops import Tracked
    from planner.posterior.kron import KronScorer

    d, ops, seed = case
    net = Network.from_json(d)
    post, mean, cov = kron_posterior(d, net, np.random.default_rng(seed))
    dense = FullPosterior.from_dense(net, mean, cov).scorer()
    kron = KronScorer(post)
    tr = Tracked.start(net)

    def compare():
        for s in tr.positions:
            if s in net.graph.fixed:
                continue
            groups = tr.consumer_groups(s)
            if groups.size:
                close(kron.drops(groups).increments(), dense.drops(groups).increments())
        for b in net.graph.blocks:
            if b.branch[-1] not in tr.gone:
                idx = tr.block_indices(b.number)[None, :]
                close(kron.drops(idx).increments(), dense.drops(idx).increments())

    compare()
    for op in planner_ops(ops):
        eff = tr.apply(op)
        kron.commit(eff.conditioned, eff.targets)
        dense.commit(eff.conditioned, eff.targets)
        close(kron.cost, dense.cost)
        compare()
    close(kron.cost, reference(d, ops, mean, cov)[2])


def test_ops_json_round_trips():
    for d in [
        {"op": "phi", "space": 3, "channel": 1},
        {"op": "psi", "block": 2},
        {"op": "psi", "layer": 4, "pairing": [1, 0]},
    ]:
        assert op_from_json(d).to_json() == d
