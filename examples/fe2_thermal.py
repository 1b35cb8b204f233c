"""FE² nonlinear transient heat conduction in a graded composite plate (the main job).

The plate Ω = [0, 2] × [0, 1] is a matrix with conducting circular inclusions whose
volume fraction grows from 0.1 at the left edge to 0.5 at the right edge: every
quadrature point has its own cell (a graded material). Both phases follow
``k = k0 (1 + α θ)(1 + β |g|²)`` (matrix k0 = 1, α = 0.5, β = 0.2; inclusions
k0 = 10, α = 0.2, β = 0.05), so the macro Newton needs ∂Q/∂G and ∂Q/∂θ. The plate starts
at T = 0; the left edge is held at T = 1, the right edge at T = 0, the top and bottom
are insulated; backward Euler with capacity c = 1.

By default (``--closure surrogate``) the closure is the shipped SANO model with
fallback: points whose calibrated std exceeds ``--std-rel`` of their flux, whose state
leaves the training domain or whose cell leaves the training family are solved by the
fine FE solver, balanced over the ranks; with ``--enrich`` the exact results fine-tune
the model between steps. With ``--reference`` (default on) the same
problem is also solved by the exact-micro FE² (every point a fine solve) and the summary
reports the relative L2 difference of T at every step, of the flux at the quadrature
points at the last step, and the speed-up. Run::

    .venv/bin/mpiexec -n 2 .venv/bin/python examples/fe2_thermal.py     # the main job
    .venv/bin/python examples/fe2_thermal.py --closure exact --no-reference
    .venv/bin/python examples/fe2_thermal.py --large

Fields (XDMF for ParaView), ``summary.json`` and the fallback/uncertainty maps go to
``--output`` (the reference run's to ``OUTPUT/reference``). With ``--dns 4 8`` the same
problem is also solved by direct numerical simulation resolving every cell (period ε =
1/4, 1/8 of the plate height, ``--cell-n`` voxels per period), and the relative L2
difference of T at every step is reported: it shrinks like ε.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI

import neuroscale_coupling.dolfinx_env  # noqa: F401

# isort: split
import ufl
from dolfinx import fem, mesh
from graded_plate import LENGTH, MATERIAL, graded_cells
from run_options import add_closure_arguments, closure_settings, make_closure, solve_and_compare

from neuroscale_coupling.closure.contract import cells_of_points
from neuroscale_coupling.closure.enrichment import EnrichmentOptions
from neuroscale_coupling.closure.fallback import FallbackPolicy
from neuroscale_coupling.closure.run_record import format_summary
from neuroscale_coupling.fine import make_solver
from neuroscale_coupling.hosts.dolfinx.dns import ThermalDNS
from neuroscale_coupling.hosts.dolfinx.driver import TwoScaleDriver
from neuroscale_coupling.hosts.dolfinx.problems import MacroQuadrature, ThermalFE2Problem
from neuroscale_coupling.io import write_json_atomic
from neuroscale_coupling.surrogate.model_file import Surrogate


def plate(comm: MPI.Comm, n: int) -> Any:
    """Quadrilateral mesh of the plate with (2 n) × n elements."""
    corners = [np.zeros(2), np.array([LENGTH, 1.0])]
    return mesh.create_rectangle(comm, corners, [2 * n, n], mesh.CellType.quadrilateral)


def edge_temperatures(msh: Any, hot: float = 1.0) -> Any:
    """V -> Dirichlet conditions: T = hot on the left edge, T = 0 on the right edge."""

    def bcs(V: Any) -> list[Any]:
        out = []
        for x0, value in ((0.0, hot), (LENGTH, 0.0)):
            facets = mesh.locate_entities_boundary(msh, 1, lambda x, x0=x0: np.isclose(x[0], x0))
            dofs = fem.locate_dofs_topological(V, 1, facets)
            out.append(fem.dirichletbc(fem.Constant(msh, value), dofs, V))
        return out

    return bcs


def build(
    comm: MPI.Comm,
    *,
    macro: int,
    cell_n: int,
    solver: str,
    surrogate: Surrogate | None = None,
    policy: FallbackPolicy | None = None,
    enrichment: EnrichmentOptions | None = None,
    hot: float = 1.0,
) -> ThermalFE2Problem:
    """The FE² problem on a (2 macro) × macro quadrilateral mesh of the plate; the exact-micro
    closure, or the surrogate closure when ``surrogate`` is given."""
    msh = plate(comm, macro)
    quad = MacroQuadrature(msh, 2)
    fine = make_solver(solver, MATERIAL)
    cells = cells_of_points(comm, graded_cells(cell_n), quad.coordinates)
    closure = make_closure(
        MATERIAL, fine, cells, comm=comm, surrogate=surrogate, policy=policy,
        enrichment=enrichment,
    )  # fmt: skip
    return ThermalFE2Problem(
        quad, closure, bcs=edge_temperatures(msh, hot), source=0.0, capacity=1.0
    )


def run(
    problem: ThermalFE2Problem,
    times: np.ndarray,
    output: str | None,
    progress: bool,
    meta: dict[str, Any],
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Drive the steps; returns the summary and T after every step."""
    history: list[np.ndarray] = []
    driver = TwoScaleDriver(
        problem,
        output_dir=output,
        after_step=lambda k, t: history.append(problem.u.x.array.copy()) or {},
        progress=progress,
        metadata={"example": "fe2_thermal", **meta},
    )
    return driver.run(times), history


