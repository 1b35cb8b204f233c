"""Shared test setup. The suite runs serially and under ``mpiexec -n 2``: every rank runs
every test; tests that compare ranks use ``comm`` (MPI.COMM_WORLD)."""

import os

import numpy as np
import pytest
from mpi4py import MPI

if MPI.COMM_WORLD.size > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def comm() -> MPI.Comm:
    return MPI.COMM_WORLD


def assert_same_on_all_ranks(comm: MPI.Comm, array: np.ndarray) -> None:
    """Every rank holds bitwise the same array."""
    arrays = comm.allgather(np.asarray(array))
    for a in arrays[1:]:
        np.testing.assert_array_equal(a, arrays[0])


def evaluate_step(closure, states, step: int = 0):
    """One closure step at fixed states (the host protocol of a host without a Newton
    solve): begin_step, evaluate, and evaluate again while revise_step asks for it (the
    state tests apply at converged states), end_step; returns the last ClosureResult."""
    closure.begin_step(step)
    result = closure.evaluate(states)
    while closure.revise_step():
        result = closure.evaluate(states)
    closure.end_step()
    return result
