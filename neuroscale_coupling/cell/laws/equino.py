"""Small-strain nonlinear elasticity of the EquiNO benchmark (mechanical physics), plane
strain, tensor-shear Voigt ε = (ε11, ε22, ε12)::

    σ = K tr(ε) m + μ(‖e‖) e,   m = (1, 1, 0),   e = ε - tr(ε)/3 m,
    ‖e‖² = e11² + e22² + 2 e12²,   μ(s) = 2 G + c1 / (c2 + s)

A linear elastic phase has c1 = 0 (:meth:`MechanicalPhase.linear_elastic`); the EquiNO
matrix has G = 0, c1 = 50, c2 = 0.06. The 2D "deviator" e keeps a trace, so the law is not
exactly the gradient of a potential and its tangent is only nearly symmetric.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from neuroscale_coupling.cell.laws.base import MechanicalLaw, check_parameter

__all__ = [
    "EQUINO_FIBRE",
    "EQUINO_LAW",
    "EQUINO_MATRIX",
    "NORM_REG2",
    "EquinoElasticity",
    "MechanicalPhase",
]

#: δ² added under the square root of ‖e‖ in the UFL form: keeps the derivative of the norm
#: finite at e = 0 (there e/‖e‖ → e/δ = 0) and changes ‖e‖ by δ²/(2‖e‖), i.e. nothing at
#: double precision for any strain above 1e-20. (The torch form clamps instead.)
NORM_REG2 = 1e-60


@dataclass(frozen=True)
class MechanicalPhase:
    """Parameters of one solid phase: ``σ = K tr(ε) m + (2G + c1/(c2 + ‖e‖)) e``."""

    K: float
    G: float = 0.0
    c1: float = 0.0
    c2: float = 1.0

    def __post_init__(self) -> None:
        check_parameter("K", self.K)
        check_parameter("G", self.G, allow_zero=True)
        check_parameter("c1", self.c1, allow_zero=True)
        check_parameter("c2", self.c2)
        if self.G == 0 and self.c1 == 0:
            raise ValueError(
                "a mechanical phase with G = 0 and c1 = 0 has no shear stiffness: "
                "give G > 0 (linear elastic) or c1 > 0 (EquiNO matrix law)"
            )

    @classmethod
    def linear_elastic(cls, E: float, nu: float) -> "MechanicalPhase":
        """Linear elastic phase from Young's modulus E and Poisson's ratio nu."""
        if not -1.0 < nu < 0.5:
            raise ValueError(f"Poisson ratio nu={nu!r} must lie in (-1, 0.5)")
        return cls(K=E / (3 * (1 - 2 * nu)), G=E / (2 * (1 + nu)))


class EquinoElasticity(MechanicalLaw):
    """The EquiNO law (see the module docstring)."""

    phase = MechanicalPhase
    stiffness = "K"

    def torch_form(self, fields: Mapping[str, Any], eps: Any) -> tuple[Any, Any]:
        import torch

        m = torch.tensor([1.0, 1.0, 0.0], dtype=eps.dtype, device=eps.device)
        w = torch.tensor([1.0, 1.0, 2.0], dtype=eps.dtype, device=eps.device)
        tr = eps[..., 0] + eps[..., 1]
        e = eps - (tr / 3)[..., None] * m
        s = torch.sqrt((w * e * e).sum(-1))
        inv = fields["c1"] / (fields["c2"] + s)
        mu = 2 * fields["G"] + inv
        sigma = (fields["K"] * tr)[..., None] * m + mu[..., None] * e
        mm = m[:, None] * m[None, :]
        dev = torch.eye(3, dtype=eps.dtype, device=eps.device) - mm / 3
        # ds/dε = (w∘e)ᵀ dev / s; μ'(s) = -c1/(c2+s)²; the product with e vanishes as e → 0.
        ds = (w * e) @ dev / torch.clamp(s, min=torch.finfo(eps.dtype).tiny)[..., None]
        dmu = -inv / (fields["c2"] + s)
        tangent = (
            fields["K"][..., None, None] * mm
            + mu[..., None, None] * dev
            + dmu[..., None, None] * (e[..., :, None] * ds[..., None, :])
        )
        return sigma, tangent

    def ufl_form(self, params: Mapping[str, Any], eps: Any) -> Any:
        """``σ = K tr(ε) I + (2G + c1/(c2 + ‖e‖)) e``, ``e = ε − tr(ε)/3 I``, ``‖e‖² = e:e``
        (= e11² + e22² + 2 e12²) regularised by :data:`NORM_REG2`."""
        import ufl

        eye = ufl.Identity(2)
        tr = ufl.tr(eps)
        e = eps - tr / 3 * eye
        norm = ufl.sqrt(ufl.inner(e, e) + NORM_REG2)
        mu = 2 * params["G"] + params["c1"] / (params["c2"] + norm)
        return params["K"] * tr * eye + mu * e


#: The law of :class:`~neuroscale_coupling.cell.materials.MechanicalMaterial`.
EQUINO_LAW = EquinoElasticity()
#: EquiNO matrix: K = 4780, c1 = 50, c2 = 0.06.
EQUINO_MATRIX = MechanicalPhase(K=4780.0, c1=50.0, c2=0.06)
#: EquiNO fibre: linear elastic, E = 73000, ν = 0.22 (K = 43452.381, G = 29918.0328).
EQUINO_FIBRE = MechanicalPhase(K=43452.381, G=29918.0328)
