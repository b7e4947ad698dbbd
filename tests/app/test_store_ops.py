"""Plans are stored compactly: their ops packed in the database, the same public form read
back, rows written before the packing still read."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from app.store import pack_ops, unpack_ops

phi = st.builds(
    lambda t, i: {"op": "phi", "layer": t, "neuron": i}, st.integers(2, 9), st.integers(0, 999)
)
psi = st.one_of(
    st.builds(lambda t: {"op": "psi", "layer": t}, st.integers(2, 9)),
    st.builds(
        lambda t, pi: {"op": "psi", "layer": t, "pairing": pi},
        st.integers(2, 9),
        st.permutations(list(range(5))),
    ),
)


@given(st.lists(st.one_of(phi, psi), max_size=40))
def test_packed_ops_read_back_as_given(ops):
    packed = json.loads(json.dumps(pack_ops(ops)))  # through the database's JSON
    assert unpack_ops(packed) == ops
    assert unpack_ops(ops) == ops  # a row written before packing


def test_packing_is_several_times_smaller():
    ops = [{"op": "phi", "layer": 2, "neuron": i % 100} for i in range(10_000)]
    assert len(json.dumps(pack_ops(ops))) * 4 < len(json.dumps(ops))
