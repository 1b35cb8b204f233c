"""The closure as the external function of dolfinx-external-operator (FEMExternalOperator).

Macro problems on the unit square, solved by SNES Newton with the flux/stress from an
ExactClosure on a HOMOGENEOUS cell (one phase), whose homogenized law is the phase law
itself: the FE² answer must equal a single-scale solve with the law written in UFL,
Newton must converge quadratically, the closure must be called once per iterate, and one
rank must give what two ranks give.
"""

import itertools

import numpy as np
import pytest
from mpi4py import MPI

pytest.importorskip("dolfinx_external_operator")

import neuroscale_coupling.dolfinx_env  # noqa: F401

# isort: split
import dolfinx.fem.petsc as fem_petsc
import ufl
from dolfinx import fem, mesh
from dolfinx_external_operator import (
    evaluate_external_operators,
    evaluate_operands,
    replace_external_operators,
)

from neuroscale_coupling.cell.laws import CONDUCTIVITY, EQUINO_LAW, ThermalPhase
from neuroscale_coupling.cell.materials import ThermalMaterial, equino_material
from neuroscale_coupling.closure.exact import ExactClosure
from neuroscale_coupling.fine.fem import FESolver
from neuroscale_coupling.hosts.dolfinx.external_operator import (
    ClosureExternalFunction,
    attach_to_nonlinear_problem,
    mechanical_stress_operator,
    quadrature_coordinates,
    quadrature_layout,
    stress_tensor,
    thermal_flux_operator,
)

PHASE = ThermalPhase(k0=1.0, alpha=0.3, beta=0.5)
THERMAL = ThermalMaterial(phases=(PHASE,))
MECHANICAL = equino_material()  # phase 0: the nonlinear EquiNO matrix
CELL_N = 8
SNES_OPTIONS = {
    "snes_type": "newtonls",
    "snes_linesearch_type": "basic",
    "snes_rtol": 1e-13,
    "snes_atol": 1e-13,
    "snes_stol": 0.0,
    "snes_max_it": 20,
    "ksp_type": "preonly",
    "pc_type": "lu",
}
_prefix = itertools.count()


def homogeneous_closure(material, layout):
    cells = np.zeros((layout.n_local, CELL_N, CELL_N), dtype=np.int64)
    return ExactClosure(material, FESolver(material), cells, comm=layout.msh.comm)


def newton(F, u, J, bcs):
    """SNES Newton on replaced forms; returns the problem and the residual history."""
    problem = fem_petsc.NonlinearProblem(
        F,
        u,
        J=J,
        bcs=bcs,
        petsc_options_prefix=f"extop{next(_prefix)}_",
        petsc_options=SNES_OPTIONS,
    )
    history = []
    problem.solver.setMonitor(lambda _snes, _it, norm: history.append(norm))
    return problem, history


def solve(problem, history):
    problem.solve()
    reason = problem.solver.getConvergedReason()
    assert reason > 0, f"SNES did not converge (reason {reason}), residuals {history}"
    return np.array(history)


def observed_orders(res):
    """p_k = log(r_{k+1}/r_k) / log(r_k/r_{k-1}) over the steps above round-off."""
    r = res[res > 1e-12 * res[0]]
    return [np.log(r[k + 1] / r[k]) / np.log(r[k] / r[k - 1]) for k in range(1, len(r) - 1)]


def l2_squared(comm, w, dx):
    return comm.allreduce(fem.assemble_scalar(fem.form(ufl.inner(w, w) * dx)), op=MPI.SUM)


