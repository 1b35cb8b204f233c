"""Relative differences between two FE² runs of one problem (collective).

Used to measure a surrogate-closure run against the exact-micro reference: the macro
field (relative L2 over the domain) and the homogenized response at the quadrature points
(relative Euclidean norm over all points and components).
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from mpi4py import MPI

import neuroscale_coupling.dolfinx_env  # noqa: F401  (import order of the DOLFINx wheel)

# isort: split
import ufl
from dolfinx import fem

__all__ = ["compare_runs", "field_difference", "format_summary", "response_difference"]


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


def format_summary(summary: Mapping[str, Any], title: str) -> str:
    """A few terminal lines from a :class:`TwoScaleDriver` summary (with an optional
    ``reference`` entry from :func:`compare_runs` and the reference's time)."""
    other = summary["seconds_total"] - summary["seconds_closure"] - summary["seconds_host"]
    lines = [
        f"{title}: {summary['points']} quadrature points on {summary['ranks']} rank(s), "
        f"closure {summary.get('closure', '?')}",
        f"  steps {len(summary['steps'])}, Newton iterations {summary['newton_iterations']}, "
        f"closure calls {summary['closure_calls']}, step revisions {summary['revisions']}",
        f"  fallback fraction {summary['fallback_fraction']:.4f} {summary['fallbacks']}, "
        f"max predicted std {summary['max_std']:.3g}",
        f"  time {summary['seconds_total']:.2f} s = closure {summary['seconds_closure']:.2f} s "
        f"(surrogate {summary['seconds_surrogate']:.2f} s, fine solves "
        f"{summary['seconds_fine']:.2f} s) + host {summary['seconds_host']:.2f} s + other "
        f"(fields, summaries) {other:.2f} s; set-up {summary.get('seconds_setup', 0.0):.2f} s",
    ]
    ref = summary.get("reference")
    if ref:
        fields = ", ".join(f"{e:.2e}" for e in ref["field_relative_l2"])
        lines += [
            f"  exact-micro reference: {ref['seconds_total']:.2f} s (set-up "
            f"{ref.get('seconds_setup', 0.0):.2f} s), speed-up {ref['speedup']:.1f}x "
            "(set-up + run time)",
            f"  relative L2 difference of the macro field per step: {fields}",
            "  relative L2 difference of the homogenized response at the last step: "
            f"{ref['response_relative_l2']:.2e}",
        ]
    return "\n".join(lines)
