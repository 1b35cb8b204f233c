"""The host-facing closure operator: the contract every backend keeps.

A host calls ``evaluate(states)`` with the macro states at the quadrature points it owns
on this rank and receives the homogenized response, its consistent tangent, a standard
deviation and a mask of points that were solved exactly. Every call here is collective
over the closure's communicator, also on a rank that owns no points.

This module holds the contract: :class:`Closure` (the call order and the step
bookkeeping), :class:`ClosureResult`, :class:`StepStats` and the fallback reason codes
(:data:`FALLBACK_REASONS`). The backends are :class:`~neuroscale_coupling.closure.exact.
ExactClosure` and :class:`~neuroscale_coupling.closure.surrogate_closure.SurrogateClosure`.
"""

import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from mpi4py import MPI

from neuroscale_coupling.cell.materials import Material
from neuroscale_coupling.fine.protocol import FineSolveError, FineSolver
from neuroscale_coupling.log import get_logger
from neuroscale_coupling.parallel import BlockPlan, collective_call, gather, scatter

__all__ = [
    "CALL_ORDER",
    "FALLBACK_REASONS",
    "HISTORY_WINDOW",
    "Closure",
    "ClosureResult",
    "RunTotals",
    "StepStats",
    "as_states",
    "cell_stack",
    "cells_of_points",
]


#: Why a point was handed to the fine solver, in the order the tests are applied (a point
#: failing several counts under the first); reason code k + 1 in per-point arrays, 0 = not.
FALLBACK_REASONS = ("domain", "family", "uncertainty")


#: The order of the calls a host makes each step (all collective).
CALL_ORDER = (
    "begin_step(k) -> evaluate(states) once per Newton iterate -> revise_step() after the "
    "Newton solve converged (solve the step again while it returns True) -> end_step()"
)
#: Steps whose statistics ``Closure.history`` keeps; the whole run is in ``Closure.totals``.
HISTORY_WINDOW = 100

log = get_logger(__name__)


@dataclass(frozen=True)
class ClosureResult:
    """Answer for the n local points of one evaluate call.

    response (n, r), tangent (n, r, d) = ∂response/∂state, std (n, r) (0 for exact
    solves), exact (n,) bool: True where the point was answered by a fine solve.
    """

    response: np.ndarray
    tangent: np.ndarray
    std: np.ndarray
    exact: np.ndarray

    def write_to(self, *, response: Any = None, tangent: Any = None, std: Any = None) -> None:
        """Copy the answer into a host's storage, point-major: each target a PETSc Vec
        (its local entries) or a writable numpy array with n·r (response, std) or n·r·d
        (tangent) entries. Not collective."""
        for name, target in (("response", response), ("tangent", tangent), ("std", std)):
            if target is None:
                continue
            values = getattr(self, name).reshape(-1)
            local = target.getArray() if hasattr(target, "getArray") else target
            if np.size(local) != values.size:
                raise ValueError(
                    f"write_to: the {name} target holds {np.size(local)} local entries but "
                    f"the answer has {values.size} ({getattr(self, name).shape}, point-major)"
                )
            np.copyto(np.asarray(local).reshape(-1), values)


@dataclass
class StepStats:
    """Statistics of one step, summed over ranks (times: slowest rank).

    points: global quadrature points; evaluations: closure calls; exact_solves: fine
    solves (all calls); fallbacks: points sent to the fine solver, by reason; revisions:
    times the step was solved again because more points had to fall back; seconds of the
    surrogate and of the fine solves; max_std: largest std component of the answers at the
    step's last evaluation (its converged states; 0 where a fine solve answered); enrichment:
    what the online enrichment after the step did (empty when off).
    """

    step: int
    points: int = 0
    evaluations: int = 0
    exact_solves: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)
    revisions: int = 0
    seconds_surrogate: float = 0.0
    seconds_fine: float = 0.0
    max_std: float = 0.0
    enrichment: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunTotals:
    """The statistics of every step of a run, summed (times summed over steps of the
    slowest rank's step times; max_std: the largest over the run); bounded in size."""

    steps: int = 0
    point_steps: int = 0
    evaluations: int = 0
    exact_solves: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)
    revisions: int = 0
    seconds_surrogate: float = 0.0
    seconds_fine: float = 0.0
    max_std: float = 0.0

    def add(self, stats: StepStats) -> None:
        self.steps += 1
        self.point_steps += stats.points
        self.evaluations += stats.evaluations
        self.exact_solves += stats.exact_solves
        for reason, count in stats.fallbacks.items():
            self.fallbacks[reason] = self.fallbacks.get(reason, 0) + count
        self.revisions += stats.revisions
        self.seconds_surrogate += stats.seconds_surrogate
        self.seconds_fine += stats.seconds_fine
        self.max_std = max(self.max_std, stats.max_std)

    @property
    def fallback_fraction(self) -> float:
        """Point-steps answered by a fine solve because they fell back, over all."""
        return sum(self.fallbacks.values()) / self.point_steps if self.point_steps else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fallback_fraction": self.fallback_fraction}


