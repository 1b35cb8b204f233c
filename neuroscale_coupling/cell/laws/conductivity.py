"""Nonlinear conduction (thermal physics)::

    q = k(θ, g) g,   k = k0 (1 + α θ) (1 + β |g|²),   k0 > 0, β >= 0

per phase, at the macro temperature θ and the local gradient g ∈ R². The law derives from
the potential ψ(g) = k0 (1 + αθ) (|g|²/2 + β|g|⁴/4), convex in g, so the homogenized
flux is the gradient of a convex potential and dQ/dG is symmetric positive definite
wherever 1 + αθ > 0 in every phase.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from neuroscale_coupling.cell.laws.base import ThermalLaw, check_parameter

__all__ = ["CONDUCTIVITY", "NonlinearConductivity", "ThermalPhase"]


@dataclass(frozen=True)
class ThermalPhase:
    """Parameters of one conducting phase: ``k = k0 (1 + alpha θ)(1 + beta |g|²)``."""

    k0: float
    alpha: float = 0.0
    beta: float = 0.0

    def __post_init__(self) -> None:
        check_parameter("k0", self.k0)
        check_parameter("beta", self.beta, allow_zero=True)
        if not np.isfinite(self.alpha):
            raise ValueError(f"phase parameter alpha={self.alpha!r} must be finite")


class NonlinearConductivity(ThermalLaw):
    """``q = k0 (1 + αθ)(1 + β|g|²) g`` (see the module docstring)."""

    phase = ThermalPhase
    stiffness = "k0"

    def torch_form(self, fields: Mapping[str, Any], theta: Any, g: Any) -> tuple[Any, Any, Any]:
        import torch

        a = fields["k0"] * (1 + fields["alpha"] * theta)
        gg = (g * g).sum(-1)
        b = 1 + fields["beta"] * gg
        k = a * b
        q = k[..., None] * g
        eye = torch.eye(2, dtype=g.dtype, device=g.device)
        dq_dg = k[..., None, None] * eye + (2 * a * fields["beta"])[..., None, None] * (
            g[..., :, None] * g[..., None, :]
        )
        dq_dtheta = (fields["k0"] * fields["alpha"] * b)[..., None] * g
        return q, dq_dg, dq_dtheta

    def ufl_form(self, params: Mapping[str, Any], theta: Any, g: Any) -> Any:
        import ufl

        a = params["k0"] * (1 + params["alpha"] * theta)
        return a * (1 + params["beta"] * ufl.dot(g, g)) * g

    def check(self, fields: Mapping[str, np.ndarray], states: np.ndarray) -> list[str | None]:
        """Ill-posed where k0 (1 + αθ) <= 0 at some point of the cell."""
        theta = np.asarray(states)[:, self.layout.theta_index, None]
        a = np.asarray(fields["k0"]) * (1 + np.asarray(fields["alpha"]) * theta)
        return [
            None
            if v > 0
            else f"the conductivity k0 (1 + alpha theta) = {v:.6g} <= 0 at this theta: "
            "the cell problem is ill-posed (keep 1 + alpha theta > 0 in every phase)"
            for v in a.min(axis=1)
        ]


#: The law of :class:`~neuroscale_coupling.cell.materials.ThermalMaterial`.
CONDUCTIVITY = NonlinearConductivity()
