"""Host adapters: how a macro solver calls the closure.

* :mod:`~neuroscale_coupling.hosts.dolfinx` — DOLFINx: FE² problems whose Newton solve
  calls the closure at the quadrature points, the two-scale driver, dolfinx-external-
  operator interop, the direct numerical simulation and run comparisons.
* :mod:`~neuroscale_coupling.hosts.petsc_fv` — PETSc finite volumes (petsc4py only): a
  structured DMDA whose face fluxes come from the closure, SNES Newton with the
  consistent Jacobian, the step loop with VTK output.

A new host (the preCICE Micro Manager, …) gets a folder of
its own here; it needs nothing of DOLFINx, only the contract of
:mod:`neuroscale_coupling.closure`.
"""
