"""The surrogate closure: SANO answers where it is sure, the fine solver where it is not.

:class:`SurrogateClosure` keeps the :class:`~neuroscale_coupling.closure.contract.Closure` contract.
Per step:

1. ``begin_step``: a new decision is due.
2. first ``evaluate`` of the step: the surrogate predicts at every local point (float64,
   latents of the local cells cached; beyond the training box the first-order expansion
   from the box of :meth:`Surrogate.decode`, whose std grows with the distance) and the
   points whose cell lies outside the training family, or whose prediction is not
   finite, are marked for the fine solver. The state
   tests wait for the converged states: an iterate is not a solution (a host that
   imposes new Dirichlet values in its residual sees a predictor jump of 2/h at a heated
   edge, and a step starts from the previous step's states, which it leaves), so marking
   on it would solve points exactly for a whole step whose solution needs no fine solve.
   The marked set is fixed for the step's Newton iterations (a closure that changes
   within a Newton solve loses quadratic convergence), and its work is block-balanced
   over the ranks (:class:`BlockPlan`): every rank solves about the same number of cells,
   results return to their owners.
3. later ``evaluate`` calls: surrogate everywhere, fine solves at the marked points.
4. ``revise_step`` after the Newton solve converged: every test (training domain, family,
   calibrated std) is applied at the converged states; points that fail join the marked
   set (none leaves it) and the host solves the step again from the converged field, so
   that at the step's solution every point answered by the surrogate passes every test.
5. ``end_step``: the exact results of the step's last evaluation join the enrichment
   buffer and, with enrichment on, the model is fine-tuned (gradients averaged over
   ranks) and recalibrated before the next step; the cached latents are recomputed.

Family ratios are computed once, with the model as loaded.
"""

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from neuroscale_coupling.cell.materials import material_to_dict
from neuroscale_coupling.cell.microstructure import distinct_images
from neuroscale_coupling.closure.contract import (
    FALLBACK_REASONS,
    HISTORY_WINDOW,
    Closure,
    ClosureResult,
    StepStats,
    cell_stack,
    cells_of_points,
)
from neuroscale_coupling.closure.enrichment import EnrichmentOptions, OnlineEnrichment
from neuroscale_coupling.closure.fallback import FallbackPolicy, fallback_reasons
from neuroscale_coupling.fine.protocol import FineSolver, broadcast_cells
from neuroscale_coupling.log import get_logger
from neuroscale_coupling.parallel import BlockPlan, collective_call, scatter
from neuroscale_coupling.surrogate.model_file import Surrogate

__all__ = ["SurrogateClosure"]

log = get_logger(__name__)


