"""The search (docs/theory.md §6): no worse than the greedy of exact increments, the exhaustive
optimum where it can be enumerated, one plan per Gaussian, exact on planted structure.

The references (``tests.reference_search``) are independent of ``planner``: the
greedy and the brute force condition the teacher's covariance by dense solves in
the reference's own layout.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner import (
    DeadlineExceeded,
    DiagPosterior,
    FullPosterior,
    MissingData,
    NotInLattice,
    Plan,
    Psi,
    Structure,
    UnknownCriterion,
)
from planner.criteria import CRITERIA, NeuronContext
from planner.network import forward, unflatten
from planner.ops import Tracked
from planner.posterior import LowRankPosterior, PrecisionPosterior
from planner.search import budget as budget_module
from planner.search import random_plan, search
from tests.helpers import close
from tests.reference import RefNet
from tests.reference_search import brute_force, constraint_cost, ref_greedy
from tests.strategies import redundant, search_cases, spd, to_structure

RTOL = 1e-9


def at_most(a: float, b: float) -> None:
    assert a <= b * (1 + RTOL) + 1e-12, (a, b)


def full(net: RefNet, seed: int) -> FullPosterior:
    rng = np.random.default_rng(seed)
    s = to_structure(net)
    return FullPosterior.from_dense(s, rng.normal(size=s.n_params), spd(rng, s.n_params))


@given(search_cases())
def test_search_costs_no_more_than_the_greedy_of_exact_increments(case):
    net, student, seed = case
    post = full(net, seed)
    found = search(post, to_structure(student))
    assert found.plan.student == to_structure(student)
    close(found.cost, found.plan.cost(post))
    at_most(found.cost, ref_greedy(net, post.mean, post.covariance, student.widths, student.acts))


@settings(max_examples=15)
@given(search_cases(max_T=4, max_width=3, max_steps=3))
def test_search_equals_brute_force_where_it_can_be_enumerated(case):
    net, student, seed = case
    post = full(net, seed)
    found = search(post, to_structure(student))
    best = brute_force(net, post.mean, post.covariance, student.widths, student.acts)
    close(found.cost, best)
    assert found.exhaustive


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("widths", "student", "pairs"),
    [
        ((4, 24, 40), (4, 16, 40), 4),
        ((1, 6, 160), (1, 4, 160), 1),
        ((3, 8, 12, 6), (3, 5, 8, 6), 3),
    ],
)
def test_redundant_neurons_are_removed_in_pairs(widths, student, pairs, seed):
    """Ranking by the teacher's marginal takes one neuron of a pair and an outsider;
    exact increments see the partner become free once the first is gone."""
    teacher = Structure.mlp(widths, bias=seed % 2 == 1)
    mean, cov = redundant(teacher, np.random.default_rng(seed), pairs)
    post = FullPosterior.from_dense(teacher, mean, cov)
    target = teacher.inherit(student)
    found = search(post, target)
    net = RefNet(
        list(widths), ["identity", *["relu"] * (len(widths) - 2), "identity"], teacher.bias, False
    )
    acts = ["identity", *["relu"] * (len(student) - 2), "identity"]
    greedy = ref_greedy(net, mean, cov, list(student), acts)
    at_most(found.cost, greedy)
    marginal = search(post, target, "obd", work=0).cost  # ranked on the marginal, not improved
    assert greedy < 0.95 * marginal


def same_gaussian(s: Structure, rng: np.random.Generator):
    """One Gaussian, Σ = D + F Fᵀ, as full, precision and lowrank posteriors."""
    p = s.n_params
    mean = rng.normal(size=p)
    var = rng.uniform(0.2, 1.5, size=p)
    F = rng.normal(size=(p, 3)) * 0.6
    cov = np.diag(var) + F @ F.T
    prec = np.linalg.inv(cov)
    return {
        "full": FullPosterior.from_dense(s, mean, cov),
        "precision": PrecisionPosterior.from_arrays(
            s, {"mean": mean, "precision": (prec + prec.T) / 2}
        ),
        "lowrank": LowRankPosterior.from_arrays(s, {"mean": mean, "variance": var, "factor": F}),
    }


@settings(max_examples=20)
@given(search_cases(max_T=5, max_width=5, max_steps=6))
def test_one_gaussian_gets_one_plan_in_every_format(case):
    net, student, seed = case
    s, target = to_structure(net), to_structure(student)
    posts = same_gaussian(s, np.random.default_rng(seed))
    costs = {fmt: search(post, target).cost for fmt, post in posts.items()}
    for fmt in ("precision", "lowrank"):
        close(costs[fmt], costs["full"])
    # a diagonal Gaussian: as diag and as full
    rng = np.random.default_rng(seed + 1)
    mean, var = rng.normal(size=s.n_params), rng.uniform(0.2, 1.5, size=s.n_params)
    d = search(DiagPosterior.from_arrays(s, {"mean": mean, "variance": var}), target).cost
    f = search(FullPosterior.from_dense(s, mean, np.diag(var)), target).cost
    close(d, f)


def trap(rng: np.random.Generator, fmt: str):
    """An identity-activation chain whose middle layers look like the identity in their
    marginal variances (large) but not jointly: their deviation from the identity lies
    along a direction of tiny variance.  Layers are independent of each other."""
    widths = (2, 3, 3, 3, 3, 3, 3, 2)
    s = Structure.mlp(widths, activation="identity")
    p = s.n_params
    mean = rng.normal(size=p) * 0.3
    cov = np.eye(p) * 0.05
    for t in range(3, 7):
        U = s.layer(t).U.ravel()
        mean[U] = np.eye(3).ravel() + (0.3 if t in (4, 5) else 0.05) * np.ones(9)
        if t in (4, 5):  # marginal variance 2, but the all-ones direction has variance 1e-3
            ones = np.ones(9) / 3
            block = 2.0 * (np.eye(9) - np.outer(ones, ones)) + 1e-3 * np.outer(ones, ones)
            cov[np.ix_(U, U)] = block
    if fmt == "full":
        return s, FullPosterior.from_dense(s, mean, cov)
    prec = np.linalg.inv(cov)
    return s, PrecisionPosterior.from_arrays(s, {"mean": mean, "precision": (prec + prec.T) / 2})


def test_routes_are_chosen_by_exact_costs_in_every_format():
    rng = np.random.default_rng(0)
    s, post_full = trap(np.random.default_rng(0), "full")
    _, post_prec = trap(np.random.default_rng(0), "precision")
    student = s.inherit((2, 3, 2))
    every = search(post_full, student, max_routes=100)
    assert every.routes_built > 8  # more routes than the default finishes
    found = {
        fmt: search(post, student) for fmt, post in (("full", post_full), ("precision", post_prec))
    }
    for res in found.values():
        close(res.cost, every.cost)
    _ = rng


def test_a_deadline_before_the_first_plan_is_a_clear_error():
    rng = np.random.default_rng(0)
    teacher = Structure.mlp((6, 30, 20, 8))
    p = teacher.n_params
    post = FullPosterior.from_dense(teacher, rng.normal(size=p), spd(rng, p))
    with pytest.raises(DeadlineExceeded) as err:
        search(post, teacher.inherit((6, 18, 12, 8)), seconds=0.0)
    assert err.value.field == "seconds" and "first plan" in err.value.reason


class _Clock:
    """A monotonic clock that advances one second each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 1.0
        return self.now


