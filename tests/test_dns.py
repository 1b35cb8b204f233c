"""The single-scale DNS reference: exact manufactured solutions, mesh convergence rate,
homogenization limit of laminates (thermal and mechanical) at rate ε, the phase map of a
graded microstructure, failures, and the same answer on 1 and 2 ranks."""

import numpy as np
import pytest

pytest.importorskip("dolfinx_solver")

import ufl
from dolfinx import fem, mesh
from dolfinx.fem.petsc import LinearProblem
from mpi4py import MPI

from neuroscale_coupling.cell import microstructure as ms
from neuroscale_coupling.cell.laws import CONDUCTIVITY, ThermalPhase
from neuroscale_coupling.cell.materials import MechanicalMaterial, ThermalMaterial, equino_material
from neuroscale_coupling.fine.analytic import laminate_exact
from neuroscale_coupling.hosts.dolfinx.dns import (
    MechanicalDNS,
    ThermalDNS,
    cell_phases,
    gather_dof_values,
)

NONLINEAR = ThermalPhase(k0=2.0, alpha=0.3, beta=0.5)
#: Two equal phases: any image gives the homogeneous material.
EQUAL = ThermalMaterial(phases=(NONLINEAR, NONLINEAR))
LINEAR_LAMINATE = ThermalMaterial(phases=(ThermalPhase(k0=1.0), ThermalPhase(k0=10.0)))
GRADED = ThermalMaterial(
    phases=(ThermalPhase(k0=1.0, alpha=0.2, beta=0.3), ThermalPhase(k0=8.0, alpha=-0.1, beta=1.0))
)
EQUINO = equino_material()
STRAIN = np.array([0.03, -0.01, 0.02])


def _square(comm: MPI.Comm, n: int):
    return mesh.create_unit_square(comm, n, n, mesh.CellType.quadrilateral)


def _boundary_dofs(V):
    msh = V.mesh
    msh.topology.create_connectivity(1, 2)
    return fem.locate_dofs_topological(V, 1, mesh.exterior_facet_indices(msh.topology))


def _l2(expr, msh, degree: int = 8) -> float:
    dx = ufl.Measure("dx", domain=msh, metadata={"quadrature_degree": degree})
    local = fem.assemble_scalar(fem.form(ufl.inner(expr, expr) * dx))
    return float(np.sqrt(msh.comm.allreduce(local, op=MPI.SUM)))


def _law(phase: ThermalPhase) -> dict[str, float]:
    return {"k0": phase.k0, "alpha": phase.alpha, "beta": phase.beta}


def _affine_bc(V, E: np.ndarray):
    g = fem.Function(V)
    g.interpolate(lambda x: np.vstack([E[0] * x[0] + E[2] * x[1], E[2] * x[0] + E[1] * x[1]]))
    return fem.dirichletbc(g, _boundary_dofs(V))


def _graded_inclusions(centres: np.ndarray) -> np.ndarray:
    """A disk whose volume fraction grows with x1 (one image per period)."""
    return np.stack([ms.circular_inclusion(8, 0.1 + 0.3 * c[0]) for c in centres])


# ---------------------------------------------------------------------- thermal, exact
def test_thermal_steady_and_backward_euler_reproduce_q2_solution(comm):
    """T = (1 + t) p(x), p quadratic, is in Q2 and linear in t: the steady solve at t = 0
    and every backward Euler step reproduce it to Newton tolerance (nonlinear k)."""
    msh = _square(comm, 4)
    x = ufl.SpatialCoordinate(msh)
    t = fem.Constant(msh, 0.0)
    transient = fem.Constant(msh, 0.0)  # 0: steady source, 1: with c ∂T/∂t = c p
    capacity = 3.0
    p = 1 + x[0] + 2 * x[1] ** 2 + x[0] * x[1]
    T_ex = (1 + t) * p
    q_ex = CONDUCTIVITY.ufl_form(_law(NONLINEAR), T_ex, ufl.grad(T_ex))
    f = transient * capacity * p - ufl.div(q_ex)
    V = fem.functionspace(msh, ("Lagrange", 2))
    g = fem.Function(V)
    g_expr = fem.Expression(T_ex, V.element.interpolation_points)
    g.interpolate(g_expr)
    dns = ThermalDNS(
        msh,
        EQUAL,
        ms.checkerboard(4),
        0.25,
        bcs=[fem.dirichletbc(g, _boundary_dofs(V))],
        capacity=[capacity, capacity],
        source=f,
        V=V,
        quadrature_degree=8,
    )
    iterations = [dns.solve_step()]
    errors = [_l2(dns.T - T_ex, msh)]
    # the macro flux average of the exact field
    dx = ufl.Measure("dx", domain=msh, metadata={"quadrature_degree": 8})
    q_mean = [
        comm.allreduce(fem.assemble_scalar(fem.form(q_ex[i] * dx)), op=MPI.SUM) for i in (0, 1)
    ]
    np.testing.assert_allclose(dns.mean_flux(), q_mean, rtol=1e-11)
    transient.value = 1.0
    for _ in range(3):
        t.value += 0.25
        g.interpolate(g_expr)
        iterations.append(dns.solve_step(0.25))
        errors.append(_l2(dns.T - T_ex, msh))
    assert dns.time == pytest.approx(0.75)
    assert max(errors) < 1e-11, errors
    assert all(it >= 1 for it in iterations)