# ----------------------------------------------------------------- thermal
def thermal_problem(comm, *, closure):
    """-div q(T, ∇T) = 4 on the unit square, T = 1 + x + y/2 on the boundary (6×6 quads)."""
    msh = mesh.create_unit_square(comm, 6, 6, mesh.CellType.quadrilateral)
    V = fem.functionspace(msh, ("Lagrange", 1))
    T, v = fem.Function(V), ufl.TestFunction(V)
    msh.topology.create_connectivity(1, 2)
    facets = mesh.exterior_facet_indices(msh.topology)
    T_D = fem.Function(V)
    T_D.interpolate(lambda x: 1.0 + x[0] + 0.5 * x[1])
    bcs = [fem.dirichletbc(T_D, fem.locate_dofs_topological(V, 1, facets))]
    layout = quadrature_layout(msh, 2)
    dx = layout.measure
    if closure:
        q = thermal_flux_operator(homogeneous_closure(THERMAL, layout), T, layout)
    else:
        params = {"k0": PHASE.k0, "alpha": PHASE.alpha, "beta": PHASE.beta}
        q = CONDUCTIVITY.ufl_form(params, T, ufl.grad(T))
    F = ufl.inner(q, ufl.grad(v)) * dx - 4.0 * v * dx
    J = ufl.derivative(F, T, ufl.TrialFunction(V))
    ext, ops = None, []
    if closure:
        F, F_ops = replace_external_operators(F)
        J, J_ops = replace_external_operators(J)
        ops = [F_ops, J_ops]
        ext = q.external_function
    problem, history = newton(F, T, J, bcs)
    if closure:
        attach_to_nonlinear_problem(problem, bcs, *ops)
    return msh, T, dx, problem, history, ext


@pytest.fixture(scope="module")
def thermal_runs():
    """FE² and single-scale solves on COMM_WORLD, FE² on COMM_SELF (serial reference)."""
    out = {}
    for key, comm, closure in (
        ("fe2", MPI.COMM_WORLD, True),
        ("ufl", MPI.COMM_WORLD, False),
        ("fe2_serial", MPI.COMM_SELF, True),
    ):
        _msh, T, dx, problem, history, ext = thermal_problem(comm, closure=closure)
        if ext is not None:
            ext.begin_step(0)
        res = solve(problem, history)
        stats = ext.end_step() if ext is not None else None
        out[key] = dict(
            T=T,
            dx=dx,
            res=res,
            ext=ext,
            stats=stats,
            its=problem.solver.getIterationNumber(),
            l2=l2_squared(comm, T, dx),
        )
    return out


def test_thermal_fe2_equals_single_scale_solve(thermal_runs):
    a, b = thermal_runs["fe2"], thermal_runs["ufl"]
    # Same mesh, same dof numbering: compare nodal values directly.
    err = np.max(np.abs(a["T"].x.array - b["T"].x.array))
    assert err < 1e-10, err
    assert abs(a["l2"] - b["l2"]) < 1e-10 * b["l2"]
    assert a["its"] == b["its"]


def test_thermal_newton_is_quadratic(thermal_runs):
    res = thermal_runs["fe2"]["res"]
    orders = observed_orders(res)
    assert res[-1] < 1e-12 * res[0], res
    assert max(orders) > 1.8 and orders[-1] > 1.6, (res, orders)


def test_thermal_closure_called_once_per_iterate(thermal_runs):
    run = thermal_runs["fe2"]
    ext, its = run["ext"], run["its"]
    # One residual per iterate 0..its; the Jacobian at an iterate reuses its answer.
    assert ext.closure_calls == its + 1 == run["stats"].evaluations
    # Q, ∂Q/∂G and ∂Q/∂θ were requested at every iterate; the closure ran once.
    assert ext.requests == 3 * (its + 1)
    assert run["stats"].exact_solves == (its + 1) * ext.closure.n_global


def test_thermal_serial_equals_parallel(thermal_runs, comm):
    a, b = thermal_runs["fe2"]["l2"], thermal_runs["fe2_serial"]["l2"]
    assert abs(a - b) < 1e-10 * abs(b), (a, b)
    assert len(set(comm.allgather(round(a, 12)))) == 1