@pytest.mark.parametrize("ticks", [30, 50, 70])
def test_the_deadline_cuts_the_search_and_still_answers(monkeypatch, ticks):
    """Past the deadline in any phase after the first plan (a branch and bound at any
    depth included), the best plan found comes back, marked cut by the deadline."""
    rng = np.random.default_rng(0)
    teacher = Structure.mlp((4, 8, 8, 3))
    p = teacher.n_params
    post = FullPosterior.from_dense(teacher, rng.normal(size=p), spd(rng, p))
    student = teacher.inherit((4, 2, 8, 3))
    full = search(post, student)
    monkeypatch.setattr(budget_module, "time", _Clock())
    found = search(post, student, seconds=float(ticks))
    assert found.cut and found.cut_by == "deadline" and not found.exhaustive
    assert found.plan.student.widths == (4, 2, 8, 3)
    close(found.cost, found.plan.cost(post))
    assert found.cost >= full.cost * (1 - 1e-9)


@settings(max_examples=15, deadline=None)
@given(
    search_cases(max_T=5, max_width=12, max_steps=8),
    st.sampled_from([0.005, 0.05, 0.3]),
    st.sampled_from(["fast", "thorough"]),
)
def test_a_search_never_runs_past_its_deadline(case, seconds, effort):
    """Whatever the teacher, the student and the effort, a search answers (or says it
    had no first plan) within its deadline plus a small margin (one step's time)."""
    import time

    net, student, seed = case
    post = full(net, seed)
    t0 = time.monotonic()
    try:
        found = search(post, to_structure(student), seconds=seconds, effort=effort)
    except DeadlineExceeded:
        found = None
    took = time.monotonic() - t0
    assert took < seconds + 0.5, (took, seconds)
    if found is not None:
        close(found.cost, found.plan.cost(post))


