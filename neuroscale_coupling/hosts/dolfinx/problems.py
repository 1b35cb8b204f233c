"""DOLFINx host: FE² macro problems whose constitutive response comes from a closure.

The closure's local points are the quadrature points of the mesh cells this rank owns,
numbered ``k = c * n_q + q`` (owned cell ``c`` in local numbering, quadrature point
``q`` of the rule of :class:`MacroQuadrature`). Response and tangent live in quadrature
spaces that the residual and Jacobian forms read; the SNES residual callback evaluates
the macro state at the quadrature points, calls the closure (collectively) and fills
those spaces, then assembles. The Jacobian at the same iterate reuses the tangent: the
closure is called once per new iterate, never twice for the same state (line search
and Jacobian evaluations included). Whether an iterate is new is decided collectively,
so every rank calls the collective closure the same number of times.

Thermal (steady or backward Euler): find T with
``∫ c (T - T_old)/Δt v + ∫ Q(∇T, T)·∇v = ∫ f v + boundary terms``, Jacobian
``∫ c/Δt δT v + ∫ (∂Q/∂G ∇δT + ∂Q/∂θ δT)·∇v``.

Mechanical (quasi-static, plane strain): find u with ``∫ Σ(ε(u)) : ε(v) = ∫_Γ t·v``,
where with tensor-shear Voigt vectors ``Σ:ε(v) = Σ11 ε11 + Σ22 ε22 + 2 Σ12 ε12``.
"""

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import neuroscale_coupling.dolfinx_env  # noqa: F401  (first: the import order of DOLFINx)

# isort: split
from neuroscale_coupling.petsc_solvers import newton_lu_options

# isort: split
import basix.ufl
import dolfinx.fem.petsc as fem_petsc
import ufl
from dolfinx import fem
from mpi4py import MPI
from petsc4py import PETSc

from neuroscale_coupling.closure.contract import Closure
from neuroscale_coupling.closure.run_record import NewtonReport, run_step
from neuroscale_coupling.log import get_logger

__all__ = [
    "DEFAULT_SNES_OPTIONS",
    "MacroQuadrature",
    "MechanicalFE2Problem",
    "ThermalFE2Problem",
    "voigt_strain",
]

log = get_logger(__name__)

#: Newton with a full step and a direct LU (MUMPS when present): the consistent tangent
#: gives quadratic convergence (:func:`~neuroscale_coupling.petsc_solvers.
#: newton_lu_options`). Passed through to PETSc unchanged; the user's options update these.
DEFAULT_SNES_OPTIONS: dict[str, Any] = newton_lu_options()


class MacroQuadrature:
    """The quadrature rule of a macro mesh and the coordinates of its local points.

    msh: a 2D DOLFINx mesh (any communicator). degree: quadrature degree (2 gives 2×2
    Gauss points on quadrilaterals, 3 points on triangles).
    Attributes: ``points`` (n_q, 2) reference points; ``cells`` (n_owned,) local cell
    indices; ``coordinates`` (n_owned * n_q, 2) physical coordinates of the closure's
    local points in their order; ``n_local`` = n_owned * n_q.
    """

    def __init__(self, msh: Any, degree: int = 2) -> None:
        if msh.geometry.dim < 2 or msh.topology.dim != 2:
            raise ValueError(f"the macro mesh must be 2D; got topological dim {msh.topology.dim}")
        self.msh = msh
        self.degree = int(degree)
        self.cell_name = msh.topology.cell_name()
        probe = basix.ufl.quadrature_element(self.cell_name, value_shape=(), degree=self.degree)
        self.points = np.asarray(fem.functionspace(msh, probe).element.interpolation_points)
        self.n_q = self.points.shape[0]
        n_owned = msh.topology.index_map(2).size_local
        self.cells = np.arange(n_owned, dtype=np.int32)
        x = fem.Expression(ufl.SpatialCoordinate(msh), self.points).eval(msh, self.cells)
        self.coordinates = np.ascontiguousarray(x.reshape(-1, x.shape[-1])[:, :2])
        self.n_local = n_owned * self.n_q
        self.measure = ufl.Measure(
            "dx",
            domain=msh,
            metadata={"quadrature_degree": self.degree, "quadrature_rule": "default"},
        )

    @property
    def n_owned_cells(self) -> int:
        """Cells this rank owns."""
        return int(self.cells.size)

    @property
    def n_cells(self) -> int:
        """Cells of this rank, ghosts included."""
        index_map = self.msh.topology.index_map(2)
        return int(index_map.size_local + index_map.num_ghosts)

    def space(self, value_shape: tuple[int, ...]) -> Any:
        """A quadrature function space on this rule with the given value shape."""
        element = basix.ufl.quadrature_element(
            self.cell_name, value_shape=value_shape, degree=self.degree
        )
        return fem.functionspace(self.msh, element)

    def evaluate(self, expression: Any) -> np.ndarray:
        """Compiled ``fem.Expression`` at the local points: (n_local, *value_shape)."""
        values = expression.eval(self.msh, self.cells)
        return values.reshape(self.n_local, *values.shape[2:])

    def expression(self, ufl_expr: Any) -> Any:
        """Compile a UFL expression for evaluation at the quadrature points."""
        return fem.Expression(ufl_expr, self.points)

    def fill(self, function: Any, values: np.ndarray) -> None:
        """Write per-point values (n_local, *value_shape) into a quadrature Function."""
        space = function.function_space
        bs = space.dofmap.bs
        dofs = space.dofmap.list[self.cells].reshape(-1)  # (n_local,) in point order
        array = function.x.array
        array.reshape(-1, bs)[dofs] = values.reshape(self.n_local, bs)
        function.x.scatter_forward()


