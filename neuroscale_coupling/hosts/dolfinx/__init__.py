"""The DOLFINx host: :mod:`~neuroscale_coupling.hosts.dolfinx.problems` (quadrature-point
layout, thermal and mechanical FE² problems), :mod:`~neuroscale_coupling.hosts.dolfinx.
driver` (the step loop, fields, summary), :mod:`~neuroscale_coupling.hosts.dolfinx.
external_operator` (dolfinx-external-operator interop), :mod:`~neuroscale_coupling.hosts.
dolfinx.dns` (every cell resolved: the reference for FE²) and
:mod:`~neuroscale_coupling.hosts.dolfinx.comparison` (differences between two runs).
Importing any of them imports DOLFINx.
"""