def test_the_memory_bound_skips_improvement_and_still_answers():
    rng = np.random.default_rng(0)
    teacher = Structure.mlp((6, 30, 20, 8))
    p = teacher.n_params
    post = FullPosterior.from_dense(teacher, rng.normal(size=p), spd(rng, p))
    student = teacher.inherit((6, 18, 12, 8))
    found = search(post, student, memory=0)
    assert found.cut and found.cut_by == "memory"
    close(found.cost, found.plan.cost(post))
    assert search(post, student).cost <= found.cost * (1 + 1e-9)


def test_branch_and_bound_of_a_deep_shrink_is_bounded():
    """One neuron kept of many (the red team's (10, 82, 82, 10) → (10, 1, 82, 10), scaled
    down): the walk enters only completable prefixes and holds its copies within the
    memory bound; it finishes and proves the optimum."""
    rng = np.random.default_rng(1)
    teacher = Structure.mlp((3, 24, 6, 2))
    p = teacher.n_params
    post = FullPosterior.from_dense(teacher, rng.normal(size=p), spd(rng, p))
    student = teacher.inherit((3, 1, 6, 2))
    found = search(post, student, memory=2**30)
    assert found.exhaustive and not found.cut
    # keeping neuron k conditions every other column of layer 3 (6 × 24, after layer 2's
    # 24 × 3 weights in parameters_to_vector order) to zero
    cov = post.covariance

    def kept(k: int) -> float:
        B = [72 + r * 24 + j for r in range(6) for j in range(24) if j != k]
        return constraint_cost(post.mean, cov, B, [0.0] * len(B))

    close(found.cost, min(kept(k) for k in range(24)))
    tight = search(post, student, memory=64 * 2**10)
    assert tight.cut and tight.cut_by == "memory" and tight.cost >= found.cost * (1 - 1e-9)


def test_the_same_request_gives_the_same_plan():
    rng = np.random.default_rng(4)
    teacher = Structure.mlp((6, 20, 12, 3), bias=True)
    p = teacher.n_params
    post = FullPosterior.from_dense(teacher, rng.normal(size=p), spd(rng, p))
    a = search(post, teacher.inherit((6, 10, 6, 3)))
    b = search(post, teacher.inherit((6, 10, 6, 3)))
    assert a.plan.ops == b.plan.ops and a.cost == b.cost and not a.cut


@settings(max_examples=20)
@given(search_cases(max_T=5, max_width=5, max_steps=6, rnn=False), st.integers(0, 2**32 - 1))
def test_search_costs_no_more_than_the_best_of_40_random_plans(case, seed):
    net, student, pseed = case
    post = full(net, pseed)
    found = search(post, to_structure(student))
    rng = np.random.default_rng(seed)
    randoms = [
        random_plan(post.structure, to_structure(student), rng).cost(post) for _ in range(40)
    ]
    at_most(found.cost, min(randoms))


