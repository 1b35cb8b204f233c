"""The micro simulation classes the Micro Manager instantiates.

:class:`SurrogateMicroSimulation` (the trained surrogate with calibrated std; declare it
stateless: ``micro_stateless_flags`` true, one shared instance) and
:class:`FineMicroSimulation` (an FE cell solve per point; stateless too: its answer
depends on the point's read data only, so one shared instance with one compiled solver
serves every point). Both answer ``solve(micro_sim_input, dt) -> dict`` in the layout of
:class:`~neuroscale_coupling.hosts.micro_manager.names.DataNames`; ``get_state`` returns
None and ``set_state`` ignores it (nothing to checkpoint); neither defines
``initialize`` nor ``output`` (the Micro Manager then calls neither).

They inherit the Micro Manager's ``MicroSimulationInterface`` when the Micro Manager can
be imported (it is, when it loads the micro files), else a stand-in with its abstract
methods, so that this module imports without preCICE or the Micro Manager; the micro
files export them through :func:`micro_manager_class`, which also adopts a class built
before the Micro Manager was imported.
"""

import importlib.util
import sys
from abc import ABC, abstractmethod

from neuroscale_coupling.hosts.micro_manager import engine as _engine

__all__ = [
    "FineMicroSimulation",
    "MicroSimulationBase",
    "SurrogateMicroSimulation",
    "micro_manager_class",
]


class _StandInInterface(ABC):
    """The abstract methods of micro_manager.MicroSimulationInterface (0.12) and its
    helpers, for use without the Micro Manager. No ``initialize`` and no ``output``: the
    models define neither, and the Micro Manager's wrapper of a foreign class fails on an
    ``initialize(self, *args, **kwargs)`` (it writes ``def initialize(self, , *args…``)."""

    @abstractmethod
    def solve(self, micro_sim_input: dict, dt: float) -> dict: ...

    @abstractmethod
    def get_state(self) -> object: ...

    @abstractmethod
    def set_state(self, state: object) -> None: ...

    @abstractmethod
    def get_global_id(self) -> int: ...

    @abstractmethod
    def set_global_id(self, global_id: int) -> None: ...

    def requires_initialize(self) -> bool:
        return False

    def requires_output(self) -> bool:
        return False

    def destroy(self) -> None:
        return None

    @property
    def name(self) -> str:
        return type(self).__name__


def _interface() -> type:
    """micro_manager.MicroSimulationInterface if the Micro Manager imports (it needs
    pyprecice, or a stand-in ``precice`` module), else the stand-in."""
    module = sys.modules.get("micro_manager.micro_simulation")
    if module is None and all(_importable(name) for name in ("micro_manager", "precice")):
        try:
            import micro_manager.micro_simulation as module
        except ImportError:
            module = None
    return getattr(module, "MicroSimulationInterface", _StandInInterface)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class MicroSimulationBase(_interface()):  # type: ignore[misc]
    """What both models share: the global id, no state, the shared engine.

    sim_id: the global id the Micro Manager gives (the model index for the one instance
    of a stateless model). The first instance in a process reads the settings and the
    model file, so that a bad setting fails while the Micro Manager loads the models.
    """

    def __init__(self, sim_id: int) -> None:
        self._global_id = int(sim_id)
        self.engine = _engine.shared()
        self.engine.ensure_ready()

    def get_state(self) -> None:
        """Nothing to checkpoint: the answer depends on the read data only."""
        return None

    def set_state(self, state: object) -> None:
        """Nothing to restore."""

    def get_global_id(self) -> int:
        return self._global_id

    def set_global_id(self, global_id: int) -> None:
        self._global_id = int(global_id)


class SurrogateMicroSimulation(MicroSimulationBase):
    """The surrogate model (stateless): Q, tangent, calibrated std and exact per point.

    Where a fallback test fires (state outside the training domain, cell outside the
    training family, std above tolerance), it answers with a fine solve (``Exact`` = 1,
    std 0) when ``fallback.fine_solve`` is on (the default), else with the surrogate,
    leaving the point to the model switching
    (:func:`~neuroscale_coupling.hosts.micro_manager.switching.switching_function`).
    """

    def solve(self, micro_sim_input: dict, dt: float) -> dict:
        """The answer at one point (its read data ``micro_sim_input``; dt unused)."""
        return self.engine.surrogate_answer(micro_sim_input)


class FineMicroSimulation(MicroSimulationBase):
    """The fine model: an FE solve of the point's cell at its state (``Exact`` = 1, std 0)."""

    def solve(self, micro_sim_input: dict, dt: float) -> dict:
        """The answer at one point (its read data ``micro_sim_input``; dt unused)."""
        return self.engine.fine_answer(micro_sim_input)


_adopted: dict[tuple[type, type], type] = {}


def micro_manager_class(cls: type) -> type:
    """``cls`` if it inherits the Micro Manager's MicroSimulationInterface, else (this
    module was imported before the Micro Manager) a subclass of both, so that the Micro
    Manager's loader takes it as its own; ``cls`` itself without the Micro Manager. The
    micro files (``surrogate_model``, ``fine_model``) export their class through it."""
    base = _interface()
    if issubclass(cls, base):
        return cls
    key = (cls, base)
    if key not in _adopted:
        _adopted[key] = type(
            cls.__name__, (cls, base), {"__module__": cls.__module__, "__doc__": cls.__doc__}
        )
    return _adopted[key]
