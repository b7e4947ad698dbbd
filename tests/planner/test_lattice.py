"""The lattice 𝔖_f against brute force over the reference's own rules (docs/theory.md §5)."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from planner import InvalidStructure, NotInLattice, Structure
from planner.lattice import count_sequences, enumerate_sequences, membership, routes
from tests.reference import RefNet, valid_ops
from tests.strategies import nets, ref_next, to_structure


def _key(net: RefNet):
    return (tuple(net.widths), tuple(net.acts))


def brute_sequences(teacher: RefNet, student: RefNet) -> set[tuple]:
    """Every structure-level sequence, by exhaustive search of the lattice."""
    target = _key(student)
    out: set[tuple] = set()

    def go(net: RefNet, seq: tuple) -> None:
        if _key(net) == target:
            out.add(seq)
        for kind, t in valid_ops(net):
            op = (kind, t, 0 if kind == "phi" else list(range(net.widths[t - 1])))
            go(ref_next(net, op), (*seq, (kind, t)))

    go(teacher, ())
    return out


def brute_reachable(teacher: RefNet) -> set:
    seen: dict = {}

    @cache
    def go(key):
        widths, acts = key
        net = RefNet(list(widths), list(acts), teacher.bias, teacher.rnn)
        seen[key] = net
        for kind, t in valid_ops(net):
            op = (kind, t, 0 if kind == "phi" else list(range(net.widths[t - 1])))
            go(_key(ref_next(net, op)))

    go(_key(teacher))
    return seen


@given(nets(max_T=5, max_width=3), st.data())
def test_membership_count_and_enumeration_match_brute_force(teacher, data):
    reachable = brute_reachable(teacher)
    f = to_structure(teacher)
    # a reachable student, and a random one that may not be
    key = data.draw(st.sampled_from(sorted(reachable)))
    student = reachable[key]
    g = to_structure(student)
    assert membership(f, g).member
    brute = brute_sequences(teacher, student)
    assert count_sequences(f, g) == len(brute)
    got = enumerate_sequences(f, g, limit=10_000)
    assert {tuple(s) for s in got} == brute
    assert len(got) == len(brute)

    T = data.draw(st.integers(3, teacher.T))
    widths = (
        [teacher.widths[0]]
        + [data.draw(st.integers(1, 3)) for _ in range(T - 2)]
        + [teacher.widths[-1]]
    )
    hidden = [data.draw(st.sampled_from(["identity", "relu", "tanh"])) for _ in range(T - 2)]
    other = RefNet(widths, ["identity", *hidden, teacher.acts[-1]], teacher.bias, teacher.rnn)
    m = membership(f, to_structure(other))
    assert m.member == (_key(other) in reachable)
    if not m.member:
        assert m.reason


def test_the_seeds_example_has_exactly_three_sequences():
    f, g = Structure.mlp((10, 6, 7, 10)), Structure.mlp((10, 4, 6, 10))
    assert count_sequences(f, g) == 3
    assert sorted(map(tuple, enumerate_sequences(f, g))) == sorted(
        [
            (("phi", 2), ("phi", 2), ("phi", 3)),
            (("phi", 3), ("phi", 2), ("phi", 2)),
            (("phi", 2), ("phi", 3), ("phi", 2)),
        ]
    )


def test_a_square_layer_is_removed_in_exactly_one_way():
    f, g = Structure.mlp((10, 6, 6, 10)), Structure.mlp((10, 6, 10))
    assert count_sequences(f, g) == 1
    assert enumerate_sequences(f, g) == [[("psi", 3)]]


def test_phi_only_counts_are_multinomials():
    f = Structure.mlp((784, 1024, 1024, 1024, 1024, 10))
    g = Structure.mlp((784, 1020, 1021, 1022, 1023, 10))
    # (4+3+2+1)! / (4! 3! 2! 1!)
    assert count_sequences(f, g) == 12600
    assert len(enumerate_sequences(f, g, limit=7)) == 7


@pytest.mark.parametrize(
    ("student", "words"),
    [
        (Structure.mlp((10, 200, 1)), "student position 2 (width 200)"),
        (Structure.mlp((11, 50, 1)), "input width"),
        (Structure.mlp((10, 50, 2)), "output width"),
        (Structure.mlp((10, 5, 5, 5, 1)), "more than the teacher"),
        (Structure.mlp((10, 10, 10, 1), activation="tanh"), "activation tanh"),
        (Structure.mlp((10, 10, 10, 1), bias=True), "biases"),
        (Structure.rnn((10, 10, 10, 1)), "rnn"),
    ],
)
def test_non_members_come_with_a_reason(student, words):
    teacher = Structure.mlp((10, 100, 50, 1))
    m = membership(teacher, student)
    assert not m.member
    assert words in m.reason
    with pytest.raises(NotInLattice):
        count_sequences(teacher, student)


def test_psi_on_relu_into_the_input_is_not_a_route():
    # width 5 can only come from position 3, so position 2 must merge into the input:
    # ψ(2) needs σ_2 = identity
    student = Structure.mlp((4, 5, 2))
    relu = Structure.mlp((4, 4, 5, 2))
    m = membership(relu, student)
    assert not m.member and "ψ(2) reads the input, so it needs σ_2 to be the identity" in m.reason
    lin = Structure.mlp((4, 4, 5, 2), activation=["identity", "relu"])
    assert membership(lin, student).member
    assert [r.removed_layers for r in routes(lin, student)] == [(2,)]


def test_a_student_inherits_what_it_does_not_say():
    teacher = Structure.mlp((4, 6, 5, 2), activation="tanh", output_activation="sigmoid", bias=True)
    student = teacher.inherit((4, 3, 2))
    assert student.activations == ("tanh", "sigmoid") and student.bias
    mixed = Structure.mlp((4, 6, 5, 2), activation=["identity", "relu"])
    assert mixed.inherit((4, 3, 3, 2)).activations == ("identity", "relu", "identity")
    with pytest.raises(InvalidStructure, match="explicitly"):
        mixed.inherit((4, 3, 2))
    assert mixed.inherit((4, 3, 2), activation="relu").activations == ("relu", "identity")


def test_counting_refuses_past_its_state_budget():
    from planner import TooLarge
    from planner.lattice import count_sequences

    f, g = Structure.mlp((4, 30, 30, 30, 2)), Structure.mlp((4, 5, 2))
    assert count_sequences(f, g) > 0
    with pytest.raises(TooLarge):
        count_sequences(f, g, max_states=10)
