"""The search: better than random, exact on planted structure (SPEC §4–§6)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import planner.search as search_mod
from planner import (
    DiagPosterior,
    FullPosterior,
    MissingData,
    NotInLattice,
    Plan,
    Structure,
    UnknownCriterion,
)
from planner.criteria import CRITERIA, NeuronContext
from planner.lattice import membership
from planner.network import forward, unflatten
from planner.ops import Tracked
from planner.search import random_plan, search
from tests.strategies import spd


@st.composite
def teacher_student(draw):
    T = draw(st.integers(4, 5))
    widths = [draw(st.integers(2, 4))] + [draw(st.integers(3, 6)) for _ in range(T - 2)] + [2]
    teacher = Structure.mlp(widths, bias=draw(st.booleans()))
    # a student in the lattice: shrink hidden widths, maybe drop one hidden position
    hidden = [draw(st.integers(1, n)) for n in widths[1:-1]]
    if draw(st.booleans()) and len(hidden) > 1:
        k = draw(st.integers(0, len(hidden) - 1))
        hidden = hidden[:k] + hidden[k + 1 :]
    student = teacher.inherit([widths[0], *hidden, widths[-1]])
    return teacher, student, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=25)
@given(teacher_student())
def test_search_costs_no_more_than_the_best_of_40_random_plans(case):
    teacher, student, seed = case
    if not membership(teacher, student).member:
        return
    rng = np.random.default_rng(seed)
    p = teacher.n_params
    post = FullPosterior.from_dense(teacher, rng.normal(size=p), spd(rng, p))
    found = search(post, student)
    assert found.plan.student == student
    randoms = [random_plan(teacher, student, rng).cost(post) for _ in range(40)]
    assert found.cost <= min(randoms) * (1 + 1e-9) + 1e-9
    assert np.isclose(found.cost, found.plan.cost(post), rtol=1e-12)


def planted(bias: bool, permuted: bool, rng: np.random.Generator):
    """Teacher (3, 6, 4, 4, 2): two dead neurons at position 2, layer 4 a (permuted) identity."""
    teacher = Structure.mlp((3, 6, 4, 4, 2), bias=bias)
    theta = rng.normal(size=teacher.n_params)
    L3, L4 = teacher.layer(3), teacher.layer(4)
    theta[L3.U[:, [1, 4]]] = 0.0  # dead: no outgoing weight
    pi = rng.permutation(4) if permuted else np.arange(4)
    theta[L4.U] = 0.0
    theta[L4.U[np.arange(4), pi]] = 1.0
    if bias:
        theta[L4.b] = 0.0
    p = teacher.n_params
    cov = 1e-6 * spd(rng, p)  # sharply peaked
    return teacher, theta, cov, pi


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("fmt", ["full", "diag"])
def test_planted_dead_neurons_and_identity_layer_are_found(bias, permuted, fmt):
    rng = np.random.default_rng(7)
    teacher, theta, cov, _pi = planted(bias, permuted, rng)
    post = (
        FullPosterior.from_dense(teacher, theta, cov)
        if fmt == "full"
        else DiagPosterior.from_arrays(teacher, {"mean": theta, "variance": np.diag(cov)})
    )
    student = teacher.inherit((3, 4, 4, 2))
    found = search(post, student)
    assert found.cost < 1e-8
    prov = found.plan.compiled.provenance
    assert prov[1].teacher_neurons == (0, 2, 3, 5)  # the dead 1 and 4 are gone
    assert [pr.teacher_position for pr in prov] == [1, 2, 3, 5]  # layer 4 removed
    aligned = found.plan.apply(post)
    X = rng.normal(size=(64, 3))
    np.testing.assert_allclose(
        forward(student, aligned.mean, X), forward(teacher, theta, X), rtol=1e-9, atol=1e-9
    )


def test_identity_pairing_is_not_assumed():
    rng = np.random.default_rng(3)
    teacher, theta, cov, pi = planted(False, True, rng)
    assert not np.array_equal(pi, np.arange(4))
    post = FullPosterior.from_dense(teacher, theta, cov)
    student = teacher.inherit((3, 4, 4, 2))
    found = search(post, student)
    seeds_way = [op for op in found.plan.ops if op.to_json()["op"] == "phi"]
    from planner import Psi

    naive = Plan(teacher, (*seeds_way, Psi(4)))  # the seed's identity pairing
    assert naive.cost(post) > 1e3 * max(found.cost, 1e-12)


def test_forward_is_the_network_it_claims():
    s = Structure.mlp((2, 2, 1), bias=True)
    theta = np.array([1.0, -1.0, 2.0, 0.5, 0.1, -0.2, 3.0, -4.0, 0.25])
    lp = unflatten(s, theta)
    assert lp[0].U.tolist() == [[1.0, -1.0], [2.0, 0.5]] and lp[0].b.tolist() == [0.1, -0.2]
    x = np.array([[1.0, 2.0]])
    h = np.maximum(np.array([1 - 2 + 0.1, 2 + 1 - 0.2]), 0)
    assert forward(s, theta, x)[0, 0] == pytest.approx(3 * h[0] - 4 * h[1] + 0.25)


def test_narrowed_assignment_on_wider_layers_still_finds_the_identity(monkeypatch):
    monkeypatch.setattr(search_mod, "_LSA_ENTRIES", 100)
    rng = np.random.default_rng(5)
    teacher = Structure.mlp((4, 24, 24, 3))
    theta = rng.normal(size=teacher.n_params)
    U3 = teacher.layer(3).U
    theta[U3] = 0.0
    keep = np.sort(rng.choice(24, 8, replace=False))
    theta[U3[keep, keep]] = 1.0  # U_3 restricted to 8 neurons is the identity
    theta[teacher.layer(4).U[:, np.setdiff1d(np.arange(24), keep)]] = 0.0
    var = np.full(teacher.n_params, 1e-6)
    post = DiagPosterior.from_arrays(teacher, {"mean": theta, "variance": var})
    found = search(post, teacher.inherit((4, 8, 3)))
    assert found.cost < 1e-8


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_every_criterion_scores_every_neuron(name):
    rng = np.random.default_rng(0)
    teacher = Structure.rnn((3, 5, 4, 2), bias=True)
    p = teacher.n_params
    post = FullPosterior.from_dense(teacher, rng.normal(size=p), spd(rng, p))
    grads = rng.normal(size=(16, p))
    ctx = NeuronContext(post, Tracked.start(teacher), 2, rng, grads)
    scores = CRITERIA[name](ctx)
    assert scores.shape == (5,) and np.isfinite(scores).all()
    found = search(post, Structure.rnn((3, 3, 2, 2), bias=True), name, gradients=grads)
    assert found.plan.student.widths == (3, 3, 2, 2)


def test_obd_uses_the_precision_diagonal():
    rng = np.random.default_rng(1)
    teacher = Structure.mlp((2, 3, 2))
    p = teacher.n_params
    cov = spd(rng, p)
    mean = rng.normal(size=p)
    post = FullPosterior.from_dense(teacher, mean, cov)
    h = np.diag(np.linalg.inv(cov))
    scores = CRITERIA["obd"](NeuronContext(post, Tracked.start(teacher), 2, rng))
    U3 = teacher.layer(3).U
    expect = [0.5 * np.sum(h[U3[:, i]] * mean[U3[:, i]] ** 2) for i in range(3)]
    np.testing.assert_allclose(scores, expect, rtol=1e-10)


def test_posterior_ratio_is_the_group_mahalanobis_cost():
    rng = np.random.default_rng(2)
    teacher = Structure.mlp((2, 3, 2))
    p = teacher.n_params
    cov, mean = spd(rng, p), rng.normal(size=p)
    post = FullPosterior.from_dense(teacher, mean, cov)
    scores = CRITERIA["posterior_ratio"](NeuronContext(post, Tracked.start(teacher), 2, rng))
    U3 = teacher.layer(3).U
    for i in range(3):
        g = U3[:, i]
        assert scores[i] == pytest.approx(
            0.5 * mean[g] @ np.linalg.solve(cov[np.ix_(g, g)], mean[g]), rel=1e-10
        )


def test_criteria_errors():
    rng = np.random.default_rng(0)
    teacher = Structure.mlp((2, 3, 2))
    p = teacher.n_params
    post = DiagPosterior.from_arrays(teacher, {"mean": np.ones(p), "variance": np.ones(p)})
    with pytest.raises(UnknownCriterion):
        search(post, Structure.mlp((2, 2, 2)), "magic")
    with pytest.raises(MissingData):
        search(post, Structure.mlp((2, 2, 2)), "gradient_covariance")
    with pytest.raises(NotInLattice):
        search(post, Structure.mlp((2, 4, 2)))
    _ = rng
