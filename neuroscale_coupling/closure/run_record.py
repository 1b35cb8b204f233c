"""The record of a coupled run, for any host that gives its points' coordinates.

A host makes one :class:`RunRecorder` for its closure and calls :meth:`RunRecorder.record`
after every step with the step's :class:`~neuroscale_coupling.closure.contract.StepStats`
(what ``closure.end_step()`` returned) and its own figures of the step, then
:meth:`RunRecorder.close` after the last step::

    recorder = RunRecorder(closure, coordinates, comm=comm, output_dir="out", total_steps=n)
    for k in range(n):
        closure.begin_step(k)
        ...                                     # the host's Newton solve
        stats = closure.end_step()
        recorder.record(stats, {"value": t_k, "iterations": its, "seconds_host": s})
    summary = recorder.close()

What it keeps and writes (all calls collective; rank 0 writes, the ranks agree on the
write's success before going on):

* ``summary.json`` in ``output_dir`` (atomically, after every step): the host's metadata,
  ``steps`` (per step the host's figures and ``closure_stats``) and run totals —
  ``newton_iterations``, ``closure_calls``, ``revisions`` and ``seconds_closure`` /
  ``seconds_host`` summed from the host's figures of those names when it gives them;
  ``fallbacks`` by reason, ``fallback_fraction``, ``exact_solves``, ``max_std``,
  ``seconds_surrogate`` and ``seconds_fine`` from the closure; ``seconds_total`` (wall time
  of the steps with the records written per step) and, at close, ``seconds_maps``;
* for closures that report per-point maps (the surrogate closure):
  ``fallback.png`` (why each point fell back at the last step), ``fallback_steps.png``
  (in how many steps it did) and ``predicted_std.png``
  (:func:`~neuroscale_coupling.closure.point_maps.write_point_maps`);
* a progress bar on rank 0 (tqdm) with the step's Newton iterations and closure seconds.
"""

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI

from neuroscale_coupling.closure.contract import FALLBACK_REASONS, Closure, RunTotals, StepStats
from neuroscale_coupling.closure.point_maps import write_point_maps
from neuroscale_coupling.io import plain_values, write_json_atomic
from neuroscale_coupling.parallel import collective_call

__all__ = ["NewtonReport", "RunRecorder", "format_summary", "run_step"]

#: Host figures summed over the steps into run totals (when the host gives them).
_HOST_TOTALS = {
    "iterations": "newton_iterations",
    "closure_calls": "closure_calls",
    "revisions": "revisions",
    "seconds_closure": "seconds_closure",
    "seconds_host": "seconds_host",
}


@dataclass
class NewtonReport:
    """A host's figures of one step, as the hosts of this package report them: Newton
    iterations (all solves of the step), ‖F‖ per iteration of the last solve, the solver's
    converged reason (agreed by all ranks), closure calls, seconds in the closure vs the
    host (slowest rank), the closure's step statistics (``StepStats.as_dict()``) and
    revisions (solves repeated because the closure changed its decisions)."""

    iterations: int
    residuals: list[float]
    converged_reason: int
    closure_calls: int
    seconds_closure: float
    seconds_host: float
    closure_stats: dict[str, Any] = field(default_factory=dict)
    revisions: int = 0

    def observed_orders(self) -> list[float]:
        """Convergence orders log(r_{k+1}/r_k) / log(r_k/r_{k-1}) along the history."""
        r = np.asarray(self.residuals)
        r = r[r > 0]
        if r.size < 3:
            return []
        lr = np.log(r)
        return list((lr[2:] - lr[1:-1]) / (lr[1:-1] - lr[:-2]))

    def figures(self) -> tuple[StepStats, dict[str, Any]]:
        """(the closure's StepStats, the host's plain figures with the observed orders):
        the two arguments of :meth:`RunRecorder.record`."""
        figures = {k: v for k, v in vars(self).items() if k != "closure_stats"}
        figures["observed_orders"] = self.observed_orders()
        return StepStats(**self.closure_stats), figures