def as_states(states: Any, state_dim: int) -> np.ndarray:
    """States as a float64 array (n, state_dim) from an array or a PETSc Vec.

    A Vec holds the states point-major (n * state_dim local entries).
    """
    if hasattr(states, "getArray"):  # a copy: the Vec's read-only view must not leak out
        states = np.array(states.getArray(readonly=True)).reshape(-1, state_dim)
    s = np.asarray(states)
    if s.dtype.kind not in "fiu":
        raise TypeError(f"closure states must be real numbers; got dtype {s.dtype}")
    if s.ndim != 2 or s.shape[1] != state_dim:
        raise ValueError(
            f"closure states have shape (n_local, {state_dim}); got {s.shape}: pass one row "
            "per local quadrature point"
        )
    s = np.ascontiguousarray(s, dtype=np.float64)
    return s if s.flags.writeable else s.copy()


def cell_stack(comm: MPI.Comm, cells: Any) -> np.ndarray:
    """This rank's cells as an (n_local, n, n) array, checked on every rank together
    (collective): a bad stack on one rank raises on all."""

    def check() -> np.ndarray:
        stack = np.asarray(cells)
        if stack.ndim != 3:
            raise ValueError(f"cells must be a stack (n_local, n, n); got shape {stack.shape}")
        return stack

    return collective_call(comm, check, "closure cells")


def cells_of_points(
    comm: MPI.Comm, cell_of: Callable[[np.ndarray], np.ndarray], coordinates: np.ndarray
) -> np.ndarray:
    """``cell_of(coordinates (n_local, 2)) -> (n_local, n, n)``, the user's function run on
    every rank with its failure agreed by all (collective): graded materials, where the
    cell varies with the point's position."""
    coords = np.asarray(coordinates, dtype=np.float64).reshape(-1, 2)
    return cell_stack(comm, collective_call(comm, lambda: cell_of(coords), "cell_of(coordinates)"))