def test_thermal_q1_converges_at_rate_two(comm):
    """Smooth manufactured T with the nonlinear law on Q1: L2 error ~ h²."""
    errors = []
    for n in (8, 16, 32):
        msh = _square(comm, n)
        x = ufl.SpatialCoordinate(msh)
        T_ex = 0.5 + ufl.sin(np.pi * x[0]) * ufl.cos(np.pi * x[1]) / 2
        f = -ufl.div(CONDUCTIVITY.ufl_form(_law(NONLINEAR), T_ex, ufl.grad(T_ex)))
        V = fem.functionspace(msh, ("Lagrange", 1))
        g = fem.Function(V)
        g.interpolate(fem.Expression(T_ex, V.element.interpolation_points))
        dns = ThermalDNS(
            msh, EQUAL, ms.laminate(4, 0.5), 0.25, bcs=[fem.dirichletbc(g, _boundary_dofs(V))],
            source=f, V=V,
        )  # fmt: skip
        dns.solve_step()
        errors.append(_l2(dns.T - T_ex, msh))
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all(np.abs(rates - 2.0) < 0.1), (errors, rates)


# ---------------------------------------------------------------------- homogenization
def test_thermal_laminate_approaches_homogenized_solution(comm):
    """Layers normal to e1, f = 1, T = 0 on ∂Ω: ‖T_ε − T_0‖ / ‖T_0‖ ~ ε, with T_0 the solve
    with diag(⟨1/k⟩⁻¹, ⟨k⟩) from laminate_exact on the same mesh."""
    K = laminate_exact(LINEAR_LAMINATE, (0.5, 0.5), np.zeros((1, 3))).tangent[0][:, :2]
    np.testing.assert_allclose(K, np.diag([2 / (1 + 1 / 10), 5.5]), rtol=1e-14)
    n_vox = 4
    errors = []
    for eps in (1 / 4, 1 / 8, 1 / 16):
        msh = _square(comm, round(n_vox / eps))
        V = fem.functionspace(msh, ("Lagrange", 1))
        bc = fem.dirichletbc(0.0, _boundary_dofs(V), V)
        image = ms.laminate(n_vox, 0.5, normal=1)
        dns = ThermalDNS(msh, LINEAR_LAMINATE, image, eps, bcs=[bc], source=1.0, V=V)
        assert dns.solve_step() == 1  # linear
        u, v = ufl.TrialFunction(V), ufl.TestFunction(V)
        Kc = fem.Constant(msh, np.ascontiguousarray(K))
        hom = LinearProblem(
            ufl.inner(Kc * ufl.grad(u), ufl.grad(v)) * ufl.dx,
            fem.Constant(msh, 1.0) * v * ufl.dx,
            bcs=[bc],
            petsc_options_prefix="test_dns_hom_",
            petsc_options={"ksp_type": "preonly", "pc_type": "lu"},
        )
        T0 = hom.solve()
        diff = fem.Function(V)
        diff.x.array[:] = dns.T.x.array - T0.x.array
        errors.append(_l2(diff, msh, 2) / _l2(T0, msh, 2))  # one compiled form for both
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert errors[-1] < 0.06, errors
    assert np.all((rates > 0.8) & (rates < 1.3)), (errors, rates)


