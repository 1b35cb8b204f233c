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
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from mpi4py import MPI

from neuroscale_coupling.cell.materials import Material
from neuroscale_coupling.fine.protocol import FineSolveError, FineSolver
from neuroscale_coupling.log import get_logger
from neuroscale_coupling.parallel import BlockPlan, collective_call, gather, scatter

__all__ = ["FALLBACK_REASONS", "Closure", "ClosureResult", "StepStats", "as_states"]


#: Why a point was handed to the fine solver, in the order the tests are applied (a point
#: failing several counts under the first); reason code k + 1 in per-point arrays, 0 = not.
FALLBACK_REASONS = ("domain", "family", "uncertainty")


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


@dataclass
class StepStats:
    """Statistics of one step, summed over ranks (times: slowest rank).

    points: global quadrature points; evaluations: closure calls; exact_solves: fine
    solves (all calls); fallbacks: points sent to the fine solver, by reason; revisions:
    times the step was solved again because more points had to fall back; seconds of the
    surrogate and of the fine solves; max_std: largest predicted std component; enrichment:
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


def as_states(states: Any, state_dim: int) -> np.ndarray:
    """States as a float64 array (n, state_dim) from an array or a PETSc Vec.

    A Vec holds the states point-major (n * state_dim local entries).
    """
    if hasattr(states, "getArray"):
        states = states.getArray(readonly=True).reshape(-1, state_dim)
    s = np.asarray(states)
    if s.dtype.kind not in "fiu":
        raise TypeError(f"closure states must be real numbers; got dtype {s.dtype}")
    if s.ndim != 2 or s.shape[1] != state_dim:
        raise ValueError(
            f"closure states have shape (n_local, {state_dim}); got {s.shape}: pass one row "
            "per local quadrature point"
        )
    return np.ascontiguousarray(s, dtype=np.float64)


class Closure:
    """Base of the closure backends: the collective contract and the step bookkeeping.

    Subclasses implement ``_evaluate(states) -> ClosureResult`` on validated states.
    """

    def __init__(self, material: Material, n_local: int, *, comm: MPI.Comm) -> None:
        self.material = material
        self.comm = comm
        self.n_local = int(n_local)
        self.n_global = comm.allreduce(self.n_local)
        self.history: list[StepStats] = []
        self._step: StepStats | None = None

    def begin_step(self, step: int) -> None:
        """Start a step (collective): decisions that hold for the whole step are taken here."""
        self._step = StepStats(step=int(step), points=self.n_global)

    def end_step(self) -> StepStats:
        """Close the step (collective) and return its statistics, also kept in ``history``."""
        stats = self._current()
        stats.exact_solves = self.comm.allreduce(stats.exact_solves)
        stats.seconds_fine = self.comm.allreduce(stats.seconds_fine, op=MPI.MAX)
        stats.seconds_surrogate = self.comm.allreduce(stats.seconds_surrogate, op=MPI.MAX)
        stats.max_std = self.comm.allreduce(stats.max_std, op=MPI.MAX)
        self.history.append(stats)
        self._step = None
        return stats

    def point_maps(self) -> dict[str, np.ndarray]:
        """Per-point data of the last step for maps, name -> (n_local,) (none here)."""
        return {}

    def revise_step(self) -> bool:
        """After the host's Newton solve of a step converged (collective): True, on every
        rank, when the closure changed a decision and the step must be solved again."""
        return False

    def _current(self) -> StepStats:
        if self._step is None:
            self.begin_step(len(self.history))
        assert self._step is not None
        return self._step

    def evaluate(self, states: Any) -> ClosureResult:
        """Response, tangent, std and exact-mask at this rank's points (collective).

        states: (n_local, d) float64 array, or a PETSc Vec with n_local * d local entries.
        """
        s = as_states(states, self.material.state_dim)
        if s.shape[0] != self.n_local:
            raise ValueError(
                f"evaluate got {s.shape[0]} states but this closure was set up for "
                f"{self.n_local} local points"
            )
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
        stats = self._current()
        stats.evaluations += 1
        return self._evaluate(s)

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