def voigt_strain(w: Any) -> Any:
    """Tensor-shear Voigt vector (ε11, ε22, ε12) of the symmetric gradient of w."""
    e = ufl.sym(ufl.grad(w))
    return ufl.as_vector([e[0, 0], e[1, 1], e[0, 1]])


class _FE2Problem:
    """Shared machinery: quadrature data, the closure callbacks around SNES, reports."""

    physics: str

    def __init__(
        self,
        quadrature: MacroQuadrature,
        closure: Closure,
        *,
        prefix: str,
        petsc_options: dict[str, Any] | None,
    ) -> None:
        if closure.material.physics != self.physics:
            raise TypeError(
                f"{type(self).__name__} needs a {self.physics} closure; got a "
                f"{closure.material.physics} one"
            )
        if closure.n_local != quadrature.n_local:
            raise ValueError(
                f"the closure has {closure.n_local} local points but the macro quadrature has "
                f"{quadrature.n_local} on rank {quadrature.msh.comm.rank}: build the closure "
                "on MacroQuadrature.coordinates"
            )
        self.quadrature = quadrature
        self.closure = closure
        self.comm = quadrature.msh.comm
        self._prefix = prefix
        self._options = {**DEFAULT_SNES_OPTIONS, **(petsc_options or {})}
        self._last_x: np.ndarray | None = None
        self._calls = 0
        self._seconds_closure = 0.0
        self._step = 0
        self.max_revisions = 3
        self.last_result: Any = None

    # Subclasses set: self.u, self._state_expr, self._fill(result), self.F, self.J, self.bcs
    def _build_problem(self, F: Any, J: Any, bcs: Sequence[Any]) -> None:
        self.problem = fem_petsc.NonlinearProblem(
            F, self.u, J=J, bcs=list(bcs), petsc_options_prefix=self._prefix,
            petsc_options=self._options,
        )  # fmt: skip
        snes = self.problem.solver
        self._kargs_F = {
            "u": self.u, "residual": self.problem.F, "jacobian": self.problem.J, "bcs": list(bcs)
        }  # fmt: skip
        self._kargs_J = {
            "u": self.u, "jacobian": self.problem.J, "preconditioner": None, "bcs": list(bcs)
        }  # fmt: skip
        snes.setFunction(self._residual, self.problem.b)
        snes.setJacobian(self._jacobian, self.problem.A, None)
        snes.setConvergenceHistory(length=200, reset=True)

    def _update(self, x: Any) -> None:
        """Call the closure at iterate x unless it was the last one evaluated (collective)."""
        x.ghostUpdate(addv=PETSc.InsertMode.INSERT, mode=PETSc.ScatterMode.FORWARD)
        local = x.getArray(readonly=True)
        same = self._last_x is not None and np.array_equal(local, self._last_x)
        if self.comm.allreduce(int(same), op=MPI.MIN):
            return
        fem_petsc.assign(x, self.u)
        states = self.quadrature.evaluate(self._state_expr)
        states = states.reshape(self.quadrature.n_local, -1)
        t0 = time.perf_counter()
        result = self.closure.evaluate(states)
        self._seconds_closure += time.perf_counter() - t0
        self._calls += 1
        self._fill(result)
        self.last_result = result
        self._last_x = local.copy()

    def _residual(self, snes: Any, x: Any, b: Any) -> None:
        self._update(x)
        fem_petsc.assemble_residual(snes, x, b, **self._kargs_F)

    def _jacobian(self, snes: Any, x: Any, J: Any, P: Any) -> None:
        self._update(x)
        fem_petsc.assemble_jacobian(snes, x, J, P, **self._kargs_J)

    def _fill(self, result: Any) -> None:
        raise NotImplementedError

    def solve_step(self) -> NewtonReport:
        """One Newton solve at the current load/time (collective).

        Opens a closure step (the closure's decisions hold through its Newton
        iterations), solves, and solves again from the converged field while the closure
        revises its decisions (``Closure.revise_step``, at most ``max_revisions`` times),
        then closes the step. Raises RuntimeError, on every rank, when SNES does not
        converge.
        """
        self._calls, self._seconds_closure = 0, 0.0
        # The first iterate is the previous step's field (the closure tests the states at
        # convergence, in revise_step), and the first Newton update (Dirichlet rows u − g, lifted
        # into the interior through the tangent) is the linear predictor of the new
        # boundary values. Setting them first would put the whole jump of a changed
        # Dirichlet value into one element layer (spurious gradients at the edge).

        def newton() -> tuple[list[float], int, str, int]:
            residuals, reason, failure = self._newton()
            return residuals, reason, failure, self.problem.solver.getIterationNumber()

        report = run_step(
            self.closure, self._step, newton, max_revisions=self.max_revisions,
            counters=lambda: (self._calls, self._seconds_closure),
            advice="reduce the load/time step, raise snes_max_it, or see the closure error above",
        )  # fmt: skip
        self._step += 1
        return report

    def _newton(self) -> tuple[list[float], int, str]:
        """One SNES solve from the current field: (‖F‖ history, reason agreed by all
        ranks (-1000: an error in a callback), the error message)."""
        self._last_x = None
        failure = ""
        try:
            self.problem.solve()
        except PETSc.Error as exc:  # a closure error inside a callback surfaces here
            failure = f"{exc}"
        snes = self.problem.solver
        reason = -1000 if failure else int(snes.getConvergedReason())
        reason = self.comm.allreduce(reason, op=MPI.MIN)
        return [float(r) for r in snes.getConvergenceHistory()[0]], reason, failure