@pytest.mark.parametrize("effort", ["fast", "thorough"])
def test_a_space_too_large_to_enumerate_is_searched_past_the_moves_local_optimum(effort):
    """Found by the test above: teacher (1,4,4,4,4) with biases to (1,3,4), 2,304 leaves,
    more than the enumeration floor proves.  The exchange moves stopped at 14.02 where a
    random plan cost 12.91; a branch and bound below the moves' cost finds the optimum."""
    net = RefNet([1, 4, 4, 4, 4], ["identity", "relu", "identity", "tanh", "identity"], True, False)
    student = RefNet([1, 3, 4], ["identity", "relu", "tanh"], True, False)
    post = full(net, 1)
    found = search(post, to_structure(student), effort=effort)
    close(found.cost, brute_force(net, post.mean, post.covariance, student.widths, student.acts))
    close(found.cost, found.plan.cost(post))


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
    close(found.cost, found.plan.cost(post))


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
    teacher = Structure.mlp((2, 3, 2))
    p = teacher.n_params
    post = DiagPosterior.from_arrays(teacher, {"mean": np.ones(p), "variance": np.ones(p)})
    with pytest.raises(UnknownCriterion):
        search(post, Structure.mlp((2, 2, 2)), "magic")
    with pytest.raises(MissingData):
        search(post, Structure.mlp((2, 2, 2)), "gradient_covariance")
    with pytest.raises(NotInLattice):
        search(post, Structure.mlp((2, 4, 2)))


def _constructed(post, target: Structure):
    """The constructive greedy's plan (no improvement) on the route the search picks."""
    from planner.criteria import criterion_function
    from planner.search.construction import construct

    found = search(post, target, work=0)
    return construct(
        post,
        target,
        found.route,
        criterion_function("posterior_ratio"),
        rng=np.random.default_rng(0),
    )


