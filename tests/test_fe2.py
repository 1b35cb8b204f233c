"""FE² with the exact-micro closure on the DOLFINx host (serial and mpiexec -n 2).

- a homogeneous cell reproduces the single-scale DOLFINx solve with the same law;
- a laminate cell solves a manufactured homogenized problem with P1's rate 2;
- the macro Newton converges quadratically with the consistent tangent;
- one closure call per Newton iterate;
- the run on all ranks equals the run on one rank (COMM_SELF) to 1e-10;
- a two-scale run approaches the DNS that resolves every cell as ε shrinks.
"""

import numpy as np
import pytest
from mpi4py import MPI

import neuroscale_coupling.dolfinx_env  # noqa: F401

# isort: split
import ufl
from dolfinx import fem, mesh
from dolfinx.fem.petsc import NonlinearProblem

from neuroscale_coupling.cell.laws import CONDUCTIVITY, EQUINO_LAW, EQUINO_MATRIX, ThermalPhase
from neuroscale_coupling.cell.materials import MechanicalMaterial, ThermalMaterial, equino_material
from neuroscale_coupling.cell.microstructure import (
    centre_and_corner_fibres,
    circular_inclusion,
    laminate,
)
from neuroscale_coupling.closure.exact import ExactClosure
from neuroscale_coupling.fine.analytic import laminate_exact
from neuroscale_coupling.fine.fem import FESolver
from neuroscale_coupling.fine.spectral import SpectralSolver
from neuroscale_coupling.hosts.dolfinx.dns import MechanicalDNS, ThermalDNS, gather_dof_values
from neuroscale_coupling.hosts.dolfinx.driver import TwoScaleDriver
from neuroscale_coupling.hosts.dolfinx.problems import (
    MacroQuadrature,
    MechanicalFE2Problem,
    ThermalFE2Problem,
)

LU = {"snes_rtol": 1e-12, "snes_atol": 1e-14, "ksp_type": "preonly", "pc_type": "lu"}
NONLINEAR = ThermalMaterial(phases=(ThermalPhase(1.0, 0.3, 0.5), ThermalPhase(10.0, 0.1, 0.2)))


def _boundary_bcs(msh, value):
    def make(V):
        facets = mesh.locate_entities_boundary(msh, 1, lambda x: np.full(x.shape[1], True))
        g = fem.Function(V)
        g.interpolate(value)
        return [fem.dirichletbc(g, fem.locate_dofs_topological(V, 1, facets))]

    return make


def _thermal(comm, n_macro, material, cell, *, capacity=None, source=1.0, bc=None):
    msh = mesh.create_unit_square(comm, n_macro, n_macro, mesh.CellType.quadrilateral)
    quad = MacroQuadrature(msh, 2)
    cells = np.broadcast_to(cell, (quad.n_local, *cell.shape))
    closure = ExactClosure(material, SpectralSolver(material), cells, comm=comm)
    bc = bc or (lambda x: 0.2 * x[0] + 0.1 * x[1] ** 2)
    problem = ThermalFE2Problem(
        quad, closure, bcs=_boundary_bcs(msh, bc), source=source, capacity=capacity
    )
    return problem


def _rel_l2(a, b, measure):
    comm = a.function_space.mesh.comm
    num = comm.allreduce(fem.assemble_scalar(fem.form(ufl.inner(a - b, a - b) * measure)))
    den = comm.allreduce(fem.assemble_scalar(fem.form(ufl.inner(b, b) * measure)))
    return np.sqrt(num / den)


