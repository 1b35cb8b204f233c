"""The phase laws of :mod:`neuroscale_coupling.cell.materials` stated in UFL.

Shared by the FE cell solver (:mod:`neuroscale_coupling.fine.fem`) and the single-scale
reference (:mod:`neuroscale_coupling.hosts.dolfinx.dns`), so that the formulas exist once in
UFL (the torch versions are ``ThermalMaterial.local`` and ``MechanicalMaterial.local``).

``params`` maps the material's ``parameter_names`` to UFL operands: typically DG0
Functions holding the phase value of every cell, or plain floats / Constants.
Only :mod:`ufl` is imported (no DOLFINx), so the module stays light.
"""

from collections.abc import Mapping
from typing import Any

import ufl

__all__ = ["NORM_REG2", "mechanical_stress", "thermal_flux"]

#: δ² added under the square root of ‖e‖ (EquiNO law): keeps the derivative of the norm
#: finite at e = 0 (there e/‖e‖ → e/δ = 0) and changes ‖e‖ by δ²/(2‖e‖), i.e. nothing at
#: double precision for any strain above 1e-20.
NORM_REG2 = 1e-60


def thermal_flux(params: Mapping[str, Any], theta: Any, g: Any) -> Any:
    """Thermal flux ``q = k0 (1 + α θ)(1 + β |g|²) g`` (vector of shape (2,)).

    params: ``k0``, ``alpha``, ``beta``; theta: scalar UFL operand (the temperature that
    enters k); g: gradient, UFL vector of shape (2,). Wrap θ and g in ``ufl.variable``
    before the call when derivatives by ``ufl.diff`` are wanted.
    """
    a = params["k0"] * (1 + params["alpha"] * theta)
    return a * (1 + params["beta"] * ufl.dot(g, g)) * g


def mechanical_stress(params: Mapping[str, Any], eps: Any) -> Any:
    """Plane-strain stress tensor σ (2×2) of the EquiNO-type law at strain tensor eps (2×2).

    ``σ = K tr(ε) I + (2G + c1/(c2 + ‖e‖)) e``, ``e = ε − tr(ε)/3 I`` (2D "deviator",
    keeps a trace), ``‖e‖² = e:e`` (= e11² + e22² + 2 e12²) regularised by NORM_REG2.
    params: ``K``, ``G``, ``c1``, ``c2``.
    """
    eye = ufl.Identity(2)
    tr = ufl.tr(eps)
    e = eps - tr / 3 * eye
    norm = ufl.sqrt(ufl.inner(e, e) + NORM_REG2)
    mu = 2 * params["G"] + params["c1"] / (params["c2"] + norm)
    return params["K"] * tr * eye + mu * e