class ThermalFE2Problem(_FE2Problem):
    """Nonlinear (transient) heat conduction whose flux Q(∇T, T) comes from a closure.

    quadrature: the macro rule; closure: a thermal closure on quadrature.coordinates.
    degree: Lagrange degree of T. bcs: DirichletBCs on ``problem.V`` (build them after
    construction with ``problem.V``, or pass a callable V -> bcs). source: f (UFL
    expression or number). capacity: c (None = steady). boundary_flux: optional UFL
    form term ∫_Γ h v ds as a callable v -> form (added to the right-hand side).
    The time step is ``problem.dt`` (a Constant); ``advance()`` copies T to T_old.
    """

    physics = "thermal"

    def __init__(
        self,
        quadrature: MacroQuadrature,
        closure: Closure,
        *,
        degree: int = 1,
        bcs: Callable[[Any], Sequence[Any]] | Sequence[Any] = (),
        source: Any = 0.0,
        capacity: float | None = None,
        dt: float = 1.0,
        initial: Callable[[np.ndarray], np.ndarray] | float = 0.0,
        boundary_flux: Callable[[Any], Any] | None = None,
        petsc_options: dict[str, Any] | None = None,
        prefix: str = "fe2_thermal_",
    ) -> None:
        super().__init__(quadrature, closure, prefix=prefix, petsc_options=petsc_options)
        msh = quadrature.msh
        self.V = fem.functionspace(msh, ("Lagrange", degree))
        self.u = fem.Function(self.V, name="T")
        self.T_old = fem.Function(self.V, name="T_old")
        if callable(initial):
            self.u.interpolate(initial)
        else:
            self.u.x.array[:] = float(initial)
        self.T_old.x.array[:] = self.u.x.array
        self.flux = fem.Function(quadrature.space((2,)), name="Q")
        self.dflux = fem.Function(quadrature.space((2, 2)), name="dQ_dG")
        self.dflux_dtheta = fem.Function(quadrature.space((2,)), name="dQ_dtheta")
        self.dt = fem.Constant(msh, float(dt))
        self.steady = capacity is None
        v, dT = ufl.TestFunction(self.V), ufl.TrialFunction(self.V)
        dxq, T = quadrature.measure, self.u
        if isinstance(source, int | float):
            source = fem.Constant(msh, float(source))
        F = ufl.inner(self.flux, ufl.grad(v)) * dxq - source * v * ufl.dx(domain=msh)
        J = ufl.inner(ufl.dot(self.dflux, ufl.grad(dT)) + self.dflux_dtheta * dT, ufl.grad(v)) * dxq
        if capacity is not None:
            c = fem.Constant(msh, float(capacity))
            F += c / self.dt * (T - self.T_old) * v * dxq
            J += c / self.dt * dT * v * dxq
        if boundary_flux is not None:
            F -= boundary_flux(v)
        self.bcs = list(bcs(self.V) if callable(bcs) else bcs)
        self._state_expr = quadrature.expression(ufl.as_vector([T.dx(0), T.dx(1), T]))
        self._build_problem(F, J, self.bcs)

    def _fill(self, result: Any) -> None:
        q = self.quadrature
        q.fill(self.flux, result.response)
        q.fill(self.dflux, result.tangent[:, :, :2])
        q.fill(self.dflux_dtheta, result.tangent[:, :, 2])

    def advance(self) -> None:
        """Accept the current solution as the previous time level."""
        self.T_old.x.array[:] = self.u.x.array


