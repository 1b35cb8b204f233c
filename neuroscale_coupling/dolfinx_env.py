"""Import point for DOLFINx and petsc4py: the one place that orders those imports.

The ``dolfinx-solver-real`` wheel must be imported before ``dolfinx`` and ``petsc4py``
(it loads its MPI first). Conda-forge DOLFINx has no such module and needs nothing.
Modules of this package that use DOLFINx import this module first.
"""

try:
    import dolfinx_solver  # noqa: F401
except ImportError:
    pass

try:
    import dolfinx  # noqa: F401
    from petsc4py import PETSc
except ImportError as exc:
    raise ImportError(
        "DOLFINx is not installed: install the FE extra, "
        "`pip install 'neuroscale-coupling[fem]'`, or DOLFINx 0.11 from conda-forge "
        f"({exc})"
    ) from exc


def direct_solver_type() -> str:
    """The sparse LU package to use: MUMPS when the PETSc build has it, else
    SuperLU_DIST, else PETSc's own (serial) LU."""
    for package in ("mumps", "superlu_dist"):
        if PETSc.Sys.hasExternalPackage(package):
            return package
    return "petsc"
