"""neuroscale_coupling: closure operators for concurrent two-scale simulation (FE², HMM).

The folders follow the pipeline: ``cell`` (phase laws, materials, microstructures),
``fine`` (exact cell solvers), ``data`` (datasets of fine solves), ``surrogate`` (the SANO
model and its file), ``training`` (offline: train, evaluate), ``closure`` (online: what a
host calls at its quadrature points) and ``hosts`` (host adapters: DOLFINx). The README
and docs/design.md describe them.

Importing the package is light: torch, DOLFINx, petsc4py and MPI are imported only by the
modules that need them.
"""

from neuroscale_coupling.cell.laws import EQUINO_FIBRE, EQUINO_MATRIX, MechanicalPhase, ThermalPhase
from neuroscale_coupling.cell.materials import MechanicalMaterial, ThermalMaterial
from neuroscale_coupling.fine.protocol import FineSolveError, FineSolver, Homogenized

__version__ = "0.1.0"

__all__ = [
    "EQUINO_FIBRE",
    "EQUINO_MATRIX",
    "FineSolveError",
    "FineSolver",
    "Homogenized",
    "MechanicalMaterial",
    "MechanicalPhase",
    "ThermalMaterial",
    "ThermalPhase",
    "__version__",
]
