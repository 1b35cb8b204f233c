"""Two-scale driver: steps, macro Newton per step, fields for ParaView, a JSON summary.

The driver walks a list of step values (times for transient heat conduction, load
factors for quasi-static mechanics), lets the problem prepare each step, runs its macro
Newton solve (each residual evaluation calls the closure at every quadrature point),
writes the fields and records what every step cost. All calls are collective over the
mesh communicator; rank 0 writes the summary and shows progress.

Outputs in ``output_dir``:

- ``fields.xdmf`` (+ ``.h5``): the macro field (P1) and, per cell, the cell average of the
  homogenized response, of its standard deviation and the fraction of exactly solved
  points (DG0), at every step;
- ``summary.json``: per step the Newton iterations and residuals, closure calls and
  statistics (fallbacks by reason, surrogate vs fine-solve seconds, max std, enrichment),
  seconds in the closure vs host assembly/solve, and run totals; written atomically.
  ``seconds_total`` is the wall time of the steps, fields and summaries written per step
  included; drawing the point maps after the last step is ``seconds_maps``, apart;
- for closures that report per-point maps (the surrogate closure): ``fallback.png`` (why
  each quadrature point fell back to the fine solver at the last step),
  ``fallback_steps.png`` (in how many steps it did) and ``predicted_std.png`` (the
  surrogate's predicted standard deviation at the last step).
"""

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI

import neuroscale_coupling.dolfinx_env  # noqa: F401  (import order of the DOLFINx wheel)

# isort: split
from dolfinx import fem, io

from neuroscale_coupling.closure.contract import FALLBACK_REASONS
from neuroscale_coupling.closure.point_maps import write_point_maps
from neuroscale_coupling.hosts.dolfinx.problems import (
    MechanicalFE2Problem,
    NewtonReport,
    ThermalFE2Problem,
)
from neuroscale_coupling.io import write_json_atomic
from neuroscale_coupling.log import get_logger

__all__ = ["TwoScaleDriver"]

log = get_logger(__name__)


