"""Micro models for the preCICE Micro Manager (``micro-manager-precice`` 0.12).

The Micro Manager runs one micro simulation per macro point (preCICE vertex; in the
two-scale heat conduction tutorial the macro quadrature points) and couples them to the
macro solver through preCICE. Three modules plug in by name in its JSON configuration:

* ``neuroscale_coupling.hosts.micro_manager.surrogate_model`` — the trained SANO surrogate
  (:class:`~neuroscale_coupling.hosts.micro_manager.simulations.SurrogateMicroSimulation`),
  stateless (``micro_stateless_flags`` true: one shared instance), cells encoded once and
  decoded per point by a numpy copy of the decoder
  (:mod:`~neuroscale_coupling.surrogate.numpy_decoder`, about 0.15 ms a point);
* ``neuroscale_coupling.hosts.micro_manager.fine_model`` — an FE cell solve per point
  (:class:`~neuroscale_coupling.hosts.micro_manager.simulations.FineMicroSimulation`);
* ``neuroscale_coupling.hosts.micro_manager.switching`` — the switching function of the
  Micro Manager's model switching: points where the surrogate's fallback tests fire go to
  the fine model.

Per point both models read the temperature gradient, the temperature and the cell's datum
and write the flux Q, the tangent entries (``K00 … K11`` = ∂Q/∂G, ∂Q/∂θ), the calibrated
std of Q and an exact flag (:class:`~neuroscale_coupling.hosts.micro_manager.names.
DataNames`). Their settings (model file, fallback thresholds, cell source, names) are
read from ``neuroscale-micro.toml`` next to the Micro Manager configuration, or the file
``NEUROSCALE_MICRO_CONFIG`` names (:mod:`~neuroscale_coupling.hosts.micro_manager.
settings`). Importing this package needs neither preCICE nor the Micro Manager; the
classes are loaded on first access.
"""

from neuroscale_coupling.hosts.micro_manager.cells import CellSpec
from neuroscale_coupling.hosts.micro_manager.names import NAME_PATTERN, DataNames
from neuroscale_coupling.hosts.micro_manager.settings import (
    ENV_VAR,
    MicroSettings,
    configure,
    current_settings,
    load_settings,
)
from neuroscale_coupling.lazy import lazy_attributes

__all__ = [
    "ENV_VAR",
    "NAME_PATTERN",
    "CellSpec",
    "DataNames",
    "FineMicroSimulation",
    "MicroEngine",
    "MicroSettings",
    "SurrogateMicroSimulation",
    "ThermalNumpyDecoder",
    "configure",
    "current_settings",
    "load_settings",
    "switching_function",
]

_LAZY = {
    "SurrogateMicroSimulation": "neuroscale_coupling.hosts.micro_manager.simulations",
    "FineMicroSimulation": "neuroscale_coupling.hosts.micro_manager.simulations",
    "MicroEngine": "neuroscale_coupling.hosts.micro_manager.engine",
    "ThermalNumpyDecoder": "neuroscale_coupling.surrogate.numpy_decoder",
    "switching_function": "neuroscale_coupling.hosts.micro_manager.switching",
}

__getattr__ = lazy_attributes(__name__, _LAZY)
