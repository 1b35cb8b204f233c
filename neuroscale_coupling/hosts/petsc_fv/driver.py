"""The finite-volume host's step loop: steps, fields for ParaView, the run record, and the
comparison of two runs (a surrogate run against its exact-micro reference).

Outputs in ``output_dir`` (all collective; where rank 0 writes, the ranks agree on the
write's success):

- ``fields_XXXX.vts`` per step, written by PETSc's VTK viewer (one piece per rank): the
  cell temperature ``T`` and ``closure.Q1``, ``closure.Q2``, ``closure.std`` (‖std‖),
  ``closure.exact_fraction``: per cell, averages over its closure faces of the last
  closure answer; ``fields.pvd`` lists them with their times (open it in ParaView);
- through :class:`~neuroscale_coupling.closure.run_record.RunRecorder`: ``summary.json``
  (per step the Newton iterations and residuals, closure calls and statistics, seconds in
  the closure vs the host; run totals), rewritten after every step, and for closures with
  per-point maps (the surrogate closure) ``fallback.png``, ``fallback_steps.png`` and
  ``predicted_std.png`` over the face centres.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mpi4py import MPI

# isort: split
import numpy as np
from petsc4py import PETSc

from neuroscale_coupling.closure.run_record import NewtonReport, RunRecorder
from neuroscale_coupling.closure.run_record import format_summary as summary_lines
from neuroscale_coupling.hosts.petsc_fv.problem import ThermalFVProblem
from neuroscale_coupling.io import atomic_write
from neuroscale_coupling.log import get_logger
from neuroscale_coupling.parallel import collective_call

__all__ = ["CELL_FIELDS", "FVDriver", "compare_runs", "field_difference", "format_summary"]

log = get_logger(__name__)

#: Per-cell closure fields written next to T.
CELL_FIELDS = ("Q1", "Q2", "std", "exact_fraction")


class FVDriver:
    """Runs a :class:`ThermalFVProblem` through its time steps (collective).

    output_dir: where fields and summary go (None: nothing written). after_step: optional
    collective callback (step index, time) -> dict recorded with the step. progress: a
    progress bar on rank 0. metadata: plain entries at the top of the summary.
    """

    def __init__(
        self,
        problem: ThermalFVProblem,
        *,
        output_dir: Path | str | None = None,
        after_step: Callable[[int, float], dict[str, Any]] | None = None,
        progress: bool = True,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.problem = problem
        self.comm = problem.comm
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.after_step = after_step
        self.progress = progress
        g = problem.grid
        self.metadata = {"host": "petsc_fv", "grid": [g.nx, g.ny], **dict(metadata or {})}
        self.reports: list[NewtonReport] = []
        self.values: list[float] = []
        self.maps: dict[str, str] = {}
        self._field_dm = g.cell_dm(len(CELL_FIELDS), CELL_FIELDS)
        self._fields = self._field_dm.createGlobalVec()
        self._fields.setName("closure")
        self._files: list[tuple[float, str]] = []

    def run(self, values: Sequence[float]) -> dict[str, Any]:
        """Solve every step (times, increasing; collective); returns the summary."""
        p = self.problem
        recorder = RunRecorder(
            p.closure, p.grid.face_coordinates, comm=self.comm, output_dir=self.output_dir,
            progress=self.progress, total_steps=len(values), metadata=self.metadata,
            description="FV steps",
        )  # fmt: skip
        for k, value in enumerate(values):
            previous = self.values[-1] if self.values else 0.0
            if not p.steady:
                if value <= previous:
                    raise ValueError(
                        f"transient step {k}: time {value} does not increase past "
                        f"{previous}; give increasing times"
                    )
                p.dt = float(value) - previous
            report = p.solve_step()
            p.advance()
            self.reports.append(report)
            self.values.append(float(value))
            observed = self.after_step(k, float(value)) if self.after_step is not None else {}
            log.info(
                "step %d (t = %.4g): %d Newton iterations, closure %.3f s, host %.3f s",
                k, value, report.iterations, report.seconds_closure, report.seconds_host,
            )  # fmt: skip
            if self.output_dir is not None:
                self._write_fields(k, float(value))
            stats, figures = report.figures()
            recorder.record(stats, {"value": float(value), **figures, **observed})
        summary = recorder.close()
        self.maps = recorder.maps
        return summary

    def _write_fields(self, k: int, value: float) -> None:
        """T and the per-cell closure fields of step k into ``fields_k.vts`` (collective;
        PETSc's VTK viewer writes when destroyed), and the ``.pvd`` index (rank 0)."""
        out = self.output_dir
        assert out is not None
        self.problem.cell_fields(self._field_dm, self._fields)
        name = f"fields_{k:04d}.vts"

        def write_vts() -> None:
            viewer = PETSc.Viewer().createVTK(
                str(out / name), mode=PETSc.Viewer.Mode.WRITE, comm=self.comm
            )
            self.problem.T.view(viewer)
            self._fields.view(viewer)
            viewer.destroy()

        collective_call(self.comm, write_vts, f"VTK fields {name}")
        self._files.append((value, name))
        rows = "\n".join(
            f'    <DataSet timestep="{t:.12g}" part="0" file="{f}"/>' for t, f in self._files
        )
        text = (
            '<?xml version="1.0"?>\n<VTKFile type="Collection" version="0.1">\n'
            f"  <Collection>\n{rows}\n  </Collection>\n</VTKFile>\n"
        )

        def write_pvd() -> None:
            if self.comm.rank == 0:
                atomic_write(out / "fields.pvd", lambda fh: fh.write(text.encode()))

        collective_call(self.comm, write_pvd, "fields.pvd")


def field_difference(comm: MPI.Comm, values: np.ndarray, reference: np.ndarray) -> float:
    """‖values − reference‖ / ‖reference‖ over all ranks' cells (equal cells: the relative
    L2 difference of two cell fields), arrays of the owned entries (collective)."""
    num = comm.allreduce(float(np.sum((values - reference) ** 2)), op=MPI.SUM)
    den = comm.allreduce(float(np.sum(reference**2)), op=MPI.SUM)
    return math.sqrt(num / den) if den > 0 else math.inf


def compare_runs(
    problem: ThermalFVProblem,
    history: Sequence[np.ndarray],
    reference: ThermalFVProblem,
    ref_history: Sequence[np.ndarray],
) -> dict[str, Any]:
    """Differences of a run to a reference run of the same problem on the same grid layout
    (collective): ``field_relative_l2`` of T per step (history: the owned T values after
    every step) and ``response_relative_l2`` of the face fluxes at the last iterate."""
    fields = [
        field_difference(problem.comm, a, b) for a, b in zip(history, ref_history, strict=True)
    ]
    assert problem.last_result is not None and reference.last_result is not None
    response = field_difference(
        problem.comm, problem.last_result.response, reference.last_result.response
    )
    return {"field_relative_l2": fields, "response_relative_l2": response}


def format_summary(summary: Mapping[str, Any], title: str) -> str:
    """A few terminal lines from an :class:`FVDriver` summary (with the optional
    ``reference`` entry of the exact-micro run)."""
    nx, ny = summary.get("grid", ("?", "?"))
    return summary_lines(
        summary,
        title,
        points=f"closure faces ({nx} x {ny} cells)",
        field_label="T",
        response_label="the face fluxes",
    )
