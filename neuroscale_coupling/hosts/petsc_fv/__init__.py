"""The PETSc finite-volume host: cell-centred finite volumes on a structured DMDA whose
face fluxes come from a closure (petsc4py only; nothing here imports DOLFINx).

* :mod:`~neuroscale_coupling.hosts.petsc_fv.grid` — :class:`FVGrid`: the DMDA of cells on
  a rectangle, its faces (the closure's points, each owned by one rank), the face
  reconstruction of the macro state and the boundary ghost cells;
* :mod:`~neuroscale_coupling.hosts.petsc_fv.problem` — :class:`ThermalFVProblem`:
  nonlinear transient heat conduction, backward Euler, SNES Newton with the consistent
  Jacobian from the closure tangent;
* :mod:`~neuroscale_coupling.hosts.petsc_fv.driver` — :class:`FVDriver`: the step loop,
  VTK fields for ParaView, the JSON summary, run comparisons.

Typical use (all collective)::

    grid = FVGrid(comm, 12, 6, upper=(2.0, 1.0), dirichlet_sides=("left", "right"))
    closure = ExactClosure(material, solver, grid.cells_at_faces(cell_of), comm=comm)
    problem = ThermalFVProblem(grid, closure, dirichlet={"left": 1.0, "right": 0.0},
                               capacity=1.0)
    summary = FVDriver(problem, output_dir="out").run([0.05, 0.1])
"""

from mpi4py import MPI  # noqa: F401  (before petsc4py: the DOLFINx wheel's petsc4py needs it)

# isort: split
from neuroscale_coupling.hosts.petsc_fv.driver import (
    FVDriver,
    compare_runs,
    field_difference,
    format_summary,
)
from neuroscale_coupling.hosts.petsc_fv.grid import SIDES, FVGrid
from neuroscale_coupling.hosts.petsc_fv.problem import ThermalFVProblem

__all__ = [
    "SIDES",
    "FVDriver",
    "FVGrid",
    "ThermalFVProblem",
    "compare_runs",
    "field_difference",
    "format_summary",
]
