"""Spectral (FFT-preconditioned Newton–Krylov) Q1 cell solver: exact laminates, the
pointwise law on homogeneous cells, tangent = central difference, square symmetry,
batching, failures and rank agreement."""

import numpy as np
import pytest
import torch
from conftest import assert_same_on_all_ranks

from neuroscale_coupling.cell import microstructure as ms
from neuroscale_coupling.cell.laws import ThermalPhase
from neuroscale_coupling.cell.materials import ThermalMaterial, equino_material
from neuroscale_coupling.cell.symmetry import transform_image, voigt_rotation
from neuroscale_coupling.fine import spectral
from neuroscale_coupling.fine.analytic import laminate_exact
from neuroscale_coupling.fine.protocol import FineSolveError
from neuroscale_coupling.fine.spectral import SpectralSolver

THERMAL = ThermalMaterial(phases=(ThermalPhase(1.0, 0.5, 0.3), ThermalPhase(10.0, -0.2, 0.1)))
EQUINO = equino_material()
THERMAL_STATES = np.array([[0.7, -0.4, 0.3], [1.2, 0.5, -0.5], [-0.3, 0.9, 0.8]])
MECH_STATES = np.array([[0.03, -0.02, 0.025], [-0.03, 0.01, -0.03], [0.02, 0.03, 0.0]])
# A cell with no symmetry of its own (so that the D4 checks are not vacuous).
ASYMMETRIC = ms.random_inclusions(16, 0.35, n_inclusions=3, seed=3)


def rel_err(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()


@pytest.mark.parametrize(("n", "vf"), [(16, 0.25), (10, 0.4)])
@pytest.mark.parametrize("normal", [1, 2])
@pytest.mark.parametrize(
    ("material", "states"), [(THERMAL, THERMAL_STATES), (EQUINO, MECH_STATES)], ids=["th", "mech"]
)
def test_laminate_matches_exact_solution(material, states, normal, n, vf):
    # Q1 represents the piecewise-linear laminate solution exactly: only round-off and
    # the Newton tolerance remain (measured: 1e-13 or better).
    image = ms.laminate(n, vf, normal=normal)
    got = SpectralSolver(material).solve(image, states)
    exact = laminate_exact(material, (1 - vf, vf), states, normal=normal)
    for a, b in ((got.response, exact.response), (got.tangent, exact.tangent)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * np.abs(b).max())


@pytest.mark.parametrize("phase", [0, 1])
def test_homogeneous_cell_is_the_pointwise_law(phase):
    image = np.full((8, 8), phase)
    for material, states in ((THERMAL, THERMAL_STATES), (EQUINO, MECH_STATES)):
        got = SpectralSolver(material).solve(image, states)
        table = torch.from_numpy(material.parameter_table()[phase])
        f = {k: table[c].expand(len(states)) for c, k in enumerate(material.parameter_names)}
        s = torch.from_numpy(states)
        if material is THERMAL:
            q, a, dq_dtheta = material.law.torch_form(f, s[:, 2], s[:, :2])
            tangent = torch.cat((a, dq_dtheta[..., None]), -1)
        else:
            q, tangent = material.law.torch_form(f, s)
        np.testing.assert_allclose(got.response, q.numpy(), rtol=1e-13, atol=0)
        np.testing.assert_allclose(got.tangent, tangent.numpy(), rtol=1e-12, atol=1e-14)
        assert np.all(got.newton_iterations == 0)


@pytest.mark.parametrize(
    ("material", "state", "step"),
    [(THERMAL, np.array([0.8, -0.6, 0.4]), 1e-5), (EQUINO, np.array([0.03, -0.02, 0.02]), 1e-6)],
    ids=["th", "mech"],
)
def test_tangent_is_central_difference_of_response(material, state, step):
    image = ms.circular_inclusion(16, 0.3)
    d = state.size
    states = np.vstack(
        [state] + [state + s * step * np.eye(d)[j] for j in range(d) for s in (1, -1)]
    )
    res = SpectralSolver(material, rtol=1e-13).solve(image, states)
    fd = np.stack(
        [(res.response[1 + 2 * j] - res.response[2 + 2 * j]) / (2 * step) for j in range(d)], -1
    )
    assert rel_err(fd, res.tangent[0]) < 1e-7  # measured ~1e-11


ROT90 = np.array([[0.0, -1.0], [1.0, 0.0]])  # np.rot90: rot[i, j] = im[j, n-1-i], x ↦ R x
FLIP1 = np.array([[-1.0, 0.0], [0.0, 1.0]])  # np.flip(axis=0): x1 ↦ 1 - x1


@pytest.mark.parametrize(
    ("transform", "rotation"),
    [(np.rot90, ROT90), (lambda im: np.flip(im, axis=0), FLIP1)],
    ids=["rot90", "flip"],
)
def test_square_symmetry(transform, rotation):
    # image[i, j] is the voxel at ((i+.5)/n, (j+.5)/n): np.rot90 gives new[i, j] =
    # old[j, n-1-i], i.e. new(x) = old(Rᵀ x) with R the rotation by +90°.
    image = ASYMMETRIC
    moved = np.ascontiguousarray(transform(image))
    np.testing.assert_array_equal(moved, transform_image(image, rotation.astype(int)))
    # Thermal: G → R G (θ unchanged), Q → R Q, dQ/dG → R A Rᵀ, dQ/dθ → R dQ/dθ.
    st = THERMAL_STATES[:2]
    moved_st = np.c_[st[:, :2] @ rotation.T, st[:, 2]]
    solver = SpectralSolver(THERMAL)
    a, b = solver.solve(image, st), solver.solve(moved, moved_st)
    assert rel_err(b.response, a.response @ rotation.T) < 1e-9
    assert rel_err(b.tangent[:, :, :2], rotation @ a.tangent[:, :, :2] @ rotation.T) < 1e-9
    assert rel_err(b.tangent[:, :, 2], a.tangent[:, :, 2] @ rotation.T) < 1e-9
    # Mechanical: ε → R ε Rᵀ, σ → R σ Rᵀ (tensor-shear Voigt matrix V), C → V C V⁻¹.
    v = voigt_rotation(rotation)
    solver = SpectralSolver(EQUINO)
    st = MECH_STATES[:2]
    a, b = solver.solve(image, st), solver.solve(moved, st @ v.T)
    assert rel_err(b.response, a.response @ v.T) < 1e-9
    assert rel_err(b.tangent, v @ a.tangent @ np.linalg.inv(v)) < 1e-9


def test_thermal_conductivity_is_symmetric_positive_definite():
    image = ms.random_inclusions(16, 0.35, n_inclusions=3, seed=3)
    res = SpectralSolver(THERMAL).solve(image, THERMAL_STATES)
    k = res.tangent[:, :, :2]
    np.testing.assert_allclose(k, k.transpose(0, 2, 1), rtol=1e-9, atol=1e-12)
    assert np.all(np.linalg.eigvalsh(k) > 0)


def test_unconverged_point_names_its_index_and_state():
    image = ms.circular_inclusion(16, 0.3)
    states = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, -2.0, 0.5]])
    with pytest.raises(FineSolveError) as info:
        SpectralSolver(THERMAL, max_newton=1).solve(image, states)
    assert info.value.index == 2
    assert "point 2" in str(info.value) and "[3.0, -2.0, 0.5]" in str(info.value)
    assert "max_newton=1" in info.value.reason and "residual history" in info.value.reason
    # An ill-posed point (conductivity 1 + alpha theta <= 0 in phase 0) in a later chunk.
    states = np.array([[0.1, 0.2, 0.0], [0.1, 0.2, 0.0], [0.1, 0.2, -3.0]])
    with pytest.raises(FineSolveError) as info:
        SpectralSolver(THERMAL, batch_size=2).solve(image, states)
    assert info.value.index == 2 and "conductivity" in info.value.reason


