"""The macro state and response of each physics, stated once.

A host, a dataset, a model file and the closure all exchange states as float64 rows
(N, d) and responses as rows (N, r) in these orders; tangents are (N, r, d), the plain
Jacobian ∂response_i/∂state_j. The first ``driving`` state components are the macro
gradient or strain the cell problem is driven by; the rest (the macro temperature θ of the
thermal physics) enter the phase laws as parameters.

* thermal: state (G1, G2, θ) — macro temperature gradient and temperature; response
  Q = ⟨q⟩ (Q1, Q2), the volume average of the flux q = k(θ, g) g. The sign convention is
  that of a conductivity: Q points along G (Fourier's law is then q_heat = −Q for
  G = ∇T), and dQ/dG is symmetric positive definite.
* mechanical: state E = (E11, E22, E12), the macro small strain in tensor-shear Voigt order
  (E12 = ε12, not 2ε12), plane strain; response Σ = ⟨σ⟩ (S11, S22, S12) in the same order.
  A macro weak form counts the shear term twice: σ:ε(v) = σ11ε11 + σ22ε22 + 2σ12ε12.
"""

from dataclasses import dataclass

__all__ = ["LAYOUTS", "MECHANICAL", "PHYSICS", "THERMAL", "StateLayout", "layout_of"]


@dataclass(frozen=True)
class StateLayout:
    """Names and order of the macro state (d,) and response (r,) of one physics."""

    physics: str
    state_names: tuple[str, ...]
    response_names: tuple[str, ...]
    driving: int

    @property
    def state_dim(self) -> int:
        return len(self.state_names)

    @property
    def response_dim(self) -> int:
        return len(self.response_names)

    @property
    def theta_index(self) -> int | None:
        """Column of the macro temperature θ in a state row, None without one."""
        return self.state_names.index("theta") if "theta" in self.state_names else None


THERMAL = StateLayout("thermal", ("G1", "G2", "theta"), ("Q1", "Q2"), driving=2)
MECHANICAL = StateLayout("mechanical", ("E11", "E22", "E12"), ("S11", "S22", "S12"), driving=3)
LAYOUTS = {layout.physics: layout for layout in (THERMAL, MECHANICAL)}
#: The physics the library knows, in a fixed order.
PHYSICS = tuple(LAYOUTS)


def layout_of(physics: str) -> StateLayout:
    """The layout of ``physics`` ("thermal" or "mechanical")."""
    if physics not in LAYOUTS:
        raise ValueError(f"unknown physics {physics!r}: choose one of {', '.join(PHYSICS)}")
    return LAYOUTS[physics]
