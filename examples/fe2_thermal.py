"""FE² nonlinear transient heat conduction in a graded composite plate.

The plate Ω = [0, 2] × [0, 1] is a matrix with conducting circular inclusions whose
volume fraction grows from 0.1 at the left edge to 0.5 at the right edge: every
quadrature point has its own cell (a graded material). Both phases follow
``k = k0 (1 + α θ)(1 + β |g|²)`` (matrix k0 = 1, α = 0.5, β = 0.2; inclusions
k0 = 10, α = 0.2, β = 0.05), so the macro Newton needs ∂Q/∂G and ∂Q/∂θ. The plate starts
at T = 0; the left edge is held at T = 1, the right edge at T = 0, the top and bottom
are insulated; backward Euler with capacity c = 1.

Every quadrature point is answered by a true fine-scale cell solve (the exact-micro
reference FE²). Run::

    .venv/bin/python examples/fe2_thermal.py                 # small and fast
    .venv/bin/python examples/fe2_thermal.py --large         # finer macro mesh and cells
    .venv/bin/mpiexec -n 2 .venv/bin/python examples/fe2_thermal.py

Fields (XDMF for ParaView) and ``summary.json`` go to ``--output``. With ``--dns 4 8``
the same problem is also solved by direct numerical simulation resolving every cell
(period ε = 1/4, 1/8 of the plate height, ``--cell-n`` voxels per period), and the
relative L2 difference of T at every step is reported: it shrinks like ε.
"""

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI

import neuroscale_coupling.dolfinx_env  # noqa: F401

# isort: split
import ufl
from dolfinx import fem, mesh

from neuroscale_coupling.closure import ExactClosure
from neuroscale_coupling.coupling import TwoScaleDriver
from neuroscale_coupling.dns import ThermalDNS
from neuroscale_coupling.fine import make_solver
from neuroscale_coupling.hosts.dolfinx_host import MacroQuadrature, ThermalFE2Problem
from neuroscale_coupling.io import write_json_atomic
from neuroscale_coupling.materials import ThermalMaterial, ThermalPhase
from neuroscale_coupling.microstructure import circular_inclusion

MATERIAL = ThermalMaterial(phases=(ThermalPhase(1.0, 0.5, 0.2), ThermalPhase(10.0, 0.2, 0.05)))
LENGTH = 2.0


def inclusion_fraction(x1: np.ndarray) -> np.ndarray:
    """Graded inclusion volume fraction: 0.1 at x1 = 0 to 0.5 at x1 = LENGTH."""
    return 0.1 + 0.4 * np.clip(x1 / LENGTH, 0.0, 1.0)


def graded_cells(n: int) -> Any:
    """cell_of(coordinates (m, 2)) -> images (m, n, n) of the graded plate."""

    def cell_of(coordinates: np.ndarray) -> np.ndarray:
        fractions = inclusion_fraction(coordinates[:, 0])
        unique, inverse = np.unique(np.round(fractions, 6), return_inverse=True)
        images = np.stack([circular_inclusion(n, f) for f in unique]) if unique.size else None
        return images[inverse] if images is not None else np.zeros((0, n, n), dtype=np.int64)

    return cell_of


def plate(comm: MPI.Comm, n: int) -> Any:
    """Quadrilateral mesh of the plate with (2 n) × n elements."""
    corners = [np.zeros(2), np.array([LENGTH, 1.0])]
    return mesh.create_rectangle(comm, corners, [2 * n, n], mesh.CellType.quadrilateral)


def edge_temperatures(msh: Any) -> Any:
    """V -> Dirichlet conditions: T = 1 on the left edge, T = 0 on the right edge."""

    def bcs(V: Any) -> list[Any]:
        out = []
        for x0, value in ((0.0, 1.0), (LENGTH, 0.0)):
            facets = mesh.locate_entities_boundary(msh, 1, lambda x, x0=x0: np.isclose(x[0], x0))
            dofs = fem.locate_dofs_topological(V, 1, facets)
            out.append(fem.dirichletbc(fem.Constant(msh, value), dofs, V))
        return out

    return bcs


def build(comm: MPI.Comm, *, macro: int, cell_n: int, solver: str) -> ThermalFE2Problem:
    """The FE² problem on a (2 macro) × macro quadrilateral mesh of the plate."""
    msh = plate(comm, macro)
    quad = MacroQuadrature(msh, 2)
    closure = ExactClosure.from_coordinates(
        MATERIAL, make_solver(solver, MATERIAL), quad.coordinates, graded_cells(cell_n), comm=comm
    )
    return ThermalFE2Problem(quad, closure, bcs=edge_temperatures(msh), source=0.0, capacity=1.0)


def compare_with_dns(
    comm: MPI.Comm, history: list[np.ndarray], V: Any, dt: float, inv_eps: int, cell_n: int
) -> dict[str, Any]:
    """Run the DNS with period 1/inv_eps and return the relative L2 difference of T to
    the FE² field at every step (collective)."""
    msh = plate(comm, inv_eps * cell_n)
    dns = ThermalDNS(
        msh, MATERIAL, graded_cells(cell_n), 1.0 / inv_eps, bcs=edge_temperatures(msh), capacity=1.0
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
    parser.add_argument("--macro", type=int, default=6, help="macro elements across the width")
    parser.add_argument("--cell-n", type=int, default=16, help="voxels per cell side")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dt", type=float, default=0.05)
    parser.add_argument(
        "--solver",
        choices=("fem", "spectral"),
        default="fem",
        help="fine solver (fem: fastest on CPU)",
    )
    parser.add_argument("--large", action="store_true", help="macro 16, cells 32², 10 steps")
    parser.add_argument("--output", default="results/fe2_thermal")
    parser.add_argument(
        "--dns", type=int, nargs="*", default=[], metavar="INV_EPS",
        help="also run the DNS with these periods 1/ε and report the difference",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary print")
    args = parser.parse_args(argv)
    if args.large:
        args.macro, args.cell_n, args.steps = 16, 32, 10
    comm = MPI.COMM_WORLD
    problem = build(comm, macro=args.macro, cell_n=args.cell_n, solver=args.solver)
    times = args.dt * np.arange(1, args.steps + 1)
    history: list[np.ndarray] = []
    driver = TwoScaleDriver(
        problem,
        output_dir=args.output,
        after_step=lambda k, t: history.append(problem.u.x.array.copy()) or {},
        progress=not args.quiet,
        metadata={"example": "fe2_thermal", "closure": "exact", **vars(args)},
    )
    summary = driver.run(times)
    if args.dns:
        summary["dns_comparison"] = [
            compare_with_dns(comm, history, problem.V, args.dt, inv_eps, args.cell_n)
            for inv_eps in args.dns
        ]
        if comm.rank == 0:
            write_json_atomic(Path(args.output) / "summary.json", summary)
    if comm.rank == 0 and not args.quiet:
        print(json.dumps({k: v for k, v in summary.items() if k != "steps"}, indent=2))
        print(f"fields and summary in {args.output}/")
    return summary


if __name__ == "__main__":
    main()
