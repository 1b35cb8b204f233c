"""Direct numerical simulation (DNS): the single-scale reference for the two-scale runs.

A macro problem is solved on a DOLFINx mesh fine enough to resolve the microstructure
everywhere; the FE² / HMM solutions are validated against it as the period ε → 0.

Microstructure. The cell image repeats with period ε, starting at ``origin``. Period
``p = floor((x - origin)/ε)`` (two integers) has its centre at ``origin + (p + 1/2) ε``
and uses the image ``cell_of(centre)``, which may vary slowly with the centre (graded
material). A mesh cell takes the phase of the voxel holding its midpoint x::

    y = (x - origin)/ε,  phase = image[floor(frac(y1) n), floor(frac(y2) n)]

(first index along x1, as in :mod:`neuroscale_coupling.cell.microstructure`); the phase is
constant per mesh cell (DG0 parameter fields), so a structured quadrilateral mesh with n
cells per period and a period boundary on every ε-line is voxel-exact.

Physics (the phase laws of :mod:`neuroscale_coupling.cell.laws`, their UFL forms):

- thermal, steady or backward Euler: ``c ∂T/∂t − div q = f``, ``q = k(T, ∇T) ∇T``,
  ``k = k0 (1 + α T)(1 + β |∇T|²)`` of the local phase (the local temperature T plays the
  part of the macro θ of the cell problems); Dirichlet conditions;
- mechanical, quasi-static plane strain: ``div σ + λ b = 0``, ``σ n = λ t`` on the
  traction boundary, with the EquiNO-type law per phase; Dirichlet values, body force b
  and boundary traction t scaled by the load factor λ of each step.

Each step is one SNES Newton solve (``dolfinx.fem.petsc.NonlinearProblem``, LU by MUMPS
by default); a step that does not converge restores the previous solution and raises
RuntimeError on every rank, so the caller may retry with a smaller step. The constructors
and every method that solves, integrates or gathers are collective over the mesh
communicator.
"""

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import neuroscale_coupling.dolfinx_env  # noqa: F401  (first: the import order of DOLFINx)

# isort: split
from neuroscale_coupling.petsc_solvers import direct_solver_type

# isort: split
import dolfinx.fem.petsc as fem_petsc
import ufl
from dolfinx import fem, mesh
from mpi4py import MPI
from petsc4py import PETSc

from neuroscale_coupling.cell.materials import Material, MechanicalMaterial, ThermalMaterial
from neuroscale_coupling.log import get_logger

__all__ = [
    "CellSource",
    "MechanicalDNS",
    "ThermalDNS",
    "cell_phases",
    "default_petsc_options",
    "gather_dof_values",
]

_log = get_logger(__name__)

#: A fixed cell image (n, n), or a function of the period centres (M, 2) returning one
#: image per centre (M, n, n) (or one image (n, n) for all).
CellSource = np.ndarray | Callable[[np.ndarray], np.ndarray]

_prefix_counter = itertools.count()


def default_petsc_options() -> dict[str, Any]:
    """SNES options used unless overridden: Newton with backtracking, direct LU (MUMPS
    when the PETSc build has it, else SuperLU_DIST, else PETSc's serial LU)."""
    lu = direct_solver_type()
    return {
        "snes_type": "newtonls",
        "snes_linesearch_type": "bt",
        "snes_rtol": 1e-12,
        "snes_atol": 1e-12,
        "snes_stol": 1e-10,
        "snes_max_it": 50,
        "ksp_type": "preonly",
        "pc_type": "lu",
        "pc_factor_mat_solver_type": lu,
    }


