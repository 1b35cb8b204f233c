"""The exact-micro closure: every point answered by a fine-scale cell solve (the reference
FE²), the work block-balanced over the ranks and the results returned to their owners.
"""

from collections.abc import Callable

import numpy as np
from mpi4py import MPI

from neuroscale_coupling.cell.materials import Material
from neuroscale_coupling.closure.contract import (
    HISTORY_WINDOW,
    Closure,
    ClosureResult,
    cell_stack,
    cells_of_points,
)
from neuroscale_coupling.fine.protocol import FineSolver, broadcast_cells
from neuroscale_coupling.parallel import BlockPlan, collective_call, scatter

__all__ = ["ExactClosure"]


class ExactClosure(Closure):
    """Every point answered by a fine-scale solve (the reference FE²).

    cells: (n_local, n, n) phase images of this rank's points, fixed for the run. The
    work is block-balanced over the ranks once, at construction (collective).
    """

    def __init__(
        self,
        material: Material,
        solver: FineSolver,
        cells: np.ndarray,
        *,
        comm: MPI.Comm,
        history_window: int = HISTORY_WINDOW,
    ) -> None:
        cells = cell_stack(comm, cells)
        super().__init__(material, cells.shape[0], comm=comm, history_window=history_window)
        sizes = comm.allgather(cells.shape[1:] if cells.shape[0] else None)
        if len({s for s in sizes if s is not None}) > 1:
            raise ValueError(f"all cells must have one resolution; ranks hold {sizes}")
        self.solver = solver
        self.plan = BlockPlan.balanced(comm, self.n_local)
        local = collective_call(
            comm,
            lambda: (
                broadcast_cells(cells, self.n_local, material.n_phases) if self.n_local else cells
            ),
            "closure cells",
        )
        self._work_cells = scatter(comm, self.plan, np.ascontiguousarray(local, dtype=np.int64))

    @classmethod
    def from_coordinates(
        cls,
        material: Material,
        solver: FineSolver,
        coordinates: np.ndarray,
        cell_of: Callable[[np.ndarray], np.ndarray],
        *,
        comm: MPI.Comm,
    ) -> "ExactClosure":
        """Closure whose cells come from ``cell_of(coordinates (n_local, 2)) -> (n_local, n, n)``
        (graded materials: the cell varies with the point's position)."""
        return cls(material, solver, cells_of_points(comm, cell_of, coordinates), comm=comm)

    def _evaluate(self, states: np.ndarray) -> ClosureResult:
        response, tangent = self._balanced_solve(
            self.solver, self.plan, self._work_cells, states, "ranks' local points in rank order"
        )
        return ClosureResult(
            response=response,
            tangent=tangent,
            std=np.zeros_like(response),
            exact=np.ones(self.n_local, dtype=bool),
        )
