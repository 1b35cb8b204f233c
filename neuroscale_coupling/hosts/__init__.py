"""Host adapters: DOLFINx FE² problems and dolfinx-external-operator interop."""
