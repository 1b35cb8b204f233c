"""Nonlinear transient heat conduction by cell-centred finite volumes on a DMDA, with the
homogenized flux from a closure at the grid faces.

Find T (one value per cell P, area |P|) with, for every cell,

    c |P| (T_P − T_P^old) / Δt − Σ_faces Q_f · n_(P,f) |f| − Σ_(flux faces) h |f| = f_P |P|,

the discrete form of ``c ∂T/∂t − div Q = f`` (the DOLFINx host's weak form
``∫ c (T − T_old)/Δt v + ∫ Q·∇v = ∫ f v + ∫_Γ h v``): Q = Q(G, θ) is the closure's
response at the face state (G1, G2, θ) of :class:`~neuroscale_coupling.hosts.petsc_fv.
grid.FVGrid` (conductivity-like: Q ≈ K G for G = ∇T, the physical heat flux is −Q), n
the outward normal, h the prescribed ``Q·n`` on a flux side (0: insulated). Dirichlet
values enter through the ghost cells (half-cell treatment, the value is met at the face).
Backward Euler; ``capacity=None`` solves the steady problem.

Newton (PETSc SNES, full steps, a direct LU by default) with the consistent Jacobian:
row P, column Q of ``∂F/∂T`` = ``Σ_f ± |f| (∂Q_a/∂(G1, G2, θ))_f · weights_f · ∂T_stencil/∂T_Q``
(the closure's tangent through the face reconstruction and the affine ghost cells) plus
``c |P| / Δt`` on the diagonal, assembled with ``Mat.setValuesCOO`` on a pattern fixed at
set-up. The closure is called once per new Newton iterate (in the residual callback; the
Jacobian at the same iterate reuses that evaluation's tangent), inside
``begin_step(k)`` … ``revise_step()`` … ``end_step()``, collectively on every rank (also
one without faces). Local work in the callbacks runs under ``collective_call`` and a
failure inside SNES is re-raised after the solve, so a failure on one rank raises on all.

The time loop is ours (one SNES solve per step) rather than PETSc TS: the closure's step
(begin_step, one evaluate per iterate, revise_step → solve the step again, end_step) maps
one to one onto a step of the loop, while TS would own the step (its own residual
evaluations, rollback to redo a step) and hide that order.
"""

import time
from collections.abc import Callable, Mapping
from typing import Any

from mpi4py import MPI

# isort: split
import numpy as np
from petsc4py import PETSc

from neuroscale_coupling.closure.contract import Closure, ClosureResult
from neuroscale_coupling.closure.run_record import NewtonReport, run_step
from neuroscale_coupling.hosts.petsc_fv.grid import SIDES, FVGrid, values_at
from neuroscale_coupling.log import get_logger
from neuroscale_coupling.parallel import collective_call
from neuroscale_coupling.petsc_solvers import newton_lu_options

__all__ = ["ThermalFVProblem"]

log = get_logger(__name__)

Value = float | Callable[[np.ndarray], np.ndarray]


