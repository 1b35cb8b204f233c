"""DOLFINx finite-element solver of the periodic cell problem (serial per point).

Each point's cell problem is solved on ``MPI.COMM_SELF``: the calling rank solves its own
points and ``solve`` makes no collective call, so ranks may hold different numbers of
points (zero included).

Discretisation (shared with the spectral solver on voxel images, so that both solve the
same discrete problem): nodes at the voxel corners, one bilinear (Q1) element per voxel
with the voxel's phase, 2×2 Gauss quadrature per element for the residual, the Jacobian
and the averages; unknown = periodic fluctuation (thermal: scalar φ with total gradient
G + ∇φ; mechanical: displacement u with total strain E + ε(u), internal work σ:ε(v)).
``degree=2`` uses Q2 (P2 on triangles) with a 3×3 Gauss rule.

Periodicity: a prolongation P (PETSc AIJ, one unit entry per row) maps the independent
unknowns to all dofs; dofs on x1 = 1 (x2 = 1) copy their partner on x1 = 0 (x2 = 0),
corners copy the origin corner, and the dofs of one node (the node at the origin) are
left out of the independent set, which pins the constants (thermal) or translations
(mechanical). Newton works on Pᵀ F(u) and Pᵀ J P (``Mat.PtAP``) with a sparse LU
(MUMPS when the PETSc build has it); a step that does not reduce ‖Pᵀ F‖ is halved
(backtracking), which never changes the converged answer, only robustness far from it.

Consistent tangent: at the converged state the same factorised Pᵀ J P is reused for d
extra solves, J ψ_j = -∂F/∂S_j; then ∂⟨q⟩/∂S_j = ⟨∂q/∂S_j⟩ + ⟨A ∇ψ_j⟩ (A = local
tangent), the second term as (Pᵀ L_i)·ψ_j with L_i(v) = ⟨(A ∇v)_i⟩ assembled.

Forms and expressions are compiled once per solver and mesh (cached per image size n or
per CellMesh object); per point only the Constants (G and θ, or E) and the DG0
parameter fields change.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import neuroscale_coupling.dolfinx_env  # noqa: F401  (first: the import order of DOLFINx)

# isort: split
from neuroscale_coupling.petsc_solvers import direct_solver_type

# isort: split
import basix
import basix.ufl
import dolfinx.fem.petsc as fem_petsc
import ufl
from dolfinx import fem, mesh
from mpi4py import MPI
from petsc4py import PETSc
from scipy.spatial import cKDTree

from neuroscale_coupling.cell.laws import MechanicalLaw, ThermalLaw
from neuroscale_coupling.cell.materials import MechanicalMaterial, ThermalMaterial
from neuroscale_coupling.fine.cell_mesh import CellMesh
from neuroscale_coupling.fine.protocol import FineSolveError, Homogenized, broadcast_cells
from neuroscale_coupling.log import get_logger

__all__ = ["FESolver"]

_log = get_logger(__name__)

#: Tolerance for matching periodic partner nodes, relative to the cell size 1.
_PERIODIC_TOL = 1e-8
#: Absolute residual floor, in units of eps · max|q| · sqrt(#dofs) · h (round-off level).
_FLOOR_FACTOR = 1e3
#: Backtracking: at most this many halvings of a Newton step.
_MAX_HALVINGS = 12


def _default_petsc_options() -> dict[str, Any]:
    solver = direct_solver_type()
    return {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": solver}


@dataclass
class _Problem:
    """Everything compiled and allocated for one mesh (one image size n or one CellMesh)."""

    msh: Any
    V: Any
    u: Any
    params: dict[str, Any]
    param_dofs: np.ndarray  # (C,) DG0 dof of each dolfinx cell, in the order of param_source
    param_source: np.ndarray  # (C,) voxel (flat) or CellMesh cell index of each DG0 dof
    state_setter: Any
    residual: Any
    jacobian: Any
    dres_dstate: list[Any]
    tangent_forms: list[Any]
    flux_expr: Any
    full_expr: Any
    cells: np.ndarray
    qweights: np.ndarray  # (C, nq) quadrature weight × |det J|
    area: float
    P: Any
    A: Any
    Jr: Any = None
    ksp: Any = None
    b: Any = None
    rb: Any = None
    dy: Any = None
    du: Any = None
    n_red: int = 0
    floor_scale: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class FESolver:
    """Periodic cell solver on DOLFINx (FineSolver protocol), serial per point.

    material: ThermalMaterial or MechanicalMaterial.
    degree: Lagrange degree (1: Q1 with 2×2 Gauss, the discretisation shared with the
    spectral solver; 2: Q2 with 3×3 Gauss).
    rtol: Newton stops when ‖Pᵀ F‖ <= rtol · ‖Pᵀ F‖ at the start (or at round-off level).
    max_newton: Newton iterations allowed before FineSolveError.
    petsc_options: options of the linear solver (KSP/PC, default LU with MUMPS when the
    PETSc build has it, else PETSc's own LU), passed through unchanged under a private
    prefix, e.g. ``{"pc_factor_mat_solver_type": "petsc"}``.
    """

    def __init__(
        self,
        material: ThermalMaterial | MechanicalMaterial,
        *,
        degree: int = 1,
        rtol: float = 1e-10,
        max_newton: int = 30,
        petsc_options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(material, ThermalMaterial | MechanicalMaterial):
            raise TypeError(
                f"FESolver needs a ThermalMaterial or MechanicalMaterial; got "
                f"{type(material).__name__}"
            )
        if degree not in (1, 2) or isinstance(degree, bool):
            raise ValueError(f"degree={degree!r}: give 1 (Q1/P1) or 2 (Q2/P2)")
        if not (isinstance(rtol, int | float) and 0.0 < rtol < 1.0):
            raise ValueError(f"rtol={rtol!r} must be a number in (0, 1), e.g. 1e-10")
        if isinstance(max_newton, bool) or not isinstance(max_newton, int) or max_newton < 1:
            raise ValueError(f"max_newton={max_newton!r}: give an integer >= 1")
        if petsc_options is not None and not isinstance(petsc_options, dict):
            raise TypeError(f"petsc_options must be a dict; got {type(petsc_options).__name__}")
        self.material = material
        self.degree = int(degree)
        self.rtol = float(rtol)
        self.max_newton = int(max_newton)
        self.petsc_options = {**_default_petsc_options(), **(petsc_options or {})}
        self._thermal = isinstance(material, ThermalMaterial)
        self._problems: dict[Any, _Problem] = {}
        self._ksp_counter = 0

    @property
    def quadrature_degree(self) -> int:
        """Degree passed to basix/FFCx: 2 → 2×2 Gauss (degree 1), 4 → 3×3 Gauss (degree 2)."""
        return 2 * self.degree

    # ------------------------------------------------------------------ public API
    def solve(self, cells: np.ndarray | CellMesh, states: np.ndarray) -> Homogenized:
        """Solve the cell problems of N points on this rank (not collective).

        cells: int array (N, n, n) of phase images, one image (n, n) shared by all
        points, or a CellMesh shared by all points.
        states: (N, d) or (d,) float, d = material.state_dim.
        Returns Homogenized with response (N, r), tangent (N, r, d) and
        newton_iterations (N,). Raises FineSolveError naming the first point whose
        Newton iteration failed.
        """
        s = self.material.check_states(states)
        n_pts = s.shape[0]
        r, d = self.material.response_dim, self.material.state_dim
        response = np.zeros((n_pts, r))
        tangent = np.zeros((n_pts, r, d))
        iterations = np.zeros(n_pts, dtype=np.int64)
        if isinstance(cells, CellMesh):
            if cells.phase.max() >= self.material.n_phases:
                raise ValueError(
                    f"the cell mesh holds phase id {cells.phase.max()} but the material has "
                    f"{self.material.n_phases} phases: add phases or relabel the mesh"
                )
            prob = self._problem_for_mesh(cells)
            values = self.material.parameter_table()[cells.phase]  # (C, n_params)
            self._check_law({nm: values[None, :, c] for c, nm in enumerate(self._pnames)}, s)
            self._set_params(prob, {nm: values[:, c] for c, nm in enumerate(self._pnames)})
            for p in range(n_pts):
                response[p], tangent[p], iterations[p] = self._solve_point(prob, p, s[p])
            return Homogenized(response=response, tangent=tangent, newton_iterations=iterations)
        images = broadcast_cells(cells, n_pts, self.material.n_phases)
        if n_pts == 0:
            return Homogenized(response=response, tangent=tangent, newton_iterations=iterations)
        prob = self._problem_for_image(images.shape[-1])
        shared = images.ndim == 3 and images.strides[0] == 0
        flds = self.material.fields(images[:1] if shared else images)
        self._check_law({nm: v.reshape(v.shape[0], -1) for nm, v in flds.items()}, s)
        for p in range(n_pts):
            if p == 0 or not shared:
                q = 0 if shared else p
                self._set_params(prob, {nm: flds[nm][q].reshape(-1) for nm in self._pnames})
            response[p], tangent[p], iterations[p] = self._solve_point(prob, p, s[p])
        return Homogenized(response=response, tangent=tangent, newton_iterations=iterations)

    def _check_law(self, values: dict[str, np.ndarray], states: np.ndarray) -> None:
        """FineSolveError for the first state at which the law calls the cell problem
        ill-posed; values: parameter name → (N or 1, K) at the cell's K points."""
        n = states.shape[0]
        full = {nm: np.broadcast_to(v, (n, v.shape[1])) for nm, v in values.items()}
        for p, why in enumerate(self.material.law.check(full, states)):
            if why is not None:
                raise FineSolveError(p, states[p], why)

    # ------------------------------------------------------------------ set-up
    @property
    def _pnames(self) -> tuple[str, ...]:
        return self.material.parameter_names

    def _problem_for_image(self, n: int) -> _Problem:
        key = ("image", n)
        if key not in self._problems:
            msh = mesh.create_unit_square(MPI.COMM_SELF, n, n, mesh.CellType.quadrilateral)
            tdim = msh.topology.dim
            n_cells = msh.topology.index_map(tdim).size_local
            mid = mesh.compute_midpoints(msh, tdim, np.arange(n_cells, dtype=np.int32))
            ij = np.clip(np.floor(mid[:, :2] * n).astype(np.int64), 0, n - 1)
            source = ij[:, 0] * n + ij[:, 1]  # image[i, j] ravelled (first index along x1)
            self._problems[key] = self._build(msh, source)
            _log.debug("compiled FE cell problem for %d×%d voxel images", n, n)
        return self._problems[key]

    def _problem_for_mesh(self, cell_mesh: CellMesh) -> _Problem:
        if cell_mesh not in self._problems:
            cells = cell_mesh.cells
            if cells.shape[1] == 4:
                shape = "quadrilateral"
                cells = cells[:, [0, 1, 3, 2]]  # counter-clockwise → DOLFINx tensor order
            else:
                shape = "triangle"
            element = basix.ufl.element("Lagrange", shape, 1, shape=(2,))
            msh = mesh.create_mesh(
                MPI.COMM_SELF, np.ascontiguousarray(cells), element, cell_mesh.points.copy()
            )
            source = np.asarray(msh.topology.original_cell_index, dtype=np.int64)
            self._problems[cell_mesh] = self._build(msh, source)
            _log.debug("compiled FE cell problem for a %d-cell mesh", cell_mesh.n_cells)
        return self._problems[cell_mesh]

    def _build(self, msh: Any, source: np.ndarray) -> _Problem:
        tdim = msh.topology.dim
        n_cells = msh.topology.index_map(tdim).size_local
        cells = np.arange(n_cells, dtype=np.int32)
        qdeg = self.quadrature_degree
        dx = ufl.Measure("dx", domain=msh, metadata={"quadrature_degree": qdeg})
        Q0 = fem.functionspace(msh, ("DG", 0))
        params = {nm: fem.Function(Q0, name=nm) for nm in self._pnames}
        param_dofs = np.asarray(Q0.dofmap.list[:, 0], dtype=np.int64)
        if self._thermal:
            V = fem.functionspace(msh, ("Lagrange", self.degree))
            forms = _thermal_forms(msh, V, self.material.law, params, dx)
        else:
            V = fem.functionspace(msh, ("Lagrange", self.degree, (2,)))
            forms = _mechanical_forms(msh, V, self.material.law, params, dx)
        u = forms["u"]
        cell_type = msh.topology.cell_type.name
        qpts, qwts = basix.make_quadrature(getattr(basix.CellType, cell_type), qdeg)
        det = fem.Expression(abs(ufl.JacobianDeterminant(msh)), qpts)
        qweights = det.eval(msh, cells).reshape(n_cells, -1) * qwts[None, :]
        residual = fem.form(forms["F"])
        jacobian = fem.form(forms["J"])
        prob = _Problem(
            msh=msh,
            V=V,
            u=u,
            params=params,
            param_dofs=param_dofs,
            param_source=source,
            state_setter=forms["set_state"],
            residual=residual,
            jacobian=jacobian,
            dres_dstate=[fem.form(f) for f in forms["dF"]],
            tangent_forms=[fem.form(f) for f in forms["L"]],
            flux_expr=fem.Expression(forms["flux"], qpts),
            full_expr=fem.Expression(forms["full"], qpts),
            cells=cells,
            qweights=qweights,
            area=float(qweights.sum()),
            P=None,
            A=fem_petsc.create_matrix(jacobian),
        )
        prob.extra["qpoints"] = qpts
        prob.P, prob.n_red = _prolongation(V)
        bs = V.dofmap.index_map_bs
        n_dofs = V.dofmap.index_map.size_local * bs
        prob.floor_scale = (
            _FLOOR_FACTOR * np.finfo(float).eps * math.sqrt(n_dofs) * math.sqrt(prob.area / n_cells)
        )
        prob.b = fem_petsc.create_vector(V)
        prob.rb = prob.P.createVecRight()
        prob.dy = prob.P.createVecRight()
        prob.du = prob.P.createVecLeft()
        prob.ksp = self._make_ksp()
        return prob

    def _make_ksp(self) -> Any:
        self._ksp_counter += 1
        prefix = f"nsc_fem_{id(self):x}_{self._ksp_counter}_"
        ksp = PETSc.KSP().create(MPI.COMM_SELF)
        ksp.setOptionsPrefix(prefix)
        opts = PETSc.Options()
        for key, value in self.petsc_options.items():
            opts[prefix + key] = value
        try:
            ksp.setFromOptions()
        finally:
            for key in self.petsc_options:
                opts.delValue(prefix + key)
        return ksp

    @staticmethod
    def _set_params(prob: _Problem, values: dict[str, np.ndarray]) -> None:
        for nm, fn in prob.params.items():
            fn.x.array[prob.param_dofs] = values[nm][prob.param_source]

    # ------------------------------------------------------------------ Newton
    def _residual_norm(self, prob: _Problem) -> float:
        with prob.b.localForm() as bl:
            bl.set(0.0)
        fem_petsc.assemble_vector(prob.b, prob.residual)
        prob.P.multTranspose(prob.b, prob.rb)
        return float(prob.rb.norm())

    def _assemble_jacobian(self, prob: _Problem) -> None:
        prob.A.zeroEntries()
        fem_petsc.assemble_matrix(prob.A, prob.jacobian)
        prob.A.assemble()
        if prob.Jr is None:
            prob.Jr = prob.A.PtAP(prob.P)
            prob.ksp.setOperators(prob.Jr)
        else:
            prob.A.PtAP(prob.P, result=prob.Jr)

    def _linear_solve(self, prob: _Problem, rhs: Any, out: Any) -> str | None:
        """Solve (Pᵀ J P) out = rhs; returns a failure reason or None."""
        try:
            prob.ksp.solve(rhs, out)
        except PETSc.Error as exc:
            return f"the linear solve failed ({exc})"
        reason = prob.ksp.getConvergedReason()
        if reason < 0:
            return f"the LU solve failed (KSP reason {reason}; singular Jacobian?)"
        if not np.all(np.isfinite(out.array)):
            return "the linear solve produced NaN/Inf (singular Jacobian?)"
        return None

    def _solve_point(
        self, prob: _Problem, index: int, state: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, int]:
        prob.state_setter(state)
        u = prob.u.x.array
        u[:] = 0.0
        flux0 = prob.flux_expr.eval(prob.msh, prob.cells)
        floor = prob.floor_scale * float(np.max(np.abs(flux0), initial=0.0))
        rnorm = self._residual_norm(prob)
        r0 = rnorm
        target = max(self.rtol * r0, floor)
        it = 0
        while True:
            if not math.isfinite(rnorm):
                raise FineSolveError(index, state, f"the residual is {rnorm} at Newton step {it}")
            self._assemble_jacobian(prob)
            if rnorm <= target:
                break
            if it >= self.max_newton:
                raise FineSolveError(
                    index,
                    state,
                    f"Newton did not converge in {self.max_newton} iterations (residual "
                    f"{rnorm:.3e}, start {r0:.3e}, target {target:.3e})",
                )
            prob.rb.scale(-1.0)
            failure = self._linear_solve(prob, prob.rb, prob.dy)
            if failure:
                raise FineSolveError(index, state, f"{failure} at Newton step {it}")
            prob.P.mult(prob.dy, prob.du)
            u_old = u.copy()
            du = prob.du.array
            step = 1.0
            for _ in range(_MAX_HALVINGS + 1):
                u[:] = u_old + step * du
                trial = self._residual_norm(prob)
                if trial <= (1.0 - 1e-4 * step) * rnorm or trial <= target:
                    break
                step *= 0.5
            else:
                raise FineSolveError(
                    index,
                    state,
                    f"no decrease of the residual along the Newton step at iteration {it} "
                    f"(residual {rnorm:.3e}, start {r0:.3e}, target {target:.3e}): the "
                    "iteration stagnated; raise rtol or check the material parameters",
                )
            rnorm = trial
            it += 1
        return (*self._homogenize(prob, index, state), it)

    def _homogenize(
        self, prob: _Problem, index: int, state: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        r, d = self.material.response_dim, self.material.state_dim
        vals = prob.full_expr.eval(prob.msh, prob.cells).reshape(len(prob.cells), -1, r + r * d)
        mean = np.einsum("cq,cqk->k", prob.qweights, vals) / prob.area
        response = mean[:r].copy()
        tangent = mean[r:].reshape(r, d).copy()
        # ⟨A ∇ψ_j⟩_i = (Pᵀ L_i) · y_j with (Pᵀ J P) y_j = -Pᵀ ∂F/∂S_j.
        lred = np.empty((r, prob.n_red))
        for i, form in enumerate(prob.tangent_forms):
            with prob.b.localForm() as bl:
                bl.set(0.0)
            fem_petsc.assemble_vector(prob.b, form)
            prob.P.multTranspose(prob.b, prob.rb)
            lred[i] = prob.rb.array
        for j, form in enumerate(prob.dres_dstate):
            with prob.b.localForm() as bl:
                bl.set(0.0)
            fem_petsc.assemble_vector(prob.b, form)
            prob.P.multTranspose(prob.b, prob.rb)
            prob.rb.scale(-1.0)
            failure = self._linear_solve(prob, prob.rb, prob.dy)
            if failure:
                raise FineSolveError(index, state, f"{failure} in the tangent solve {j}")
            tangent[:, j] += lred @ prob.dy.array / prob.area
        return response, tangent


# ---------------------------------------------------------------------- forms
def _thermal_forms(msh: Any, V: Any, law: ThermalLaw, params: dict, dx: Any) -> dict:
    """Residual, Jacobian, ∂F/∂(G, θ), L_i and the flux expressions of the thermal law."""
    phi = fem.Function(V, name="phi")
    v = ufl.TestFunction(V)
    dphi = ufl.TrialFunction(V)
    G = fem.Constant(msh, np.zeros(2))
    theta = fem.Constant(msh, 0.0)
    g = ufl.variable(G + ufl.grad(phi))
    th = ufl.variable(theta)
    q = law.ufl_form(params, th, g)
    A = ufl.diff(q, g)  # (2, 2)
    dq_dth = ufl.diff(q, th)  # (2,)
    dq_ds = ufl.as_matrix([[A[i, 0], A[i, 1], dq_dth[i]] for i in range(2)])  # (2, 3)
    F = ufl.inner(q, ufl.grad(v)) * dx
    J = ufl.derivative(F, phi, dphi)
    dF = [ufl.inner(dq_ds[:, j], ufl.grad(v)) * dx for j in range(3)]
    L = [ufl.dot(A, ufl.grad(v))[i] * dx for i in range(2)]
    full = ufl.as_vector([q[0], q[1]] + [dq_ds[i, j] for i in range(2) for j in range(3)])

    def set_state(s: np.ndarray) -> None:
        G.value[:] = s[:2]
        theta.value = float(s[2])

    return {"u": phi, "F": F, "J": J, "dF": dF, "L": L, "flux": q, "full": full,
            "set_state": set_state}  # fmt: skip


def _mechanical_forms(msh: Any, V: Any, law: MechanicalLaw, params: dict, dx: Any) -> dict:
    """Residual, Jacobian, ∂F/∂E, L_i and the stress expressions of the mechanical law."""
    u = fem.Function(V, name="u")
    v = ufl.TestFunction(V)
    du = ufl.TrialFunction(V)
    E = fem.Constant(msh, np.zeros(3))
    E_t = ufl.as_matrix([[E[0], E[2]], [E[2], E[1]]])
    eps = ufl.variable(E_t + ufl.sym(ufl.grad(u)))
    sigma = law.ufl_form(params, eps)
    A = ufl.diff(sigma, eps)  # (2, 2, 2, 2), ε11/ε12/ε21/ε22 as independent entries
    i, j, k, m = ufl.indices(4)
    units = [((1, 0), (0, 0)), ((0, 0), (0, 1)), ((0, 1), (1, 0))]  # ∂ε/∂E_j (E12 → ε12, ε21)
    dsig = [ufl.as_tensor(A[i, j, k, m] * ufl.as_matrix(b)[k, m], (i, j)) for b in units]
    voigt = [(0, 0), (1, 1), (0, 1)]
    eps_v = ufl.sym(ufl.grad(v))
    F = ufl.inner(sigma, ufl.sym(ufl.grad(v))) * dx
    J = ufl.derivative(F, u, du)
    dF = [ufl.inner(ds, eps_v) * dx for ds in dsig]
    L = [A[a, b, k, m] * eps_v[k, m] * dx for a, b in voigt]
    flux = ufl.as_vector([sigma[a, b] for a, b in voigt])
    full = ufl.as_vector(
        [sigma[a, b] for a, b in voigt] + [dsig[jj][a, b] for a, b in voigt for jj in range(3)]
    )

    def set_state(s: np.ndarray) -> None:
        E.value[:] = s

    return {"u": u, "F": F, "J": J, "dF": dF, "L": L, "flux": flux, "full": full,
            "set_state": set_state}  # fmt: skip


# ---------------------------------------------------------------------- periodicity
def _prolongation(V: Any) -> tuple[Any, int]:
    """P (n_dofs × n_red, AIJ) mapping independent dofs to all dofs, and n_red.

    Nodes are matched by coordinates: the partner of a node x is the node at x with every
    coordinate ≈ 1 replaced by 0. The node at the origin is pinned (its dofs get empty
    rows), which removes the constants/translations from the independent set.
    """
    bs = V.dofmap.index_map_bs
    x = V.tabulate_dof_coordinates()[:, :2]
    n_nodes = x.shape[0]
    wrapped = np.where(x > 1.0 - _PERIODIC_TOL, x - 1.0, x)
    independent = np.flatnonzero(np.all(x <= 1.0 - _PERIODIC_TOL, axis=1))
    dist, nearest = cKDTree(x[independent]).query(wrapped)
    if np.any(dist > _PERIODIC_TOL):
        bad = int(np.argmax(dist))
        raise ValueError(
            f"the mesh is not periodic: the node at {x[bad].tolist()} has no partner at "
            f"{wrapped[bad].tolist()} (nearest {dist[bad]:.3g} away); build the mesh so that "
            "the nodes on opposite sides of the cell match"
        )
    master = independent[nearest]  # (n_nodes,) independent node of every node
    origin = int(independent[np.argmin(np.linalg.norm(x[independent], axis=1))])
    if np.linalg.norm(x[origin]) > _PERIODIC_TOL:
        raise ValueError(
            f"the mesh has no node at the origin (nearest {x[origin].tolist()}): a cell mesh "
            "needs nodes at the corners of the unit square"
        )
    red_index = np.full(n_nodes, -1, dtype=np.int64)
    keep = independent[independent != origin]
    red_index[keep] = np.arange(keep.size)
    node_col = red_index[master]  # (n_nodes,), -1 for the pinned node and its copies
    col = (node_col[:, None] * bs + np.arange(bs)[None, :]).reshape(-1)
    valid = np.repeat(node_col >= 0, bs)
    n_dofs, n_red = n_nodes * bs, keep.size * bs
    indptr = np.concatenate([[0], np.cumsum(valid)]).astype(PETSc.IntType)
    indices = col[valid].astype(PETSc.IntType)
    P = PETSc.Mat().createAIJ(
        size=(n_dofs, n_red),
        csr=(indptr, indices, np.ones(indices.size)),
        comm=MPI.COMM_SELF,
    )
    P.assemble()
    return P, n_red
