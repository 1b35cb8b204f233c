"""FE² Cook's membrane of the EquiNO fibre composite under load steps.

Cook's membrane (a tapered cantilever with corners (0, 0), (48, 44), (48, 60), (0, 44),
plane strain) is clamped on its left edge and sheared by a uniform vertical traction on
its right edge, raised in load steps. The material at every quadrature point is the
EquiNO composite cell: a centred fibre plus corner quarter-fibres (fibre fraction 0.45,
linear elastic E = 73000, ν = 0.22) in the nonlinear EquiNO matrix (K = 4780, c1 = 50,
c2 = 0.06).

With ``--closure surrogate`` the closure is the shipped mechanical SANO model with
fallback to the fine FE solver (calibrated std above ``--std-rel`` of ‖Σ‖, strain outside
the training box |E_ij| ≤ 0.04, cell outside the training family), and ``--reference``
also runs the exact-micro FE² and reports the differences and the speed-up. The default
``--closure exact`` answers every point with a true fine-scale cell solve.

    .venv/bin/python examples/fe2_mechanical.py            # exact-micro, small and fast
    .venv/bin/python examples/fe2_mechanical.py --closure surrogate --reference
    .venv/bin/python examples/fe2_mechanical.py --large
    .venv/bin/mpiexec -n 2 .venv/bin/python examples/fe2_mechanical.py

Fields (XDMF) and ``summary.json`` go to ``--output``; the summary reports the vertical
displacement of the top-right corner at every step.

With ``--dns 2 4 8`` the same problem is also solved by direct numerical simulation
resolving every cell (:class:`neuroscale_coupling.hosts.dolfinx.dns.MechanicalDNS`). The period is
ε = 48/INV_EPS in physical coordinates, the same in x1 and x2 (INV_EPS periods across the
membrane's width; the cells are squares of the undeformed body, as the FE² quadrature
points assume), starting at the origin (0, 0), the lower end of the clamped edge. The
DNS mesh is the Cook mesh with INV_EPS × ``--cell-n`` elements per side: elements of
width ε/cell_n and height at most 44/48 of that, so about one element per voxel (the
mesh is not aligned with the cell grid, each element takes the phase of the voxel at its
midpoint). For each ε and load step the summary's ``dns_comparison`` gives the relative
L2 difference ‖u_FE² − u_DNS‖/‖u_DNS‖ (FE² field interpolated onto the DNS mesh) and
the relative difference of the tip deflection u2(48, 60). As ε → 0 they tend to the
macro discretisation error of the FE² run (use a finer ``--macro`` to see them shrink
further). ``--dns-mesh N`` sets the DNS elements per side (default: the largest INV_EPS
× cell-n), the same mesh for every ε, so that only the period changes between them.

The EquiNO matrix's deviatoric stress saturates (|σ12| < c1/√2 ≈ 35.4), so where matrix
meets the loaded edge no continuum solution carries a traction above that: ``--dns`` is
refused for ``--traction`` ≥ 35.4 (the default is 20). Cook's membrane converges slowly
under mesh refinement (corner singularities, locking of bilinear elements in the nearly
incompressible saturated matrix), so at the example's sizes the differences are
dominated by discretisation of both meshes (40–60 % at macro 4–8); the ε-convergence of
the mechanical FE² to the DNS is shown on a square in tests/test_fe2.py.
"""

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI

import neuroscale_coupling.dolfinx_env  # noqa: F401

# isort: split
import ufl
from dolfinx import fem, mesh
from run_options import add_closure_arguments, closure_settings, make_closure, solve_and_compare

from neuroscale_coupling.cell.materials import equino_material
from neuroscale_coupling.cell.microstructure import centre_and_corner_fibres
from neuroscale_coupling.closure.enrichment import EnrichmentOptions
from neuroscale_coupling.closure.fallback import FallbackPolicy
from neuroscale_coupling.closure.run_record import format_summary
from neuroscale_coupling.fine import make_solver
from neuroscale_coupling.hosts.dolfinx.dns import MechanicalDNS
from neuroscale_coupling.hosts.dolfinx.driver import TwoScaleDriver
from neuroscale_coupling.hosts.dolfinx.problems import MacroQuadrature, MechanicalFE2Problem
from neuroscale_coupling.io import write_json_atomic
from neuroscale_coupling.surrogate.model_file import Surrogate

MATERIAL = equino_material()
#: Full vertical traction on the right edge (load factor 1).
TRACTION = 20.0
#: Width of the membrane; the DNS period is WIDTH / INV_EPS.
WIDTH = 48.0
#: Fibre volume fraction of the cell.
FIBRE_FRACTION = 0.45


def cook_membrane(comm: MPI.Comm, n: int) -> Any:
    """Quadrilateral mesh of Cook's membrane: the unit square mapped bilinearly."""
    msh = mesh.create_unit_square(comm, n, n, mesh.CellType.quadrilateral)
    xi, eta = msh.geometry.x[:, 0].copy(), msh.geometry.x[:, 1].copy()
    bottom, top = 44.0 * xi, 44.0 + 16.0 * xi
    msh.geometry.x[:, 0] = 48.0 * xi
    msh.geometry.x[:, 1] = bottom + eta * (top - bottom)
    return msh