@given(search_cases(max_T=6, max_width=6, max_steps=8, rnn=False), st.booleans())
def test_every_exchange_move_is_scored_exactly(case, diagonal):
    """The exchange algebra (Schur complements on Σ_BB⁻¹, batched over a family; separable
    sums for diag) against rebuilding each moved plan and conditioning it from scratch."""
    from planner.search.construction import replay
    from planner.search.improvement import DenseEvaluator, DiagEvaluator, _pool
    from planner.search.moves import families

    net, student, seed = case
    post = full(net, seed)
    if diagonal:
        post = DiagPosterior.from_arrays(
            post.structure, {"mean": post.mean, "variance": np.diag(post.covariance).copy()}
        )
    built = _constructed(post, to_structure(student))
    fams = list(families(post.structure, built.choices))
    ev = DiagEvaluator(post, built) if diagonal else DenseEvaluator(post, built, _pool(fams))
    for fam in fams:
        costs = ev.evaluate(fam)
        for i in range(0, len(fam), max(1, len(fam) // 8)):
            close(costs[i], replay(post.structure, fam.choices(i)).cost(post))


@given(search_cases(max_T=6, max_width=6, max_steps=8, rnn=False), st.integers(0, 2**32 - 1))
def test_an_evaluator_updated_past_a_move_equals_a_new_one(case, pick):
    """The next round's evaluator by rank-k updates of P and H (``DenseEvaluator.moved``)
    scores every move of the moved plan as a new set-up does, and as rebuilding the plan;
    chained over rounds (the updates of updates), holding however many unread columns
    (in a search it sets up anew past ``_UNREAD_SHARE`` of them: then it answers None)."""
    from unittest import mock

    import planner.search.improvement as improvement
    from planner.search.construction import Built, replay
    from planner.search.improvement import DenseEvaluator, _pool
    from planner.search.moves import families

    net, student, seed = case
    post = full(net, seed)
    built = _constructed(post, to_structure(student))
    rng = np.random.default_rng(pick)
    fams = [f for f in families(post.structure, built.choices) if len(f)]
    ev = DenseEvaluator(post, built, _pool(fams))
    for _ in range(3):
        if not fams:
            return
        f = fams[int(rng.integers(len(fams)))]
        costs = ev.evaluate(f)
        if not np.isfinite(costs).any():
            return
        i = int(rng.choice(np.flatnonzero(np.isfinite(costs))))
        ch = f.choices(i)
        built = Built(replay(post.structure, ch), float(costs[i]), ch)
        fams = [g for g in families(post.structure, built.choices) if len(g)]
        pool = _pool(fams)
        if ev.E.size:  # past the share of unread columns (below 0: any): set up anew
            with mock.patch.object(improvement, "_UNREAD_SHARE", -1.0):
                assert ev.moved(built, pool, f.leave[i], f.enter[i]) is None
        with mock.patch.object(improvement, "_UNREAD_SHARE", 1.0):
            moved = ev.moved(built, pool, f.leave[i], f.enter[i])
        assert moved is not None
        fresh = DenseEvaluator(post, built, pool)
        at = moved.posB(fresh.B)
        close(moved.P[np.ix_(at, at)], fresh.P)
        for g in fams:
            got, want = moved.evaluate(g), fresh.evaluate(g)
            assert np.array_equal(np.isfinite(got), np.isfinite(want))
            ok = np.isfinite(want)
            close(got[ok], want[ok])
            j = int(np.flatnonzero(ok)[0]) if ok.any() else None
            if j is not None:
                close(got[j], replay(post.structure, g.choices(j)).cost(post))
        ev = moved


@settings(max_examples=30, deadline=None)
@given(search_cases(max_T=5, max_width=7, max_steps=8, rnn=False))
def test_exchange_rounds_from_updates_find_the_plans_new_set_ups_find(case):
    """The exchange rounds with each round's evaluator updated from the last (forced at
    any size) find plans of the cost that rounds set up anew find, and the plan's cost is
    its own (rebuilt and conditioned from scratch)."""
    from unittest import mock

    import planner.search.improvement as improvement

    net, student, seed = case
    post = full(net, seed)
    target = to_structure(student)
    with mock.patch.object(improvement, "_UPDATE_WORK", np.inf):
        anew = search(post, target, effort="thorough")
    with mock.patch.object(improvement, "_UPDATE_WORK", 0.0):
        updated = search(post, target, effort="thorough")
    close(updated.cost, anew.cost)
    close(updated.cost, updated.plan.cost(post))


@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([1, 4, 40, 70]),
    st.integers(1, 12),
    st.sampled_from([1, 2, 3, 40]),
    st.booleans(),
)
def test_leave_solver_equals_dense_solves(seed, r, n_sets, m, bad):
    """The exchange evaluator's solves against each move's ``P_RR`` (factorised once per
    distinct leaving set and solved for all of its moves together when the sets are few,
    move by move otherwise: by substitution for small orders and few columns, a LAPACK
    solve each beyond) equal dense solves with each move's own Cholesky factor; a set
    whose ``P_RR`` is not positive definite is flagged."""
    from planner.search.improvement import _LeaveSolver

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4 * n_sets + 1))
    sets = rng.integers(0, n_sets, size=n)
    blocks = [spd(rng, r) for _ in range(n_sets)]
    if bad:
        blocks[0] = -np.eye(r)
    R = np.stack([np.arange(r) + 1000 * k for k in sets])  # one index row per move
    P_RR = np.stack([blocks[k] for k in sets])
    solve, ok = _LeaveSolver.of(P_RR, R)
    assert np.array_equal(ok, ~(bad & (sets == 0)))
    M = rng.normal(size=(n, r, m))
    got = solve(M)
    for i in np.flatnonzero(ok):
        close(got[i], np.linalg.solve(np.linalg.cholesky(P_RR[i]), M[i]))


def test_a_choice_space_beyond_floats_is_searched():
    """C(3000, 1500) ≈ 10⁹⁰⁰ choices: counted as an exact integer, never as a float."""
    s = Structure.mlp((2, 3000, 2))
    rng = np.random.default_rng(0)
    post = DiagPosterior.from_arrays(
        s, {"mean": rng.normal(size=s.n_params), "variance": rng.uniform(0.5, 2, s.n_params)}
    )
    found = search(post, s.inherit((2, 1500, 2)))
    assert found.plan.student.widths == (2, 1500, 2) and not found.exhaustive