def run_step(
    closure: Closure,
    step: int,
    newton: Callable[[], tuple[list[float], int, str, int]],
    *,
    max_revisions: int,
    counters: Callable[[], tuple[int, float]],
    advice: str,
) -> NewtonReport:
    """One step of a host's Newton solve in the closure's call order (collective).

    ``closure.begin_step(step)``; ``newton()`` solves from the current field and returns
    (‖F‖ per iteration, the solver's converged reason agreed by all ranks, a failure text or
    "", its iterations); while it converged and ``closure.revise_step()`` asks for it (at
    most ``max_revisions`` times) the step is solved again; ``closure.end_step()``. When the
    solve raises, or does not converge, the step is aborted (``abort_step``) and every rank
    raises (RuntimeError naming the step, the failure and ``advice``). ``counters()`` gives
    this rank's closure calls and closure seconds of the step, for the report."""
    closure.begin_step(step)
    t0 = time.perf_counter()
    iterations, revisions = 0, 0
    try:
        while True:
            residuals, reason, failure, its = newton()
            iterations += its
            if reason <= 0 or revisions == max_revisions or not closure.revise_step():
                break
            revisions += 1
    except BaseException:
        closure.abort_step()  # the step failed: the next one starts afresh
        raise
    seconds = time.perf_counter() - t0
    if reason <= 0:
        closure.abort_step()
        detail = failure or f"solver reason {reason}, residuals {residuals[-3:]}"
        raise RuntimeError(f"macro Newton did not converge in step {step} ({detail}): {advice}")
    stats = closure.end_step()
    calls, closure_seconds = counters()
    comm = closure.comm
    return NewtonReport(
        iterations=iterations,
        residuals=residuals,
        converged_reason=int(reason),
        closure_calls=calls,
        seconds_closure=comm.allreduce(closure_seconds, op=MPI.MAX),
        seconds_host=comm.allreduce(seconds - closure_seconds, op=MPI.MAX),
        closure_stats=stats.as_dict(),
        revisions=revisions,
    )


class RunRecorder:
    """Per-step records, run summary, point maps and progress of a run (see the module
    docstring). closure: the run's closure; coordinates: (n_local, ≥ 2) positions of the
    closure's local points, in its point order; output_dir: where the summary and maps go
    (None: nothing written); total_steps: for the progress bar; metadata: plain entries
    put at the top of the summary. Construction is collective."""

    def __init__(
        self,
        closure: Closure,
        coordinates: np.ndarray,
        *,
        comm: MPI.Comm,
        output_dir: Path | str | None = None,
        progress: bool = True,
        total_steps: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        description: str = "FE² steps",
    ) -> None:

        def checked() -> np.ndarray:
            xy = np.asarray(coordinates, dtype=float)
            if xy.ndim != 2 or xy.shape[0] != closure.n_local or xy.shape[1] < 2:
                raise ValueError(
                    f"coordinates have shape {xy.shape}; the closure has {closure.n_local} "
                    "local points: give (n_local, 2) or (n_local, 3) positions in its point "
                    "order"
                )
            return xy

        xy = collective_call(comm, checked, "run record: coordinates")
        self.closure = closure
        self.comm = comm
        self.coordinates = xy
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.metadata = plain_values(dict(metadata or {}))
        self.steps: list[dict[str, Any]] = []
        #: The recorded steps' closure statistics, summed.
        self.totals = RunTotals()
        self.maps: dict[str, str] = {}
        self._fallback_steps = np.zeros(closure.n_local, dtype=np.int64)
        self._t0 = time.perf_counter()
        self._bar = None
        if progress and comm.rank == 0:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, desc=description, unit="step")
        if self.output_dir is not None:
            out = self.output_dir
            self._on_rank0(lambda: out.mkdir(parents=True, exist_ok=True), "output folder")

    def _on_rank0(self, work: Callable[[], Any], what: str) -> Any:
        """``work`` on rank 0 only, its success agreed by every rank (collective)."""
        return collective_call(
            self.comm, lambda: work() if self.comm.rank == 0 else None, f"run record: {what}"
        )

    def record(self, stats: StepStats, host: Mapping[str, Any] | None = None) -> None:
        """Record a closed step (collective): ``stats`` as ``closure.end_step()`` returned
        it, ``host`` the host's plain figures of the step (e.g. ``value``, ``iterations``,
        ``residuals``, ``closure_calls``, ``seconds_closure``, ``seconds_host``)."""
        figures = collective_call(
            self.comm, lambda: plain_values(dict(host or {})), "run record: host figures"
        )
        self.steps.append({**figures, "closure_stats": plain_values(stats.as_dict())})
        self.totals.add(stats)
        maps = self.closure.point_maps()
        if "fallback" in maps:
            self._fallback_steps += maps["fallback"] > 0
        if self._bar is not None:
            postfix = {}
            if "iterations" in figures:
                postfix["newton"] = figures["iterations"]
            if "seconds_closure" in figures:
                postfix["closure_s"] = f"{figures['seconds_closure']:.2f}"
            self._bar.set_postfix(postfix)
            self._bar.update()
        if self.output_dir is not None:
            self._write_summary(self.summary(time.perf_counter() - self._t0))

    def summary(self, seconds_total: float | None = None) -> dict[str, Any]:
        """The run summary so far (the same on every rank; not collective)."""
        totals = {
            total: sum(s[name] for s in self.steps if name in s)
            for name, total in _HOST_TOTALS.items()
        }
        run = self.totals
        return {
            **self.metadata,
            "ranks": self.comm.size,
            "points": self.closure.n_global,
            "steps": self.steps,
            **totals,
            "fallbacks": dict(run.fallbacks),
            "fallback_fraction": run.fallback_fraction,
            "exact_solves": run.exact_solves,
            "max_std": run.max_std,
            "seconds_surrogate": run.seconds_surrogate,
            "seconds_fine": run.seconds_fine,
            "seconds_total": seconds_total,
            "maps": self.maps,
        }

    def _write_summary(self, summary: dict[str, Any]) -> None:
        path = self.output_dir / "summary.json"  # type: ignore[operator]
        self._on_rank0(lambda: write_json_atomic(path, summary), "summary.json")

    def close(self) -> dict[str, Any]:
        """After the last step (collective): closes the progress bar, draws the point maps,
        writes and returns the final summary."""
        seconds_total = time.perf_counter() - self._t0
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        t0 = time.perf_counter()
        maps = self.closure.point_maps()
        if self.output_dir is not None and maps:
            if "fallback" in maps:
                maps["fallback_steps"] = self._fallback_steps
            title = f"step {len(self.steps) - 1}"
            self.maps = collective_call(
                self.comm,
                lambda: write_point_maps(
                    self.comm, self.coordinates, maps, self.output_dir, title=title,
                    categories={"fallback": FALLBACK_REASONS},
                ),
                "run record: point maps",
            )  # fmt: skip
            self.maps = self.comm.bcast(self.maps, root=0)
        summary = self.summary(seconds_total)
        summary["seconds_maps"] = self.comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        if self.output_dir is not None:
            self._write_summary(summary)
        return summary