def test_mechanical_laminate_mean_stress_approaches_exact(comm):
    """EquiNO matrix/fibre laminate under u = E x on ∂Ω, two load steps: the mean stress
    tends to the exact laminate response Σ(E) at rate ε (boundary layers of width ε)."""
    S = laminate_exact(EQUINO, (0.5, 0.5), STRAIN[None]).response[0]
    errors = []
    for eps in (1 / 4, 1 / 8, 1 / 16):
        msh = _square(comm, round(4 / eps))
        V = fem.functionspace(msh, ("Lagrange", 1, (2,)))
        dns = MechanicalDNS(msh, EQUINO, ms.laminate(4, 0.5), eps, bcs=[_affine_bc(V, STRAIN)], V=V)
        for load in (0.5, 1.0):
            dns.solve_step(load)
        np.testing.assert_allclose(dns.mean_strain(), STRAIN, atol=1e-12)
        errors.append(np.abs(dns.mean_stress() - S).max() / np.abs(S).max())
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert errors[-1] < 0.06, errors
    assert np.all((rates > 0.8) & (rates < 1.4)), (errors, rates)


# ---------------------------------------------------------------------- mechanical, exact
def test_mechanical_homogeneous_affine_field_is_exact(comm):
    """One EquiNO matrix phase, u = λ E x on ∂Ω: the affine field is the discrete solution
    and the mean stress is the pointwise law at λE (torch implementation)."""
    import torch

    matrix = MechanicalMaterial(phases=(EQUINO.phases[0],))
    msh = _square(comm, 8)
    V = fem.functionspace(msh, ("Lagrange", 1, (2,)))
    dns = MechanicalDNS(
        msh, matrix, np.zeros((2, 2), dtype=int), 0.25, bcs=[_affine_bc(V, STRAIN)], V=V
    )
    fields = {
        k: torch.tensor(v)
        for k, v in zip(matrix.parameter_names, matrix.parameter_table()[0], strict=True)
    }
    exact = fem.Function(V)
    for load in (0.5, 1.0):
        dns.solve_step(load)
        E = load * STRAIN
        exact.interpolate(
            lambda x, E=E: np.vstack([E[0] * x[0] + E[2] * x[1], E[2] * x[0] + E[1] * x[1]])
        )
        assert np.abs(dns.u.x.array - exact.x.array).max() < 1e-12
        sigma = matrix.law.torch_form(fields, torch.tensor(E))[0].numpy()
        np.testing.assert_allclose(dns.mean_stress(), sigma, rtol=1e-10)
    assert dns.load == 1.0


def test_mechanical_traction_gives_exact_uniaxial_stress(comm):
    """Linear elastic strip [0, 2] × [0, 1], roller on x1 = 0 (plus u2 = 0 at the origin),
    uniform traction λ t e1 on x1 = 2, free top and bottom: the plane-strain uniaxial-stress
    field u = λ (ε11 x1, ε22 x2) is affine, hence the discrete solution, at every load
    step, and the mean stress is (λ t, 0, 0)."""
    fibre = MechanicalMaterial(phases=(EQUINO.phases[1],))
    K, G = fibre.phases[0].K, fibre.phases[0].G
    lame, a = K - 2 * G / 3, K + 4 * G / 3  # σ = lame tr(ε) I + 2 G ε; a = lame + 2 G
    t = 250.0
    e11 = t * a / (a**2 - lame**2)
    e22 = -lame / a * e11
    msh = mesh.create_rectangle(
        comm, [np.zeros(2), np.array([2.0, 1.0])], [8, 4], mesh.CellType.quadrilateral
    )
    right = mesh.locate_entities_boundary(msh, 1, lambda x: np.isclose(x[0], 2.0))
    tags = mesh.meshtags(msh, 1, right, np.full(right.size, 3, dtype=np.int32))
    ds = ufl.Measure("ds", domain=msh, subdomain_data=tags)

    def bcs(V):
        left = mesh.locate_entities_boundary(msh, 1, lambda x: np.isclose(x[0], 0.0))
        origin = mesh.locate_entities_boundary(
            msh, 0, lambda x: np.isclose(x[0], 0.0) & np.isclose(x[1], 0.0)
        )
        zero = fem.Constant(msh, 0.0)
        return [
            fem.dirichletbc(zero, fem.locate_dofs_topological(V.sub(0), 1, left), V.sub(0)),
            fem.dirichletbc(zero, fem.locate_dofs_topological(V.sub(1), 0, origin), V.sub(1)),
        ]

    dns = MechanicalDNS(
        msh,
        fibre,
        np.zeros((2, 2), dtype=int),
        0.5,
        bcs=bcs,
        traction=lambda v, load: load * t * v[0] * ds(3),
    )
    exact = fem.Function(dns.V)
    for load in (0.5, 1.0):
        dns.solve_step(load)
        exact.interpolate(lambda x, s=load: np.vstack([s * e11 * x[0], s * e22 * x[1]]))
        scale = load * e11 * 2.0
        assert np.abs(dns.u.x.array - exact.x.array).max() < 1e-10 * scale
        np.testing.assert_allclose(dns.mean_stress(), [load * t, 0, 0], atol=1e-9 * t)
    with pytest.raises(TypeError, match="traction"):
        MechanicalDNS(msh, fibre, np.zeros((2, 2), dtype=int), 0.5, bcs=bcs, traction=1.0)


