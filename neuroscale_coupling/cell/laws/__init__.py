"""Phase laws, one module per law (:mod:`~neuroscale_coupling.cell.laws.base` says what a
law holds): :mod:`~neuroscale_coupling.cell.laws.conductivity` (thermal) and
:mod:`~neuroscale_coupling.cell.laws.equino` (mechanical)."""

from neuroscale_coupling.cell.laws.base import MechanicalLaw, PhaseLaw, ThermalLaw
from neuroscale_coupling.cell.laws.conductivity import (
    CONDUCTIVITY,
    NonlinearConductivity,
    ThermalPhase,
)
from neuroscale_coupling.cell.laws.equino import (
    EQUINO_FIBRE,
    EQUINO_LAW,
    EQUINO_MATRIX,
    EquinoElasticity,
    MechanicalPhase,
)

__all__ = [
    "CONDUCTIVITY",
    "EQUINO_FIBRE",
    "EQUINO_LAW",
    "EQUINO_MATRIX",
    "EquinoElasticity",
    "MechanicalLaw",
    "MechanicalPhase",
    "NonlinearConductivity",
    "PhaseLaw",
    "ThermalLaw",
    "ThermalPhase",
]