def format_summary(
    summary: Mapping[str, Any],
    title: str,
    *,
    points: str = "quadrature points",
    field_label: str = "the macro field",
    response_label: str = "the homogenized response",
) -> str:
    """A few terminal lines from a :class:`RunRecorder` summary (with an optional
    ``reference`` entry of the exact-micro run: its times, the speed-up and the relative L2
    differences ``field_relative_l2`` per step and ``response_relative_l2``); ``points``,
    ``field_label`` and ``response_label`` name the host's points and fields."""
    other = summary["seconds_total"] - summary["seconds_closure"] - summary["seconds_host"]
    lines = [
        f"{title}: {summary['points']} {points} on {summary['ranks']} rank(s), "
        f"closure {summary.get('closure', '?')}",
        f"  steps {len(summary['steps'])}, Newton iterations {summary['newton_iterations']}, "
        f"closure calls {summary['closure_calls']}, step revisions {summary['revisions']}",
        f"  fallback fraction {summary['fallback_fraction']:.4f} {summary['fallbacks']}, "
        f"max predicted std {summary['max_std']:.3g}",
        f"  time {summary['seconds_total']:.2f} s = closure {summary['seconds_closure']:.2f} s "
        f"(surrogate {summary['seconds_surrogate']:.2f} s, fine solves "
        f"{summary['seconds_fine']:.2f} s) + host {summary['seconds_host']:.2f} s + other "
        f"(fields, summaries) {other:.2f} s; set-up {summary.get('seconds_setup', 0.0):.2f} s",
    ]
    ref = summary.get("reference")
    if ref:
        fields = ", ".join(f"{e:.2e}" for e in ref["field_relative_l2"])
        lines += [
            f"  exact-micro reference: {ref['seconds_total']:.2f} s (set-up "
            f"{ref.get('seconds_setup', 0.0):.2f} s), speed-up {ref['speedup']:.1f}x "
            "(set-up + run time)",
            f"  relative L2 difference of {field_label} per step: {fields}",
            f"  relative L2 difference of {response_label} at the last step: "
            f"{ref['response_relative_l2']:.2e}",
        ]
    return "\n".join(lines)