# ---------------------------------------------------------------------- microstructure map
def test_graded_phase_map_is_voxel_exact(comm):
    """cell_of gets the period centres; each mesh cell takes the voxel of its midpoint
    (first image index along x1); with n cells per period the map is voxel-exact."""
    n, eps = 4, 1 / 3
    seen = []

    def cell_of(centres: np.ndarray) -> np.ndarray:
        seen.append(centres.copy())
        p1 = np.floor(centres[:, 0] / eps).astype(int)
        return np.stack([ms.laminate(n, (1 + p % 3) / 4) for p in p1])

    msh = _square(comm, 12)
    phase = cell_phases(msh, cell_of, eps, n_phases=2)
    mid = mesh.compute_midpoints(msh, 2, np.arange(phase.size, dtype=np.int32))[:, :2]
    period = np.floor(mid / eps)
    layer = np.floor((mid / eps - period) * n)
    expected = (layer[:, 0] < 1 + period[:, 0] % 3).astype(int)
    np.testing.assert_array_equal(phase, expected)
    c = seen[0]
    np.testing.assert_allclose((c / eps - 0.5) % 1.0, 0.0, atol=1e-12)
    # ∫ k0 = Σ over periods of the voxel mean of k0 (linear laminate, 3 × 3 periods)
    dns = ThermalDNS(msh, LINEAR_LAMINATE, cell_of, eps, bcs=[])
    integral = comm.allreduce(fem.assemble_scalar(fem.form(dns.params["k0"] * ufl.dx)), op=MPI.SUM)
    vf = np.array([1, 2, 3]) / 4
    exact = 3 * eps**2 * np.sum(10 * vf + 1 * (1 - vf))
    assert integral == pytest.approx(exact, rel=1e-13)
    # an origin shift moves the pattern
    shifted = cell_phases(msh, ms.laminate(n, 0.25), 0.5, origin=(0.125, 0.0))
    expected = (np.floor(((mid[:, 0] - 0.125) / 0.5) % 1.0 * n) < 1).astype(int)
    np.testing.assert_array_equal(shifted, expected)


def test_invalid_input_raises(comm):
    msh = _square(comm, 4)
    V = fem.functionspace(msh, ("Lagrange", 1))
    with pytest.raises(ValueError, match="phase ids"):
        cell_phases(msh, 2 * np.ones((4, 4), dtype=int), 0.5, n_phases=2)
    with pytest.raises(TypeError, match="integer phase ids"):
        cell_phases(msh, np.zeros((4, 4)), 0.5)
    with pytest.raises(ValueError, match="shape"):
        cell_phases(msh, lambda c: np.zeros((1, 4, 4), dtype=int), 0.25)
    with pytest.raises(ValueError, match="epsilon"):
        cell_phases(msh, np.zeros((4, 4), dtype=int), 0.0)
    with pytest.raises(TypeError, match="ThermalMaterial"):
        ThermalDNS(msh, EQUINO, np.zeros((2, 2), dtype=int), 0.5, bcs=[])
    with pytest.raises(TypeError, match="sequence"):
        ThermalDNS(
            msh,
            EQUAL,
            np.zeros((2, 2), dtype=int),
            0.5,
            bcs=fem.dirichletbc(0.0, _boundary_dofs(V), V),
        )
    other = fem.functionspace(msh, ("Lagrange", 1))
    with pytest.raises(ValueError, match="another function space"):
        ThermalDNS(
            msh,
            EQUAL,
            np.zeros((2, 2), dtype=int),
            0.5,
            bcs=[fem.dirichletbc(0.0, _boundary_dofs(other), other)],
            V=V,
        )
    dns = ThermalDNS(
        msh,
        EQUAL,
        np.zeros((2, 2), dtype=int),
        0.5,
        bcs=lambda W: [fem.dirichletbc(0.0, _boundary_dofs(W), W)],
    )
    with pytest.raises(ValueError, match="capacity"):
        dns.solve_step(0.1)


