"""FE² Cook's membrane of the EquiNO fibre composite under load steps.

Cook's membrane (a tapered cantilever with corners (0, 0), (48, 44), (48, 60), (0, 44),
plane strain) is clamped on its left edge and sheared by a uniform vertical traction on
its right edge, raised in load steps. The material at every quadrature point is the
EquiNO composite cell: a centred fibre plus corner quarter-fibres (fibre fraction 0.45,
linear elastic E = 73000, ν = 0.22) in the nonlinear EquiNO matrix (K = 4780, c1 = 50,
c2 = 0.06). Every quadrature point is answered by a true fine-scale cell solve.

    .venv/bin/python examples/fe2_mechanical.py            # small and fast
    .venv/bin/python examples/fe2_mechanical.py --large
    .venv/bin/mpiexec -n 2 .venv/bin/python examples/fe2_mechanical.py

Fields (XDMF) and ``summary.json`` go to ``--output``; the summary reports the vertical
displacement of the top-right corner at every step.
"""

import argparse
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from mpi4py import MPI

import neuroscale_coupling.dolfinx_env  # noqa: F401

# isort: split
import ufl
from dolfinx import fem, mesh

from neuroscale_coupling.closure import ExactClosure
from neuroscale_coupling.coupling import TwoScaleDriver
from neuroscale_coupling.fine import make_solver
from neuroscale_coupling.hosts.dolfinx_host import MacroQuadrature, MechanicalFE2Problem
from neuroscale_coupling.materials import equino_material
from neuroscale_coupling.microstructure import centre_and_corner_fibres

MATERIAL = equino_material()
#: Full vertical traction on the right edge (load factor 1).
TRACTION = 100.0


def cook_membrane(comm: MPI.Comm, n: int) -> Any:
    """Quadrilateral mesh of Cook's membrane: the unit square mapped bilinearly."""
    msh = mesh.create_unit_square(comm, n, n, mesh.CellType.quadrilateral)
    xi, eta = msh.geometry.x[:, 0].copy(), msh.geometry.x[:, 1].copy()
    bottom, top = 44.0 * xi, 44.0 + 16.0 * xi
    msh.geometry.x[:, 0] = 48.0 * xi
    msh.geometry.x[:, 1] = bottom + eta * (top - bottom)
    return msh


def build(comm: MPI.Comm, *, macro: int, cell_n: int, solver: str) -> MechanicalFE2Problem:
    msh = cook_membrane(comm, macro)
    quad = MacroQuadrature(msh, 2)
    cell = centre_and_corner_fibres(cell_n, 0.45)
    closure = ExactClosure(
        MATERIAL,
        make_solver(solver, MATERIAL),
        np.broadcast_to(cell, (quad.n_local, cell_n, cell_n)),
        comm=comm,
    )

    def clamp(V: Any) -> list[Any]:
        facets = mesh.locate_entities_boundary(msh, 1, lambda x: np.isclose(x[0], 0.0))
        dofs = fem.locate_dofs_topological(V, 1, facets)
        return [fem.dirichletbc(np.zeros(2), dofs, V)]

    right = mesh.locate_entities_boundary(msh, 1, lambda x: np.isclose(x[0], 48.0))
    tags = mesh.meshtags(msh, 1, right, np.full(right.size, 1, dtype=np.int32))
    ds = ufl.Measure("ds", domain=msh, subdomain_data=tags)

    def traction(v: Any, load: Any) -> Any:
        return load * TRACTION * v[1] * ds(1)

    return MechanicalFE2Problem(quad, closure, bcs=clamp, traction=traction)


def corner_deflection(problem: MechanicalFE2Problem) -> float:
    """Vertical displacement at the top-right corner (48, 60) (collective)."""
    V = problem.V
    x = V.tabulate_dof_coordinates()
    n_own = V.dofmap.index_map.size_local
    hit = np.flatnonzero(np.linalg.norm(x[:n_own, :2] - [48.0, 60.0], axis=1) < 1e-8)
    local = problem.u.x.array.reshape(-1, 2)[hit[0], 1] if hit.size else 0.0
    return float(problem.comm.allreduce(local))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--macro", type=int, default=6, help="elements per side")
    parser.add_argument("--cell-n", type=int, default=16, help="voxels per cell side")
    parser.add_argument("--steps", type=int, default=3, help="load steps up to the full traction")
    parser.add_argument(
        "--solver",
        choices=("fem", "spectral"),
        default="fem",
        help="fine solver (fem: fastest on CPU)",
    )
    parser.add_argument("--large", action="store_true", help="macro 16, cells 32², 6 steps")
    parser.add_argument("--output", default="results/fe2_mechanical")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.large:
        args.macro, args.cell_n, args.steps = 16, 32, 6
    comm = MPI.COMM_WORLD
    problem = build(comm, macro=args.macro, cell_n=args.cell_n, solver=args.solver)
    driver = TwoScaleDriver(
        problem,
        output_dir=args.output,
        after_step=lambda k, load: {"corner_deflection": corner_deflection(problem)},
        progress=not args.quiet,
        metadata={"example": "fe2_mechanical", "closure": "exact", **vars(args)},
    )
    summary = driver.run(np.linspace(1.0 / args.steps, 1.0, args.steps))
    if comm.rank == 0 and not args.quiet:
        print(json.dumps({k: v for k, v in summary.items() if k != "steps"}, indent=2))
        print(f"fields and summary in {args.output}/")
    return summary


if __name__ == "__main__":
    main()
