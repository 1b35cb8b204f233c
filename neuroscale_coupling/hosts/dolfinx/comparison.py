"""Relative differences between two FE² runs of one problem (collective).

Used to measure a surrogate-closure run against the exact-micro reference: the macro
field (relative L2 over the domain) and the homogenized response at the quadrature points
(relative Euclidean norm over all points and components).
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from mpi4py import MPI

import neuroscale_coupling.dolfinx_env  # noqa: F401  (import order of the DOLFINx wheel)

# isort: split
import ufl
from dolfinx import fem

__all__ = ["compare_runs", "field_difference", "response_difference"]


def field_difference(u: Any, reference: Any) -> float:
    """‖u − reference‖_L2 / ‖reference‖_L2 for two Functions on one mesh (collective)."""
    comm = reference.function_space.mesh.comm
    diff = fem.form(ufl.inner(u - reference, u - reference) * ufl.dx)
    norm = fem.form(ufl.inner(reference, reference) * ufl.dx)
    num = comm.allreduce(fem.assemble_scalar(diff), op=MPI.SUM)
    den = comm.allreduce(fem.assemble_scalar(norm), op=MPI.SUM)
    return math.sqrt(num / den) if den > 0 else math.inf


def response_difference(comm: MPI.Comm, response: np.ndarray, reference: np.ndarray) -> float:
    """‖response − reference‖ / ‖reference‖ over all ranks' points, arrays (n_local, r)."""
    num = comm.allreduce(float(np.sum((response - reference) ** 2)), op=MPI.SUM)
    den = comm.allreduce(float(np.sum(reference**2)), op=MPI.SUM)
    return math.sqrt(num / den) if den > 0 else math.inf


def compare_runs(
    problem: Any, history: Sequence[np.ndarray], reference: Any, ref_history: Sequence[np.ndarray]
) -> dict[str, Any]:
    """Differences of an FE² run to a reference run of the same problem (collective).

    problem, reference: FE² problems (``V``, ``comm``, ``last_result``) after their runs;
    history, ref_history: the local dof arrays of the macro field after every step.
    Returns ``field_relative_l2`` (per step) and ``response_relative_l2`` (last step).
    """
    u, v = fem.Function(problem.V), fem.Function(problem.V)
    fields = []
    for a, b in zip(history, ref_history, strict=True):
        u.x.array[:], v.x.array[:] = a, b
        fields.append(field_difference(u, v))
    response = response_difference(
        problem.comm, problem.last_result.response, reference.last_result.response
    )
    return {"field_relative_l2": fields, "response_relative_l2": response}