def test_line_search_repairs_overlong_steps(monkeypatch):
    # Make every Newton direction 8 times too long: the backtracking line search must cut
    # it back (to 1/8), after which Newton converges to the same answer.
    image = ms.circular_inclusion(16, 0.3)
    ref = SpectralSolver(THERMAL).solve(image, THERMAL_STATES)
    original = spectral.krylov_solve

    def overlong(method, apply_a, apply_m, b, rtol, maxiter, active):
        out = original(method, apply_a, apply_m, b, rtol, maxiter, active)
        if b.dim() == 4:  # Newton steps (B, c, n, n); the tangent solves are (d, B, c, n, n)
            out.x = 8 * out.x
        return out

    monkeypatch.setattr(spectral, "krylov_solve", overlong)
    solver = SpectralSolver(THERMAL)
    got = solver.solve(image, THERMAL_STATES)
    assert np.all(solver.last_statistics.line_search_halvings >= 3)
    assert rel_err(got.response, ref.response) < 1e-9
    assert rel_err(got.tangent, ref.tangent) < 1e-9

    # Ascent directions: no step length decreases |r|, the point fails with the reason.
    def backwards(method, apply_a, apply_m, b, rtol, maxiter, active):
        out = original(method, apply_a, apply_m, b, rtol, maxiter, active)
        out.x = -out.x
        return out

    monkeypatch.setattr(spectral, "krylov_solve", backwards)
    with pytest.raises(FineSolveError, match="line search") as info:
        SpectralSolver(THERMAL).solve(image, THERMAL_STATES)
    assert info.value.index == 0


