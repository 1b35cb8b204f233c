"""NeuroScale surrogate (DESIGN.md §6): datasets from the fine solvers, and later the model.

``neuroscale_coupling.data`` builds training data: macro states sampled over a
declared :class:`~neuroscale_coupling.data.domain.StateDomain`, cells drawn from a
declared :class:`~neuroscale_coupling.cell.family.CellFamily`, solved by a fine solver,
split by microstructure and normalized per wavelet scale. Importing this package is light
(no torch); the submodules import what they need.
"""
