"""The switching function for the Micro Manager's model switching: name this module in
``simulation_params.model_switching_settings.switching_function``
(``"neuroscale_coupling.hosts.micro_manager.switching"``).

The Micro Manager 0.12 calls ``switching_function(resolution, location, t, input,
prev_output)`` for each active point at the start of every solve and again after it, adds
the answer (−1, 0, +1) to the point's model index (its position in ``micro_file_names``,
clamped) and solves again the points it moved, until no point moves. The answer here is
the surrogate's own fallback decision at the point's read data ``input`` — state outside
the training domain, cell outside the training family, calibrated std above tolerance
(:class:`~neuroscale_coupling.closure.fallback.FallbackPolicy`): toward the fine model
(``[switching] fine``, default 0) where a test fires, toward the surrogate (``surrogate``,
default 1) elsewhere. It depends on ``input`` only, so the loop ends after one solve; the
prediction it makes is reused by the surrogate's ``solve`` at the same point and state.
"""

from typing import Any

import numpy as np

from neuroscale_coupling.hosts.micro_manager import engine as _engine

__all__ = ["switching_function"]


def switching_function(
    resolution: int,
    location: np.ndarray,
    t: float,
    input: dict[str, Any],
    prev_output: dict[str, Any] | None,
) -> int:
    """−1, 0 or +1: the change of the point's model index (see the module doc).

    resolution: the point's current model index; location (D,): its coordinates; t: the
    time; input: its read data; prev_output: its last answer (unused: the decision is
    made from the input, so it is the same before and after a solve)."""
    return _engine.shared().switch(resolution, input)
