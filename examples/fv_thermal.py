"""The graded plate of the main job on the PETSc finite-volume host (two-scale FV).

The problem of ``examples/fe2_thermal.py``: the plate Ω = [0, 2] × [0, 1] with conducting
circular inclusions whose volume fraction grows from 0.1 at the left edge to 0.5 at the
right edge (a different cell at every closure point: here the grid faces), both phases
``k = k0 (1 + α θ)(1 + β |g|²)`` (matrix k0 = 1, α = 0.5, β = 0.2; inclusions k0 = 10,
α = 0.2, β = 0.05); T = 0 at t = 0, T = ``--hot`` on the left edge, T = 0 on the right
edge, top and bottom insulated; backward Euler with c = 1 and steps of ``--dt``. The grid
has (2 N) × N square cells for ``--macro N`` (the FE² example's element layout); the
closure is called at every interior face and every face on the left and right edges.

``--closure surrogate`` (default): the shipped SANO model with fine-solver fallback; with
``--reference`` (default on) the exact-micro run follows and the summary reports the
relative L2 difference of T per step, of the face fluxes at the last step, and the
speed-up. Run::

    .venv/bin/mpiexec -n 2 .venv/bin/python examples/fv_thermal.py
    .venv/bin/python examples/fv_thermal.py --closure exact --macro 4 --steps 2

Fields (``fields_XXXX.vts`` and ``fields.pvd`` for ParaView), ``summary.json`` and, for
the surrogate, the fallback maps go to ``--output`` (the reference's to
``OUTPUT/reference``). With ``--solver spectral`` nothing imports DOLFINx.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI

# isort: split
from graded_plate import LENGTH, MATERIAL, graded_cells
from run_options import add_closure_arguments, closure_settings, make_closure, solve_and_compare

from neuroscale_coupling.closure.enrichment import EnrichmentOptions
from neuroscale_coupling.closure.fallback import FallbackPolicy
from neuroscale_coupling.fine import make_solver
from neuroscale_coupling.hosts.petsc_fv import (
    FVDriver,
    FVGrid,
    ThermalFVProblem,
    compare_runs,
    format_summary,
)
from neuroscale_coupling.io import write_json_atomic
from neuroscale_coupling.surrogate.model_file import Surrogate


def plate(comm: MPI.Comm, n: int) -> FVGrid:
    """The plate's grid: (2 n) × n cells, Dirichlet on the left and right edges."""
    return FVGrid(comm, 2 * n, n, upper=(LENGTH, 1.0), dirichlet_sides=("left", "right"))


def build(
    comm: MPI.Comm,
    *,
    macro: int,
    cell_n: int,
    solver: str,
    hot: float = 1.0,
    surrogate: Surrogate | None = None,
    policy: FallbackPolicy | None = None,
    enrichment: EnrichmentOptions | None = None,
) -> ThermalFVProblem:
    """The FV problem on the plate with the exact-micro closure, or the surrogate closure
    when ``surrogate`` is given (collective)."""
    grid = plate(comm, macro)
    cells = grid.cells_at_faces(graded_cells(cell_n))  # collective: fails on all ranks alike
    fine = make_solver(solver, MATERIAL)
    closure = make_closure(
        MATERIAL, fine, cells, comm=comm, surrogate=surrogate, policy=policy,
        enrichment=enrichment,
    )  # fmt: skip
    return ThermalFVProblem(
        grid, closure, dirichlet={"left": hot, "right": 0.0}, source=0.0, capacity=1.0
    )


def run(
    problem: ThermalFVProblem,
    times: np.ndarray,
    output: str | None,
    progress: bool,
    meta: dict[str, Any],
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Drive the steps; returns the summary and the owned T values after every step."""
    history: list[np.ndarray] = []

    def keep(k: int, t: float) -> dict[str, Any]:
        history.append(np.array(problem.T.getArray(readonly=True)))
        return {}

    driver = FVDriver(
        problem,
        output_dir=output,
        after_step=keep,
        progress=progress,
        metadata={"example": "fv_thermal", **meta},
    )
    return driver.run(times), history


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--macro", type=int, default=6, help="cells across the height (N)")
    parser.add_argument(
        "--cell-n", type=int, default=None,
        help="voxels per cell side (default: the model's image size; 16 with --closure exact)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dt", type=float, default=0.05)
    parser.add_argument("--hot", type=float, default=1.0, help="left-edge temperature")
    add_closure_arguments(parser, physics="thermal", closure="surrogate", reference=True)
    parser.add_argument(
        "--solver", choices=("fem", "spectral"), default="fem",
        help="fine solver (fem: fastest on CPU)",
    )  # fmt: skip
    parser.add_argument("--output", default="results/fv_thermal")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary print")
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    sur, policy, enrichment = closure_settings(args, "thermal", MATERIAL)
    if args.cell_n is None:
        args.cell_n = sur.image_size if sur is not None else 16
    options = {"macro": args.macro, "cell_n": args.cell_n, "solver": args.solver, "hot": args.hot}
    times = args.dt * np.arange(1, args.steps + 1)
    _, summary, _, _ = solve_and_compare(
        comm, build, run, times, args, options, surrogate=sur, policy=policy,
        enrichment=enrichment, compare=compare_runs,
    )  # fmt: skip
    if comm.rank == 0:
        write_json_atomic(Path(args.output) / "summary.json", summary)
        if not args.quiet:
            print(format_summary(summary, "FV thermal plate"))
            print(f"fields (fields.pvd), maps and summary.json in {args.output}/")
    return summary


if __name__ == "__main__":
    main()
