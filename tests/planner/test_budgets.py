"""Students by budget (docs/theory.md §11): never above the budget, never above the greedy of
exact increments that stops at it (the independent reference), deterministic, and MLPs agree
with the same network written as stages."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner import FullPosterior, InvalidPlan, Network, NotInLattice, Structure
from planner.search import search_budget
from planner.search.budgets import params_for
from tests.helpers import close
from tests.planner.test_networks import network_json
from tests.reference_networks import ref_budget_greedy
from tests.strategies import spd


@settings(max_examples=30, deadline=None)
@given(network_json(), st.floats(0.5, 0.95), st.integers(0, 2**32 - 1))
def test_a_network_by_budget_fits_and_is_no_worse_than_the_greedy_that_stops_there(d, keep, seed):
    net = Network.from_json(d)
    rng = np.random.default_rng(seed)
    p = net.n_params
    mean, cov = rng.normal(size=p), spd(rng, p)
    post = FullPosterior.from_dense(net, mean, cov)
    budget = params_for(net, keep=keep)
    ref_cost, ref_params = ref_budget_greedy(net.to_json(), budget, mean, cov)
    try:
        found = search_budget(post, budget)
    except NotInLattice:  # the reference could not fit it either
        assert ref_params > budget
        return
    assert found.plan.student.n_params <= budget
    assert found.cost <= ref_cost + 1e-9 * max(1.0, ref_cost)
    close(found.cost, found.plan.cost(post))
    again = search_budget(post, budget)
    assert again.plan.ops == found.plan.ops


@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.integers(1, 4), min_size=3, max_size=4),
    st.booleans(),
    st.floats(0.4, 0.9),
    st.integers(0, 2**32 - 1),
)
def test_an_mlp_by_budget_matches_the_same_network_written_as_stages(widths, bias, keep, seed):
    s = Structure.mlp(widths, bias=bias)
    d = {
        "input": [widths[0]],
        "stages": [
            {"type": "linear", "out": w, "bias": bias, "activation": "relu"} for w in widths[1:-1]
        ]
        + [{"type": "linear", "out": widths[-1], "bias": bias}],
    }
    assert Network.from_json(d).n_params == s.n_params  # the same layout
    rng = np.random.default_rng(seed)
    p = s.n_params
    mean, cov = rng.normal(size=p), spd(rng, p)
    budget = params_for(s, keep=keep)
    ref_cost, ref_params = ref_budget_greedy(d, budget, mean, cov)
    try:
        found = search_budget(FullPosterior.from_dense(s, mean, cov), budget)
    except NotInLattice:
        assert ref_params > budget
        return
    assert found.plan.student.n_params <= budget
    assert found.cost <= ref_cost + 1e-9 * max(1.0, ref_cost)


def test_floors_are_kept_and_bad_budgets_say_which_field():
    s = Structure.mlp((6, 30, 20, 8))
    rng = np.random.default_rng(0)
    post = FullPosterior.from_dense(s, rng.normal(size=s.n_params), spd(rng, s.n_params))
    found = search_budget(post, s.n_params // 2, floors={3: 15})
    assert found.plan.student.width(3) >= 15 and found.plan.student.n_params <= s.n_params // 2
    with pytest.raises(NotInLattice, match="smallest the floors allow"):
        search_budget(post, 100, floors={2: 30, 3: 20})
    for kwargs, field in [
        ({"keep": 1.5}, "budget.keep"),
        ({}, "budget"),
        ({"max_params": 0}, "budget.max_params"),
    ]:
        with pytest.raises(InvalidPlan) as exc:
            params_for(s, **kwargs)
        assert exc.value.field == field
