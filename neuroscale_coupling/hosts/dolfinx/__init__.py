"""hosts/dolfinx."""
