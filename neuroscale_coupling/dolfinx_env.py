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
    from petsc4py import PETSc  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "DOLFINx is not installed: install the FE extra, "
        "`pip install 'neuroscale-coupling[fem]'`, or DOLFINx 0.11 from conda-forge "
        f"({exc})"
    ) from exc