def test_homogeneous_cell_reproduces_single_scale_thermal_transient(comm):
    phase = ThermalPhase(2.0, 0.4, 0.6)
    material = ThermalMaterial(phases=(phase,))
    problem = _thermal(comm, 6, material, np.zeros((4, 4), int), capacity=0.5)
    driver = TwoScaleDriver(problem, progress=False)
    driver.run([0.1, 0.25])
    # Single scale: the same law in UFL, the same quadrature, the same time steps.
    V = problem.V
    T, T_old, v = fem.Function(V), fem.Function(V), ufl.TestFunction(V)
    dt = fem.Constant(V.mesh, 0.1)
    dxq = problem.quadrature.measure
    params = {"k0": phase.k0, "alpha": phase.alpha, "beta": phase.beta}
    F = (
        ufl.inner(CONDUCTIVITY.ufl_form(params, T, ufl.grad(T)), ufl.grad(v)) * dxq
        - 1.0 * v * ufl.dx
        + 0.5 / dt * (T - T_old) * v * dxq
    )
    bcs = _boundary_bcs(V.mesh, lambda x: 0.2 * x[0] + 0.1 * x[1] ** 2)(V)
    ref = NonlinearProblem(F, T, bcs=bcs, petsc_options_prefix="single_thermal_", petsc_options=LU)
    for step in (0.1, 0.15):
        dt.value = step
        ref.solve()
        assert ref.solver.getConvergedReason() > 0
        T_old.x.array[:] = T.x.array
    assert _rel_l2(problem.u, T, ufl.dx) < 1e-10
    for report in driver.reports:
        assert report.closure_calls == report.iterations + 1  # one call per iterate


def _pull_bcs(msh, holder):
    """Left edge clamped, right edge moved by holder["pull"] (updated per load step)."""

    def make(V):
        left = mesh.locate_entities_boundary(msh, 1, lambda x: np.isclose(x[0], 0.0))
        right = mesh.locate_entities_boundary(msh, 1, lambda x: np.isclose(x[0], 1.0))
        holder["pull"] = fem.Function(V)
        return [
            fem.dirichletbc(fem.Function(V), fem.locate_dofs_topological(V, 1, left)),
            fem.dirichletbc(holder["pull"], fem.locate_dofs_topological(V, 1, right)),
        ]

    def set_load(value):
        holder["pull"].interpolate(
            lambda x: np.vstack([0.03 * value + 0 * x[0], 0.01 * value * x[1]])
        )

    return make, set_load


def test_homogeneous_cell_reproduces_single_scale_mechanical(comm):
    material = MechanicalMaterial(phases=(EQUINO_MATRIX,))
    msh = mesh.create_unit_square(comm, 5, 5, mesh.CellType.quadrilateral)
    quad = MacroQuadrature(msh, 2)
    closure = ExactClosure(
        material, SpectralSolver(material), np.zeros((quad.n_local, 4, 4), int), comm=comm
    )
    make_bcs, set_load = _pull_bcs(msh, {})
    problem = MechanicalFE2Problem(quad, closure, bcs=make_bcs)
    driver = TwoScaleDriver(problem, prepare=lambda k, value: set_load(value), progress=False)
    driver.run([0.5, 1.0])
    # Single scale: the law in UFL with full tensors, loaded in one step.
    V = problem.V
    u, v = fem.Function(V), ufl.TestFunction(V)
    m = EQUINO_MATRIX
    params = {"K": m.K, "G": m.G, "c1": m.c1, "c2": m.c2}
    eps = ufl.sym(ufl.grad(u))
    F = ufl.inner(EQUINO_LAW.ufl_form(params, eps), ufl.sym(ufl.grad(v))) * quad.measure
    ref_bcs, ref_load = _pull_bcs(msh, {})
    ref = NonlinearProblem(
        F, u, bcs=ref_bcs(V), petsc_options_prefix="single_mech_", petsc_options=LU
    )
    ref_load(1.0)
    ref.solve()
    assert ref.solver.getConvergedReason() > 0
    assert _rel_l2(problem.u, u, ufl.dx) < 1e-10


