"""Phase laws (DESIGN.md §4) and the two-phase-or-more materials built from them.

Thermal phase law (per phase, macro temperature θ, local gradient g ∈ R²)::

    q = k(θ, g) g,   k = k0 (1 + α θ) (1 + β |g|²),   k0 > 0, β >= 0

Mechanical phase law (plane strain, tensor-shear Voigt ε = (ε11, ε22, ε12))::

    σ = K tr(ε) m + μ(‖e‖) e,   m = (1, 1, 0),   e = ε - tr(ε)/3 m,
    ‖e‖² = e11² + e22² + 2 e12²,   μ(s) = 2 G + c1 / (c2 + s)

A linear elastic phase has c1 = 0; the EquiNO matrix has G = 0, c1 = 50, c2 = 0.06.
Stresses are returned in the same tensor-shear Voigt order (σ11, σ22, σ12), and every
tangent is the plain Jacobian of the returned vector with respect to the listed state
components, e.g. dσ/dε[i, j] = ∂σ_i/∂ε_j with ε12 (= ε21) as one variable.

The local laws are written once, in torch (imported lazily), and shared by the spectral
solver and the tests; the FE solver states the same formulas in UFL.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from neuroscale_coupling.cell.microstructure import from_array

__all__ = [
    "EQUINO_FIBRE",
    "EQUINO_MATRIX",
    "Material",
    "MechanicalMaterial",
    "MechanicalPhase",
    "ThermalMaterial",
    "ThermalPhase",
    "equino_material",
]


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (np.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"phase parameter {name}={value!r} is invalid: it must be finite and {bound}"
        )


@dataclass(frozen=True)
class ThermalPhase:
    """Nonlinear conductor ``k = k0 (1 + alpha θ)(1 + beta |g|²)``."""

    k0: float
    alpha: float = 0.0
    beta: float = 0.0

    def __post_init__(self) -> None:
        _positive("k0", self.k0)
        _positive("beta", self.beta, allow_zero=True)
        if not np.isfinite(self.alpha):
            raise ValueError(f"phase parameter alpha={self.alpha!r} must be finite")


@dataclass(frozen=True)
class MechanicalPhase:
    """``σ = K tr(ε) m + (2G + c1/(c2 + ‖e‖)) e`` (see the module docstring)."""

    K: float
    G: float = 0.0
    c1: float = 0.0
    c2: float = 1.0

    def __post_init__(self) -> None:
        _positive("K", self.K)
        _positive("G", self.G, allow_zero=True)
        _positive("c1", self.c1, allow_zero=True)
        _positive("c2", self.c2)
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


#: EquiNO matrix: K = 4780, c1 = 50, c2 = 0.06.
EQUINO_MATRIX = MechanicalPhase(K=4780.0, c1=50.0, c2=0.06)
#: EquiNO fibre: linear elastic, E = 73000, ν = 0.22 (K = 43452.381, G = 29918.0328).
EQUINO_FIBRE = MechanicalPhase(K=43452.381, G=29918.0328)


def _torch() -> Any:
    import torch

    return torch


@dataclass(frozen=True)
class Material:
    """Base of the materials: phases indexed by the phase ids of a cell image."""

    physics: ClassVar[str]
    state_names: ClassVar[tuple[str, ...]]
    response_names: ClassVar[tuple[str, ...]]
    parameter_names: ClassVar[tuple[str, ...]]
    phases: tuple[Any, ...] = field(default=())

    @property
    def state_dim(self) -> int:
        return len(self.state_names)

    @property
    def response_dim(self) -> int:
        return len(self.response_names)

    @property
    def n_phases(self) -> int:
        return len(self.phases)

    def parameter_table(self) -> np.ndarray:
        """Phase parameters, shape (n_phases, n_parameters), columns ``parameter_names``."""
        return np.array(
            [[float(getattr(p, name)) for name in self.parameter_names] for p in self.phases]
        )

    def fields(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Per-voxel parameter fields: each of shape ``images.shape`` (…, n, n), float64."""
        imgs = np.asarray(images)
        flat = imgs.reshape(-1, imgs.shape[-2], imgs.shape[-1])
        for im in flat:
            from_array(im, n_phases=self.n_phases)
        table = self.parameter_table()
        return {name: table[imgs, c] for c, name in enumerate(self.parameter_names)}

    def check_states(self, states: Any) -> np.ndarray:
        """Validate macro states and return them as float64, shape (N, state_dim)."""
        s = np.asarray(states)
        if s.dtype.kind not in "fiu":
            raise TypeError(f"states must be real numbers; got dtype {s.dtype}")
        s = np.asarray(s, dtype=np.float64)
        if s.ndim == 1:
            s = s[None, :]
        if s.ndim != 2 or s.shape[1] != self.state_dim:
            raise ValueError(
                f"{self.physics} states have shape (N, {self.state_dim}) with columns "
                f"{self.state_names}; got shape {np.shape(states)}"
            )
        bad = ~np.all(np.isfinite(s), axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"state {i} = {s[i].tolist()} is not finite: remove NaN/Inf")
        return s

    def __post_init__(self) -> None:
        if len(self.phases) == 0:
            raise ValueError(f"a {self.physics} material needs at least one phase")