def clamp(msh: Any) -> Callable[[Any], list[Any]]:
    """V -> Dirichlet conditions: u = 0 on the left edge x1 = 0."""

    def bcs(V: Any) -> list[Any]:
        facets = mesh.locate_entities_boundary(msh, 1, lambda x: np.isclose(x[0], 0.0))
        dofs = fem.locate_dofs_topological(V, 1, facets)
        return [fem.dirichletbc(np.zeros(2), dofs, V)]

    return bcs


def right_edge_traction(msh: Any, magnitude: float = TRACTION) -> Callable[[Any, Any], Any]:
    """(v, load) -> external work of the vertical traction load × magnitude on x1 = 48."""
    right = mesh.locate_entities_boundary(msh, 1, lambda x: np.isclose(x[0], WIDTH))
    tags = mesh.meshtags(msh, 1, right, np.full(right.size, 1, dtype=np.int32))
    ds = ufl.Measure("ds", domain=msh, subdomain_data=tags)

    def traction(v: Any, load: Any) -> Any:
        return load * magnitude * v[1] * ds(1)

    return traction


def build(
    comm: MPI.Comm,
    *,
    macro: int,
    cell_n: int,
    solver: str,
    traction: float = TRACTION,
    surrogate: Surrogate | None = None,
    policy: FallbackPolicy | None = None,
    enrichment: EnrichmentOptions | None = None,
) -> MechanicalFE2Problem:
    """The FE² membrane; the exact-micro closure, or the surrogate closure when
    ``surrogate`` is given."""
    msh = cook_membrane(comm, macro)
    quad = MacroQuadrature(msh, 2)
    cells = np.broadcast_to(
        centre_and_corner_fibres(cell_n, FIBRE_FRACTION), (quad.n_local, cell_n, cell_n)
    )
    fine = make_solver(solver, MATERIAL)
    closure = make_closure(
        MATERIAL, fine, cells, comm=comm, surrogate=surrogate, policy=policy,
        enrichment=enrichment,
    )  # fmt: skip
    return MechanicalFE2Problem(
        quad, closure, bcs=clamp(msh), traction=right_edge_traction(msh, traction)
    )