class TwoScaleDriver:
    """Runs an FE² problem through its steps.

    problem: ThermalFE2Problem or MechanicalFE2Problem. output_dir: where fields and
    summary go (None: nothing written). prepare: optional callback (step index, value)
    called before each solve, e.g. to move Dirichlet data with the load. after_step:
    optional collective callback (step index, value) -> dict of quantities of interest,
    recorded with the step. progress: show a progress bar on rank 0.
    """

    def __init__(
        self,
        problem: ThermalFE2Problem | MechanicalFE2Problem,
        *,
        output_dir: Path | str | None = None,
        prepare: Callable[[int, float], None] | None = None,
        after_step: Callable[[int, float], dict[str, Any]] | None = None,
        progress: bool = True,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.problem = problem
        self.comm = problem.comm
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.prepare = prepare
        self.after_step = after_step
        self.observations: list[dict[str, Any]] = []
        self.progress = progress
        self.metadata = dict(metadata or {})
        self.reports: list[NewtonReport] = []
        self.values: list[float] = []
        self._cell_fields = self._make_cell_fields()
        self._fallback_steps = np.zeros(problem.closure.n_local, dtype=np.int64)
        self.maps: dict[str, str] = {}

    def _make_cell_fields(self) -> dict[str, Any]:
        msh = self.problem.quadrature.msh
        r = self.problem.closure.material.response_dim
        names = self.problem.closure.material.response_names
        return {
            "response": fem.Function(fem.functionspace(msh, ("DG", 0, (r,))), name="-".join(names)),
            "std": fem.Function(fem.functionspace(msh, ("DG", 0, (r,))), name="std"),
            "exact": fem.Function(fem.functionspace(msh, ("DG", 0)), name="exact_fraction"),
        }

    def _update_cell_fields(self) -> None:
        result = self.problem.last_result
        if result is None:
            return
        quad = self.problem.quadrature
        n_cells, n_q = quad.cells.size, quad.n_q
        for name, values in (
            ("response", result.response),
            ("std", result.std),
            ("exact", result.exact.astype(float)),
        ):
            fn = self._cell_fields[name]
            bs = fn.function_space.dofmap.bs
            means = values.reshape(n_cells, n_q, -1).mean(axis=1)
            dofs = fn.function_space.dofmap.list[quad.cells, 0]
            fn.x.array.reshape(-1, bs)[dofs] = means.reshape(n_cells, bs)
            fn.x.scatter_forward()

    def _output_field(self) -> Any:
        u = self.problem.u
        element = u.function_space.ufl_element()
        if element.basix_element.degree <= 1:
            return u
        space = fem.functionspace(u.function_space.mesh, ("Lagrange", 1, u.ufl_shape))
        out = fem.Function(space, name=u.name)
        out.interpolate(u)
        return out

    def run(self, values: Sequence[float]) -> dict[str, Any]:
        """Solve every step (collective); returns the run summary (also written)."""
        xdmf = None
        if self.output_dir is not None:
            if self.comm.rank == 0:
                self.output_dir.mkdir(parents=True, exist_ok=True)
            self.comm.barrier()
            xdmf = io.XDMFFile(self.comm, str(self.output_dir / "fields.xdmf"), "w")
            xdmf.write_mesh(self.problem.quadrature.msh)
        bar = None
        if self.progress and self.comm.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=len(values), desc="FE² steps", unit="step")
        t_start = time.perf_counter()
        try:
            for k, value in enumerate(values):
                if self.prepare is not None:
                    self.prepare(k, float(value))
                self._prepare_problem(k, float(value))
                report = self.problem.solve_step()
                self._finish_problem()
                self.reports.append(report)
                self.values.append(float(value))
                self.observations.append(
                    self.after_step(k, float(value)) if self.after_step is not None else {}
                )
                log.info(
                    "step %d (value %.4g): %d Newton iterations, closure %.3f s, host %.3f s",
                    k, value, report.iterations, report.seconds_closure, report.seconds_host,
                )  # fmt: skip
                if xdmf is not None:
                    self._update_cell_fields()
                    xdmf.write_function(self._output_field(), float(value))
                    for fn in self._cell_fields.values():
                        xdmf.write_function(fn, float(value))
                maps = self.problem.closure.point_maps()
                if "fallback" in maps:
                    self._fallback_steps += maps["fallback"] > 0
                if bar is not None:
                    bar.set_postfix(
                        newton=report.iterations, closure_s=f"{report.seconds_closure:.2f}"
                    )
                    bar.update()
                if self.output_dir is not None:
                    self._write_summary(time.perf_counter() - t_start)
        finally:
            if bar is not None:
                bar.close()
            if xdmf is not None:
                xdmf.close()
        seconds_total = time.perf_counter() - t_start
        t0 = time.perf_counter()
        self._write_maps()
        summary = self.summary(seconds_total)
        summary["seconds_maps"] = self.comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        if self.output_dir is not None and self.comm.rank == 0:
            write_json_atomic(self.output_dir / "summary.json", summary)
        return summary

    def _write_maps(self) -> None:
        """Point maps of the closure at the last step (collective; rank 0 draws)."""
        maps = self.problem.closure.point_maps()
        if self.output_dir is None or not maps:
            return
        if "fallback" in maps:
            maps["fallback_steps"] = self._fallback_steps
        self.maps = write_point_maps(
            self.comm,
            self.problem.quadrature.coordinates,
            maps,
            self.output_dir,
            title=f"step {len(self.values) - 1}",
            categories={"fallback": FALLBACK_REASONS},
        )

    def _prepare_problem(self, k: int, value: float) -> None:
        p = self.problem
        if isinstance(p, ThermalFE2Problem):
            if not p.steady:
                previous = self.values[-1] if self.values else 0.0
                if value <= previous:
                    raise ValueError(
                        f"transient step {k}: time {value} does not increase past {previous}; "
                        "give increasing times"
                    )
                p.dt.value = value - previous
        else:
            p.load.value = value

    def _finish_problem(self) -> None:
        if isinstance(self.problem, ThermalFE2Problem):
            self.problem.advance()

    def summary(self, seconds_total: float) -> dict[str, Any]:
        """The run summary: configuration, per-step reports and totals."""
        steps = [
            {"value": v, **vars(r), "observed_orders": r.observed_orders(), **obs}
            for v, r, obs in zip(self.values, self.reports, self.observations, strict=True)
        ]
        closure_s = sum(r.seconds_closure for r in self.reports)
        host_s = sum(r.seconds_host for r in self.reports)
        stats = [r.closure_stats for r in self.reports]
        fallbacks: dict[str, int] = {}
        for st in stats:
            for reason, count in st.get("fallbacks", {}).items():
                fallbacks[reason] = fallbacks.get(reason, 0) + count
        point_steps = sum(st.get("points", 0) for st in stats)
        return {
            **self.metadata,
            "ranks": self.comm.size,
            "points": self.problem.closure.n_global,
            "steps": steps,
            "newton_iterations": sum(r.iterations for r in self.reports),
            "closure_calls": sum(r.closure_calls for r in self.reports),
            "revisions": sum(r.revisions for r in self.reports),
            "fallbacks": fallbacks,
            "fallback_fraction": sum(fallbacks.values()) / point_steps if point_steps else 0.0,
            "exact_solves": sum(st.get("exact_solves", 0) for st in stats),
            "max_std": max((st.get("max_std", 0.0) for st in stats), default=0.0),
            "seconds_closure": closure_s,
            "seconds_surrogate": sum(st.get("seconds_surrogate", 0.0) for st in stats),
            "seconds_fine": sum(st.get("seconds_fine", 0.0) for st in stats),
            "seconds_host": host_s,
            "seconds_total": seconds_total,
            "maps": self.maps,
        }

    def _write_summary(self, seconds_total: float) -> None:
        record = self.summary(seconds_total)
        if self.comm.rank == 0 and self.output_dir is not None:
            write_json_atomic(self.output_dir / "summary.json", record)
