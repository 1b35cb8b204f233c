"""The surrogate micro model as a Micro Manager micro file: name this module in
``micro_manager.micro_file_names`` (``"neuroscale_coupling.hosts.micro_manager.surrogate_model"``)
with its ``micro_stateless_flags`` entry true. The Micro Manager loads ``MicroSimulation``."""

from neuroscale_coupling.hosts.micro_manager.simulations import (
    SurrogateMicroSimulation,
    micro_manager_class,
)

MicroSimulation = micro_manager_class(SurrogateMicroSimulation)

__all__ = ["MicroSimulation"]
