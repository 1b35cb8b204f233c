"""Host adapters: how a macro solver calls the closure.

* :mod:`~neuroscale_coupling.hosts.dolfinx` — DOLFINx: FE² problems whose Newton solve
  calls the closure at the quadrature points, the two-scale driver, dolfinx-external-
  operator interop, the direct numerical simulation and run comparisons.
* :mod:`~neuroscale_coupling.hosts.petsc_fv` — PETSc finite volumes (petsc4py only): a
  structured DMDA whose face fluxes come from the closure, SNES Newton with the
  consistent Jacobian, the step loop with VTK output.
* :mod:`~neuroscale_coupling.hosts.micro_manager` — micro models for the preCICE Micro
  Manager (micro-manager-precice 0.12): the surrogate (stateless, per-point numpy
  decoder), the fine FE model and the switching function of its model switching.

A new host gets a folder of its own here; it needs nothing of DOLFINx, only the contract
of :mod:`neuroscale_coupling.closure`.
"""
