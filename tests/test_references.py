"""Independent references from the homogenization literature, run against both fine
solvers and the ``neuroscale homogenize`` command.

- Dykhne (1971): a two-phase checkerboard has k_eff = sqrt(k1 k2) exactly.
- Keller (1964) reciprocity: for a cell with square symmetry, k_eff(k1, k2) · k_eff(k2, k1)
  = k1 k2 for any geometry.
- Hill (1963): phases with one shear modulus μ have the exact in-plane bulk modulus
  1/(κ* + μ) = Σ f_i / (κ_i + μ) for any geometry (plane strain, κ = K + μ/3).
- Hashin–Shtrikman (2D conductivity) bounds enclose every isotropic two-phase answer.
- Laminates (linear and nonlinear): exact, see ``neuroscale_coupling.fine.analytic``.

The voxel references (Dykhne, Hill) depend only on the voxel fractions, so the error is
pure discretisation error and must fall as the grid is refined.
"""

import json

import numpy as np
import pytest

from neuroscale_coupling import cli
from neuroscale_coupling.cell.laws import MechanicalPhase, ThermalPhase
from neuroscale_coupling.cell.materials import MechanicalMaterial, ThermalMaterial, equino_material
from neuroscale_coupling.cell.microstructure import (
    centre_and_corner_fibres,
    checkerboard,
    circular_inclusion,
    phase_fractions,
)
from neuroscale_coupling.fine import make_solver
from neuroscale_coupling.fine.analytic import laminate_exact

LINEAR = ThermalMaterial(phases=(ThermalPhase(1.0), ThermalPhase(10.0)))
SWAPPED = ThermalMaterial(phases=(ThermalPhase(10.0), ThermalPhase(1.0)))
UNIT_G = np.array([[1.0, 0.0, 0.0]])


def k11(solver_name, material, image):
    return make_solver(solver_name, material).solve(image, UNIT_G).response[0, 0]


@pytest.mark.parametrize("solver", ["spectral", "fem"])
def test_dykhne_checkerboard_converges_to_sqrt_k1k2(solver):
    sizes = (16, 32, 64)
    errors = np.array([abs(k11(solver, LINEAR, checkerboard(n)) - np.sqrt(10)) for n in sizes])
    rates = np.log2(errors[:-1] / errors[1:])
    # The singular field at the corners of the squares limits the rate (measured 0.8).
    assert np.all(rates > 0.6), (errors, rates)
    assert errors[-1] / np.sqrt(10) < 0.035


@pytest.mark.parametrize("solver", ["spectral", "fem"])
def test_keller_reciprocity_on_an_inclusion(solver):
    sizes = (16, 32) if solver == "fem" else (16, 32, 64)
    gaps = []
    for n in sizes:
        im = circular_inclusion(n, 0.3)
        gaps.append(abs(k11(solver, LINEAR, im) * k11(solver, SWAPPED, im) / 10 - 1))
    assert gaps[-1] < 0.02 and gaps[-1] < gaps[0], gaps


@pytest.mark.parametrize("solver", ["spectral", "fem"])
def test_hill_equal_shear_bulk_modulus_is_exact(solver):
    mu, bulk = 40.0, np.array([50.0, 150.0])
    mat = MechanicalMaterial(
        phases=(MechanicalPhase(K=bulk[0], G=mu), MechanicalPhase(K=bulk[1], G=mu))
    )
    sizes = (16, 32) if solver == "fem" else (16, 32, 64)
    errors = []
    for n in sizes:
        im = centre_and_corner_fibres(n, 0.45)
        f = phase_fractions(im, 2)
        kappa = bulk + mu / 3  # plane-strain bulk modulus λ + μ
        exact = 1 / np.sum(f / (kappa + mu)) - mu
        e = 1e-3
        sigma = make_solver(solver, mat).solve(im, np.array([[e, e, 0.0]])).response[0]
        errors.append(abs((sigma[0] + sigma[1]) / (4 * e) / exact - 1))
        assert abs(sigma[2]) < 1e-8 * abs(sigma[0])
    # Voxel interfaces: first-order convergence (measured 0.0051, 0.0026, 0.0011).
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(rates > 0.7) and errors[-1] < 0.003, (errors, rates)


def test_inclusion_lies_within_hashin_shtrikman_bounds():
    im = circular_inclusion(64, 0.3)
    f1, f2 = phase_fractions(im, 2)
    k1, k2 = 1.0, 10.0
    lower = k1 + f2 / (1 / (k2 - k1) + f1 / (2 * k1))
    upper = k2 + f1 / (1 / (k1 - k2) + f2 / (2 * k2))
    k = make_solver("spectral", LINEAR).solve(im, UNIT_G).tangent[0, :, :2]
    assert lower < k[0, 0] < upper
    np.testing.assert_allclose(k[1, 1], k[0, 0], rtol=1e-10)  # square symmetry: isotropic
    assert abs(k[0, 1]) < 1e-10 * k[0, 0]


@pytest.mark.parametrize("solver", ["spectral", "fem"])
@pytest.mark.parametrize("physics", ["thermal", "mechanical"])
def test_cli_nonlinear_laminate_matches_the_exact_solution(tmp_path, solver, physics, comm):
    out = tmp_path / f"lam_{comm.rank}.json"
    args = [
        "homogenize",
        "--cell",
        "laminate",
        "--n",
        "10",
        "--param",
        "volume_fraction=0.4",
        "--physics",
        physics,
        "--solver",
        solver,
        "--json",
        str(out),
    ]
    if physics == "thermal":
        args += [
            "--phase",
            "k0=1,alpha=0.5,beta=0.3",
            "--phase",
            "k0=10,alpha=-0.2,beta=0.1",
            "--state",
            "0.7,-1.2,0.4",
        ]
        material = ThermalMaterial(
            phases=(ThermalPhase(1.0, 0.5, 0.3), ThermalPhase(10.0, -0.2, 0.1))
        )
        state = [0.7, -1.2, 0.4]
    else:
        args += ["--state", "0.03,-0.01,0.02"]
        material, state = equino_material(), [0.03, -0.01, 0.02]
    assert cli.main(args) == 0
    record = json.loads(out.read_text())
    exact = laminate_exact(material, [0.6, 0.4], np.array([state]))
    np.testing.assert_allclose(record["response"], exact.response, rtol=1e-9)
    np.testing.assert_allclose(
        record["tangent"], exact.tangent, rtol=1e-7, atol=1e-9 * np.abs(exact.tangent).max()
    )


def test_cli_reports_bad_input_clearly(capsys):
    assert cli.main(["homogenize", "--physics", "thermal", "--state", "1,nan,0"]) == 2
    assert "not finite" in capsys.readouterr().err
    assert (
        cli.main(["homogenize", "--cell", "circular_inclusion", "--param", "volume_fraction=0.95"])
        == 2
    )
    assert "volume_fraction" in capsys.readouterr().err
