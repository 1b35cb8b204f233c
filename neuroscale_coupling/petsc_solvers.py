"""The PETSc solver choices every host and the FE cell solver share: which sparse LU
package this PETSc build has, and Newton with full steps on a direct LU (the consistent
tangent then gives quadratic convergence). Imports petsc4py (after mpi4py.MPI, which the
DOLFINx wheel's petsc4py needs loaded first) but not DOLFINx."""

from typing import Any

from mpi4py import MPI

# isort: split
from petsc4py import PETSc

__all__ = ["direct_solver_type", "newton_lu_options"]


def direct_solver_type() -> str:
    """The sparse LU package to use: MUMPS when the PETSc build has it, else
    SuperLU_DIST, else PETSc's own (serial) LU."""
    for package in ("mumps", "superlu_dist"):
        if PETSc.Sys.hasExternalPackage(package):
            return package
    return "petsc"


def newton_lu_options(comm: MPI.Comm | None = None) -> dict[str, Any]:
    """SNES options: Newton with full steps, ‖F‖ to 1e-10 relative / 1e-12 absolute, at
    most 25 iterations, each a direct LU solve (:func:`direct_solver_type`). On several
    ranks of ``comm`` without a parallel LU package: GMRES with block Jacobi to 1e-12.
    Passed to PETSc unchanged; a host's user options update them."""
    options: dict[str, Any] = {
        "snes_type": "newtonls",
        "snes_linesearch_type": "basic",
        "snes_rtol": 1e-10,
        "snes_atol": 1e-12,
        "snes_stol": 0.0,
        "snes_max_it": 25,
        "ksp_type": "preonly",
        "pc_type": "lu",
    }
    lu = direct_solver_type()
    if lu == "petsc" and comm is not None and comm.size > 1:
        return {**options, "ksp_type": "gmres", "pc_type": "bjacobi", "ksp_rtol": 1e-12}
    return {**options, "pc_factor_mat_solver_type": lu}
