"""A test-only stand-in for pyprecice (preCICE's Python bindings), as the Micro Manager's
own unit tests use one (their tests/unit/precice.py, found first on sys.path): enough of
``precice.Participant`` for ``micro_manager.MicroManagerCoupling`` to initialize and run
its coupling loop without preCICE.

The test sets ``Participant.scenario`` (a :class:`Scenario`) before building the Micro
Manager: the macro mesh (vertex ids and coordinates), the data the macro "writes" per time
window and implicit iteration, and the coupling (time windows, iterations per window). The
participant records every write (``Scenario.written``).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__version__ = "0.0.0+stand-in"


@dataclass
class Scenario:
    """coords (V, 2): the macro vertices; macro(name, ids (n,), window, iteration) ->
    (n,) or (n, dim): the read data; windows, iterations: time windows and implicit
    iterations per window; dt: time window size; dims: data name -> dimension."""

    coords: np.ndarray
    macro: Callable[[str, np.ndarray, int, int], np.ndarray]
    windows: int = 2
    iterations: int = 2
    dt: float = 0.1
    dims: dict[str, int] = field(default_factory=dict)
    written: list[dict[str, Any]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)


class Participant:
    scenario: Scenario | None = None

    def __init__(self, solver_name, config_file_name, solver_process_index, solver_process_size):
        if Participant.scenario is None:
            raise RuntimeError("set precice.Participant.scenario before building the Micro Manager")
        self.s = Participant.scenario
        self.rank, self.size = solver_process_index, solver_process_size
        self.window = 0
        self.iteration = 0
        self.complete = False
        self.bounds = None
        self.s.calls.append("construct")

    # coupling
    def initialize(self):
        self.s.calls.append("initialize")

    def finalize(self):
        self.s.calls.append("finalize")

    def is_coupling_ongoing(self):
        return self.window < self.s.windows

    def is_time_window_complete(self):
        return self.complete

    def get_max_time_step_size(self):
        return self.s.dt

    def requires_initial_data(self):
        return True

    def requires_writing_checkpoint(self):
        return self.iteration == 0

    def requires_reading_checkpoint(self):
        return not self.complete

    def advance(self, dt):
        self.iteration += 1
        self.complete = self.iteration >= self.s.iterations
        if self.complete:
            self.window += 1
            self.iteration = 0

    # mesh
    def get_mesh_dimensions(self, mesh_name):
        return self.s.coords.shape[1]

    def get_data_dimensions(self, mesh_name, data_name):
        return self.s.dims.get(data_name, 1)

    def set_mesh_access_region(self, mesh_name, bounds):
        self.bounds = np.asarray(bounds, dtype=float)

    def get_mesh_vertex_ids_and_coordinates(self, mesh_name):
        c = self.s.coords
        inside = np.ones(c.shape[0], dtype=bool)
        if self.bounds is not None:
            for d in range(c.shape[1]):
                inside &= (c[:, d] >= self.bounds[2 * d]) & (c[:, d] <= self.bounds[2 * d + 1])
        ids = np.flatnonzero(inside)
        return ids, c[ids]

    # data
    def read_data(self, mesh_name, data_name, vertex_ids, relative_read_time):
        ids = np.asarray(vertex_ids, dtype=np.int64)
        return np.asarray(self.s.macro(data_name, ids, self.window, self.iteration))

    def write_data(self, mesh_name, data_name, vertex_ids, data):
        self.s.written.append(
            {
                "window": self.window,
                "iteration": self.iteration,
                "rank": self.rank,
                "name": data_name,
                "ids": np.asarray(vertex_ids, dtype=np.int64).copy(),
                "data": np.asarray(data, dtype=float).copy(),
            }
        )

    # profiling
    def start_profiling_section(self, name):
        pass

    def stop_last_profiling_section(self):
        pass
