"""Phase laws (autograd = closed-form tangent) and the exact laminate references."""

import numpy as np
import pytest
import torch

from neuroscale_coupling.cell.laws import EQUINO_FIBRE, MechanicalPhase, ThermalPhase
from neuroscale_coupling.cell.materials import MechanicalMaterial, ThermalMaterial, equino_material
from neuroscale_coupling.cell.symmetry import D4, state_matrix, transform_result
from neuroscale_coupling.fine.analytic import laminate_exact

THERMAL = ThermalMaterial(phases=(ThermalPhase(1.0, 0.5, 0.3), ThermalPhase(10.0, -0.2, 0.1)))


def _fields(material, phases):
    return {k: torch.from_numpy(v) for k, v in material.fields(phases).items()}


def test_equino_fibre_parameters_match_young_and_poisson():
    fibre = MechanicalPhase.linear_elastic(73000.0, 0.22)
    assert fibre.K == pytest.approx(EQUINO_FIBRE.K, rel=1e-8)
    assert fibre.G == pytest.approx(EQUINO_FIBRE.G, rel=1e-8)


def test_thermal_tangent_is_the_jacobian_of_the_flux():
    rng = np.random.default_rng(0)
    phases = rng.integers(0, 2, size=(3, 4, 4))
    f = _fields(THERMAL, phases)
    g = torch.from_numpy(rng.normal(size=(3, 4, 4, 2)))
    theta = torch.tensor(0.4, dtype=torch.float64)
    _, a, b = THERMAL.law.torch_form(f, theta, g)
    jac = torch.func.vmap(
        torch.func.jacrev(lambda gi, fi: THERMAL.law.torch_form(fi, theta, gi)[0])
    )
    flat = {k: v.reshape(-1) for k, v in f.items()}
    np.testing.assert_allclose(
        jac(g.reshape(-1, 2), flat).numpy(), a.reshape(-1, 2, 2).numpy(), rtol=1e-13
    )
    djac = torch.func.jacrev(lambda t: THERMAL.law.torch_form(f, t, g)[0])(theta)
    np.testing.assert_allclose(djac.numpy(), b.numpy(), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(a.numpy(), np.swapaxes(a.numpy(), -1, -2))


def test_mechanical_tangent_is_the_jacobian_of_the_stress_and_finite_at_zero():
    mat = equino_material()
    rng = np.random.default_rng(1)
    f = {k: v.reshape(-1)[:5] for k, v in _fields(mat, rng.integers(0, 2, size=(2, 2, 2))).items()}
    f["K"][0] = 4780.0  # at least one matrix point
    eps = torch.from_numpy(rng.uniform(-0.04, 0.04, size=(5, 3)))
    _, c = mat.law.torch_form(f, eps)
    jac = torch.func.vmap(torch.func.jacrev(lambda e, fi: mat.law.torch_form(fi, e)[0]))
    np.testing.assert_allclose(jac(eps, f).numpy(), c.numpy(), rtol=1e-12, atol=1e-9)
    sigma0, c0 = mat.law.torch_form(f, torch.zeros(5, 3, dtype=torch.float64))
    assert np.all(np.isfinite(c0.numpy())) and np.all(sigma0.numpy() == 0)
    # Matrix at zero strain: K m⊗m + (c1/c2) (I − m⊗m/3).
    m = np.array([1.0, 1.0, 0.0])
    expected = 4780 * np.outer(m, m) + 50 / 0.06 * (np.eye(3) - np.outer(m, m) / 3)
    np.testing.assert_allclose(c0.numpy()[0], expected, rtol=1e-12)


def test_matrix_law_is_only_nearly_symmetric_in_work_conjugate_form():
    """The EquiNO law's asymmetry ≈ 0.1 % of the largest entry with engineering shear."""
    mat = MechanicalMaterial(phases=(equino_material().phases[0],))
    f = {k: v[0, 0] for k, v in _fields(mat, np.zeros((2, 2), dtype=int)).items()}
    _, c = mat.law.torch_form(f, torch.tensor([0.03, -0.01, 0.02], dtype=torch.float64))
    # Work-conjugate pairs (σ11, ε11), (σ22, ε22), (σ12, γ12 = 2 ε12): dσ/d(ε11, ε22, γ12).
    work = c.numpy() @ np.diag([1.0, 1.0, 0.5])
    asym = np.abs(work - work.T).max() / np.abs(work).max()
    assert 1e-4 < asym < 1e-2


def test_linear_laminate_matches_the_textbook_bounds():
    mat = ThermalMaterial(phases=(ThermalPhase(1.0), ThermalPhase(10.0)))
    h = laminate_exact(mat, [0.75, 0.25], np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    np.testing.assert_allclose(h.response[0], [1 / (0.75 / 1 + 0.25 / 10), 0.0], rtol=1e-14)
    np.testing.assert_allclose(h.response[1], [0.0, 0.75 * 1 + 0.25 * 10], rtol=1e-14)


@pytest.mark.parametrize("normal", [1, 2])
@pytest.mark.parametrize("physics", ["thermal", "mechanical"])
def test_laminate_tangent_equals_finite_difference(physics, normal):
    mat = THERMAL if physics == "thermal" else equino_material()
    state = np.array([0.7, -1.2, 0.4]) if physics == "thermal" else np.array([0.03, -0.01, 0.02])
    fr = [0.6, 0.4]
    h = laminate_exact(mat, fr, state, normal=normal)
    fd = np.empty((mat.response_dim, 3))
    for j in range(3):
        e = 1e-6 * max(abs(state[j]), 1e-2)
        dp, dm = state.copy(), state.copy()
        dp[j] += e
        dm[j] -= e
        fd[:, j] = (
            laminate_exact(mat, fr, dp, normal=normal).response[0]
            - laminate_exact(mat, fr, dm, normal=normal).response[0]
        ) / (2 * e)
    np.testing.assert_allclose(h.tangent[0], fd, atol=1e-7 * np.abs(fd).max())


def test_laminate_is_equivariant_under_quarter_turn():
    """Layers normal to e1 rotated by 90° are layers normal to e2."""
    r = D4[1]
    for mat, state in (
        (THERMAL, np.array([0.7, -1.2, 0.4])),
        (equino_material(), np.array([0.03, -0.01, 0.02])),
    ):
        h1 = laminate_exact(mat, [0.6, 0.4], state, normal=1)
        h2 = laminate_exact(mat, [0.6, 0.4], state_matrix(r, mat.physics) @ state, normal=2)
        resp, tan = transform_result(h1.response, h1.tangent, r, mat.physics)
        np.testing.assert_allclose(h2.response, resp, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(h2.tangent, tan, rtol=1e-10, atol=1e-9)


def test_bad_states_and_phases_are_clear_errors():
    with pytest.raises(ValueError, match="not finite"):
        THERMAL.check_states([[np.nan, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        THERMAL.check_states(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="k0"):
        ThermalPhase(k0=-1.0)
    with pytest.raises(ValueError, match="no shear stiffness"):
        MechanicalPhase(K=1.0)
    with pytest.raises(ValueError, match="summing to 1"):
        laminate_exact(THERMAL, [0.5, 0.6], [1.0, 0.0, 0.0])
