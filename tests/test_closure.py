"""Closure contract and MPI redistribution (serial and mpiexec -n 2)."""

import logging

import numpy as np
import pytest
from mpi4py import MPI

from neuroscale_coupling.cell.laws import ThermalPhase
from neuroscale_coupling.cell.materials import ThermalMaterial
from neuroscale_coupling.cell.microstructure import circular_inclusion
from neuroscale_coupling.closure.contract import as_states
from neuroscale_coupling.closure.exact import ExactClosure
from neuroscale_coupling.fine.protocol import FineSolveError
from neuroscale_coupling.fine.spectral import SpectralSolver
from neuroscale_coupling.parallel import BlockPlan, collective_call, gather, scatter

MAT = ThermalMaterial(phases=(ThermalPhase(1.0, 0.2, 0.5), ThermalPhase(10.0, 0.1, 0.2)))


def _unbalanced_points(comm, n_first=7):
    """Rank 0 owns n_first points, the others none: the worst case for balance."""
    n = n_first if comm.rank == 0 else 0
    rng = np.random.default_rng(3)
    states = rng.uniform(-1, 1, size=(n_first, 3))[:n]
    vf = np.linspace(0.1, 0.5, n_first)[:n]
    cells = np.stack([circular_inclusion(8, v) for v in vf]) if n else np.zeros((0, 8, 8), int)
    return cells, states


def test_block_plan_balances_and_round_trips(comm):
    n_local = 10 if comm.rank == 0 else 0
    plan = BlockPlan.balanced(comm, n_local)
    total = comm.allreduce(n_local)
    assert abs(plan.n_work - total / comm.size) <= 1
    rows = np.arange(n_local * 3, dtype=np.float64).reshape(n_local, 3) + 100 * comm.rank
    work = scatter(comm, plan, rows)
    assert work.shape == (plan.n_work, 3)
    np.testing.assert_array_equal(gather(comm, plan, work * 2), rows * 2)


def test_exact_closure_equals_direct_solves_whatever_the_distribution(comm):
    cells, states = _unbalanced_points(comm)
    solver = SpectralSolver(MAT)
    closure = ExactClosure(MAT, solver, cells, comm=comm)
    closure.begin_step(0)
    result = closure.evaluate(states)
    stats = closure.end_step()
    assert result.response.shape == (states.shape[0], 2)
    assert result.tangent.shape == (states.shape[0], 2, 3)
    assert np.all(result.std == 0) and np.all(result.exact)
    if states.shape[0]:
        direct = solver.solve(cells, states)
        np.testing.assert_allclose(result.response, direct.response, rtol=1e-12)
        np.testing.assert_allclose(result.tangent, direct.tangent, rtol=1e-10, atol=1e-12)
    # Every rank worked: the block plan spread the 7 points.
    assert closure.plan.n_work >= 7 // comm.size
    assert stats.points == 7 and stats.exact_solves == 7 and stats.evaluations == 1


def test_closure_accepts_petsc_vec():
    from petsc4py import PETSc

    from neuroscale_coupling import dolfinx_env  # noqa: F401

    s = np.arange(6.0)
    vec = PETSc.Vec().createWithArray(s, comm=MPI.COMM_SELF)
    np.testing.assert_array_equal(as_states(vec, 3), s.reshape(2, 3))


def test_nan_state_raises_on_every_rank(comm):
    cells, states = _unbalanced_points(comm)
    closure = ExactClosure(MAT, SpectralSolver(MAT), cells, comm=comm)
    if comm.rank == 0:
        states[2, 1] = np.nan
    closure.begin_step(0)
    with pytest.raises(ValueError, match="NaN/Inf"):
        closure.evaluate(states)


def test_fine_failure_on_one_rank_raises_everywhere_naming_the_point(comm):
    cells, states = _unbalanced_points(comm)
    if comm.rank == 0:
        states[-1] = [1.0, 1.0, -7.0]  # 1 + αθ < 0: an ill-posed cell problem
    closure = ExactClosure(MAT, SpectralSolver(MAT), cells, comm=comm)
    closure.begin_step(0)
    with pytest.raises((FineSolveError, RuntimeError), match=r"point 6|failed on another rank"):
        closure.evaluate(states)