def run(
    problem: MechanicalFE2Problem,
    loads: np.ndarray,
    output: str | None,
    progress: bool,
    meta: dict[str, Any],
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Drive the load steps; returns the summary and u after every step."""
    history: list[np.ndarray] = []

    def after_step(k: int, load: float) -> dict[str, float]:
        history.append(problem.u.x.array.copy())
        return {"corner_deflection": corner_deflection(problem)}

    driver = TwoScaleDriver(
        problem,
        output_dir=output,
        after_step=after_step,
        progress=progress,
        metadata={"example": "fe2_mechanical", **meta},
    )
    return driver.run(loads), history


def matrix_shear_capacity() -> float:
    """Largest shear stress |σ12| any phase with a saturating law (G = 0) can carry:
    c1/√2 (|σ12| = c1 |e12| / (c2 + ‖e‖) and ‖e‖ >= √2 |e12|); inf if none."""
    caps = [p.c1 / np.sqrt(2.0) for p in MATERIAL.phases if p.G == 0]
    return min(caps, default=float("inf"))


def tip_deflection(u: Any) -> float:
    """Vertical displacement of a P1 vector Function at the corner (48, 60) (collective)."""
    V = u.function_space
    x = V.tabulate_dof_coordinates()
    n_own = V.dofmap.index_map.size_local
    hit = np.flatnonzero(np.linalg.norm(x[:n_own, :2] - [WIDTH, 60.0], axis=1) < 1e-8)
    local = u.x.array.reshape(-1, 2)[hit[0], 1] if hit.size else 0.0
    return float(V.mesh.comm.allreduce(local))


def corner_deflection(problem: MechanicalFE2Problem) -> float:
    """Vertical displacement at the top-right corner (48, 60) (collective)."""
    return tip_deflection(problem.u)


def compare_with_dns(
    comm: MPI.Comm,
    history: list[np.ndarray],
    V: Any,
    loads: np.ndarray,
    inv_eps: int,
    cell_n: int,
    *,
    dns_mesh: int,
    traction: float = TRACTION,
) -> dict[str, Any]:
    """Run the DNS with period WIDTH/inv_eps through the same load steps (collective).

    history: the FE² displacement dof arrays (one per step) on V; dns_mesh: elements per
    side of the DNS Cook mesh. Returns the relative L2 difference of u and of the tip
    deflection at every step, and both tip deflections.
    """
    msh = cook_membrane(comm, dns_mesh)
    cell = centre_and_corner_fibres(cell_n, FIBRE_FRACTION)
    dns = MechanicalDNS(
        msh,
        MATERIAL,
        cell,
        WIDTH / inv_eps,
        bcs=clamp(msh),
        traction=right_edge_traction(msh, traction),
    )
    cells = np.arange(msh.topology.index_map(2).size_local, dtype=np.int32)
    data = fem.create_interpolation_data(dns.V, V, cells)
    macro, on_dns = fem.Function(V), fem.Function(dns.V)
    dx = ufl.Measure("dx", domain=msh, metadata={"quadrature_degree": 2})
    diff = fem.form(ufl.inner(dns.u - on_dns, dns.u - on_dns) * dx)
    norm = fem.form(ufl.inner(dns.u, dns.u) * dx)
    errors, tips_dns, tips_fe2, tip_errors, iterations = [], [], [], [], []
    for values, load in zip(history, loads, strict=True):
        iterations.append(dns.solve_step(float(load)))
        macro.x.array[:] = values
        on_dns.interpolate_nonmatching(macro, cells, data)
        num = comm.allreduce(fem.assemble_scalar(diff))
        den = comm.allreduce(fem.assemble_scalar(norm))
        errors.append(float(np.sqrt(num / den)))
        tip_dns, tip_fe2 = tip_deflection(dns.u), tip_deflection(macro)
        tips_dns.append(tip_dns)
        tips_fe2.append(tip_fe2)
        tip_errors.append(abs(tip_fe2 - tip_dns) / abs(tip_dns))
    return {
        "inv_epsilon": inv_eps,
        "epsilon": WIDTH / inv_eps,
        "dns_mesh": dns_mesh,
        "dns_cells": comm.allreduce(cells.size),
        "relative_l2": errors,
        "tip_deflection_dns": tips_dns,
        "tip_deflection_fe2": tips_fe2,
        "tip_relative_difference": tip_errors,
        "dns_newton_iterations": iterations,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--macro", type=int, default=6, help="elements per side")
    parser.add_argument(
        "--cell-n", type=int, default=None,
        help="voxels per cell side (default: the model's image size; 16 with --closure exact)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=3, help="load steps up to the full traction")
    parser.add_argument(
        "--solver",
        choices=("fem", "spectral"),
        default="fem",
        help="fine solver (fem: fastest on CPU)",
    )
    parser.add_argument("--large", action="store_true", help="macro 16, 6 steps")
    parser.add_argument("--output", default="results/fe2_mechanical")
    parser.add_argument(
        "--dns", type=int, nargs="*", default=[], metavar="INV_EPS",
        help="also run the DNS with periods ε = 48/INV_EPS and report the difference",
    )  # fmt: skip
    parser.add_argument(
        "--dns-mesh", type=int, default=None, metavar="N",
        help="elements per side of the DNS mesh (default: largest INV_EPS × cell-n)",
    )  # fmt: skip
    parser.add_argument(
        "--traction", type=float, default=TRACTION,
        help=f"full vertical traction on the right edge (default {TRACTION:g})",
    )  # fmt: skip
    add_closure_arguments(parser, physics="mechanical", closure="exact", reference=False)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.large:
        args.macro, args.steps = 16, 6
    comm = MPI.COMM_WORLD
    sur, policy, enrichment = closure_settings(args, "mechanical", MATERIAL)
    if args.cell_n is None:
        args.cell_n = sur.image_size if sur is not None else 16
    if any(k < 1 for k in args.dns):
        parser.error(f"--dns {args.dns}: give positive integers INV_EPS (period 48/INV_EPS)")
    if args.dns and args.dns_mesh is None:
        args.dns_mesh = max(args.dns) * args.cell_n
    if args.dns and abs(args.traction) >= matrix_shear_capacity():
        parser.error(
            f"--traction {args.traction:g} with --dns: the matrix cannot carry a boundary "
            f"shear traction of {matrix_shear_capacity():.4g} or more (its deviatoric "
            "stress saturates), so the DNS has no solution where matrix meets the loaded "
            "edge; pass e.g. --traction 20"
        )
    options = {
        "macro": args.macro, "cell_n": args.cell_n, "solver": args.solver,
        "traction": args.traction,
    }  # fmt: skip
    loads = np.linspace(1.0 / args.steps, 1.0, args.steps)
    problem, summary, history, ref_summary = solve_and_compare(
        comm, build, run, loads, args, options, surrogate=sur, policy=policy,
        enrichment=enrichment,
    )  # fmt: skip
    if ref_summary is not None:
        summary["reference"]["corner_deflection"] = [
            s["corner_deflection"] for s in ref_summary["steps"]
        ]
    if args.dns:
        summary["dns_comparison"] = [
            compare_with_dns(
                comm,
                history,
                problem.V,
                loads,
                inv_eps,
                args.cell_n,
                dns_mesh=args.dns_mesh,
                traction=args.traction,
            )
            for inv_eps in args.dns
        ]
    if comm.rank == 0:
        write_json_atomic(Path(args.output) / "summary.json", summary)
        if not args.quiet:
            print(format_summary(summary, "FE² Cook's membrane"))
            tips = ", ".join(f"{s['corner_deflection']:.4g}" for s in summary["steps"])
            print(f"  tip deflection per load step: {tips}")
            print(f"fields, maps and summary.json in {args.output}/")
    return summary


if __name__ == "__main__":
    main()
