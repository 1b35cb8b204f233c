"""Surrogate closure: answers equal the surrogate where no test fires and the fine solver
where one does; the decision is fixed through a step and revised only on request; fallback
work is balanced over the ranks and gives the same answers on any distribution; the family
distance is zero for training cells under every symmetry; bad input is refused clearly."""

import logging
import math

import numpy as np
import pytest
import torch
from mpi4py import MPI

pytest.importorskip("dolfinx_solver")

from conftest import assert_same_on_all_ranks, evaluate_step
from surrogate_cases import tiny_surrogate

from neuroscale_coupling.cell.laws import ThermalPhase
from neuroscale_coupling.cell.materials import ThermalMaterial
from neuroscale_coupling.cell.microstructure import checkerboard, laminate
from neuroscale_coupling.cell.symmetry import D4, transform_image
from neuroscale_coupling.closure.exact import ExactClosure
from neuroscale_coupling.closure.fallback import FallbackPolicy, fallback_reasons
from neuroscale_coupling.closure.surrogate_closure import SurrogateClosure
from neuroscale_coupling.fine.fem import FESolver

OFF = FallbackPolicy(std_rel=math.inf, domain_tol=math.inf, family_threshold=math.inf)


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """The tiny model as trained (float32)."""
    return tiny_surrogate(tmp_path_factory.mktemp("sc"))


@pytest.fixture(scope="module")
def tiny(tiny32):
    """A float64 copy: the closure decodes in float64, so its answers equal predict's."""
    sur, data = tiny32
    return sur.to(dtype=torch.float64), data


def _points(data, n, seed=0):
    """n (image, state) pairs: cells of the dataset, fresh states in the domain."""
    rng = np.random.default_rng(seed)
    cells = data.images[rng.integers(0, data.n_cells, size=n)].astype(np.int64)
    states = data.spec.domain.sample(n, seed=seed + 1)
    return cells, states


def _local(comm, rows):
    """This rank's block of rows (n, …)."""
    return np.array_split(rows, comm.size)[comm.rank]


