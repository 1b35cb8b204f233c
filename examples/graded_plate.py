"""The main job's material and graded microstructure, shared by its hosts: the DOLFINx
FE² example (``fe2_thermal.py``) and the PETSc finite-volume example (``fv_thermal.py``).

The plate Ω = [0, LENGTH] × [0, 1] holds conducting circular inclusions whose volume
fraction grows from 0.1 at the left edge to 0.5 at the right edge; both phases follow
``k = k0 (1 + α θ)(1 + β |g|²)`` (matrix k0 = 1, α = 0.5, β = 0.2; inclusions k0 = 10,
α = 0.2, β = 0.05). No host is imported here.
"""

from typing import Any

import numpy as np

from neuroscale_coupling.cell.laws import ThermalPhase
from neuroscale_coupling.cell.materials import ThermalMaterial
from neuroscale_coupling.cell.microstructure import circular_inclusion

__all__ = ["LENGTH", "MATERIAL", "graded_cells", "inclusion_fraction"]

MATERIAL = ThermalMaterial(phases=(ThermalPhase(1.0, 0.5, 0.2), ThermalPhase(10.0, 0.2, 0.05)))
LENGTH = 2.0


def inclusion_fraction(x1: np.ndarray) -> np.ndarray:
    """Graded inclusion volume fraction: 0.1 at x1 = 0 to 0.5 at x1 = LENGTH."""
    return 0.1 + 0.4 * np.clip(x1 / LENGTH, 0.0, 1.0)


def graded_cells(n: int) -> Any:
    """cell_of(coordinates (m, 2)) -> images (m, n, n) of the graded plate (each distinct
    fraction drawn once)."""

    def cell_of(coordinates: np.ndarray) -> np.ndarray:
        fractions = inclusion_fraction(coordinates[:, 0])
        unique, inverse = np.unique(np.round(fractions, 6), return_inverse=True)
        if unique.size == 0:
            return np.zeros((0, n, n), dtype=np.int64)
        return np.stack([circular_inclusion(n, f) for f in unique])[inverse]

    return cell_of