@pytest.mark.parametrize("physics", ["thermal", "mechanical"])
def test_macro_newton_converges_quadratically(comm, physics):
    if physics == "thermal":
        problem = _thermal(comm, 4, NONLINEAR, circular_inclusion(8, 0.3), source=4.0,
                           bc=lambda x: 1.0 + 2.0 * x[0] + x[1])  # fmt: skip
        report = problem.solve_step()
    else:
        material = equino_material()
        msh = mesh.create_unit_square(comm, 4, 4, mesh.CellType.quadrilateral)
        quad = MacroQuadrature(msh, 2)
        cells = np.broadcast_to(centre_and_corner_fibres(8, 0.45), (quad.n_local, 8, 8))
        closure = ExactClosure(material, SpectralSolver(material), cells, comm=comm)
        # a bilinear boundary displacement: the strain varies, so Newton has work to do
        stretch = _boundary_bcs(
            msh, lambda x: np.vstack([0.03 * x[0] * (1 + x[1]), -0.01 * x[1] * (1 + x[0])])
        )
        problem = MechanicalFE2Problem(quad, closure, bcs=stretch)
        report = problem.solve_step()
    r = np.asarray(report.residuals)
    assert report.converged_reason > 0 and r[-1] < 1e-9 * r[0]
    orders = report.observed_orders()
    # Quadratic: the best observed order is close to 2. The mechanical solve takes three
    # iterations after the boundary values enter, its last residual at round-off (~1e-11),
    # which caps the observed order near 1.7-1.8; an inconsistent tangent gives about 1.
    assert max(orders, default=0.0) > 1.6, (r, orders)
    assert report.closure_calls == report.iterations + 1


def test_first_closure_call_of_a_step_sees_the_states_it_starts_from(comm):
    """A changed Dirichlet value enters through the first Newton update, not by setting it
    into the start field: the closure's first call sees the previous step's states (here
    T = 0, so G = 0 and θ = 0), never the jump crammed into the boundary element layer."""
    problem = _thermal(comm, 4, NONLINEAR, circular_inclusion(8, 0.3), source=0.0,
                       bc=lambda x: 1.0 + 2.0 * x[0] + x[1])  # fmt: skip
    seen = []
    evaluate = problem.closure.evaluate
    problem.closure.evaluate = lambda states: seen.append(np.array(states)) or evaluate(states)
    report = problem.solve_step()
    assert report.converged_reason > 0
    assert np.all(seen[0] == 0.0)
    # the first Newton update imposed the new boundary values; the converged field holds them
    dofs = problem.bcs[0].dof_indices()[0]
    x = problem.V.tabulate_dof_coordinates()[dofs]
    np.testing.assert_allclose(problem.u.x.array[dofs], 1.0 + 2.0 * x[:, 0] + x[:, 1], rtol=1e-12)


def test_laminate_manufactured_solution_converges_at_rate_two(comm):
    material = ThermalMaterial(phases=(ThermalPhase(1.0), ThermalPhase(10.0)))
    k_eff = laminate_exact(material, [0.5, 0.5], np.array([[1.0, 0, 0], [0, 1.0, 0]])).response
    k11, k22 = k_eff[0, 0], k_eff[1, 1]
    errors = []
    for n_macro in (4, 8, 16):
        msh = mesh.create_unit_square(comm, n_macro, n_macro, mesh.CellType.quadrilateral)
        x = ufl.SpatialCoordinate(msh)
        exact = ufl.sin(np.pi * x[0]) * ufl.sin(np.pi * x[1])
        source = np.pi**2 * (k11 + k22) * exact
        quad = MacroQuadrature(msh, 2)
        cells = np.broadcast_to(laminate(4, 0.5), (quad.n_local, 4, 4))
        closure = ExactClosure(material, SpectralSolver(material), cells, comm=comm)
        problem = ThermalFE2Problem(
            quad, closure, bcs=_boundary_bcs(msh, lambda x: 0 * x[0]), source=source
        )
        problem.solve_step()
        err = fem.assemble_scalar(fem.form((problem.u - exact) ** 2 * ufl.dx(degree=6)))
        errors.append(np.sqrt(comm.allreduce(err)))
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(rates > 1.9), (errors, rates)


def test_all_ranks_equal_one_rank(comm):
    """The run on COMM_WORLD equals the same run on COMM_SELF (each rank alone)."""
    fields = []
    for c in (comm, MPI.COMM_SELF):
        problem = _thermal(c, 5, NONLINEAR, circular_inclusion(8, 0.3), capacity=1.0,
                           bc=lambda x: 1.0 + x[0])  # fmt: skip
        TwoScaleDriver(problem, progress=False).run([0.2, 0.4])
        fields.append(gather_dof_values(problem.u))
    (x0, v0), (x1, v1) = fields
    np.testing.assert_allclose(x0, x1, atol=1e-12)
    assert np.abs(v0 - v1).max() <= 1e-10 * np.abs(v1).max()


