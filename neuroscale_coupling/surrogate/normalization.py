"""State/response normalization of a model (:class:`Normalization`): states map affinely to
[-1, 1] over the domain; responses are divided by their per-component RMS over the
training set (no shift, so a zero state still maps to a zero response); tangents
transform consistently, so the normalized tangent is the exact derivative of the
normalized response with respect to the normalized state. The loss
(:mod:`~neuroscale_coupling.surrogate.loss`) and the fallback's relative std test use it.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from neuroscale_coupling.data.dataset import Dataset
from neuroscale_coupling.data.domain import StateDomain

__all__ = ["Normalization"]


@dataclass(frozen=True)
class Normalization:
    """Affine normalization of states, responses and tangents.

    u = (state - state_center) / state_half_width  (the domain box → [-1, 1]^d);
    y = response / response_scale;  dy/du = diag(1/response_scale) T diag(state_half_width),
    so normalized tangents are exact derivatives of normalized responses.
    state_center, state_half_width: (d,); response_scale: (r,) > 0.
    """

    state_center: tuple[float, ...]
    state_half_width: tuple[float, ...]
    response_scale: tuple[float, ...]

    @classmethod
    def fit(cls, train: Dataset, domain: StateDomain) -> "Normalization":
        """States from the domain; response_scale = per-component RMS over ``train``."""
        rms = np.sqrt(np.mean(train.response**2, axis=0))
        scale = np.where(rms > 0, rms, 1.0)
        return cls(
            tuple(float(x) for x in domain.center),
            tuple(float(x) for x in domain.half_width),
            tuple(float(x) for x in scale),
        )

    def states_to(self, states: Any) -> np.ndarray:
        """(N, d) → normalized (N, d)."""
        return (np.asarray(states, dtype=float) - self.state_center) / self.state_half_width

    def states_from(self, u: Any) -> np.ndarray:
        return np.asarray(u, dtype=float) * self.state_half_width + self.state_center

    def response_to(self, response: Any) -> np.ndarray:
        """(N, r) → normalized (N, r)."""
        return np.asarray(response, dtype=float) / self.response_scale

    def response_from(self, y: Any) -> np.ndarray:
        return np.asarray(y, dtype=float) * self.response_scale

    def tangent_to(self, tangent: Any) -> np.ndarray:
        """(N, r, d) → normalized (N, r, d)."""
        t = np.asarray(tangent, dtype=float)
        return t * np.asarray(self.state_half_width) / np.asarray(self.response_scale)[:, None]

    def tangent_from(self, tn: Any) -> np.ndarray:
        t = np.asarray(tn, dtype=float)
        return t * np.asarray(self.response_scale)[:, None] / np.asarray(self.state_half_width)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state_center": list(self.state_center),
            "state_half_width": list(self.state_half_width),
            "response_scale": list(self.response_scale),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Normalization":
        return cls(
            tuple(float(x) for x in d["state_center"]),
            tuple(float(x) for x in d["state_half_width"]),
            tuple(float(x) for x in d["response_scale"]),
        )
