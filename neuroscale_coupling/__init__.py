"""neuroscale_coupling: closure operators for concurrent two-scale simulation (FE², HMM).

Importing the package is light: torch, DOLFINx and petsc4py are imported only by the
modules that need them (``neuroscale_coupling.fine.spectral`` and
``neuroscale_coupling.fine.fem``).
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