def test_two_scale_run_approaches_dns_as_epsilon_shrinks(comm):
    """Steady nonlinear conduction in a composite square: FE² (exact micro, macro mesh
    8²) against DNS resolving every period (ε = 1/4, 1/8; 8 voxels per period).

    Measured: relative L2 difference 0.0387 (ε = 1/4), 0.0197 (ε = 1/8), the same with
    a 16² macro mesh: the difference is the O(ε) homogenization error."""
    cell = circular_inclusion(8, 0.3)
    fe2 = _thermal(comm, 8, NONLINEAR, cell, source=2.0, bc=lambda x: x[0] * (1 - x[1]))
    fe2.solve_step()
    diffs = []
    for inv_eps in (4, 8):
        n = 8 * inv_eps
        msh = mesh.create_unit_square(comm, n, n, mesh.CellType.quadrilateral)
        dns = ThermalDNS(msh, NONLINEAR, cell, 1.0 / inv_eps, source=2.0,
                         bcs=_boundary_bcs(msh, lambda x: x[0] * (1 - x[1])))  # fmt: skip
        dns.solve_step()
        # Compare on the DNS mesh: interpolate the macro field there.
        macro = fem.Function(dns.V)
        cells = np.arange(msh.topology.index_map(2).size_local, dtype=np.int32)
        data = fem.create_interpolation_data(dns.V, fe2.V, cells)
        macro.interpolate_nonmatching(fe2.u, cells, data)
        diffs.append(_rel_l2(dns.T, macro, ufl.dx))
    # O(ε): halving the period about halves the difference.
    assert diffs[1] < 0.6 * diffs[0], diffs
    assert diffs[1] < 0.03, diffs


def test_mechanical_two_scale_run_approaches_dns_as_epsilon_shrinks(comm):
    """EquiNO fibre composite on the unit square, displacement u = (0.03 x y,
    -0.02 y + 0.02 x²) on the boundary: FE² (macro 8²) against DNS (ε = 1/4, 1/8).

    Measured: relative L2 difference of u 0.0739 (ε = 1/4), 0.0382 (ε = 1/8), the same
    with a 16² macro mesh: the O(ε) homogenization error."""
    material = equino_material()
    cell = centre_and_corner_fibres(8, 0.45)

    def disp(x):
        return np.vstack([0.03 * x[0] * x[1], -0.02 * x[1] + 0.02 * x[0] ** 2])

    msh = mesh.create_unit_square(comm, 8, 8, mesh.CellType.quadrilateral)
    quad = MacroQuadrature(msh, 2)
    cells = np.broadcast_to(cell, (quad.n_local, 8, 8))
    closure = ExactClosure(material, FESolver(material), cells, comm=comm)
    fe2 = MechanicalFE2Problem(quad, closure, bcs=_boundary_bcs(msh, disp))
    fe2.solve_step()
    diffs = []
    for inv_eps in (4, 8):
        fine = mesh.create_unit_square(comm, 8 * inv_eps, 8 * inv_eps, mesh.CellType.quadrilateral)
        dns = MechanicalDNS(fine, material, cell, 1.0 / inv_eps, bcs=_boundary_bcs(fine, disp))
        dns.solve_step(1.0)
        on_fine = fem.Function(dns.V)
        owned = np.arange(fine.topology.index_map(2).size_local, dtype=np.int32)
        on_fine.interpolate_nonmatching(
            fe2.u, owned, fem.create_interpolation_data(dns.V, fe2.V, owned)
        )
        diffs.append(_rel_l2(dns.u, on_fine, ufl.dx))
    assert diffs[1] < 0.6 * diffs[0] and diffs[1] < 0.05, diffs


def test_closure_of_the_wrong_physics_is_refused(comm):
    msh = mesh.create_unit_square(comm, 2, 2, mesh.CellType.quadrilateral)
    quad = MacroQuadrature(msh, 2)
    material = equino_material()
    cells = np.zeros((quad.n_local, 4, 4), dtype=np.int64)
    closure = ExactClosure(material, FESolver(material), cells, comm=comm)
    with pytest.raises(TypeError, match="needs a thermal closure; got a mechanical one"):
        ThermalFE2Problem(quad, closure)
