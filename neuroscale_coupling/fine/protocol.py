"""The fine-solver contract shared by the FE and spectral solvers.

A fine solver solves the periodic cell problem for a batch of (cell, macro state)
pairs and returns the homogenized response with its exact consistent tangent::

    result = solver.solve(cells, states)
    result.response   # (N, r)      Q (thermal, r = 2) or Σ (mechanical, r = 3)
    result.tangent    # (N, r, d)   ∂response/∂state, d = material.state_dim

Solves are deterministic (the same input gives the same bits on every rank) and run on
the calling process only; spreading a batch over MPI ranks is the caller's choice.
"""

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from neuroscale_coupling.cell.microstructure import from_array

__all__ = ["FineSolveError", "FineSolver", "Homogenized", "broadcast_cells"]


class FineSolveError(RuntimeError):
    """A cell problem did not converge; names the point and its macro state."""

    def __init__(self, index: int, state: np.ndarray, reason: str) -> None:
        self.index = int(index)
        self.state = np.asarray(state, dtype=float).copy()
        self.reason = reason
        super().__init__(
            f"fine-scale cell solve failed at point {self.index} with macro state "
            f"{self.state.tolist()}: {reason}"
        )


@dataclass(frozen=True)
class Homogenized:
    """Homogenized responses of a batch of N points.

    response: (N, r) float64. tangent: (N, r, d) float64, ∂response_i/∂state_j.
    newton_iterations: (N,) int, Newton iterations each cell solve took.
    """

    response: np.ndarray
    tangent: np.ndarray
    newton_iterations: np.ndarray

    def __len__(self) -> int:
        return int(self.response.shape[0])


@runtime_checkable
class FineSolver(Protocol):
    """Anything that solves batches of periodic cell problems for ``material``."""

    material: Any

    def solve(self, cells: Any, states: Any) -> Homogenized:
        """Solve the cell problems of N points (not collective).

        cells: int array (N, n, n), or one image (n, n) shared by all points.
        states: float array (N, d) (or (d,) for one point), d = material.state_dim.
        Raises FineSolveError naming the first point that did not converge.
        """
        ...


def broadcast_cells(cells: Any, n_points: int, n_phases: int) -> np.ndarray:
    """Validate images and return them as int64 (N, n, n), repeating a single image."""
    c = np.asarray(cells)
    if c.ndim == 2:
        c = np.broadcast_to(from_array(c, n_phases=n_phases), (n_points, *c.shape))
        return c
    if c.ndim != 3 or c.shape[0] != n_points:
        raise ValueError(
            f"cells must be one image (n, n) or a stack (N, n, n) with N = {n_points} "
            f"(the number of states); got shape {c.shape}"
        )
    return np.stack([from_array(im, n_phases=n_phases) for im in c])