def test_no_fallback_equals_the_surrogate(tiny, comm):
    sur, data = tiny
    cells, states = _points(data, 24)
    closure = SurrogateClosure(
        sur, FESolver(sur.material), _local(comm, cells), comm=comm, policy=OFF
    )
    closure.begin_step(0)
    res = closure.evaluate(_local(comm, states))
    pred = sur.predict(_local(comm, cells), _local(comm, states))
    q, t, s = pred.response, pred.tangent, pred.std
    np.testing.assert_allclose(res.response, q, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(res.tangent, t, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(res.std, s, rtol=1e-12, atol=1e-14)
    assert not res.exact.any()
    stats = closure.end_step()
    assert stats.exact_solves == 0 and stats.fallbacks == dict.fromkeys(stats.fallbacks, 0)
    assert stats.max_std == pytest.approx(comm.allreduce(float(s.max(initial=0)), op=MPI.MAX))
    # per symmetry class std factors reach the closure's std as they reach predict's
    own = closure.surrogate  # the closure's copy: changing it leaves the caller's model alone
    own.model.set_interval_multipliers(
        own.model.interval_table.double().numpy(), [3.0, 1.5, 2.0, 0.25]
    )
    res = evaluate_step(closure, _local(comm, states), 1)
    s2 = own.predict(_local(comm, cells), _local(comm, states)).std
    np.testing.assert_allclose(res.std, s2, rtol=1e-12, atol=1e-14)
    if s2.size:
        assert not np.allclose(s2, s)
    np.testing.assert_array_equal(sur.predict(_local(comm, cells), _local(comm, states)).std, s)


def test_closure_leaves_the_callers_model_as_it_is(tiny32, comm):
    """The closure decodes with its own float64 CPU copy of the model."""
    sur, data = tiny32
    cells, states = _points(data, 6)
    before = {k: v.clone() for k, v in sur.model.state_dict().items()}
    closure = SurrogateClosure(sur, FESolver(sur.material), _local(comm, cells), comm=comm)
    evaluate_step(closure, _local(comm, states))
    assert closure.surrogate.model.state_scale.dtype == torch.float64
    assert closure.surrogate.model is not sur.model
    for k, v in sur.model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


def test_all_fallback_equals_the_exact_closure_on_any_distribution(tiny, comm):
    """std_abs = 0: every point is solved exactly; the answer equals ExactClosure and the
    serial (COMM_SELF) run to round-off, whatever the ranks own (rank 0 may own all)."""
    sur, data = tiny
    cells, states = _points(data, 10, seed=4)
    solver = FESolver(sur.material)
    everything = FallbackPolicy(std_abs=0.0, std_rel=math.inf, family_threshold=math.inf)
    serial = SurrogateClosure(sur, solver, cells, comm=MPI.COMM_SELF, policy=everything)
    ref = evaluate_step(serial, states)
    exact = evaluate_step(ExactClosure(sur.material, solver, cells, comm=MPI.COMM_SELF), states)
    np.testing.assert_allclose(ref.response, exact.response, rtol=1e-12)
    np.testing.assert_allclose(ref.tangent, exact.tangent, rtol=1e-12, atol=1e-13)
    assert ref.exact.all() and not ref.std.any()
    # all points on rank 0, none elsewhere: the fallback work is still split evenly
    mine = slice(None) if comm.rank == 0 else slice(0, 0)
    closure = SurrogateClosure(sur, solver, cells[mine], comm=comm, policy=everything)
    closure.begin_step(0)
    closure.evaluate(states[mine])  # the state tests wait for the converged states
    assert closure.revise_step()
    res = closure.evaluate(states[mine])
    np.testing.assert_allclose(res.response, ref.response[mine], rtol=1e-12)
    np.testing.assert_allclose(res.tangent, ref.tangent[mine], rtol=1e-12, atol=1e-13)
    work = comm.allgather(closure._plan.n_work)
    assert max(work) - min(work) <= 1 and sum(work) == 10
    stats = closure.end_step()
    assert stats.fallbacks["uncertainty"] == 10 and stats.exact_solves == 10


def test_domain_fallback_marks_exactly_the_points_outside(tiny, comm, caplog):
    sur, data = tiny
    cells, states = _points(data, 12, seed=7)
    states[::3, 0] = 2.5  # G1 beyond the box [-2, 2]
    policy = FallbackPolicy(std_rel=math.inf, family_threshold=math.inf)
    solver = FESolver(sur.material)
    closure = SurrogateClosure(sur, solver, _local(comm, cells), comm=comm, policy=policy)
    closure.begin_step(0)
    first = closure.evaluate(_local(comm, states))
    assert not first.exact.any()  # an iterate: the state tests wait for convergence
    with caplog.at_level(logging.WARNING, logger="neuroscale_coupling"):
        assert closure.revise_step()
    res = closure.evaluate(_local(comm, states))
    # a third of the points outside the box: a WARNING (rank 0) says why and what to check
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if comm.rank == 0:
        assert len(warned) == 1 and "outside the trained domain" in warned[0], warned
        assert "units" in warned[0] and "2.5" in warned[0], warned[0]
    else:
        assert not warned
    outside = _local(comm, np.arange(12) % 3 == 0)
    np.testing.assert_array_equal(res.exact, outside)
    ref = solver.solve(_local(comm, cells)[outside], _local(comm, states)[outside])
    np.testing.assert_allclose(res.response[outside], ref.response, rtol=1e-12)
    q = sur.predict(_local(comm, cells), _local(comm, states)).response
    np.testing.assert_allclose(res.response[~outside], q[~outside], rtol=1e-12)
    assert closure.end_step().fallbacks == {"domain": 4, "family": 0, "uncertainty": 0}


def test_beyond_the_box_a_c1_expansion_with_a_consistent_tangent(tiny, comm):
    """Beyond the training box the closure answers Q(p) + T(p)(s - p) from the nearest
    state p of the box: continuous and C¹ across the box's face, its tangent the central
    difference of its response (also where only some components are clipped), its std
    growing from the model's at p."""
    sur, data = tiny
    box = sur.domain
    cells, states = _points(data, 6, seed=3)
    cells[:], states[:] = cells[0], states[0]  # one cell and state, G1 moved out
    states[:, 0] = box.upper[0] + np.array([0.0, 1e-7, 0.05, 0.3, 1.0, 20.0])  # G1 beyond
    states[4, 2] = box.upper[2] + 0.2  # G1 and theta beyond
    closure = SurrogateClosure(
        sur, FESolver(sur.material), _local(comm, cells), comm=comm, policy=OFF
    )
    closure.begin_step(0)
    res = closure.evaluate(_local(comm, states))
    inside = sur.predict(_local(comm, cells), np.clip(_local(comm, states), box.lower, box.upper))
    e = _local(comm, states) - np.clip(_local(comm, states), box.lower, box.upper)
    np.testing.assert_allclose(
        res.response, inside.response + np.einsum("nrd,nd->nr", inside.tangent, e), rtol=1e-12
    )
    # rows 0 and 1 straddle the face: value and tangent continuous, std as at p
    first = np.flatnonzero(np.arange(6) < 2)
    mine = np.array_split(np.arange(6), comm.size)[comm.rank]
    at_face = [i for i, g in enumerate(mine) if g in first]
    if len(at_face) == 2:
        np.testing.assert_allclose(res.tangent[at_face[1]], res.tangent[at_face[0]], rtol=1e-5)
    std_p = inside.std
    assert np.all(np.linalg.norm(res.std, axis=1) >= np.linalg.norm(std_p, axis=1) - 1e-15)
    grow = [i for i, g in enumerate(mine) if g in (2, 3)]
    if len(grow) == 2:
        assert np.linalg.norm(res.std[grow[1]]) > np.linalg.norm(res.std[grow[0]])
    # consistent tangent: central differences of the closure's own response
    h = 1e-6
    fd = np.zeros_like(res.tangent)
    for j in range(states.shape[1]):
        step = np.zeros(states.shape[1])
        step[j] = h
        up = closure.evaluate(_local(comm, states + step)).response
        down = closure.evaluate(_local(comm, states - step)).response
        fd[:, :, j] = (up - down) / (2 * h)
    scale = np.abs(res.tangent).max(initial=1.0)
    np.testing.assert_allclose(res.tangent, fd, atol=2e-5 * scale)
    closure.end_step()


def test_decision_is_fixed_in_a_step_and_revised_on_request(tiny, comm):
    sur, data = tiny
    cells, states = _points(data, 8, seed=9)
    policy = FallbackPolicy(std_rel=math.inf, family_threshold=math.inf)
    closure = SurrogateClosure(
        sur, FESolver(sur.material), _local(comm, cells), comm=comm, policy=policy
    )
    closure.begin_step(0)
    assert not closure.evaluate(_local(comm, states)).exact.any()
    moved = states.copy()
    moved[:, 1] = -3.0  # every state now outside: the step's decision still holds
    assert not closure.evaluate(_local(comm, moved)).exact.any()
    assert closure.revise_step() is True  # the converged states are outside: solve again
    assert closure.evaluate(_local(comm, moved)).exact.all()
    assert closure.revise_step() is False
    stats = closure.end_step()
    assert stats.revisions == 1 and stats.fallbacks["domain"] == 8
    closure.begin_step(1)  # a new step decides afresh
    assert not closure.evaluate(_local(comm, states)).exact.any()
    closure.end_step()


def test_family_ratio_marks_foreign_cells_and_inflates_their_std(tiny, comm):
    """The family ratio is at most 1 for 99 % of the training cells (its unit is the 99th
    percentile of their leave-one-out distances); a threshold below the foreign cells'
    ratios sends exactly those to the fine solver; the predicted std grows with the ratio
    beyond 1."""
    sur, data = tiny
    # the family was fitted on the training cells under the 8 symmetries of the square
    train = sur.training_images.astype(np.int64)
    train_images = np.concatenate([transform_image(train, r) for r in D4])
    n = train_images.shape[-1]
    foreign = np.stack([checkerboard(n, 2), laminate(n, 0.5), laminate(n, 0.25)])
    cells = np.concatenate([train_images, foreign.astype(np.int64)])
    measure = FallbackPolicy(std_rel=math.inf, family_threshold=1e9)
    solver = FESolver(sur.material)
    ratio = SurrogateClosure(sur, solver, cells, comm=MPI.COMM_SELF, policy=measure).family_ratio
    assert_same_on_all_ranks(comm, ratio)
    inside = ratio[: train_images.shape[0]]
    # (fitted on float32 latents, evaluated in float64: agreement to ~1e-4)
    assert np.mean(inside <= 1 + 1e-3) >= 0.99 - 1.0 / inside.size, inside
    # (a family of a few 8×8 disks has a wide leave-one-out unit: foreign cells lie beyond
    # every training cell, not necessarily beyond 1)
    cut = float(inside.max())
    policy = FallbackPolicy(std_rel=math.inf, family_threshold=cut)
    states = data.spec.domain.sample(cells.shape[0], seed=3)
    res = evaluate_step(
        SurrogateClosure(sur, solver, cells, comm=MPI.COMM_SELF, policy=policy), states
    )
    np.testing.assert_array_equal(res.exact, ratio > cut)
    assert res.exact[-3:].all(), (ratio[-3:], cut)  # laminates and checkerboard are foreign
    # the std's family term: √(calibrated² + (gain · (ρ − 1)₊ · ‖Q‖)²)
    std = sur.predict(cells, states).std
    with_family = np.linalg.norm(std, axis=1)
    sur.model.family_gain.zero_()
    try:
        base = sur.predict(cells, states).std
    finally:
        sur.model.family_gain.fill_(1.0)
    q = sur.predict(cells, states).response
    excess = np.maximum(ratio - 1, 0) * np.linalg.norm(q, axis=1)
    np.testing.assert_allclose(
        with_family**2, np.linalg.norm(base, axis=1) ** 2 + 2 * excess**2, rtol=1e-5, atol=1e-12
    )


def test_fallback_reasons_priority_and_relative_tolerance():
    reason = fallback_reasons(
        FallbackPolicy(std_rel=0.1, rel_floor=0.5, family_threshold=1.0),
        domain_distance=np.array([0.0, 0.2, 0.0, 0.0, 0.0]),
        family_ratio=np.array([0.5, 2.0, 2.0, 0.5, 0.5]),
        response=np.array([[10.0, 0], [1, 0], [1, 0], [10.0, 0], [0.0, 0]]),
        std=np.array([[0.5, 0], [0, 0], [0, 0], [1.5, 0], [0.4, 0]]),
        response_rms=[1.0, 0.0],
    )
    # std 0.5 < 0.1·10; domain beats family; family; 1.5 > 0.1·10; floor 0.5: 0.4 > 0.05
    np.testing.assert_array_equal(reason, [0, 1, 2, 3, 3])


def test_nan_never_passes_a_fallback_test():
    """A NaN distance, family ratio, response or std names a reason: a NaN compares False."""
    nan = math.nan
    reason = fallback_reasons(
        FallbackPolicy(),
        domain_distance=np.array([nan, 0.0, 0.0, 0.0, 0.0]),
        family_ratio=np.array([0.5, nan, 0.5, 0.5, 0.5]),
        response=np.array([[1.0, 0], [1, 0], [nan, 0], [1, 0], [1, 0]]),
        std=np.array([[0.0, 0], [0, 0], [0, 0], [0, nan], [0, 0]]),
        response_rms=[1.0, 1.0],
    )
    np.testing.assert_array_equal(reason, [1, 2, 3, 3, 0])


def test_a_model_with_a_nan_weight_on_one_rank_falls_back_there(tiny, comm):
    """The last rank's closure decodes with a NaN weight: its points are solved exactly
    (exact=True, finite answers equal to the exact closure's), the others' are not."""
    sur, data = tiny
    cells, states = _points(data, 8, seed=5)
    cells, states = _local(comm, cells), _local(comm, states)
    # every test off: only the non-finite prediction may send a point to the fine solver
    closure = SurrogateClosure(sur, FESolver(sur.material), cells, comm=comm, policy=OFF)
    poisoned = comm.rank == comm.size - 1
    if poisoned:
        with torch.no_grad():
            next(closure.surrogate.model.decoder.parameters()).view(-1)[0] = math.nan
    res = evaluate_step(closure, states)
    ref = evaluate_step(
        ExactClosure(sur.material, FESolver(sur.material), cells, comm=comm), states
    )
    assert np.all(np.isfinite(res.response)) and np.all(np.isfinite(res.tangent))
    assert res.exact.all() if poisoned else not res.exact.any()
    if poisoned:
        np.testing.assert_allclose(res.response, ref.response, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(res.tangent, ref.tangent, rtol=1e-12, atol=1e-14)


def test_bad_input_is_refused(tiny, comm):
    sur, data = tiny
    cells, _ = _points(data, 2)
    other = FESolver(ThermalMaterial(phases=(ThermalPhase(1.0), ThermalPhase(5.0))))
    with pytest.raises(ValueError, match="differs from the model"):
        SurrogateClosure(sur, other, cells, comm=MPI.COMM_SELF, policy=OFF)
    with pytest.raises(ValueError, match=r"reads \(8, 8\) images"):
        SurrogateClosure(
            sur, FESolver(sur.material), np.zeros((2, 16, 16), int), comm=MPI.COMM_SELF, policy=OFF
        )
    with pytest.raises(ValueError, match="std_rel"):
        FallbackPolicy(std_rel=-1.0)


def test_petsc_vec_states_in_and_out_without_warnings(tiny, comm):
    """A host on petsc4py passes its states as a Vec and takes the answer into Vecs: the
    same numbers as with arrays, and no warning (a read-only Vec view once made torch
    warn)."""
    import warnings

    from mpi4py import MPI as _MPI  # petsc4py needs the MPI library loaded first

    PETSc = pytest.importorskip("petsc4py.PETSc")
    sur, data = tiny
    cells, states = _points(data, 10, seed=2)
    mine, local = _local(comm, cells), _local(comm, states)
    closure = SurrogateClosure(sur, FESolver(sur.material), mine, comm=comm, policy=OFF)
    ref = evaluate_step(closure, local, 0)
    vec = PETSc.Vec().createWithArray(local.reshape(-1).copy(), comm=_MPI.COMM_SELF)
    response = PETSc.Vec().createSeq(local.shape[0] * 2, comm=_MPI.COMM_SELF)
    tangent = PETSc.Vec().createSeq(local.shape[0] * 6, comm=_MPI.COMM_SELF)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = evaluate_step(closure, vec, 1)
        res.write_to(response=response, tangent=tangent)
    np.testing.assert_array_equal(res.response, ref.response)
    np.testing.assert_array_equal(response.getArray().reshape(-1, 2), ref.response)
    np.testing.assert_array_equal(tangent.getArray().reshape(-1, 2, 3), ref.tangent)
    with pytest.raises(ValueError, match="local entries"):
        res.write_to(std=PETSc.Vec().createSeq(local.shape[0] * 2 + 1, comm=_MPI.COMM_SELF))