def test_gmres_corrects_cg_on_a_strongly_non_symmetric_operator():
    # A tangent with a large skew part in work-conjugate form: CG's recurrences fail, the
    # "auto" method must notice it from the true residual and let GMRES finish the job.
    torch.manual_seed(0)
    n, batch = 8, 2
    grid = spectral.Q1Grid(n, torch.float64, torch.device("cpu"))
    physics = spectral.MechanicalVoxelPhysics(EQUINO, grid)
    work = torch.eye(3, dtype=torch.float64) + 0.9 * torch.tensor(
        [[0.0, 1.0, -1.0], [-1.0, 0.0, 1.0], [1.0, -1.0, 0.0]], dtype=torch.float64
    )
    scale = 1 + torch.rand(batch, n, n, 4, 1, 1, dtype=torch.float64)
    a = scale * torch.linalg.solve(torch.diag(torch.tensor([1.0, 1.0, 2.0])).double(), work)
    wa = spectral.GaussTangent(a, grid.weight)

    def jac(v):
        return physics.strain_t(wa.apply(physics.strain(v)))

    prec = SpectralSolver(EQUINO)._preconditioner(physics, a)
    b = spectral.zero_mean(torch.randn(batch, 2, n, n, dtype=torch.float64))
    rtol = torch.full((batch,), 1e-10, dtype=torch.float64)
    active = torch.ones(batch, dtype=torch.bool)
    cg = spectral.krylov_solve("cg", jac, prec, b, rtol, 200, active)
    auto = spectral.krylov_solve("auto", jac, prec, b, rtol, 200, active)
    gmres = spectral.krylov_solve("gmres", jac, prec, b, rtol, 200, active)

    def true_relres(x):
        r = b - jac(x)
        return torch.sqrt(spectral.batched_dot(r, r) / spectral.batched_dot(b, b))

    assert torch.all(true_relres(cg.x) > 1e-6)  # CG alone does not get there
    for out in (auto, gmres):
        assert bool(out.converged.all())
        assert torch.all(true_relres(out.x) <= 2e-10)


def test_unconverged_tangent_solve_is_reported():
    image = ms.circular_inclusion(16, 0.3)
    with pytest.raises(FineSolveError, match="unit-load solve for d/dG1") as info:
        SpectralSolver(THERMAL, max_cg=3).solve(image, THERMAL_STATES[:1])
    assert info.value.index == 0


def test_batches_equal_one_by_one_solves():
    cells = np.stack([ms.random_inclusions(16, 0.3, n_inclusions=2, seed=s) for s in range(3)])
    for material, states in ((THERMAL, THERMAL_STATES), (EQUINO, MECH_STATES)):
        batched = SpectralSolver(material).solve(cells, states)
        chunked = SpectralSolver(material, batch_size=2).solve(cells, states)
        single = [SpectralSolver(material).solve(c, s) for c, s in zip(cells, states, strict=True)]
        for res in (batched, chunked):
            np.testing.assert_allclose(
                res.response, np.concatenate([s.response for s in single]), rtol=1e-12, atol=0
            )
            np.testing.assert_allclose(
                res.tangent, np.concatenate([s.tangent for s in single]), rtol=1e-12, atol=1e-14
            )


def test_krylov_variants_agree_and_fields_have_zero_mean():
    image = ms.centre_and_corner_fibres(16, 0.4)
    res, u = SpectralSolver(EQUINO).solve_with_fields(image, MECH_STATES)
    other = SpectralSolver(EQUINO, krylov="gmres").solve(image, MECH_STATES)
    assert rel_err(other.response, res.response) < 1e-9
    assert rel_err(other.tangent, res.tangent) < 1e-9
    assert u.shape == (3, 2, 16, 16)
    assert np.abs(u.mean(axis=(-2, -1))).max() < 1e-12 * np.abs(u).max()


def test_ranks_get_identical_answers(comm):
    image = ms.random_inclusions(16, 0.3, n_inclusions=2, seed=7)
    for material, states in ((THERMAL, THERMAL_STATES), (EQUINO, MECH_STATES)):
        res = SpectralSolver(material).solve(image, states)
        assert_same_on_all_ranks(comm, res.response)
        assert_same_on_all_ranks(comm, res.tangent)


def test_input_errors():
    image = ms.laminate(8, 0.25)
    with pytest.raises(ValueError, match="share the resolution"):
        SpectralSolver(THERMAL).solve([image, ms.laminate(16, 0.25)], THERMAL_STATES[:2])
    with pytest.raises(ValueError, match="not finite"):
        SpectralSolver(THERMAL).solve(image, [[np.nan, 0.0, 0.0]])
    with pytest.raises(TypeError, match="ThermalMaterial and MechanicalMaterial"):
        SpectralSolver(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="krylov"):
        SpectralSolver(THERMAL, krylov="bicg")
    with pytest.raises(ValueError, match="batch_size"):
        SpectralSolver(THERMAL, batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            SpectralSolver(THERMAL, device="cuda")
    empty = SpectralSolver(EQUINO).solve(np.zeros((0, 8, 8), int), np.zeros((0, 3)))
    assert empty.response.shape == (0, 3) and empty.tangent.shape == (0, 3, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    image = ms.centre_and_corner_fibres(32, 0.4)
    for material, states in ((THERMAL, THERMAL_STATES), (EQUINO, MECH_STATES)):
        cpu = SpectralSolver(material).solve(image, states)
        gpu = SpectralSolver(material, device="cuda").solve(image, states)
        assert rel_err(gpu.response, cpu.response) < 1e-9
        assert rel_err(gpu.tangent, cpu.tangent) < 1e-9
