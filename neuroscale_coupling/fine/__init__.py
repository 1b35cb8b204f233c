"""Fine-scale periodic cell solvers: the truth behind every surrogate answer.

``protocol`` holds the shared result type and error; ``fem`` (DOLFINx) and ``spectral``
(FFT-accelerated, torch) are imported on demand because they pull heavy dependencies.
"""

from neuroscale_coupling.fine.protocol import FineSolveError, FineSolver, Homogenized

__all__ = ["SOLVERS", "FineSolveError", "FineSolver", "Homogenized", "make_solver"]

#: The names of the fine solvers :func:`make_solver` builds.
SOLVERS = ("fem", "spectral")


def make_solver(name: str, material: object, **options: object) -> FineSolver:
    """Build the fine solver ``name`` ("fem" or "spectral") for ``material``."""
    if name == "fem":
        from neuroscale_coupling.fine.fem import FESolver

        return FESolver(material, **options)  # type: ignore[arg-type]
    if name == "spectral":
        from neuroscale_coupling.fine.spectral import SpectralSolver

        return SpectralSolver(material, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown fine solver {name!r}: choose one of {', '.join(SOLVERS)}")
