"""Materials: the phases of a cell, indexed by the phase ids of its image, and their law.

A material is a tuple of phases (parameter records of its law) and the law itself
(:mod:`~neuroscale_coupling.cell.laws`): :class:`ThermalMaterial` follows
:class:`~neuroscale_coupling.cell.laws.conductivity.NonlinearConductivity`,
:class:`MechanicalMaterial` the EquiNO law
(:class:`~neuroscale_coupling.cell.laws.equino.EquinoElasticity`). States and responses
are laid out as :mod:`~neuroscale_coupling.cell.state_layout` says. Every tangent is the
plain Jacobian of the returned vector with respect to the listed state components, e.g.
dσ/dε[i, j] = ∂σ_i/∂ε_j with ε12 (= ε21) as one variable.

The default materials (:func:`default_material`) are the built-in composites: a
two-phase conductor with contrast 10, and the EquiNO composite (nonlinear matrix,
elastic fibre).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from neuroscale_coupling.cell.laws import (
    CONDUCTIVITY,
    EQUINO_FIBRE,
    EQUINO_LAW,
    EQUINO_MATRIX,
    MechanicalPhase,
    PhaseLaw,
    ThermalPhase,
)
from neuroscale_coupling.cell.microstructure import from_array
from neuroscale_coupling.cell.state_layout import layout_of

__all__ = [
    "Material",
    "MechanicalMaterial",
    "ThermalMaterial",
    "default_material",
    "equino_material",
    "material_from_dict",
    "material_to_dict",
    "phase_values",
]


@dataclass(frozen=True)
class Material:
    """Base of the materials: phases indexed by the phase ids of a cell image.

    A subclass names its law (``law``); physics, state, response and parameter names
    follow from it."""

    law: ClassVar[PhaseLaw]
    physics: ClassVar[str]
    state_names: ClassVar[tuple[str, ...]]
    response_names: ClassVar[tuple[str, ...]]
    parameter_names: ClassVar[tuple[str, ...]]
    phases: tuple[Any, ...] = field(default=())

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A material of a law takes its physics, state and response names from the
        law's layout and its parameter names from the law."""
        super().__init_subclass__(**kwargs)
        layout = cls.law.layout
        cls.physics = layout.physics
        cls.state_names = layout.state_names
        cls.response_names = layout.response_names
        cls.parameter_names = cls.law.parameter_names

    @property
    def state_dim(self) -> int:
        return self.law.layout.state_dim

    @property
    def response_dim(self) -> int:
        return self.law.layout.response_dim

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
        for p in self.phases:
            if not isinstance(p, self.law.phase):
                raise TypeError(
                    f"{type(self).__name__} phases must be {self.law.phase.__name__}; got {p!r}"
                )


@dataclass(frozen=True)
class ThermalMaterial(Material):
    """Nonlinear conduction. State (G1, G2, θ); response Q = ⟨q⟩ (Q1, Q2).

    The tangent of the response is ∂Q/∂(G1, G2, θ), shape (2, 3): columns 0–1 are
    dQ/dG (symmetric positive definite), column 2 is dQ/dθ.
    """

    law: ClassVar[PhaseLaw] = CONDUCTIVITY
    phases: tuple[ThermalPhase, ...] = field(default=())


@dataclass(frozen=True)
class MechanicalMaterial(Material):
    """Plane-strain nonlinear elasticity. State E = (E11, E22, E12) (tensor shear);
    response Σ = ⟨σ⟩ (S11, S22, S12); tangent dΣ/dE, shape (3, 3)."""

    law: ClassVar[PhaseLaw] = EQUINO_LAW
    phases: tuple[MechanicalPhase, ...] = field(default=())


_MATERIALS: dict[str, type[Material]] = {
    ThermalMaterial.physics: ThermalMaterial,
    MechanicalMaterial.physics: MechanicalMaterial,
}


def equino_material() -> MechanicalMaterial:
    """The EquiNO composite: phase 0 = nonlinear matrix, phase 1 = elastic fibre."""
    return MechanicalMaterial(phases=(EQUINO_MATRIX, EQUINO_FIBRE))


def default_material(physics: str) -> ThermalMaterial | MechanicalMaterial:
    """The built-in material of ``physics``: thermal, a linear two-phase conductor
    (k0 = 1 matrix, k0 = 10 inclusions); mechanical, the EquiNO composite."""
    layout_of(physics)
    if physics == ThermalMaterial.physics:
        return ThermalMaterial(phases=(ThermalPhase(1.0), ThermalPhase(10.0)))
    return equino_material()


def material_to_dict(material: ThermalMaterial | MechanicalMaterial) -> dict[str, Any]:
    """Plain description ``{"physics", "phases": [{param: value}]}`` of a material."""
    if not isinstance(material, Material):
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
    if physics not in _MATERIALS:
        raise ValueError(
            f"unknown physics {physics!r} in a material record: {', '.join(_MATERIALS)}"
        )
    cls = _MATERIALS[physics]
    return cls(phases=tuple(cls.law.phase(**p) for p in d["phases"]))  # type: ignore[arg-type]


def phase_values(material: ThermalMaterial | MechanicalMaterial) -> np.ndarray:
    """Scalar value per phase used to turn a phase image into a field, shape (n_phases,).

    The log of the law's stiffness parameter (``law.stiffness``: k0, thermal; K, the bulk
    modulus, mechanical): a physical scale shared by cells of different phase laws, where
    the raw phase id would not be.
    """
    name = material.law.stiffness
    return np.log(np.array([float(getattr(p, name)) for p in material.phases]))