class SurrogateClosure(Closure):
    """Closure answered by a trained SANO model with fine-solver fallback.

    surrogate: the trained model (its material must equal the solver's). solver: fine
    solver for the fallback points. cells: (n_local, n, n) phase images of this rank's
    points, n = the model's image size. policy: fallback thresholds. enrichment: options of
    online enrichment, None = off. The closure decodes with its own float64 CPU copy of the
    model, ``closure.surrogate`` (results do not depend on how points are split over
    ranks; enrichment fine-tunes the copy, the caller's surrogate is left as it is). All
    calls are collective.
    """

    def __init__(
        self,
        surrogate: Surrogate,
        solver: FineSolver,
        cells: np.ndarray,
        *,
        comm: MPI.Comm,
        policy: FallbackPolicy | None = None,
        enrichment: EnrichmentOptions | None = None,
        history_window: int = HISTORY_WINDOW,
    ) -> None:
        material = surrogate.material
        cells = cell_stack(comm, cells)
        super().__init__(material, cells.shape[0], comm=comm, history_window=history_window)
        if material_to_dict(solver.material) != material_to_dict(material):
            raise ValueError(
                f"the fine solver's material {material_to_dict(solver.material)} differs from "
                f"the model's {material_to_dict(material)}: build the solver with "
                "surrogate.material"
            )
        size = surrogate.image_size

        def local_cells() -> np.ndarray:
            if self.n_local == 0:
                return np.zeros((0, size, size), dtype=np.int8)
            if cells.shape[1:] != (size, size):
                raise ValueError(
                    f"cells have shape {cells.shape[1:]} but the model reads ({size}, {size}) "
                    "images: generate the cells at the model's resolution"
                )
            return broadcast_cells(cells, self.n_local, material.n_phases).astype(np.int8)

        self.cells = collective_call(comm, local_cells, "surrogate closure setup")
        # The closure's own float64 CPU copy: the caller's model is left as it is, and
        # online enrichment fine-tunes this copy.
        self.surrogate = surrogate.to(dtype=torch.float64, device="cpu")
        self.solver = solver
        self.policy = FallbackPolicy() if policy is None else policy
        if not self.surrogate.has_family_statistics and np.isfinite(self.policy.family_threshold):
            raise ValueError(
                "the model holds no training-family statistics (SANO.fit_family): retrain "
                "it with this version, or set FallbackPolicy(family_threshold=math.inf)"
            )
        self._unique, self._cell_of_point = distinct_images(self.cells)
        self._encoded = self.surrogate.encode(self._unique)
        self.family_ratio = self._encoded.family_ratio[self._cell_of_point]
        self._response_rms = self.surrogate.response_scale
        self.enrichment = (
            None
            if enrichment is None
            else OnlineEnrichment(self.surrogate, comm=comm, options=enrichment)
        )
        self.reason = np.zeros(self.n_local, dtype=np.int8)
        self.predicted_std = np.zeros((self.n_local, material.response_dim))
        self._decided = False
        self._plan = BlockPlan.balanced(comm, 0)
        self._marked = np.zeros(0, dtype=np.int64)
        self._n_marked = 0
        self._work_cells = np.zeros((0, size, size), dtype=np.int64)
        self._last: tuple[np.ndarray, ClosureResult] | None = None
        self.enrichment_history: list[dict[str, float]] = []

    @classmethod
    def from_coordinates(
        cls,
        surrogate: Surrogate,
        solver: FineSolver,
        coordinates: np.ndarray,
        cell_of: Callable[[np.ndarray], np.ndarray],
        *,
        comm: MPI.Comm,
        policy: FallbackPolicy | None = None,
        enrichment: EnrichmentOptions | None = None,
    ) -> "SurrogateClosure":
        """Closure whose cells come from ``cell_of(coordinates (n_local, 2)) -> (n_local, n,
        n)`` (graded materials: the cell varies with the point's position)."""
        cells = cells_of_points(comm, cell_of, coordinates)
        return cls(surrogate, solver, cells, comm=comm, policy=policy, enrichment=enrichment)

    # ------------------------------------------------------------------ decisions
    def _start_step(self) -> None:
        self._decided = False
        self._last = None

    def _reasons(self, states: np.ndarray, response: np.ndarray, std: np.ndarray) -> np.ndarray:
        return fallback_reasons(
            self.policy,
            domain_distance=self.surrogate.domain.distance_outside(states)
            if states.shape[0]
            else np.zeros(0),
            family_ratio=self.family_ratio,
            response=response,
            std=std,
            response_rms=self._response_rms,
        )

    def _first_reasons(
        self, states: np.ndarray, response: np.ndarray, std: np.ndarray
    ) -> np.ndarray:
        """Reasons (n_local,) at a step's first iterate: the tests that do not depend on
        the state (family) and predictions that are not finite; the state tests wait for
        the converged states (module docstring, step 2)."""
        reason = self._reasons(states, response, std)
        finite = np.all(np.isfinite(response), axis=1) & np.all(np.isfinite(std), axis=1)
        reason[finite & (reason != FALLBACK_REASONS.index("family") + 1)] = 0
        return reason

    def _mark(self, reason: np.ndarray, states: np.ndarray) -> None:
        """Fix the marked set for the step and plan its balanced work (collective)."""
        self.reason = reason
        self._marked = np.flatnonzero(reason > 0)
        self._plan = BlockPlan.balanced(self.comm, self._marked.size)
        self._work_cells = scatter(
            self.comm, self._plan, np.ascontiguousarray(self.cells[self._marked], dtype=np.int64)
        )
        counts = np.bincount(reason, minlength=len(FALLBACK_REASONS) + 1)[1:]
        total = self.comm.allreduce(counts)
        self._n_marked = int(total.sum())
        self._current().fallbacks = {
            k: int(c) for k, c in zip(FALLBACK_REASONS, total, strict=True)
        }
        self._warn_fallbacks(total, reason, states)

    def _warn_fallbacks(self, total: np.ndarray, reason: np.ndarray, states: np.ndarray) -> None:
        """A WARNING (rank 0) when more than ``policy.warn_fraction`` of the points fall back
        because their state lies outside the trained domain or their cell outside the
        training family: the usual cause is a host whose states or cells are not what the
        model was trained on (collective; global counts ``total`` by reason)."""
        share = total / max(self.n_global, 1)
        step = self._current().step
        domain = FALLBACK_REASONS.index("domain")
        if share[domain] > self.policy.warn_fraction:
            out = states[reason == domain + 1]
            d = self.material.state_dim
            lo = out.min(axis=0) if out.size else np.full(d, np.inf)
            hi = out.max(axis=0) if out.size else np.full(d, -np.inf)
            self.comm.Allreduce(MPI.IN_PLACE, lo, op=MPI.MIN)
            self.comm.Allreduce(MPI.IN_PLACE, hi, op=MPI.MAX)
            if self.comm.rank == 0:
                box = self.surrogate.domain
                log.warning(
                    "step %d: %d of %d points (%.0f %%) have states outside the trained "
                    "domain %s (theirs: %s): are the host's states in the model's units and "
                    "order? They are solved exactly; train on a domain that covers the run, "
                    "or relax FallbackPolicy.domain_tol",
                    step, total[domain], self.n_global, 100 * share[domain],
                    _ranges(box.names, box.lower, box.upper), _ranges(box.names, lo, hi),
                )  # fmt: skip
        family = FALLBACK_REASONS.index("family")
        if share[family] > self.policy.warn_fraction:
            mine = self.family_ratio[reason == family + 1]
            top = self.comm.allreduce(float(mine.max(initial=0.0)), op=MPI.MAX)
            if self.comm.rank == 0:
                log.warning(
                    "step %d: %d of %d points (%.0f %%) have cells outside the model's "
                    "training family (family ratio up to %.3g > %.3g): check the cell images "
                    "(%d×%d, phase ids 0..%d as in training) or train a model on these cells; "
                    "they are solved exactly",
                    step, total[family], self.n_global, 100 * share[family], top,
                    self.policy.family_threshold, self.surrogate.image_size,
                    self.surrogate.image_size, self.material.n_phases - 1,
                )  # fmt: skip

    def point_maps(self) -> dict[str, np.ndarray]:
        """``fallback``: reason code per point (0 surrogate, k + 1 = FALLBACK_REASONS[k]);
        ``predicted_std``: ‖calibrated std‖ of the surrogate, also where it fell back."""
        return {
            "fallback": self.reason.copy(),
            "predicted_std": np.linalg.norm(self.predicted_std, axis=1),
        }

    def _revise(self) -> bool:
        """After a converged Newton solve (collective): repeat the fallback tests at the
        converged states; True (on every rank) when points were added to the marked set,
        i.e. the step must be solved again."""
        if self._last is None:
            return False
        states, result = self._last
        new = self._reasons(states, result.response, self.predicted_std)
        new[self.reason > 0] = self.reason[self.reason > 0]
        added = self.comm.allreduce(int(np.count_nonzero(new != self.reason)))
        if added:
            log.info("step revision: %d more point(s) fall back to the fine solver", added)
            self._mark(new, states)
            self._current().revisions += 1
        return bool(added)

    # ------------------------------------------------------------------ evaluate
    def _evaluate(self, states: np.ndarray) -> ClosureResult:
        t0 = time.perf_counter()
        response, tangent, std = self.surrogate.decode(self._encoded, states, self._cell_of_point)
        stats = self._current()
        stats.seconds_surrogate += time.perf_counter() - t0
        self.predicted_std = std
        if not self._decided:
            self._mark(self._first_reasons(states, response, std), states)
            self._decided = True
        if self._n_marked:
            r_ex, t_ex = self._balanced_solve(
                self.solver, self._plan, self._work_cells, states[self._marked],
                "fallback points of all ranks in rank order",
            )  # fmt: skip
            response[self._marked], tangent[self._marked] = r_ex, t_ex
        std = std.copy()
        std[self._marked] = 0.0
        stats.max_std = float(np.max(std, initial=0.0))  # of the answers at this iterate
        exact = self.reason > 0
        result = ClosureResult(response=response, tangent=tangent, std=std, exact=exact)
        self._last = (states, result)
        return result

    # ------------------------------------------------------------------ end of step
    def _finish_step(self, stats: StepStats) -> None:
        if self.enrichment is not None and self._last is not None:
            states, result = self._last
            m = self._marked
            self.enrichment.add(self.cells[m], states[m], result.response[m], result.tangent[m])
            info = self.enrichment.update()
            if info.get("rows", 0):  # same cells, updated model: new latents, same ratios
                self._encoded = self.surrogate.encode(
                    self._unique, family_ratio=self._encoded.family_ratio
                )
                self.enrichment_history.append(info)
                stats.enrichment = info


def _ranges(names: Any, lower: Any, upper: Any) -> str:
    """``G1 ∈ [-2, 2], …`` of per-component bounds."""
    return ", ".join(
        f"{n} ∈ [{float(lo):.4g}, {float(hi):.4g}]"
        for n, lo, hi in zip(names, lower, upper, strict=True)
    )