class MechanicalFE2Problem(_FE2Problem):
    """Quasi-static plane-strain equilibrium whose stress Σ(ε(u)) comes from a closure.

    bcs: DirichletBCs on ``problem.V`` (or a callable V -> bcs); load it through
    Functions/Constants the caller updates between steps (``problem.load`` is a Constant
    for that use). traction: optional callable v -> boundary form ∫_Γ t·v ds.
    """

    physics = "mechanical"

    def __init__(
        self,
        quadrature: MacroQuadrature,
        closure: Closure,
        *,
        degree: int = 1,
        bcs: Callable[[Any], Sequence[Any]] | Sequence[Any] = (),
        traction: Callable[[Any, Any], Any] | None = None,
        petsc_options: dict[str, Any] | None = None,
        prefix: str = "fe2_mechanical_",
    ) -> None:
        super().__init__(quadrature, closure, prefix=prefix, petsc_options=petsc_options)
        msh = quadrature.msh
        self.V = fem.functionspace(msh, ("Lagrange", degree, (2,)))
        self.u = fem.Function(self.V, name="u")
        self.load = fem.Constant(msh, 0.0)
        self.stress = fem.Function(quadrature.space((3,)), name="Sigma")
        self.tangent = fem.Function(quadrature.space((3, 3)), name="dSigma_dE")
        v, du = ufl.TestFunction(self.V), ufl.TrialFunction(self.V)
        work = ufl.as_vector([1.0, 1.0, 2.0])  # the shear term counts twice
        ev = ufl.elem_mult(work, voigt_strain(v))
        dxq = quadrature.measure
        F = ufl.inner(self.stress, ev) * dxq
        J = ufl.inner(ufl.dot(self.tangent, voigt_strain(du)), ev) * dxq
        if traction is not None:
            F -= traction(v, self.load)
        self.bcs = list(bcs(self.V) if callable(bcs) else bcs)
        self._state_expr = quadrature.expression(voigt_strain(self.u))
        self._build_problem(F, J, self.bcs)

    def _fill(self, result: Any) -> None:
        self.quadrature.fill(self.stress, result.response)
        self.quadrature.fill(self.tangent, result.tangent)
