"""Laws of the distributed runner's layer assignment (greedy longest-processing-time bin packing)."""

import itertools

import pytest

pytest.importorskip("hypothesis")

from hypothesis import example, given
from hypothesis import strategies as st

from cq.distributed import assign_layers

costs_st = st.lists(st.integers(1, 10 ** 6).map(float), max_size=8)


def makespan(costs, owner, world):
    loads = [0.0] * world
    for c, r in zip(costs, owner):
        loads[r] += c
    return max(loads)


def optimum(costs, world):
    """The best makespan by brute force (small instances only)."""
    return min((makespan(costs, o, world) for o in itertools.product(range(world), repeat=len(costs))),
               default=0.0)


@given(costs_st, st.integers(1, 3))
@example([3.0, 3.0, 2.0, 2.0, 2.0], 2)  # LPT's classic worst case: 7 vs the optimum 6
@example([], 2)
def test_lpt_is_within_graham_bound_of_the_optimum(costs, world):
    owner = assign_layers(costs, world)
    assert len(owner) == len(costs) and all(0 <= r < world for r in owner)
    # Graham (1969): LPT's makespan <= (4/3 - 1/(3m)) OPT.
    assert makespan(costs, owner, world) <= (4 / 3 - 1 / (3 * world)) * optimum(costs, world) + 1e-9


@given(costs_st, st.integers(1, 4))
def test_assignment_is_a_function_of_costs_and_world(costs, world):
    """Every rank computes the plan alone: the answer cannot depend on anything else."""
    assert assign_layers(list(costs), world) == assign_layers(tuple(costs), world)
    if world == 1:
        assert set(assign_layers(costs, 1)) <= {0}