def test_newton_failure_raises_on_every_rank_and_restores(comm):
    msh = _square(comm, 8)
    V = fem.functionspace(msh, ("Lagrange", 1))
    bc = fem.dirichletbc(0.0, _boundary_dofs(V), V)
    dns = ThermalDNS(
        msh, GRADED, _graded_inclusions, 0.25, bcs=[bc], source=30.0, V=V,
        petsc_options={"snes_max_it": 1},
    )  # fmt: skip
    dns.T.x.array[:] = 0.25
    with pytest.raises(RuntimeError, match=r"did not converge.*DIVERGED_MAX_IT.*restored"):
        dns.solve_step()
    assert np.all(dns.T.x.array == 0.25)
    assert dns.time == 0.0


# ---------------------------------------------------------------------- parallel = serial
def _thermal_graded(comm: MPI.Comm) -> tuple[ThermalDNS, int]:
    msh = _square(comm, 32)
    V = fem.functionspace(msh, ("Lagrange", 1))
    bc = fem.dirichletbc(0.0, _boundary_dofs(V), V)
    dns = ThermalDNS(
        msh, GRADED, _graded_inclusions, 0.25, bcs=[bc], source=4.0, capacity=[1.0, 2.0], V=V
    )
    its = dns.solve_step() + dns.solve_step(0.05)
    return dns, its


def _mechanical_graded(comm: MPI.Comm) -> tuple[MechanicalDNS, int]:
    msh = _square(comm, 16)
    V = fem.functionspace(msh, ("Lagrange", 1, (2,)))
    dns = MechanicalDNS(msh, EQUINO, _graded_inclusions, 0.5, bcs=[_affine_bc(V, STRAIN)], V=V)
    its = dns.solve_step(0.5) + dns.solve_step(1.0)
    return dns, its


def _phase_counts(dns) -> np.ndarray:
    """Owned cells of each phase, summed over the ranks of the DNS mesh."""
    n_own = dns.msh.topology.index_map(2).size_local
    counts = np.bincount(dns.phase[:n_own], minlength=dns.material.n_phases)
    return dns.comm.allreduce(counts, op=MPI.SUM)


@pytest.mark.parametrize(
    "build", [_thermal_graded, _mechanical_graded], ids=["thermal", "mechanical"]
)
def test_world_equals_serial(comm, build):
    """The solve on COMM_WORLD (distributed under mpiexec) equals the COMM_SELF solve."""
    par, its_par = build(comm)
    ser, its_ser = build(MPI.COMM_SELF)
    u_par = par.T if isinstance(par, ThermalDNS) else par.u
    u_ser = ser.T if isinstance(ser, ThermalDNS) else ser.u
    x_par, v_par = gather_dof_values(u_par)
    x_ser, v_ser = gather_dof_values(u_ser)
    np.testing.assert_allclose(x_par, x_ser, rtol=0, atol=1e-14)
    scale = np.abs(v_ser).max()
    assert np.abs(v_par - v_ser).max() <= 1e-10 * scale
    assert its_par == its_ser
    mean_par = par.mean_flux() if isinstance(par, ThermalDNS) else par.mean_stress()
    mean_ser = ser.mean_flux() if isinstance(ser, ThermalDNS) else ser.mean_stress()
    np.testing.assert_allclose(mean_par, mean_ser, rtol=1e-10, atol=1e-12 * np.abs(mean_ser).max())
    assert comm.allreduce(
        1 if np.array_equal(_phase_counts(par), _phase_counts(ser)) else 0, op=MPI.MIN
    )
