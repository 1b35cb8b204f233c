"""Two-scale driver: steps, macro Newton per step, fields for ParaView, a JSON summary.

The driver walks a list of step values (times for transient heat conduction, load
factors for quasi-static mechanics), lets the problem prepare each step, runs its macro
Newton solve (each residual evaluation calls the closure at every quadrature point),
writes the fields and records what every step cost through the host-independent
:class:`~neuroscale_coupling.closure.run_record.RunRecorder` (summary, point maps,
progress). All calls are collective over the mesh communicator; rank 0 writes the summary
and shows progress.

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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import neuroscale_coupling.dolfinx_env  # noqa: F401  (import order of the DOLFINx wheel)

# isort: split
from dolfinx import fem, io

from neuroscale_coupling.closure.run_record import NewtonReport, RunRecorder
from neuroscale_coupling.hosts.dolfinx.problems import MechanicalFE2Problem, ThermalFE2Problem
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
        self.progress = progress
        self.metadata = dict(metadata or {})
        self.reports: list[NewtonReport] = []
        self.values: list[float] = []
        self._cell_fields = self._make_cell_fields()
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
        recorder = RunRecorder(
            self.problem.closure,
            self.problem.quadrature.coordinates,
            comm=self.comm,
            output_dir=self.output_dir,
            progress=self.progress,
            total_steps=len(values),
            metadata=self.metadata,
        )
        if self.output_dir is not None:
            xdmf = io.XDMFFile(self.comm, str(self.output_dir / "fields.xdmf"), "w")
            xdmf.write_mesh(self.problem.quadrature.msh)
        try:
            for k, value in enumerate(values):
                if self.prepare is not None:
                    self.prepare(k, float(value))
                self._prepare_problem(k, float(value))
                report = self.problem.solve_step()
                self._finish_problem()
                self.reports.append(report)
                self.values.append(float(value))
                observed = self.after_step(k, float(value)) if self.after_step is not None else {}
                log.info(
                    "step %d (value %.4g): %d Newton iterations, closure %.3f s, host %.3f s",
                    k, value, report.iterations, report.seconds_closure, report.seconds_host,
                )  # fmt: skip
                if xdmf is not None:
                    self._update_cell_fields()
                    xdmf.write_function(self._output_field(), float(value))
                    for fn in self._cell_fields.values():
                        xdmf.write_function(fn, float(value))
                stats, figures = report.figures()
                recorder.record(stats, {"value": float(value), **figures, **observed})
        finally:
            if xdmf is not None:
                xdmf.close()
        summary = recorder.close()
        self.maps = recorder.maps
        return summary

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