@dataclass(frozen=True)
class ThermalMaterial(Material):
    """Nonlinear conduction. State (G1, G2, θ); response Q = ⟨q⟩ (Q1, Q2).

    The tangent of the response is ∂Q/∂(G1, G2, θ), shape (2, 3): columns 0–1 are
    dQ/dG (symmetric positive definite), column 2 is dQ/dθ.
    """

    physics: ClassVar[str] = "thermal"
    state_names: ClassVar[tuple[str, ...]] = ("G1", "G2", "theta")
    response_names: ClassVar[tuple[str, ...]] = ("Q1", "Q2")
    parameter_names: ClassVar[tuple[str, ...]] = ("k0", "alpha", "beta")
    phases: tuple[ThermalPhase, ...] = field(default=())

    def __post_init__(self) -> None:
        super().__post_init__()
        for p in self.phases:
            if not isinstance(p, ThermalPhase):
                raise TypeError(f"ThermalMaterial phases must be ThermalPhase; got {p!r}")

    @staticmethod
    def local(fields: dict[str, Any], theta: Any, g: Any) -> tuple[Any, Any, Any]:
        """Pointwise law in torch.

        fields: ``k0, alpha, beta`` tensors of shape S; theta: broadcastable to S;
        g: (*S, 2). Returns q (*S, 2), dq/dg (*S, 2, 2), dq/dθ (*S, 2).
        """
        torch = _torch()
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


@dataclass(frozen=True)
class MechanicalMaterial(Material):
    """Plane-strain nonlinear elasticity. State E = (E11, E22, E12) (tensor shear);
    response Σ = ⟨σ⟩ (S11, S22, S12); tangent dΣ/dE, shape (3, 3)."""

    physics: ClassVar[str] = "mechanical"
    state_names: ClassVar[tuple[str, ...]] = ("E11", "E22", "E12")
    response_names: ClassVar[tuple[str, ...]] = ("S11", "S22", "S12")
    parameter_names: ClassVar[tuple[str, ...]] = ("K", "G", "c1", "c2")
    phases: tuple[MechanicalPhase, ...] = field(default=())

    def __post_init__(self) -> None:
        super().__post_init__()
        for p in self.phases:
            if not isinstance(p, MechanicalPhase):
                raise TypeError(f"MechanicalMaterial phases must be MechanicalPhase; got {p!r}")

    @staticmethod
    def local(fields: dict[str, Any], eps: Any) -> tuple[Any, Any]:
        """Pointwise law in torch.

        fields: ``K, G, c1, c2`` tensors of shape S; eps: (*S, 3) tensor-shear Voigt.
        Returns σ (*S, 3) and dσ/dε (*S, 3, 3).
        """
        torch = _torch()
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


def equino_material() -> MechanicalMaterial:
    """The EquiNO composite: phase 0 = nonlinear matrix, phase 1 = elastic fibre."""
    return MechanicalMaterial(phases=(EQUINO_MATRIX, EQUINO_FIBRE))


def material_to_dict(material: ThermalMaterial | MechanicalMaterial) -> dict[str, Any]:
    """Plain description ``{"physics", "phases": [{param: value}]}`` of a material."""
    if not isinstance(material, ThermalMaterial | MechanicalMaterial):
        raise TypeError(
            f"expected a ThermalMaterial or MechanicalMaterial; got {type(material).__name__}"
        )
    return {
        "physics": material.physics,
        "phases": [
            {nm: float(getattr(p, nm)) for nm in material.parameter_names} for p in material.phases
        ],
    }


def material_from_dict(d: Mapping[str, Any]) -> ThermalMaterial | MechanicalMaterial:
    """Inverse of :func:`material_to_dict`."""
    physics = d.get("physics")
    if physics == "thermal":
        return ThermalMaterial(phases=tuple(ThermalPhase(**p) for p in d["phases"]))
    if physics == "mechanical":
        return MechanicalMaterial(phases=tuple(MechanicalPhase(**p) for p in d["phases"]))
    raise ValueError(f"unknown physics {physics!r} in a material record: 'thermal'/'mechanical'")


def phase_values(material: ThermalMaterial | MechanicalMaterial) -> np.ndarray:
    """Scalar value per phase used to turn a phase image into a field, shape (n_phases,).

    log k0 (thermal) or log K (bulk modulus, mechanical): a physical scale shared by
    cells of different phase laws, where the raw phase id would not be.
    """
    name = "k0" if isinstance(material, ThermalMaterial) else "K"
    return np.log(np.array([float(getattr(p, name)) for p in material.phases]))
