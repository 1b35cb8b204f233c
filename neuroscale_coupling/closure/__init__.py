"""Online: the host-facing closure operator, called every Newton iteration.

The contract (:mod:`~neuroscale_coupling.closure.contract`): per step, all calls collective
over the closure's communicator (also on a rank with no points)::

    closure.begin_step(k)
    result = closure.evaluate(states)      # once per Newton iterate: (n_local, d) float64
    ...                                    # (or a PETSc Vec with n_local * d entries)
    if closure.revise_step():              # after convergence: True = solve the step again
        ...
    stats = closure.end_step()

``result.response`` (n_local, r), ``result.tangent`` (n_local, r, d), ``result.std``
(n_local, r), ``result.exact`` (n_local,) bool. Backends: :class:`ExactClosure` (a fine
solve at every point) and :class:`~neuroscale_coupling.closure.surrogate_closure.
SurrogateClosure` (the trained surrogate with fine-solver fallback,
:mod:`~neuroscale_coupling.closure.fallback`, and online enrichment,
:mod:`~neuroscale_coupling.closure.enrichment`). Importing this package loads neither
torch nor DOLFINx; ``SurrogateClosure`` and ``EnrichmentOptions`` load torch when first
used.
"""

from neuroscale_coupling.closure.contract import (
    FALLBACK_REASONS,
    Closure,
    ClosureResult,
    StepStats,
)
from neuroscale_coupling.closure.exact import ExactClosure
from neuroscale_coupling.closure.fallback import FallbackPolicy
from neuroscale_coupling.lazy import lazy_attributes

__all__ = [
    "FALLBACK_REASONS",
    "Closure",
    "ClosureResult",
    "EnrichmentOptions",
    "ExactClosure",
    "FallbackPolicy",
    "StepStats",
    "SurrogateClosure",
]

_LAZY = {
    "SurrogateClosure": "neuroscale_coupling.closure.surrogate_closure",
    "EnrichmentOptions": "neuroscale_coupling.closure.enrichment",
}

__getattr__ = lazy_attributes(__name__, _LAZY)