class ThermalFVProblem:
    """Transient (or steady) nonlinear heat conduction on an :class:`FVGrid`, the flux at
    the grid's closure faces from ``closure`` (collective construction).

    grid: the grid; closure: a thermal closure whose local points are ``grid``'s closure
    faces (``grid.n_faces`` on this rank, in ``grid.face_coordinates`` order).
    dirichlet: side -> T value (number or ``g(points (k, 2)) -> (k,)``) for exactly the
    grid's ``dirichlet_sides``. flux: side -> prescribed ``Q·n`` (outward n) on the other
    sides (default 0: insulated). source: f (number or callable of the cell centres).
    capacity: c (None: steady). dt: time step. initial: T at t = 0 (number or callable of
    the cell centres). petsc_options: SNES/KSP options updating
    :func:`~neuroscale_coupling.petsc_solvers.newton_lu_options`; prefix: their options prefix.

    ``T`` is the solution (a global vector of ``grid.da``), ``T_old`` the previous time
    level; ``solve_step()`` solves the current step, ``advance()`` accepts it.
    ``last_result`` is the closure's answer at the last iterate.
    """

    physics = "thermal"

    def __init__(
        self,
        grid: FVGrid,
        closure: Closure,
        *,
        dirichlet: Mapping[str, Value],
        flux: Mapping[str, float] | None = None,
        source: Value = 0.0,
        capacity: float | None = None,
        dt: float = 1.0,
        initial: Value = 0.0,
        petsc_options: Mapping[str, Any] | None = None,
        prefix: str = "fv_thermal_",
    ) -> None:
        if closure.material.physics != self.physics:
            raise TypeError(
                f"ThermalFVProblem needs a thermal closure; got a {closure.material.physics} one"
            )
        self.grid = grid
        self.closure = closure
        self.comm = grid.comm

        def check() -> None:
            if MPI.Comm.Compare(closure.comm, grid.comm) not in (MPI.IDENT, MPI.CONGRUENT):
                raise ValueError("the closure and the grid must share one communicator")
            if closure.n_local != grid.n_faces:
                raise ValueError(
                    f"the closure has {closure.n_local} local points but the grid has "
                    f"{grid.n_faces} closure faces on rank {self.comm.rank}: build the "
                    "closure on grid.face_coordinates (grid.cells_at_faces)"
                )
            if set(dirichlet) != set(grid.dirichlet_sides):
                raise ValueError(
                    f"Dirichlet values given for {sorted(dirichlet)} but the grid's Dirichlet "
                    f"sides are {list(grid.dirichlet_sides)}"
                )
            bad = set(flux or {}) - (set(SIDES) - set(grid.dirichlet_sides))
            if bad:
                raise ValueError(f"flux given on {sorted(bad)}, which are not flux sides")

        collective_call(self.comm, check, "ThermalFVProblem set-up")
        self.steady = capacity is None
        self.capacity = 0.0 if capacity is None else float(capacity)
        self.dt = float(dt)
        self.max_revisions = 3
        da = grid.da
        self.T = da.createGlobalVec()
        self.T.setName("T")
        self.T_old = da.createGlobalVec()
        self._T_loc = da.createLocalVec()
        self._F_loc = da.createLocalVec()
        self._b = da.createGlobalVec()
        self._dirichlet: dict[str, Value] = dict(dirichlet)
        flux = dict(flux or {})
        side_flux = np.array([float(flux.get(s, 0.0)) for s in SIDES])
        self._flux_terms = side_flux[grid.flux_side] * grid.flux_area
        centres = grid.cell_centres
        source_values = collective_call(
            self.comm, lambda: values_at(source, centres), "source at the cell centres"
        )
        self._source = source_values * grid.cell_volume
        self._ghost_const = collective_call(
            self.comm, lambda: grid.ghost_constants(self._dirichlet), "Dirichlet values"
        )
        self.T.setArray(
            collective_call(self.comm, lambda: values_at(initial, centres), "initial values")
        )
        self.T.copy(self.T_old)
        self._build_matrix()
        self._build_snes(prefix, {**newton_lu_options(self.comm), **(petsc_options or {})})
        self.last_result: ClosureResult | None = None
        self._last_x: np.ndarray | None = None
        self._error: BaseException | None = None
        self._calls = 0
        self._seconds_closure = 0.0
        self._step = 0
        self._sums: tuple[Any, Any, Any] | None = None

    # ------------------------------------------------------------------ set-up
    def _build_matrix(self) -> None:
        """The Jacobian's COO pattern: 2 rows (L, R) × 6 stencil columns per face, the
        columns through the ghost map, rows of physical ghosts dropped, then the diagonal
        of the owned cells."""
        g = self.grid
        l2g = g.local_to_global
        m = g.n_faces
        rows = np.broadcast_to(g.stencil[:, :2, None], (m, 2, 6))
        cols = np.broadcast_to(g.stencil_source[:, None, :], (m, 2, 6))
        rows_g, cols_g = l2g[rows].reshape(-1), l2g[cols].reshape(-1)
        self._keep = rows_g >= 0
        diag = l2g[g.owned_local]
        int_type = PETSc.IntType
        self._coo_rows = np.concatenate([rows_g[self._keep], diag]).astype(int_type)
        self._coo_cols = np.concatenate([cols_g[self._keep], diag]).astype(int_type)
        n, N = g.n_owned, g.nx * g.ny
        A = PETSc.Mat().create(comm=self.comm)
        A.setSizes(((n, N), (n, N)))
        A.setType(PETSc.Mat.Type.AIJ)
        A.setPreallocationCOO(self._coo_rows, self._coo_cols)
        self.A = A
        # sign (−|f| for L, +|f| for R) and ghost coefficient of every entry, (m, 2, 6)
        sign = np.array([-1.0, 1.0])[None, :, None] * g.face_area[:, None, None]
        self._entry_scale = sign * g.stencil_coef[:, None, :]

    def _build_snes(self, prefix: str, options: Mapping[str, Any]) -> None:
        snes = PETSc.SNES().create(comm=self.comm)
        snes.setOptionsPrefix(prefix)
        opts = PETSc.Options()
        for key, value in options.items():
            opts[f"{prefix}{key}"] = value
        snes.setFunction(self._residual, self._b)
        snes.setJacobian(self._jacobian, self.A, self.A)
        snes.setFromOptions()
        snes.getKSP().setFromOptions()
        for key in options:
            opts.delValue(f"{prefix}{key}")
        snes.setConvergenceHistory(length=200, reset=True)
        self.snes = snes

    def set_dirichlet(self, side: str, value: Value) -> None:
        """Change the Dirichlet value of ``side`` for the next solve (collective)."""
        if side not in self.grid.dirichlet_sides:
            raise ValueError(f"{side!r} is not a Dirichlet side of the grid")
        self._dirichlet[side] = value
        self._ghost_const = collective_call(
            self.comm, lambda: self.grid.ghost_constants(self._dirichlet), "Dirichlet values"
        )

    # ------------------------------------------------------------------ callbacks
    def _update(self, x: Any) -> None:
        """Evaluate the closure at iterate x unless it was the last one evaluated (collective,
        decided by all ranks alike)."""
        local = x.getArray(readonly=True)
        same = self._last_x is not None and np.array_equal(local, self._last_x)
        if self.comm.allreduce(int(same), op=MPI.MIN):
            return
        g = self.grid
        g.da.globalToLocal(x, self._T_loc, addv=PETSc.InsertMode.INSERT_VALUES)

        def states() -> np.ndarray:
            t = np.array(self._T_loc.getArray(readonly=True))
            g.fill_ghosts(t, self._ghost_const)
            return g.face_states(t)

        s = collective_call(self.comm, states, "face states")
        t0 = time.perf_counter()
        result = self.closure.evaluate(s)
        self._seconds_closure += time.perf_counter() - t0
        self._calls += 1
        self.last_result = result
        self._last_x = np.array(local)

    def _residual(self, snes: Any, x: Any, f: Any) -> None:
        """SNES residual callback. An error (on every rank alike: the closure and the local
        work fail collectively) is stored and the residual set to NaN, which stops SNES
        cleanly; ``_newton`` re-raises it. Raising inside a callback would leave PETSc's
        read lock on x set."""
        if self._error is None:
            try:
                self._update(x)
                self._assemble_residual(x, f)
                return
            except Exception as exc:
                self._error = exc
        f.set(np.nan)

    def _assemble_residual(self, x: Any, f: Any) -> None:
        g = self.grid
        result = self.last_result
        assert result is not None

        def face_terms() -> tuple[np.ndarray, np.ndarray]:
            q = result.response[np.arange(g.n_faces), g.face_axis] * g.face_area
            n = g.n_ghosted
            local = np.bincount(g.stencil[:, 1], q, n) - np.bincount(g.stencil[:, 0], q, n)
            local -= np.bincount(g.flux_cells, self._flux_terms, n)
            local[g.ghost_index] = 0.0
            owned = -self._source
            if not self.steady:
                dT = x.getArray(readonly=True) - self.T_old.getArray(readonly=True)
                owned = owned + self.capacity * g.cell_volume / self.dt * dT
            return local, owned

        local, owned = collective_call(self.comm, face_terms, "residual assembly")
        self._F_loc.setArray(local)
        f.setArray(owned)
        g.da.localToGlobal(self._F_loc, f, addv=PETSc.InsertMode.ADD_VALUES)

    def _jacobian(self, snes: Any, x: Any, J: Any, P: Any) -> None:
        """SNES Jacobian callback: the COO values from the tangent of the evaluation at x.
        After an error (stored, see ``_residual``) it assembles the identity, so that the
        linear solve passes and the next residual, NaN, stops SNES."""
        g = self.grid
        v: np.ndarray | None = None
        if self._error is None:
            try:
                self._update(x)
                result = self.last_result
                assert result is not None

                def values() -> np.ndarray:
                    tangent = result.tangent[np.arange(g.n_faces), g.face_axis]  # (m, 3)
                    dq = np.einsum("mk,mks->ms", tangent, g.weights)  # ∂Q_a/∂T_stencil
                    entries = (self._entry_scale * dq[:, None, :]).reshape(-1)[self._keep]
                    diag = np.full(g.n_owned, self.capacity * g.cell_volume / self.dt)
                    return np.concatenate([entries, diag])

                v = collective_call(self.comm, values, "Jacobian assembly")
            except Exception as exc:
                self._error = exc
        if v is None:
            v = np.zeros(self._coo_rows.size)
            v[-g.n_owned :] = 1.0
        P.setValuesCOO(v, addv=PETSc.InsertMode.INSERT_VALUES)
        if J.handle != P.handle:
            J.assemble()

    # ------------------------------------------------------------------ solves
    def _newton(self) -> tuple[list[float], int, BaseException | None]:
        """One SNES solve from the current T: (‖F‖ history, reason agreed by all ranks
        (-1000: an error in a callback), the error)."""
        self._last_x = None
        self._error = None
        try:
            self.snes.solve(None, self.T)
        except PETSc.Error as exc:  # an error of PETSc itself (the callbacks do not raise)
            if self._error is None:
                self._error = exc
        failed = self.comm.allreduce(int(self._error is not None), op=MPI.MAX)
        reason = -1000 if failed else int(self.snes.getConvergedReason())
        reason = self.comm.allreduce(reason, op=MPI.MIN)
        history = [float(r) for r in self.snes.getConvergenceHistory()[0]]
        return history, reason, self._error

    def solve_step(self) -> NewtonReport:
        """Solve the current step (collective): ``closure.begin_step(k)``, SNES from the
        previous step's field, then while ``closure.revise_step()`` asks for it (at most
        ``max_revisions`` times) SNES again from the converged field, ``closure.end_step()``.
        A closure or callback error raises on every rank (the closure's step is aborted);
        SNES not converging raises RuntimeError on every rank."""
        self._calls, self._seconds_closure = 0, 0.0

        def newton() -> tuple[list[float], int, str, int]:
            residuals, reason, error = self._newton()
            if reason == -1000:  # a failure inside the SNES callbacks: raised here, on all
                if error is not None:
                    raise error
                raise RuntimeError(
                    f"the macro Newton solve of step {self._step} failed on another rank"
                )
            return residuals, reason, "", self.snes.getIterationNumber()

        report = run_step(
            self.closure, self._step, newton, max_revisions=self.max_revisions,
            counters=lambda: (self._calls, self._seconds_closure),
            advice="reduce the time step or raise snes_max_it",
        )  # fmt: skip
        self._step += 1
        return report

    def advance(self) -> None:
        """Accept the current solution as the previous time level (not collective)."""
        self.T.copy(self.T_old)

    # ------------------------------------------------------------------ fields
    def cell_fields(self, dm: Any, out: Any) -> None:
        """Per-cell averages over the cell's closure faces of the last closure answer, into
        ``out`` (a global vector of ``dm = grid.cell_dm(4)``): Q1, Q2, ‖std‖ and the share
        of exactly solved faces (collective)."""
        g = self.grid
        result = self.last_result
        n = g.n_ghosted
        if result is None:
            out.set(0.0)
            return
        data = np.concatenate(
            [
                result.response,
                np.linalg.norm(result.std, axis=1)[:, None],
                result.exact.astype(float)[:, None],
                np.ones((g.n_faces, 1)),
            ],
            axis=1,
        )
        local = np.zeros((n, 5))
        for side in (0, 1):
            for c in range(5):
                local[:, c] += np.bincount(g.stencil[:, side], data[:, c], n)
        local[g.ghost_index] = 0.0
        if self._sums is None:
            sums_dm = g.cell_dm(5)
            self._sums = (sums_dm, sums_dm.createLocalVec(), sums_dm.createGlobalVec())
        sums_dm, sums_loc, sums = self._sums
        sums_loc.setArray(local.reshape(-1))
        sums.set(0.0)
        sums_dm.localToGlobal(sums_loc, sums, addv=PETSc.InsertMode.ADD_VALUES)
        s = sums.getArray(readonly=True).reshape(-1, 5)
        count = np.maximum(s[:, 4:5], 1.0)
        out.setArray((s[:, :4] / count).reshape(-1))