def test_collective_call_propagates(comm):
    def fail_on_last():
        if comm.rank == comm.size - 1:
            raise ValueError("boom")
        return 1

    with pytest.raises((ValueError, RuntimeError), match="boom"):
        collective_call(comm, fail_on_last, "test")


def test_wrong_number_of_states_is_a_clear_error(comm):
    cells, states = _unbalanced_points(comm)
    closure = ExactClosure(MAT, SpectralSolver(MAT), cells, comm=comm)
    closure.begin_step(0)
    with pytest.raises(ValueError, match="shape"):
        closure.evaluate(states[:, :2])
    # only this rank's states are short: every rank raises, none waits
    short = states[:-1] if comm.rank == 0 else states
    with pytest.raises((ValueError, RuntimeError), match=r"local points|another rank"):
        closure.evaluate(short)


def test_calls_out_of_order_name_the_missing_call(comm):
    """The host protocol is enforced: begin_step → evaluate per iterate → revise_step →
    end_step; a call out of order raises on every rank and names what is missing."""
    cells, states = _unbalanced_points(comm)
    closure = ExactClosure(MAT, SpectralSolver(MAT), cells, comm=comm)
    with pytest.raises(RuntimeError, match=r"evaluate\(\) outside a step: call begin_step"):
        closure.evaluate(states)
    with pytest.raises(RuntimeError, match=r"end_step\(\) outside a step"):
        closure.end_step()
    with pytest.raises(RuntimeError, match=r"revise_step\(\) outside a step"):
        closure.revise_step()
    closure.begin_step(0)
    with pytest.raises(RuntimeError, match=r"revise_step\(\) before any evaluate"):
        closure.revise_step()
    with pytest.raises(RuntimeError, match=r"begin_step\(1\) while step 0 is still open"):
        closure.begin_step(1)
    closure.evaluate(states)
    assert closure.revise_step() is False
    assert closure.end_step().evaluations == 1
    # a failed step is closed with abort_step and leaves no record
    closure.begin_step(1)
    closure.abort_step()
    closure.begin_step(1)
    closure.evaluate(states)
    closure.end_step()
    assert [s.step for s in closure.history] == [0, 1] and closure.totals.steps == 2


def test_history_is_a_window_and_totals_cover_the_run(comm, caplog):
    cells, states = _unbalanced_points(comm)
    closure = ExactClosure(MAT, SpectralSolver(MAT), cells, comm=comm, history_window=3)
    with caplog.at_level(logging.INFO, logger="neuroscale_coupling"):
        for k in range(5):
            closure.begin_step(k)
            closure.evaluate(states)
            closure.end_step()
    logged = [r.getMessage() for r in caplog.records if "fallback fraction" in r.getMessage()]
    assert len(logged) == (5 if comm.rank == 0 else 0), logged  # rank 0 logs each step
    assert [s.step for s in closure.history] == [2, 3, 4]
    assert closure.totals.steps == 5 and closure.totals.evaluations == 5
    assert closure.totals.point_steps == 5 * closure.n_global
    assert closure.totals.exact_solves == 5 * closure.n_global


@pytest.mark.timeout(60)
def test_cell_of_failing_on_one_rank_raises_everywhere(comm):
    """A user's cell_of that fails on the last rank only: every rank raises (no rank waits
    in the closure's collectives); a bad stack on one rank likewise."""

    def cell_of(x):
        if comm.rank == comm.size - 1:
            raise ValueError("no cell for this point")
        return np.stack([circular_inclusion(8, 0.3)] * x.shape[0])

    coords = np.random.default_rng(comm.rank).random((3, 2))
    with pytest.raises((ValueError, RuntimeError), match=r"no cell|failed on another rank"):
        ExactClosure.from_coordinates(MAT, SpectralSolver(MAT), coords, cell_of, comm=comm)
    bad = np.zeros((3, 8)) if comm.rank == 0 else np.zeros((3, 8, 8), dtype=int)
    with pytest.raises((ValueError, RuntimeError), match=r"stack|failed on another rank"):
        ExactClosure(MAT, SpectralSolver(MAT), bad, comm=comm)