def compare_with_dns(
    comm: MPI.Comm,
    history: list[np.ndarray],
    V: Any,
    dt: float,
    inv_eps: int,
    cell_n: int,
    hot: float = 1.0,
) -> dict[str, Any]:
    """Run the DNS with period 1/inv_eps and return the relative L2 difference of T to
    the FE² field at every step (collective)."""
    msh = plate(comm, inv_eps * cell_n)
    dns = ThermalDNS(
        msh,
        MATERIAL,
        graded_cells(cell_n),
        1.0 / inv_eps,
        bcs=edge_temperatures(msh, hot),
        capacity=1.0,
    )
    cells = np.arange(msh.topology.index_map(2).size_local, dtype=np.int32)
    data = fem.create_interpolation_data(dns.V, V, cells)
    macro, on_dns = fem.Function(V), fem.Function(dns.V)
    diff = fem.form((dns.T - on_dns) ** 2 * ufl.dx)
    norm = fem.form(dns.T**2 * ufl.dx)
    errors = []
    for values in history:
        dns.solve_step(dt)
        macro.x.array[:] = values
        on_dns.interpolate_nonmatching(macro, cells, data)
        num = comm.allreduce(fem.assemble_scalar(diff))
        den = comm.allreduce(fem.assemble_scalar(norm))
        errors.append(float(np.sqrt(num / den)))
    return {"inv_epsilon": inv_eps, "dns_cells": comm.allreduce(cells.size), "relative_l2": errors}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--macro", type=int, default=6, help="macro elements across the height")
    parser.add_argument(
        "--cell-n", type=int, default=None,
        help="voxels per cell side (default: the model's image size; 16 with --closure exact)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--hot", type=float, default=1.0,
        help="left-edge temperature (default 1; the shipped model knows θ in [0, 1], so a "
        "larger value drives points out of its domain and onto the fine solver)",
    )  # fmt: skip
    parser.add_argument("--dt", type=float, default=0.05)
    add_closure_arguments(parser, physics="thermal", closure="surrogate", reference=True)
    parser.add_argument(
        "--solver", choices=("fem", "spectral"), default="fem",
        help="fine solver (fem: fastest on CPU)",
    )  # fmt: skip
    parser.add_argument("--large", action="store_true", help="macro 16, 10 steps")
    parser.add_argument("--output", default="results/fe2_thermal")
    parser.add_argument(
        "--dns", type=int, nargs="*", default=[], metavar="INV_EPS",
        help="also run the DNS with these periods 1/ε and report the difference",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary print")
    args = parser.parse_args(argv)
    if args.large:
        args.macro, args.steps = 16, 10
    comm = MPI.COMM_WORLD
    sur, policy, enrichment = closure_settings(args, "thermal", MATERIAL)
    if args.cell_n is None:
        args.cell_n = sur.image_size if sur is not None else 16
    options = {"macro": args.macro, "cell_n": args.cell_n, "solver": args.solver, "hot": args.hot}
    times = args.dt * np.arange(1, args.steps + 1)
    problem, summary, history, _ = solve_and_compare(
        comm, build, run, times, args, options, surrogate=sur, policy=policy,
        enrichment=enrichment,
    )  # fmt: skip
    if args.dns:
        summary["dns_comparison"] = [
            compare_with_dns(comm, history, problem.V, args.dt, inv_eps, args.cell_n, args.hot)
            for inv_eps in args.dns
        ]
    if comm.rank == 0:
        write_json_atomic(Path(args.output) / "summary.json", summary)
        if not args.quiet:
            print(format_summary(summary, "FE² thermal plate"))
            for dns in summary.get("dns_comparison", []):
                errs = ", ".join(f"{e:.3f}" for e in dns["relative_l2"])
                print(f"  DNS ε = 1/{dns['inv_epsilon']}: relative L2 of T per step {errs}")
            print(f"fields, maps and summary.json in {args.output}/")
    return summary


if __name__ == "__main__":
    main()
