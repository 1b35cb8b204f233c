"""What a unit cell is: the periodic unit square Y = [0, 1)² as a phase image, and what
its phases are made of.

* :mod:`~neuroscale_coupling.cell.laws` — phase laws, one module per law (torch and UFL
  forms side by side);
* :mod:`~neuroscale_coupling.cell.materials` — materials: phases of one law, the
  built-in composites;
* :mod:`~neuroscale_coupling.cell.state_layout` — the macro state and response of each
  physics;
* :mod:`~neuroscale_coupling.cell.microstructure` — phase images and their generators
  (a new generator goes into ``GENERATORS``);
* :mod:`~neuroscale_coupling.cell.family` — families of cells drawn from generators;
* :mod:`~neuroscale_coupling.cell.symmetry` — the square's symmetry group acting on cells,
  states and responses; :mod:`~neuroscale_coupling.cell.translation` — the canonical
  translation of periodic cells.
"""