# ---------------------------------------------------------------------- microstructure
def _check_images(images: Any, n_centres: int, n_phases: int | None) -> np.ndarray:
    """Validate what ``cell_of`` returned: int images (n_centres, n, n)."""
    a = np.asarray(images)
    if a.ndim == 2:
        a = np.broadcast_to(a, (n_centres, *a.shape))
    if a.ndim != 3 or a.shape[0] != n_centres or a.shape[1] != a.shape[2] or a.shape[1] < 2:
        raise ValueError(
            f"cell_of must return square phase images of shape ({n_centres}, n, n) for "
            f"{n_centres} period centres (or one image (n, n)); got shape {np.shape(images)}"
        )
    if a.dtype.kind == "b":
        a = a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise TypeError(
            f"cell images hold integer phase ids; cell_of returned dtype {a.dtype}: "
            "convert with image.astype(int)"
        )
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or (n_phases is not None and hi >= n_phases):
            raise ValueError(
                f"cell images hold phase ids {lo}..{hi} but the material has {n_phases} "
                "phases (ids 0..n_phases-1): add phases to the material or relabel the images"
            )
    return a


def cell_phases(
    msh: Any,
    cell_of: CellSource,
    epsilon: float,
    *,
    n_phases: int | None = None,
    origin: Sequence[float] = (0.0, 0.0),
) -> np.ndarray:
    """Phase id of every local mesh cell (owned, then ghosts), shape (n_local_cells,), int64.

    Not collective: each rank evaluates its own cells (ghosts included, so no
    communication is needed). ``cell_of`` is called once with the centres (M, 2) of the
    distinct periods that hold local cell midpoints (see the module docstring).
    """
    eps = float(epsilon)
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"epsilon={epsilon!r}: the period must be a finite number > 0")
    o = np.asarray(origin, dtype=np.float64)
    if o.shape != (2,):
        raise ValueError(f"origin={origin!r}: give two coordinates (x1, x2)")
    tdim = msh.topology.dim
    if tdim != 2:
        raise ValueError(f"the DNS needs a 2D mesh; got topological dimension {tdim}")
    imap = msh.topology.index_map(tdim)
    n_cells = imap.size_local + imap.num_ghosts
    mid = mesh.compute_midpoints(msh, tdim, np.arange(n_cells, dtype=np.int32))[:, :2]
    y = (mid - o) / eps
    period = np.floor(y)
    frac = y - period
    uniq, inverse = np.unique(period.astype(np.int64), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    centres = o + (uniq + 0.5) * eps
    if callable(cell_of):
        images = _check_images(cell_of(centres), centres.shape[0], n_phases)
    else:
        images = _check_images(cell_of, centres.shape[0], n_phases)
    n = images.shape[1]
    ij = np.clip(np.floor(frac * n).astype(np.int64), 0, n - 1)
    return images[inverse, ij[:, 0], ij[:, 1]].astype(np.int64)


def _parameter_fields(
    msh: Any, material: Material, phase: np.ndarray
) -> tuple[Any, dict[str, Any]]:
    """DG0 space and one DG0 Function per material parameter, set from the cell phases."""
    Q0 = fem.functionspace(msh, ("DG", 0))
    dofs = np.asarray(Q0.dofmap.list[: phase.size, 0], dtype=np.int64)
    table = material.parameter_table()
    params = {}
    for c, name in enumerate(material.parameter_names):
        f = fem.Function(Q0, name=name)
        f.x.array[dofs] = table[phase, c]
        params[name] = f
    return Q0, params


def gather_dof_values(u: Any, *, tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """All dof coordinates and values of a Lagrange Function, on every rank (collective).

    Returns coordinates (N, 2) and values (N, bs), sorted by (x1, x2) rounded to ``tol``
    times the mesh extent (the tabulated coordinates differ by round-off between
    partitions): the same order whatever the partition, so a parallel solution can be
    compared with a serial one.
    """
    V = u.function_space
    comm = V.mesh.comm
    bs = V.dofmap.index_map_bs
    n_own = V.dofmap.index_map.size_local
    x = np.ascontiguousarray(V.tabulate_dof_coordinates()[:n_own, :2])
    vals = np.ascontiguousarray(u.x.array[: n_own * bs].reshape(n_own, bs))
    xs = np.concatenate(comm.allgather(x))
    vs = np.concatenate(comm.allgather(vals))
    low = xs.min(axis=0) if xs.size else np.zeros(2)
    extent = float((xs - low).max()) if xs.size else 1.0
    step = tol * max(extent, np.finfo(float).tiny)
    keys = np.round((xs - low) / step).astype(np.int64)
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    return xs[order], vs[order]


# ---------------------------------------------------------------------- shared machinery
#: Stands for "a PETSc error was raised" in the collective decision (below every reason).
_PETSC_ERROR_REASON = -1000


def _reason_name(reason: int) -> str:
    names = {v: k for k, v in vars(PETSc.SNES.ConvergedReason).items() if isinstance(v, int)}
    return f"{names.get(reason, 'UNKNOWN')} ({reason})"


class _DNSBase:
    """Mesh, phases, parameter fields, boundary conditions and the SNES solve."""

    material: Material

    def __init__(
        self,
        msh: Any,
        material: Material,
        cell_of: CellSource,
        epsilon: float,
        *,
        degree: int,
        quadrature_degree: int | None,
        origin: Sequence[float],
    ) -> None:
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"degree={degree!r}: give the Lagrange degree, an integer >= 1")
        if quadrature_degree is None:
            quadrature_degree = 2 * degree
        if (
            isinstance(quadrature_degree, bool)
            or not isinstance(quadrature_degree, int)
            or quadrature_degree < 1
        ):
            raise ValueError(f"quadrature_degree={quadrature_degree!r}: give an integer >= 1")
        self.msh = msh
        self.comm: MPI.Comm = msh.comm
        self.material = material
        self.epsilon = float(epsilon)
        self.degree = degree
        self.quadrature_degree = quadrature_degree
        self.phase = cell_phases(msh, cell_of, epsilon, n_phases=material.n_phases, origin=origin)
        self.Q0, self.params = _parameter_fields(msh, material, self.phase)
        self.dx = ufl.Measure("dx", domain=msh, metadata={"quadrature_degree": quadrature_degree})
        self._area: float | None = None
        self._mean_forms: dict[str, list[Any]] = {}

    # -- boundary conditions
    def _resolve_bcs(self, V: Any, bcs: Any) -> list[Any]:
        if callable(bcs):
            bcs = bcs(V)
        if bcs is None or isinstance(bcs, fem.DirichletBC):
            raise TypeError(
                "bcs must be a sequence of dolfinx.fem.DirichletBC (built on the solver's "
                "function space V) or a callable V -> sequence; wrap a single bc in a list"
            )
        out = list(bcs)
        for bc in out:
            if not isinstance(bc, fem.DirichletBC):
                raise TypeError(f"bcs must hold dolfinx.fem.DirichletBC objects; got {bc!r}")
            if not V._cpp_object.contains(bc.function_space):
                raise ValueError(
                    "a Dirichlet condition is built on another function space: create the "
                    "space first and pass it as V=..., or pass bcs as a callable V -> bcs"
                )
        return out

    def _make_problem(self, F: Any, u: Any, petsc_options: dict[str, Any] | None) -> None:
        if petsc_options is not None and not isinstance(petsc_options, dict):
            raise TypeError(f"petsc_options must be a dict; got {type(petsc_options).__name__}")
        self.petsc_options = {**default_petsc_options(), **(petsc_options or {})}
        prefix = f"nsc_dns_{next(_prefix_counter)}_"
        self.problem = fem_petsc.NonlinearProblem(
            F,
            u,
            petsc_options_prefix=prefix,
            bcs=self.bcs,
            petsc_options=self.petsc_options,
        )

    def _snes_solve(self, u: Any, what: str) -> int:
        """Newton solve from the current u; on failure restore u and raise (collective)."""
        backup = u.x.array.copy()
        # Start from the Dirichlet values: DOLFINx lifts the boundary mismatch with the
        # Jacobian, so the residual is a consistent function of the iterate (and the
        # line search meaningful) only once the iterate satisfies the conditions.
        for bc in self.bcs:
            bc.set(u.x.array)
        u.x.scatter_forward()
        snes = self.problem.solver
        failure = ""
        try:
            self.problem.solve()
        except PETSc.Error as exc:
            failure = f"PETSc error {exc}"
        reason = _PETSC_ERROR_REASON if failure else int(snes.getConvergedReason())
        worst = self.comm.allreduce(reason, op=MPI.MIN)
        iterations = int(snes.getIterationNumber())
        if worst <= 0:
            u.x.array[:] = backup
            if worst == _PETSC_ERROR_REASON:
                detail = failure or "a PETSc error on another rank"
            else:
                detail = f"SNES reason {_reason_name(worst)}, {iterations} iterations, "
                detail += f"residual norm {snes.getFunctionNorm():.3e}"
            raise RuntimeError(
                f"{what}: Newton did not converge ({detail}); the previous solution was "
                "restored: take a smaller step, or pass petsc_options such as "
                "{'snes_max_it': 100}"
            )
        return iterations

    # -- averages
    @property
    def area(self) -> float:
        """Measure of the domain |Ω| (collective on first use)."""
        if self._area is None:
            one = fem.form(fem.Constant(self.msh, 1.0) * self.dx)
            self._area = self.comm.allreduce(fem.assemble_scalar(one), op=MPI.SUM)
        return self._area

    def _mean(self, key: str, components: Callable[[], list[Any]]) -> np.ndarray:
        """Domain averages of UFL scalars; the forms are compiled on first use of key."""
        if key not in self._mean_forms:
            self._mean_forms[key] = [fem.form(c * self.dx) for c in components()]
        local = np.array([fem.assemble_scalar(f) for f in self._mean_forms[key]])
        return self.comm.allreduce(local, op=MPI.SUM) / self.area


# ---------------------------------------------------------------------- thermal
class ThermalDNS(_DNSBase):
    """Nonlinear heat conduction with a resolved microstructure.

    Solves ``c ∂T/∂t − div(k(T, ∇T) ∇T) = f`` (backward Euler) or its steady form.

    msh: 2D DOLFINx mesh on any communicator.
    material: ThermalMaterial; cell_of: image (n, n) or function of the period centres
    (M, 2) → images (M, n, n); epsilon: the period (see the module docstring).
    capacity: None (steady only), a float, or one value per phase (n_phases,).
    source: f, a float or any UFL scalar (Constant, Function, expression of
    ``ufl.SpatialCoordinate``); update its data between steps for time-dependent loads.
    bcs: sequence of DirichletBC on the space V, or a callable V → sequence.
    V: the scalar Lagrange space to use (build it first when the bcs need it), else
    ``functionspace(msh, ("Lagrange", degree))``.
    degree: Lagrange degree; quadrature_degree: default 2 * degree (2×2 Gauss on Q1).
    petsc_options: SNES/KSP options merged over ``default_petsc_options()``.

    Attributes: ``T`` (the solution Function, also the initial value of a transient run:
    set it before the first step), ``V``, ``phase`` (phase id per local cell), ``params``
    (DG0 parameter Functions), ``time`` (sum of the dt of the steps taken).
    """

    def __init__(
        self,
        msh: Any,
        material: ThermalMaterial,
        cell_of: CellSource,
        epsilon: float,
        *,
        bcs: Sequence[Any] | Callable[[Any], Sequence[Any]],
        capacity: float | Sequence[float] | None = None,
        source: Any = 0.0,
        V: Any = None,
        degree: int = 1,
        quadrature_degree: int | None = None,
        origin: Sequence[float] = (0.0, 0.0),
        petsc_options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(material, ThermalMaterial):
            raise TypeError(f"ThermalDNS needs a ThermalMaterial; got {type(material).__name__}")
        if V is not None:
            degree = V.element.basix_element.degree
        super().__init__(
            msh,
            material,
            cell_of,
            epsilon,
            degree=degree,
            quadrature_degree=quadrature_degree,
            origin=origin,
        )
        self.V = fem.functionspace(msh, ("Lagrange", degree)) if V is None else V
        if self.V.dofmap.index_map_bs != 1 or self.V.value_shape not in ((), (1,)):
            raise ValueError("V must be a scalar Lagrange space for the temperature")
        self.bcs = self._resolve_bcs(self.V, bcs)
        self.T = fem.Function(self.V, name="T")
        self.T_old = fem.Function(self.V, name="T_old")
        self.time = 0.0
        self._inv_dt = fem.Constant(msh, 0.0)
        self.capacity = self._capacity_field(capacity)
        f = fem.Constant(msh, float(source)) if isinstance(source, int | float) else source
        v = ufl.TestFunction(self.V)
        self.flux = material.law.ufl_form(self.params, self.T, ufl.grad(self.T))
        F = ufl.inner(self.flux, ufl.grad(v)) * self.dx - f * v * self.dx
        if self.capacity is not None:
            F += self.capacity * self._inv_dt * (self.T - self.T_old) * v * self.dx
        self._make_problem(F, self.T, petsc_options)

    def _capacity_field(self, capacity: Any) -> Any:
        if capacity is None:
            return None
        c = np.asarray(capacity, dtype=np.float64)
        if c.ndim == 0:
            c = np.full(self.material.n_phases, float(c))
        if c.shape != (self.material.n_phases,) or not np.all(np.isfinite(c)) or np.any(c < 0):
            raise ValueError(
                f"capacity={capacity!r}: give one finite value >= 0, or one per phase "
                f"({self.material.n_phases})"
            )
        field = fem.Function(self.Q0, name="capacity")
        dofs = np.asarray(self.Q0.dofmap.list[: self.phase.size, 0], dtype=np.int64)
        field.x.array[dofs] = c[self.phase]
        return field

    def solve_step(self, dt: float | None = None) -> int:
        """One steady solve (dt None) or one backward Euler step of size dt (collective).

        The current T is the previous time level and the Newton initial guess. Returns the
        Newton iterations; raises RuntimeError (T unchanged) when Newton fails.
        """
        if dt is None:
            self._inv_dt.value = 0.0
        else:
            if self.capacity is None:
                raise ValueError(
                    f"dt={dt!r} asks for a transient step but capacity is None: give "
                    "capacity=... to ThermalDNS, or call solve_step() for a steady solve"
                )
            if not (np.isfinite(dt) and dt > 0):
                raise ValueError(f"dt={dt!r}: the time step must be a finite number > 0")
            self._inv_dt.value = 1.0 / float(dt)
        self.T_old.x.array[:] = self.T.x.array
        what = "ThermalDNS steady solve" if dt is None else f"ThermalDNS step dt={dt:g}"
        iterations = self._snes_solve(self.T, what)
        if dt is not None:
            self.time += float(dt)
        _log.debug("%s: %d Newton iterations", what, iterations)
        return iterations

    def mean_flux(self) -> np.ndarray:
        """Domain average of the flux q = k ∇T, shape (2,) (collective)."""
        return self._mean("flux", lambda: [self.flux[0], self.flux[1]])


# ---------------------------------------------------------------------- mechanical
class MechanicalDNS(_DNSBase):
    """Quasi-static plane-strain nonlinear elasticity with a resolved microstructure.

    Solves ``div σ(ε(u)) + λ b = 0`` with ``u = λ g`` on the Dirichlet boundary and
    ``σ n = λ t`` where a traction is given, λ the load factor of the step
    (``solve_step(load)``).

    msh, material (MechanicalMaterial), cell_of, epsilon, origin: as in ThermalDNS.
    bcs: sequence of DirichletBC on the vector space V (or its sub-spaces), or a callable
    V → sequence. Their values (Function or Constant) hold the full load λ = 1: this
    object takes them over and sets them to λ × that value at every step.
    body_force: None or a UFL vector (2,), scaled by λ as well.
    traction: None or a callable ``(v, load) -> form``, the external work ``∫_Γ t·v ds``
    of the full traction at load factor ``load`` (a UFL scalar, the Constant λ of the
    step), e.g. ``lambda v, load: load * t * v[1] * ds(1)`` with ``ds`` a Measure on
    ``msh`` (and subdomain_data for the tagged boundary part); the same callable as
    MechanicalFE2Problem's ``traction``. It must be linear in v and scale the traction by
    ``load`` itself (as the example shows).
    V: the vector Lagrange space to use, else ``functionspace(msh, ("Lagrange", degree,
    (2,)))``; degree, quadrature_degree, petsc_options: as in ThermalDNS.

    Attributes: ``u`` (displacement Function), ``V``, ``phase``, ``params``, ``load``
    (λ of the last converged step), ``sigma`` (UFL stress tensor 2×2).
    """

    def __init__(
        self,
        msh: Any,
        material: MechanicalMaterial,
        cell_of: CellSource,
        epsilon: float,
        *,
        bcs: Sequence[Any] | Callable[[Any], Sequence[Any]],
        body_force: Any = None,
        traction: Callable[[Any, Any], Any] | None = None,
        V: Any = None,
        degree: int = 1,
        quadrature_degree: int | None = None,
        origin: Sequence[float] = (0.0, 0.0),
        petsc_options: dict[str, Any] | None = None,
    ) -> None:
        if traction is not None and not callable(traction):
            raise TypeError(
                f"traction must be None or a callable (v, load) -> boundary form; got "
                f"{type(traction).__name__}: wrap it, e.g. lambda v, load: load * t * v[1] * ds"
            )
        if not isinstance(material, MechanicalMaterial):
            raise TypeError(
                f"MechanicalDNS needs a MechanicalMaterial; got {type(material).__name__}"
            )
        if V is not None:
            degree = V.element.basix_element.degree
        super().__init__(
            msh,
            material,
            cell_of,
            epsilon,
            degree=degree,
            quadrature_degree=quadrature_degree,
            origin=origin,
        )
        self.V = fem.functionspace(msh, ("Lagrange", degree, (2,))) if V is None else V
        if self.V.dofmap.index_map_bs != 2:
            raise ValueError("V must be a Lagrange space of 2-vectors for the displacement")
        self.bcs = self._resolve_bcs(self.V, bcs)
        self._bc_base = [np.array(self._bc_values(bc), copy=True) for bc in self.bcs]
        self.load = 0.0
        self._lam = fem.Constant(msh, 0.0)
        self.u = fem.Function(self.V, name="u")
        v = ufl.TestFunction(self.V)
        self.sigma = material.law.ufl_form(self.params, ufl.sym(ufl.grad(self.u)))
        F = ufl.inner(self.sigma, ufl.sym(ufl.grad(v))) * self.dx
        if body_force is not None:
            F -= self._lam * ufl.inner(body_force, v) * self.dx
        if traction is not None:
            F -= traction(v, self._lam)
        self._make_problem(F, self.u, petsc_options)

    @staticmethod
    def _bc_values(bc: Any) -> np.ndarray:
        g = bc.g
        return g.x.array if hasattr(g, "x") else g.value

    def solve_step(self, load: float = 1.0) -> int:
        """Solve at load factor λ = load (collective); returns the Newton iterations.

        The initial guess is the last solution scaled by load / (previous load) (exact for
        a linear response under proportional loading). Raises RuntimeError when Newton
        fails; then u and the load stay at the previous step.
        """
        lam = float(load)
        if not np.isfinite(lam):
            raise ValueError(f"load={load!r} must be finite")
        previous = self.load
        for bc, base in zip(self.bcs, self._bc_base, strict=True):
            self._bc_values(bc)[...] = lam * base
        self._lam.value = lam
        backup = self.u.x.array.copy()
        if previous != 0.0:
            self.u.x.array[:] *= lam / previous
        try:
            iterations = self._snes_solve(self.u, f"MechanicalDNS step at load {lam:g}")
        except RuntimeError:
            self.u.x.array[:] = backup
            for bc, base in zip(self.bcs, self._bc_base, strict=True):
                self._bc_values(bc)[...] = previous * base
            self._lam.value = previous
            raise
        self.load = lam
        _log.debug("MechanicalDNS load %g: %d Newton iterations", lam, iterations)
        return iterations

    def mean_stress(self) -> np.ndarray:
        """Domain average of σ, tensor-shear Voigt (S11, S22, S12), shape (3,) (collective)."""
        s = self.sigma
        return self._mean("stress", lambda: [s[0, 0], s[1, 1], s[0, 1]])

    def mean_strain(self) -> np.ndarray:
        """Domain average of ε(u), tensor-shear Voigt (E11, E22, E12), shape (3,)
        (collective)."""
        e = ufl.sym(ufl.grad(self.u))
        return self._mean("strain", lambda: [e[0, 0], e[1, 1], e[0, 1]])