# ----------------------------------------------------------------- mechanical
def mechanical_problem(comm, *, closure):
    """Plane strain 4×4 quads: u = 0 at x = 0, u = (0.01, 0) at x = 1, free elsewhere."""
    msh = mesh.create_unit_square(comm, 4, 4, mesh.CellType.quadrilateral)
    V = fem.functionspace(msh, ("Lagrange", 1, (2,)))
    u, v = fem.Function(V), ufl.TestFunction(V)
    u.interpolate(lambda x: np.stack([0.01 * x[0], 0.0 * x[0]]))  # away from e = 0
    left = mesh.locate_entities_boundary(msh, 1, lambda x: np.isclose(x[0], 0.0))
    right = mesh.locate_entities_boundary(msh, 1, lambda x: np.isclose(x[0], 1.0))
    bcs = [
        fem.dirichletbc(np.zeros(2), fem.locate_dofs_topological(V, 1, left), V),
        fem.dirichletbc(np.array([0.01, 0.0]), fem.locate_dofs_topological(V, 1, right), V),
    ]
    layout = quadrature_layout(msh, 2)
    dx = layout.measure
    eps_v = ufl.sym(ufl.grad(v))
    if closure:
        sigma = mechanical_stress_operator(homogeneous_closure(MECHANICAL, layout), u, layout)
        F = ufl.inner(stress_tensor(sigma), eps_v) * dx
    else:
        p = MECHANICAL.phases[0]
        params = {"K": p.K, "G": p.G, "c1": p.c1, "c2": p.c2}
        F = ufl.inner(EQUINO_LAW.ufl_form(params, ufl.sym(ufl.grad(u))), eps_v) * dx
    J = ufl.derivative(F, u, ufl.TrialFunction(V))
    ext = None
    if closure:
        F, F_ops = replace_external_operators(F)
        J, J_ops = replace_external_operators(J)
        ext = sigma.external_function
    problem, history = newton(F, u, J, bcs)
    if closure:
        attach_to_nonlinear_problem(problem, bcs, F_ops, J_ops)
    return u, dx, problem, history, ext


def test_mechanical_fe2_equals_single_scale_solve(comm):
    u, dx, problem, history, ext = mechanical_problem(comm, closure=True)
    ext.begin_step(0)
    res = solve(problem, history)
    ext.end_step()
    its = problem.solver.getIterationNumber()
    u_ref, _, problem_ref, history_ref, _ = mechanical_problem(comm, closure=False)
    solve(problem_ref, history_ref)
    err = np.max(np.abs(u.x.array - u_ref.x.array))
    assert err < 1e-12, err  # displacements ~1e-2
    assert ext.closure_calls == its + 1
    assert ext.requests == 2 * (its + 1)
    orders = observed_orders(res)
    assert res[-1] < 1e-11 * res[0] and max(orders) > 1.8, (res, orders)
    u_s, dx_s, problem_s, history_s, ext_s = mechanical_problem(MPI.COMM_SELF, closure=True)
    ext_s.begin_step(0)
    solve(problem_s, history_s)
    ext_s.end_step()
    a, b = l2_squared(comm, u, dx), l2_squared(MPI.COMM_SELF, u_s, dx_s)
    assert abs(a - b) < 1e-10 * b, (a, b)


# ----------------------------------------------------------------- the adapter itself
def test_layout_numbers_owned_cells_then_points(comm):
    msh = mesh.create_unit_square(comm, 3, 5, mesh.CellType.quadrilateral)
    layout = quadrature_layout(msh, 2)
    x = quadrature_coordinates(msh, 2)
    assert layout.n_q == 4 and x.shape == (layout.n_local, 2)
    assert comm.allreduce(layout.n_local) == 15 * 4
    # The points of cell c are rows 4c..4c+3: their mean is the midpoint of cell c.
    geo = msh.geometry.x[msh.geometry.dofmaps[0][: layout.n_owned_cells]][:, :, :2]
    np.testing.assert_allclose(x.reshape(-1, 4, 2).mean(axis=1), geo.mean(axis=1), atol=1e-14)


