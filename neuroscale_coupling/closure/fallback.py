"""When the surrogate closure hands a point to the fine solver.

Three tests, each with its own documented threshold in :class:`FallbackPolicy`:

* **domain**: the macro state lies outside the box the model was trained on, by more than
  ``domain_tol`` half-widths (:meth:`StateDomain.distance_outside`). Default 0.1: a state
  just beyond the box is answered by the model's first-order expansion from the box
  (:meth:`Surrogate.decode`), whose std grows as the square of the distance, so the
  uncertainty test bounds it too; the network itself is never evaluated outside;
* **family**: the point's cell lies outside the training family — its family ratio
  (:meth:`Surrogate.family_ratio`: the larger of the latent Mahalanobis distance and the
  two-point-correlation distance of :mod:`~neuroscale_coupling.surrogate.image_family`, each in
  units of the 99th percentile of its leave-one-out value over the training cells)
  exceeds ``family_threshold``. Default 1.25: of the shipped models' validation and test
  cells, 99 % lie at ≤ 1.10 (thermal: 20 of 2400 above 1.25, sparse random inclusions)
  and 235 of 239 at ≤ 1.14 (mechanical); laminates, checkerboards and inclusions beyond
  the trained volume fractions lie at 1.81–3.70 (thermal) and 3.65–12.8 (mechanical)
  (docs/results.md);
* **uncertainty**: the calibrated standard deviation exceeds ``std_abs`` (response units,
  largest component) or ‖std‖ exceeds ``std_rel`` × max(‖response‖, ``rel_floor`` × ‖the
  training RMS of the response‖). The floor keeps the test meaningful where the response
  is small (a flux near zero far from any load): there an error relative to the local
  response says nothing about the macro solution. Default: 5 % of the larger of the
  local response and the training RMS.

A point failing several tests is counted under the first of domain, family, uncertainty.
A NaN domain distance fails the domain test, a NaN family ratio the family test, a
prediction with a non-finite response or std the uncertainty test: NaN never passes a test.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neuroscale_coupling.closure.contract import FALLBACK_REASONS

__all__ = ["FallbackPolicy", "fallback_reasons"]


@dataclass(frozen=True)
class FallbackPolicy:
    """Thresholds of the three fallback tests (``math.inf`` switches a test off).

    std_abs: largest calibrated std component above which a point falls back (response
    units). std_rel: ‖std‖ / max(‖response‖, rel_floor · response_rms) above which a point
    falls back. domain_tol: half-widths a state may lie outside the training box.
    family_threshold: family ratio (:meth:`Surrogate.family_ratio`) above which a cell is
    out of family. warn_fraction: share of the points above which falling back for
    ``domain`` or ``family`` in a step logs a WARNING that says why (states in other units
    or cells unlike the training ones are the usual causes; 1 switches it off).
    """

    std_abs: float = math.inf
    std_rel: float = 0.05
    rel_floor: float = 1.0
    domain_tol: float = 0.1
    family_threshold: float = 1.25
    warn_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("std_abs", "std_rel", "domain_tol", "family_threshold"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and v >= 0) or math.isnan(v):
                raise ValueError(f"FallbackPolicy.{name}={v!r} must be a number >= 0 (inf: off)")
        if not 0 <= self.warn_fraction <= 1:
            raise ValueError(
                f"FallbackPolicy.warn_fraction={self.warn_fraction!r} must be in [0, 1]"
            )
        if not 0 < self.rel_floor < math.inf:
            raise ValueError(f"FallbackPolicy.rel_floor={self.rel_floor} must be in (0, inf)")


def fallback_reasons(
    policy: FallbackPolicy,
    *,
    domain_distance: np.ndarray,
    family_ratio: np.ndarray,
    response: np.ndarray,
    std: np.ndarray,
    response_rms: Sequence[float] | np.ndarray,
) -> np.ndarray:
    """Reason code per point (n,) int8: 0 = surrogate, k + 1 = FALLBACK_REASONS[k].

    domain_distance (n,), family_ratio (n,), response (n, r), std (n, r) calibrated,
    response_rms (r,) training RMS per component.
    """
    n = response.shape[0]
    floor = policy.rel_floor * float(np.linalg.norm(np.asarray(response_rms, dtype=float)))
    size = np.maximum(np.linalg.norm(response, axis=1), floor)
    uncertain = (np.max(std, axis=1, initial=0.0) > policy.std_abs) | (
        np.linalg.norm(std, axis=1) > policy.std_rel * size
    )
    # a prediction that is not finite cannot answer: uncertain (a NaN compares False)
    uncertain |= ~(np.all(np.isfinite(response), axis=1) & np.all(np.isfinite(std), axis=1))
    failed = {
        "domain": ~(domain_distance <= policy.domain_tol),
        "family": ~(family_ratio <= policy.family_threshold),
        "uncertainty": uncertain,
    }
    reason = np.zeros(n, dtype=np.int8)
    for code in range(len(FALLBACK_REASONS), 0, -1):  # the first failed test names the point
        reason[failed[FALLBACK_REASONS[code - 1]]] = code
    return reason
