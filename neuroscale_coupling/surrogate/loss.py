"""The data loss of the surrogate: one definition, shared by offline training
(:mod:`neuroscale_coupling.training.train`) and online enrichment
(:mod:`neuroscale_coupling.closure.enrichment`).

With the model's :class:`~neuroscale_coupling.surrogate.normalization.Normalization`, a
response (or a response error) x (N, r) is normalized as x / response_scale and a tangent
(or tangent error) T (N, r, d) as T · state_half_width / response_scale, so that
components of different size count alike and the normalized tangent is the derivative of
the normalized response with respect to the normalized state. Per sample::

    e_r = normalized (predicted − true response)          (r,)
    e_t = normalized (predicted − true tangent)           (r, d)
    row loss = mean(e_r²) + tangent_weight · mean(e_t²)

Training balances the two batch means (:meth:`DataLoss.terms`) adaptively; enrichment
sums row losses over its buffer and replay rows (:meth:`DataLoss.rows`); the mean of the
row losses equals ``response + tangent_weight · tangent`` of the terms.
"""

import numpy as np
import torch

from neuroscale_coupling.surrogate.normalization import Normalization

__all__ = ["DataLoss"]


class DataLoss:
    """The normalized data loss of one model (see the module docstring).

    Tensors may have any dtype and device; the scales follow them.
    """

    def __init__(self, normalization: Normalization, *, tangent_weight: float) -> None:
        if not (np.isfinite(tangent_weight) and tangent_weight >= 0):
            raise ValueError(f"tangent_weight={tangent_weight!r} must be a finite number >= 0")
        self._response_scale = np.asarray(normalization.response_scale, dtype=float)
        self._half_width = np.asarray(normalization.state_half_width, dtype=float)
        self.tangent_weight = float(tangent_weight)

    def _like(self, values: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(values, dtype=x.dtype, device=x.device)

    def response(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized responses (or response errors) (N, r)."""
        return x / self._like(self._response_scale, x)

    def tangent(self, t: torch.Tensor) -> torch.Tensor:
        """Normalized tangents (or tangent errors) (N, r, d)."""
        rs = self._like(self._response_scale, t)
        return t * self._like(self._half_width, t) / rs[:, None]

    def terms(
        self,
        pred_response: torch.Tensor,
        pred_tangent: torch.Tensor,
        response: torch.Tensor,
        tangent: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean squared normalized response and tangent errors over all entries (0-d each)
        of predictions (N, r), (N, r, d) against the true values of the same shapes."""
        er = self.response(pred_response - response)
        et = self.tangent(pred_tangent - tangent)
        return (er**2).mean(), (et**2).mean()

    def rows(
        self,
        pred_response: torch.Tensor,
        pred_tangent: torch.Tensor,
        response: torch.Tensor,
        tangent: torch.Tensor,
    ) -> torch.Tensor:
        """Row losses (N,) of the same arguments as :meth:`terms`."""
        er = self.response(pred_response - response)
        et = self.tangent(pred_tangent - tangent)
        return er.pow(2).mean(1) + self.tangent_weight * et.pow(2).mean((1, 2))
