"""One-pass plans against the slow step-by-step reference (docs/theory.md §3, §4)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from planner import (
    DiagPosterior,
    FullPosterior,
    InvalidOperation,
    InvalidPlan,
    Phi,
    Plan,
    Psi,
    SingularConstraint,
    Structure,
)
from tests.helpers import close
from tests.reference import RefNet, ref_apply
from tests.strategies import cases, spd, to_ops, to_structure


@given(cases())
def test_one_pass_equals_step_by_step(case):
    net, ops, mean, cov = case
    teacher = to_structure(net)
    post = FullPosterior.from_dense(teacher, mean, cov)
    plan = Plan(teacher, to_ops(ops))
    out = plan.apply(post)

    ref_net, ref_mean, ref_cov, step_costs = ref_apply(net, mean, cov, ops)
    assert plan.student == to_structure(ref_net)
    assert out.structure == plan.student
    assert out.n == plan.student.n_params == len(ref_mean)
    close(out.mean, ref_mean)
    close(out.covariance, ref_cov)
    # the joint Mahalanobis cost is the sum of the step costs (chain rule)
    close(plan.cost(post), sum(step_costs))


@given(cases())
def test_compiled_sets_partition_the_teacher(case):
    net, ops, _, _ = case
    c = Plan(to_structure(net), to_ops(ops)).compiled
    every = np.concatenate([c.conditioned, c.marginalised, c.kept])
    assert np.array_equal(np.sort(every), np.arange(c.teacher.n_params))
    assert c.targets.shape == c.conditioned.shape


@given(cases())
def test_diag_equals_full_on_a_diagonal_covariance(case):
    net, ops, mean, cov = case
    teacher = to_structure(net)
    var = np.diag(cov).copy()
    plan = Plan(teacher, to_ops(ops))
    d = plan.apply(DiagPosterior.from_arrays(teacher, {"mean": mean, "variance": var}))
    f = plan.apply(FullPosterior.from_dense(teacher, mean, np.diag(var)))
    close(d.mean, f.mean)
    close(np.diag(d.var), f.covariance)
    close(
        plan.cost(DiagPosterior.from_arrays(teacher, {"mean": mean, "variance": var})),
        plan.cost(FullPosterior.from_dense(teacher, mean, np.diag(var))),
    )


def test_provenance_names_surviving_teacher_neurons():
    teacher = Structure.mlp((3, 4, 3, 2))
    plan = Plan(teacher, (Phi(2, 1), Psi(3, (1, 0, 2))))
    prov = plan.compiled.provenance
    assert [p.teacher_position for p in prov] == [1, 2, 4]
    assert prov[1].teacher_neurons == (0, 2, 3)
    assert prov[2].teacher_neurons == (0, 1)


def test_the_seeds_three_sequences_give_three_priors():
    teacher = Structure.mlp((10, 6, 7, 10))
    rng = np.random.default_rng(1)
    p = teacher.n_params
    post = FullPosterior.from_dense(teacher, rng.normal(size=p), spd(rng, p))
    seqs = [
        (Phi(2, 0), Phi(2, 0), Phi(3, 0)),
        (Phi(3, 0), Phi(2, 0), Phi(2, 0)),
        (Phi(2, 0), Phi(3, 0), Phi(2, 0)),
    ]
    priors = [Plan(teacher, s).apply(post) for s in seqs]
    assert all(pr.structure.widths == (10, 4, 6, 10) for pr in priors)
    for a in range(3):
        for b in range(a + 1, 3):
            assert not np.allclose(priors[a].mean, priors[b].mean)
            assert not np.allclose(priors[a].covariance, priors[b].covariance)


@given(
    st.integers(0, 2**32 - 1),
    st.booleans(),
    st.booleans(),
    st.integers(1, 3),
    st.integers(1, 3),
)
def test_deeper_first_never_costs_more(seed, bias, rnn, d2, d3):
    widths = (3, 4, 4, 2)
    net = RefNet(list(widths), ["identity", "tanh", "tanh", "identity"], bias, rnn)
    teacher = to_structure(net)
    rng = np.random.default_rng(seed)
    p = teacher.n_params
    post = FullPosterior.from_dense(teacher, rng.normal(size=p), spd(rng, p))
    # remove teacher neurons in descending order, so current index == teacher index
    r2 = sorted(rng.choice(4, d2, replace=False), reverse=True)
    r3 = sorted(rng.choice(4, d3, replace=False), reverse=True)
    shallow = [Phi(2, int(i)) for i in r2] + [Phi(3, int(i)) for i in r3]
    deep = [Phi(3, int(i)) for i in r3] + [Phi(2, int(i)) for i in r2]
    c_deep, c_shallow = Plan(teacher, deep).cost(post), Plan(teacher, shallow).cost(post)
    assert c_deep <= c_shallow * (1 + 1e-12) + 1e-12


@pytest.mark.parametrize(
    ("widths", "ops", "field", "words"),
    [
        ((3, 4, 2), [Phi(1, 0)], "ops[0].layer", "the input"),
        ((3, 4, 2), [Phi(3, 0)], "ops[0].layer", "the output"),
        ((3, 4, 2), [Phi(2, 4)], "ops[0].neuron", "does not exist"),
        ((3, 1, 2), [Phi(2, 0)], "ops[0].layer", "empty"),
        ((3, 4, 4, 2), [Psi(3, (0, 0, 1, 2))], "ops[0].pairing", "permutation"),
        ((3, 4, 5, 2), [Psi(3)], "ops[0].layer", "square"),
        ((3, 3, 2), [Psi(2)], "ops[0].layer", "no hidden"),
        ((3, 3, 3, 2), [Psi(2)], "ops[0].layer", "identity at position 2"),
        ((3, 4, 4, 4), [Psi(9)], "ops[0].layer", "does not exist"),
    ],
)
def test_invalid_operations_name_the_rule(widths, ops, field, words):
    with pytest.raises(InvalidOperation) as err:
        Plan(Structure.mlp(widths), ops)
    assert err.value.field == field
    assert words in err.value.reason


def test_psi_activation_rules():
    tanh = Structure.mlp((3, 4, 4, 2), activation="tanh")
    with pytest.raises(InvalidOperation, match="idempotent"):
        Plan(tanh, [Psi(3)])
    mixed = Structure.mlp((3, 4, 4, 2), activation=["identity", "relu"])
    with pytest.raises(InvalidOperation, match="equal to σ_2"):
        Plan(mixed, [Psi(3)])
    rnn = Structure.rnn((3, 2, 2, 2), activation="relu", output_activation="identity")
    with pytest.raises(InvalidOperation, match="recurrent"):
        Plan(rnn, [Psi(4)])
    # valid: relu after relu; an identity output after relu (the output becomes relu)
    relu = Structure.mlp((3, 4, 4, 4))
    assert Plan(relu, [Psi(3)]).student.activations == ("relu", "identity")
    assert Plan(relu, [Psi(4)]).student.activations == ("relu", "relu")


def test_singular_constraint_is_refused_not_nan():
    teacher = Structure.mlp((2, 2, 1))
    p = teacher.n_params
    cov = np.eye(p)
    # U_3 column 0 perfectly correlated with U_3 column 1 -> together singular
    cov[4, 5] = cov[5, 4] = 1.0 - 1e-17
    cov[4, 4] = cov[5, 5] = 1.0
    cov[np.diag_indices(p)] += np.r_[np.zeros(4), 0.0, 0.0]
    post = FullPosterior(teacher, np.ones(p), cov)
    plan = Plan(teacher, (Phi(2, 0),))  # conditions only U_3[:, 0]: fine
    assert np.isfinite(plan.cost(post))
    with pytest.raises(SingularConstraint):
        post.constraint_cost(np.array([4, 5]), np.zeros(2))


def test_a_posterior_of_another_teacher_is_refused():
    plan = Plan(Structure.mlp((2, 3, 1)), (Phi(2, 0),))
    other = Structure.mlp((2, 4, 1))
    post = DiagPosterior.from_arrays(
        other, {"mean": np.zeros(other.n_params), "variance": np.ones(other.n_params)}
    )
    with pytest.raises(InvalidPlan):
        plan.apply(post)


@st.composite
def phi_runs(draw):
    """An RNN/MLP with a run of φ at one position, then more steps: batched runs vs steps."""
    rnn, bias = draw(st.booleans()), draw(st.booleans())
    widths = [draw(st.integers(1, 3)), draw(st.integers(3, 5)), draw(st.integers(3, 4)), 2]
    net = RefNet(widths, ["identity", "tanh", "relu", "identity"], bias, rnn)
    t = draw(st.sampled_from([2, 3]))
    ops = []
    for _ in range(draw(st.integers(2, widths[t - 1] - 1))):
        ops.append(("phi", t, draw(st.integers(0, widths[t - 1] - 1 - len(ops)))))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = len(net.params())
    return net, ops, rng.normal(size=p), spd(rng, p)


@given(phi_runs())
def test_runs_of_phi_equal_single_steps(case):
    net, ops, mean, cov = case
    teacher = to_structure(net)
    post = FullPosterior.from_dense(teacher, mean, cov)
    plan = Plan(teacher, to_ops(ops))
    _, ref_mean, ref_cov, costs = ref_apply(net, mean, cov, ops)
    out = plan.apply(post)
    close(out.mean, ref_mean)
    close(out.covariance, ref_cov)
    close(plan.cost(post), sum(costs))


def test_a_bad_step_inside_a_run_is_named():
    teacher = Structure.mlp((3, 4, 2))
    with pytest.raises(InvalidOperation) as err:
        Plan(teacher, (Phi(2, 0), Phi(2, 0), Phi(2, 5)))
    assert err.value.field == "ops[2].neuron"
    with pytest.raises(InvalidOperation) as err:
        Plan(teacher, (Phi(2, 0), Phi(2, 0), Phi(2, 0), Phi(2, 0)))
    assert err.value.field == "ops[3].layer"


@given(cases())
def test_step_costs_are_the_step_by_step_costs_of_each_run(case):
    """The cost each run adds (the plan page's chart) is the sum of the reference's
    per-step costs over that run's ops, and the runs' costs sum to the plan's."""
    from planner import step_costs

    net, ops, mean, cov = case
    teacher = to_structure(net)
    post = FullPosterior.from_dense(teacher, mean, cov)
    plan = Plan(teacher, to_ops(ops))
    *_, ref_costs = ref_apply(net, mean, cov, ops)
    runs = step_costs(plan, post)
    assert sum(r["count"] for r in runs) == len(ops)
    for r in runs:
        close(r["cost"], sum(ref_costs[r["first"] : r["first"] + r["count"]]))
        assert r["op"] == ops[r["first"]][0] and r["layer"] == ops[r["first"]][1]
    close(sum(r["cost"] for r in runs), plan.cost(post))
