"""What a phase law is: the local constitutive law of one phase, written once.

A law class holds, side by side, the two forms every solver needs:

* ``torch_form``: the pointwise law and its exact tangent, batched over any number of
  points (the spectral solver, the exact laminate solutions and the tests evaluate it);
* ``ufl_form``: the same formula in UFL (the FE cell solver and the DOLFINx DNS assemble
  it; they differentiate it symbolically);

and what they share: the parameter record of one phase (a frozen dataclass, ``phase``),
the parameter that sets a phase's stiffness scale (``stiffness``: the model's image input
maps each phase to its log), and ``check``, the per-point reasons why a cell problem with
these phases is ill-posed at a macro state. A new law is one module defining a phase
dataclass and a subclass of :class:`ThermalLaw` or :class:`MechanicalLaw`; a material
names its law (:class:`~neuroscale_coupling.cell.materials.Material`). Material records
in datasets and model files name the physics, not the law: one law per physics is
recorded today.

torch and UFL are imported inside the forms, so that the laws load without either.
"""

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, ClassVar

import numpy as np

from neuroscale_coupling.cell.state_layout import MECHANICAL, THERMAL, StateLayout

__all__ = ["MechanicalLaw", "PhaseLaw", "ThermalLaw", "check_parameter"]


def check_parameter(name: str, value: float, *, allow_zero: bool = False) -> None:
    """ValueError unless the phase parameter ``value`` is finite and > 0 (>= 0 with
    ``allow_zero``)."""
    ok = value >= 0 if allow_zero else value > 0
    if not (np.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"phase parameter {name}={value!r} is invalid: it must be finite and {bound}"
        )


class PhaseLaw:
    """Base of the phase laws (see the module docstring).

    ``fields`` arguments map the ``parameter_names`` to per-point values (torch tensors
    or numpy arrays broadcastable with the points); ``params`` map them to UFL operands
    (DG0 Functions, Constants or floats).
    """

    layout: ClassVar[StateLayout]
    phase: ClassVar[type]
    stiffness: ClassVar[str]

    @property
    def physics(self) -> str:
        return self.layout.physics

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """Names of the phase parameters, in the order of the phase dataclass."""
        return tuple(f.name for f in fields(self.phase))

    def check(self, fields: Mapping[str, np.ndarray], states: np.ndarray) -> list[str | None]:
        """Per state, why the cell problem is ill-posed there, or None.

        fields: parameter name → (N, K) values at K points (voxels or phases) of the cell
        of state i; states: (N, d). Default: never ill-posed.
        """
        return [None] * np.asarray(states).shape[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


class ThermalLaw(PhaseLaw):
    """A thermal-type law q(θ, g): flux q (2,) of the local gradient g (2,) at the macro
    temperature θ."""

    layout = THERMAL

    def torch_form(self, fields: Mapping[str, Any], theta: Any, g: Any) -> tuple[Any, Any, Any]:
        """fields: tensors of shape S; theta: broadcastable to S; g: (*S, 2). Returns
        q (*S, 2), dq/dg (*S, 2, 2) and dq/dθ (*S, 2)."""
        raise NotImplementedError

    def ufl_form(self, params: Mapping[str, Any], theta: Any, g: Any) -> Any:
        """The flux q (UFL vector (2,)) at temperature theta (scalar) and gradient g (UFL
        vector (2,)); wrap θ and g in ``ufl.variable`` to differentiate with ``ufl.diff``."""
        raise NotImplementedError


class MechanicalLaw(PhaseLaw):
    """A small-strain plane-strain law σ(ε), strains and stresses in tensor-shear Voigt
    order (ε11, ε22, ε12) (:mod:`~neuroscale_coupling.cell.state_layout`)."""

    layout = MECHANICAL

    def torch_form(self, fields: Mapping[str, Any], eps: Any) -> tuple[Any, Any]:
        """fields: tensors of shape S; eps: (*S, 3). Returns σ (*S, 3) and dσ/dε (*S, 3, 3),
        the plain Jacobian with ε12 as one variable."""
        raise NotImplementedError

    def ufl_form(self, params: Mapping[str, Any], eps: Any) -> Any:
        """The stress tensor σ (UFL 2×2) at the strain tensor eps (UFL 2×2)."""
        raise NotImplementedError