class Closure:
    """Base of the closure backends: the collective contract and the step bookkeeping.

    The host's calls per step, all collective (:data:`CALL_ORDER`): ``begin_step(k)``,
    ``evaluate(states)`` once per Newton iterate, ``revise_step()`` after the Newton solve
    converged (solve the step again while it returns True), ``end_step()``. A call out of
    this order raises RuntimeError naming the missing call, on every rank alike;
    ``abort_step()`` closes a step that failed. ``history`` keeps the statistics of the last
    ``history_window`` steps, ``totals`` those of the whole run.

    Subclasses implement ``_evaluate(states) -> ClosureResult`` on validated states and may
    hook ``_start_step``, ``_revise`` and ``_finish_step``.
    """

    def __init__(
        self,
        material: Material,
        n_local: int,
        *,
        comm: MPI.Comm,
        history_window: int = HISTORY_WINDOW,
    ) -> None:
        self.material = material
        self.comm = comm
        self.n_local = int(n_local)
        self.n_global = comm.allreduce(self.n_local)
        if not (isinstance(history_window, int) and history_window >= 1):
            raise ValueError(f"history_window={history_window!r} must be an integer >= 1")
        self.history: deque[StepStats] = deque(maxlen=history_window)
        self.totals = RunTotals()
        self._step: StepStats | None = None

    # ------------------------------------------------------------------ the call order
    def begin_step(self, step: int) -> None:
        """Start step ``step`` (collective): decisions that hold for the whole step are
        taken at its first evaluate and completed at ``revise_step``."""
        if self._step is not None:
            raise RuntimeError(
                f"begin_step({step}) while step {self._step.step} is still open: call "
                f"end_step() (or abort_step() after a failure) first; per step: {CALL_ORDER}"
            )
        self._step = StepStats(step=int(step), points=self.n_global)
        self._start_step()

    def _open(self, call: str) -> StepStats:
        if self._step is None:
            raise RuntimeError(
                f"{call} outside a step: call begin_step(k) first; per step: {CALL_ORDER}"
            )
        return self._step

    def evaluate(self, states: Any) -> ClosureResult:
        """Response, tangent, std and exact-mask at this rank's points (collective).

        states: (n_local, d) float64 array, or a PETSc Vec with n_local * d local entries
        (point-major). Bad input (wrong type or shape, NaN/Inf) raises ValueError/TypeError
        on every rank.
        """
        stats = self._open("evaluate()")

        def checked() -> np.ndarray:
            s = as_states(states, self.material.state_dim)
            if s.shape[0] != self.n_local:
                raise ValueError(
                    f"evaluate got {s.shape[0]} states but this closure was set up for "
                    f"{self.n_local} local points"
                )
            return s

        s = collective_call(self.comm, checked, "closure input")
        bad = ~np.all(np.isfinite(s), axis=1)
        n_bad = self.comm.allreduce(int(bad.sum()))
        if n_bad:
            where = np.flatnonzero(bad)
            local = (
                f"local point {where[0]} = {s[where[0]].tolist()}" if where.size else "none here"
            )
            raise ValueError(
                f"{n_bad} macro state(s) are NaN/Inf ({local}, rank {self.comm.rank}): the host "
                "Newton iterate diverged; reduce the load step or check the host solve"
            )
        stats.evaluations += 1
        return self._evaluate(s)

    def revise_step(self) -> bool:
        """After the host's Newton solve of a step converged (collective): True, on every
        rank, when the closure changed a decision and the step must be solved again."""
        stats = self._open("revise_step()")
        if stats.evaluations == 0:
            raise RuntimeError(
                f"revise_step() before any evaluate() of step {stats.step}: call it after "
                f"the step's Newton solve; per step: {CALL_ORDER}"
            )
        return self._revise()

    def end_step(self) -> StepStats:
        """Close the step (collective) and return its statistics, also kept in ``history``
        and summed into ``totals``."""
        stats = self._open("end_step()")
        self._finish_step(stats)
        stats.exact_solves = self.comm.allreduce(stats.exact_solves)
        stats.seconds_fine = self.comm.allreduce(stats.seconds_fine, op=MPI.MAX)
        stats.seconds_surrogate = self.comm.allreduce(stats.seconds_surrogate, op=MPI.MAX)
        stats.max_std = self.comm.allreduce(stats.max_std, op=MPI.MAX)
        self.history.append(stats)
        self.totals.add(stats)
        self._step = None
        self._log_step(stats)
        return stats

    def abort_step(self) -> None:
        """Close an open step without recording it (collective), after the host's solve of
        it failed; the next step starts afresh. No-op without an open step."""
        self._step = None

    # ------------------------------------------------------------------ hooks
    def _start_step(self) -> None:
        """Subclass hook at begin_step."""

    def _revise(self) -> bool:
        """Subclass hook of revise_step: True when the step must be solved again."""
        return False

    def _finish_step(self, stats: StepStats) -> None:
        """Subclass hook at end_step, before the statistics are reduced (collective)."""

    def _log_step(self, stats: StepStats) -> None:
        if self.comm.rank != 0:
            return
        fell = sum(stats.fallbacks.values())
        share = fell / stats.points if stats.points else 0.0
        log.info(
            "step %d: %d points, %d evaluations, fallback fraction %.4f %s, %d fine solves "
            "(%.3f s), surrogate %.3f s",
            stats.step, stats.points, stats.evaluations, share, stats.fallbacks,
            stats.exact_solves, stats.seconds_fine, stats.seconds_surrogate,
        )  # fmt: skip

    def point_maps(self) -> dict[str, np.ndarray]:
        """Per-point data of the last step for maps, name -> (n_local,) (none here)."""
        return {}

    def _current(self) -> StepStats:
        return self._open("a closure call")

    def _evaluate(self, states: np.ndarray) -> ClosureResult:
        raise NotImplementedError

    def _balanced_solve(
        self,
        solver: FineSolver,
        plan: BlockPlan,
        work_cells: np.ndarray,
        states: np.ndarray,
        numbering: str,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fine solves of this rank's points ``states`` (m, d) on the ranks the plan gives
        them to (work_cells: the cells of the points this rank works on); returns the
        response (m, r) and tangent (m, r, d) of my points. Collective; a failure on any
        rank raises on all (FineSolveError numbers points as ``numbering`` says)."""
        work_states = scatter(self.comm, plan, np.ascontiguousarray(states))
        t0 = time.perf_counter()

        def solve() -> tuple[np.ndarray, np.ndarray]:
            if plan.n_work == 0:
                d, r = self.material.state_dim, self.material.response_dim
                return np.empty((0, r)), np.empty((0, r, d))
            try:
                h = solver.solve(work_cells, work_states)
            except FineSolveError as exc:
                raise FineSolveError(
                    plan.first_work + exc.index,
                    exc.state,
                    f"{exc.reason} (global point numbering: {numbering})",
                ) from exc
            return h.response, h.tangent

        response, tangent = collective_call(self.comm, solve, f"{type(self).__name__} fine solve")
        stats = self._current()
        stats.seconds_fine += time.perf_counter() - t0
        stats.exact_solves += plan.n_work
        return (
            gather(self.comm, plan, np.ascontiguousarray(response)),
            gather(self.comm, plan, np.ascontiguousarray(tangent)),
        )