def test_external_function_shapes_and_fixed_temperature(comm):
    """Direct requests: response and the tangent blocks in the package's (cell, point,
    value, operand) order; with θ fixed the flux has one operand."""
    msh = mesh.create_unit_square(comm, 2, 2, mesh.CellType.quadrilateral)
    V = fem.functionspace(msh, ("Lagrange", 2))
    T = fem.Function(V)
    T.interpolate(lambda x: 0.5 + x[0] ** 2 - x[0] * x[1])
    layout = quadrature_layout(msh, 2)
    closure = homogeneous_closure(THERMAL, layout)
    q = thermal_flux_operator(closure, T, layout, temperature=2.0)
    v = ufl.TestFunction(V)
    dx = layout.measure
    F = ufl.inner(q, ufl.grad(v)) * dx
    J = ufl.derivative(F, T, ufl.TrialFunction(V))
    F_r, F_ops = replace_external_operators(F)
    J_r, J_ops = replace_external_operators(J)
    assert [op.derivatives for op in J_ops] == [(1,)]
    ext = q.external_function
    ext.begin_step(0)
    evaluated = evaluate_operands(F_ops + J_ops)
    evaluate_external_operators(F_ops + J_ops, evaluated)
    assert ext.closure_calls == 1 and ext.requests == 2
    params = {"k0": PHASE.k0, "alpha": PHASE.alpha, "beta": PHASE.beta}
    F_ufl = ufl.inner(CONDUCTIVITY.ufl_form(params, 2.0, ufl.grad(T)), ufl.grad(v)) * dx
    J_ufl = ufl.derivative(F_ufl, T, ufl.TrialFunction(V))
    b, b_ref = fem.assemble_vector(fem.form(F_r)), fem.assemble_vector(fem.form(F_ufl))
    np.testing.assert_allclose(b.array, b_ref.array, atol=1e-12)
    A = fem.assemble_matrix(fem.form(J_r)).to_dense()
    A_ref = fem.assemble_matrix(fem.form(J_ufl)).to_dense()
    np.testing.assert_allclose(A, A_ref, atol=1e-12)

    with pytest.raises(NotImplementedError, match="first derivatives"):
        ext((2,))
    with pytest.raises(ValueError, match="operand"):
        ext((1, 0))
    with pytest.raises(ValueError, match="local points"):
        ClosureExternalFunction(closure, quadrature_layout(msh, 4), operand_columns=((0, 1), (2,)))
    with pytest.raises(ValueError, match="exactly once"):
        ClosureExternalFunction(closure, layout, operand_columns=((0, 1),))
    with pytest.raises(TypeError, match="mechanical"):
        mechanical_stress_operator(closure, T, layout)


def test_mechanical_jacobian_matches_ufl(comm):
    """The tangent dΣ/dE (non-symmetric in tensor-shear Voigt) lands in J with the right
    index order and the shear counted twice: J from the operator = J of the UFL law."""
    msh = mesh.create_unit_square(comm, 2, 3, mesh.CellType.quadrilateral)
    V = fem.functionspace(msh, ("Lagrange", 2, (2,)))
    u = fem.Function(V)
    u.interpolate(lambda x: np.stack([0.02 * x[0] * x[1] - 0.01 * x[1] ** 2, 0.015 * x[0] ** 2]))
    layout = quadrature_layout(msh, 2)
    closure = homogeneous_closure(MECHANICAL, layout)
    sigma = mechanical_stress_operator(closure, u, layout)
    v, du, dx = ufl.TestFunction(V), ufl.TrialFunction(V), layout.measure
    F = ufl.inner(stress_tensor(sigma), ufl.sym(ufl.grad(v))) * dx
    F_r, F_ops = replace_external_operators(F)
    J_r, J_ops = replace_external_operators(ufl.derivative(F, u, du))
    sigma.external_function.begin_step(0)
    evaluate_external_operators(F_ops + J_ops, evaluate_operands(F_ops + J_ops))
    assert sigma.external_function.closure_calls == 1
    p = MECHANICAL.phases[0]
    params = {"K": p.K, "G": p.G, "c1": p.c1, "c2": p.c2}
    F_ufl = ufl.inner(EQUINO_LAW.ufl_form(params, ufl.sym(ufl.grad(u))), ufl.sym(ufl.grad(v))) * dx
    J_ufl = ufl.derivative(F_ufl, u, du)
    b, b_ref = fem.assemble_vector(fem.form(F_r)), fem.assemble_vector(fem.form(F_ufl))
    np.testing.assert_allclose(b.array, b_ref.array, atol=1e-10 * np.abs(b_ref.array).max())
    A = fem.assemble_matrix(fem.form(J_r)).to_dense()
    A_ref = fem.assemble_matrix(fem.form(J_ufl)).to_dense()
    np.testing.assert_allclose(A, A_ref, atol=1e-10 * np.abs(A_ref).max())
    # The pointwise tangent dΣ/dE is not symmetric in tensor-shear Voigt (shear factor 2).
    (dsigma,) = J_ops
    t = dsigma.ref_coefficient.x.array.reshape(-1, 3, 3)
    assert np.abs(t - t.transpose(0, 2, 1)).max() > 0.1 * np.abs(t[:, :2, 2]).max() > 0
