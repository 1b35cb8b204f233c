"""Host adapters: how a macro solver calls the closure.

* :mod:`~neuroscale_coupling.hosts.dolfinx` — DOLFINx: FE² problems whose Newton solve
  calls the closure at the quadrature points, the two-scale driver, dolfinx-external-
  operator interop, the direct numerical simulation and run comparisons.

A new host (a PETSc finite-volume code, the preCICE Micro Manager, …) gets a folder of
its own here; it needs nothing of DOLFINx, only the contract of
:mod:`neuroscale_coupling.closure`.
"""
