"""SANO: scale-adaptive neural operator surrogate of the homogenized cell response.

Input: per-level wavelet coefficients of the cell image, in PyWavelets ``wavedec2`` order
with the three details of a level stacked: ``coeffs = [approx (B, 1, h_S, w_S),
detail_S (B, 3, h_S, w_S), …, detail_1 (B, 3, h_1, w_1)]`` (coarsest first; level 1 is the
finest; sizes n/2^l for ``mode="periodization"``, other sizes are padded periodically).

Pipeline: tokens per scale (patch projection + learned scale embedding + periodic Fourier
position encoding) → scale-adaptive attention across all tokens (per-scale attention mass
exposed) → mean pooling → latent (B, latent). ``encode`` and ``decode`` are separate so
that a closure encodes a cell once and decodes many macro states.

``fraction_input``: the last latent component is not learned but the cell mean of the
normalized approximation coefficients (an affine function of the volume fraction, see the
``descriptors`` variant of :mod:`~neuroscale_coupling.surrogate.encoders`), so that the
decoder sees the first-order parameter of the effective response exactly, for cells the
encoder never saw.

Uncertainty: M fixed Monte Carlo dropout masks on the last hidden layer (the M samples
share the trunk and the derivatives of the hidden layer). The masks act linearly on the
output, so their expectation is exact: in eval mode the mean response and its tangent are
those of the unmasked output weights (the limit M → ∞ of the sample mean; with M = 16
fixed masks the sample mean itself was 2.8 % off on the thermal test split, the exact
mean 2.1 %), and the M samples give the spread. In training the mean of M fresh relaxed
masks is used, an unbiased estimate of it. Returned: mean response, its tangent, and
per-component calibrated std √((κ · √((std_scale · spread)² + (std_floor · τ(z))²))² +
(family_gain · e · ‖response‖)²), κ the std factor of the cell's symmetry class and
component (below). The three terms are:
- the spread of the M samples, scaled;
- a cell-level error scale τ(z) = exp(error_bias + error_weight z) from the latent, times
  a floor. The errors are mostly per cell, and the dropout spread does not see them
  (:mod:`~neuroscale_coupling.surrogate.calibration`);
- a term for cells outside the training family: e = max(0, ρ − 1) with ρ the latent
  Mahalanobis distance of the cell to the training cells over the 99th percentile of its
  leave-one-out value (:meth:`SANO.fit_family`, :meth:`SANO.family_ratio`). The dropout
  spread alone does not see a foreign cell (it measures how the last layer varies, not
  how far the latent lies from what training showed); the distance term does. A ratio
  measured otherwise (``decode(family=…)``: the image two-point-correlation ratio of
  :mod:`neuroscale_coupling.surrogate.image_family`, which
  :class:`~neuroscale_coupling.surrogate.model_file.Surrogate` passes) replaces ρ where
  it is larger.

The calibrated central interval of level p is ±k_p·std, k_p from the fitted table
``interval_table`` (:meth:`SANO.interval_multipliers`; the errors are not Gaussian).
Per symmetry class of the cell (its :func:`~neuroscale_coupling.cell.symmetry.symmetry_order`,
passed as ``decode(symmetry=…)``), the std of response component j is multiplied by
``class_std_factor[class, j]`` and the multipliers come from ``class_interval_table``
(:func:`~neuroscale_coupling.surrogate.calibration.fit_symmetry_classes`). Without it,
the pooled calibration applies.
Buffers default to scale 1, floor 0, τ = 1, Gaussian k_p, class factors 1 and no family
(ρ = 0): the raw spread. :meth:`SANO.kl` is the concrete-dropout KL term for the loss.

Symmetry (D4): the model receives wavelet coefficients, so the group acts at the image
level through :func:`d4_average` (caller side), which averages any predictor over the 8
transforms and is exactly equivariant.
The encoders (and the ablation variants) are in
:mod:`~neuroscale_coupling.surrogate.encoders`, the decoders in
:mod:`~neuroscale_coupling.surrogate.decoders`, the architecture in
:class:`~neuroscale_coupling.surrogate.config.SANOConfig`.
"""

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from neuroscale_coupling.cell.state_layout import layout_of
from neuroscale_coupling.cell.symmetry import SYMMETRY_ORDERS
from neuroscale_coupling.log import get_logger
from neuroscale_coupling.surrogate.calibration import (
    LEVELS_P,
    gaussian_multipliers,
    interval_multipliers,
)
from neuroscale_coupling.surrogate.config import SANOConfig
from neuroscale_coupling.surrogate.decoders import StressDecoder, ThermalPotentialDecoder
from neuroscale_coupling.surrogate.encoders import CNNEncoder, DescriptorEncoder, MultiScaleEncoder
from neuroscale_coupling.surrogate.uncertainty import MCDropoutMasks

__all__ = ["SANO", "SANOPrediction", "symmetry_class"]


def symmetry_class(order: np.ndarray) -> np.ndarray:
    """Row (B,) of the class tables for symmetry orders (B,) in 1, 2, 4, 8."""
    o = np.asarray(order).reshape(-1)
    index = np.searchsorted(SYMMETRY_ORDERS, o)
    bad = (index >= len(SYMMETRY_ORDERS)) | (
        np.asarray(SYMMETRY_ORDERS)[np.minimum(index, len(SYMMETRY_ORDERS) - 1)] != o
    )
    if np.any(bad):
        raise ValueError(
            f"symmetry orders must be among {SYMMETRY_ORDERS} (symmetry_order of the cells); "
            f"got {np.unique(o[bad]).tolist()}"
        )
    return index


_log = get_logger(__name__)


@dataclass(frozen=True)
class SANOPrediction:
    """Decoder output for N points.

    response (N, r): mean over the M samples; tangent (N, r, d): its exact derivative w.r.t.
    the state; std (N, r): per-component std over the samples × std_scale (exactly 0
    without dropout); samples (N, M, r) (M = 1 without dropout) or None.
    """

    response: torch.Tensor
    tangent: torch.Tensor
    std: torch.Tensor
    samples: torch.Tensor | None = None


class SANO(nn.Module):
    """Scale-adaptive neural operator: wavelet coefficients + macro state → response, tangent,
    std. Float32 by default; ``.double()`` / ``.to(device)`` as any module."""

    def __init__(self, config: SANOConfig) -> None:
        super().__init__()
        if not isinstance(config, SANOConfig):
            raise TypeError(f"config must be a SANOConfig; got {type(config).__name__}")
        self.config = config
        self.encoder: MultiScaleEncoder | CNNEncoder | DescriptorEncoder = {
            "wavelet": MultiScaleEncoder,
            "cnn": CNNEncoder,
            "descriptors": DescriptorEncoder,
        }[config.encoder](config)
        self.decoder: ThermalPotentialDecoder | StressDecoder = (
            ThermalPotentialDecoder(config)
            if config.physics == "thermal"
            else StressDecoder(config)
        )
        self.masks = MCDropoutMasks(
            config.hidden,
            config.samples,
            config.dropout,
            learn_p=config.learn_dropout,
            temperature=config.concrete_temperature,
            seed=config.mask_seed,
        )
        # Scaling of physical states/responses (set from the training domain):
        # G or E → /state_scale; θ → (θ − theta_ref)/theta_scale; response = response_scale·Q̂.
        for name, value in (
            ("state_scale", 1.0),
            ("theta_ref", 0.0),
            ("theta_scale", 1.0),
            ("response_scale", 1.0),
            ("std_scale", 1.0),
        ):
            self.register_buffer(name, torch.tensor(value))
        self.register_buffer("std_floor", torch.zeros(config.response_dim))
        # Cell error scale τ(z) = exp(error_bias + error_weight z) (normalized response units;
        # zeros: τ = 1) and the interval multipliers k_p at LEVELS_P (default Gaussian z_p).
        self.register_buffer("error_weight", torch.zeros(config.response_dim, config.latent))
        self.register_buffer("error_bias", torch.zeros(config.response_dim))
        gauss = torch.as_tensor(gaussian_multipliers(LEVELS_P), dtype=torch.float32)
        self.register_buffer("interval_table", gauss)
        # Per symmetry class (rows: orders 1, 2, 4, 8): std factor per response component
        # and multipliers.
        classes = len(SYMMETRY_ORDERS)
        self.register_buffer("class_std_factor", torch.ones(classes, config.response_dim))
        self.register_buffer("class_interval_table", gauss.repeat(classes, 1))
        # Training-family statistics of the latents (fit_family); scale 0 = not fitted.
        self.register_buffer("family_mean", torch.zeros(config.latent))
        self.register_buffer("family_precision", torch.eye(config.latent))
        self.register_buffer("family_scale", torch.tensor(0.0))
        self.register_buffer("family_gain", torch.tensor(1.0))

    # -- configuration helpers
    def reset_masks(self, seed: int) -> None:
        """Regenerate the M fixed inference masks from ``seed``."""
        self.masks.reset(seed)

    def set_scaling(
        self,
        *,
        state_scale: float = 1.0,
        theta_ref: float = 0.0,
        theta_scale: float = 1.0,
        response_scale: float = 1.0,
    ) -> None:
        """Set the normalization of states and responses (positive scales)."""
        for name, v in (
            ("state_scale", state_scale),
            ("theta_scale", theta_scale),
            ("response_scale", response_scale),
        ):
            if not v > 0:
                raise ValueError(f"{name}={v} must be > 0")
        for name, v in (
            ("state_scale", state_scale),
            ("theta_ref", theta_ref),
            ("theta_scale", theta_scale),
            ("response_scale", response_scale),
        ):
            getattr(self, name).fill_(float(v))

    def set_std_scale(self, scale: float) -> None:
        """Calibration factor s ≥ 0 multiplying the dropout spread (fitted on the
        validation split)."""
        if not scale >= 0:
            raise ValueError(f"std scale {scale} must be >= 0")
        self.std_scale.fill_(float(scale))

    def set_std_floor(self, floor: Sequence[float]) -> None:
        """Calibration floor (r,) ≥ 0 in response units: floor·τ(z) is added in quadrature
        to the scaled spread (fitted on the validation split)."""
        f = torch.as_tensor(floor, dtype=self.std_floor.dtype).reshape(-1)
        if f.shape != self.std_floor.shape or not bool(torch.all(f >= 0)):
            raise ValueError(f"std floor {floor} must hold {self.std_floor.numel()} values >= 0")
        self.std_floor.copy_(f)

    def set_cell_error_head(self, weight: Any, bias: Any) -> None:
        """Cell error scale τ(z) = exp(bias + weight z): weight (r, latent), bias (r,), in
        normalized response units (:func:`~neuroscale_coupling.surrogate.calibration.
        fit_cell_error_head`)."""
        w = torch.as_tensor(np.asarray(weight, dtype=float), dtype=self.error_weight.dtype)
        b = torch.as_tensor(np.asarray(bias, dtype=float), dtype=self.error_bias.dtype)
        if w.shape != self.error_weight.shape or b.shape != self.error_bias.shape:
            raise ValueError(
                f"cell error head: weight {tuple(w.shape)} and bias {tuple(b.shape)} must be "
                f"{tuple(self.error_weight.shape)} and {tuple(self.error_bias.shape)}"
            )
        if not bool(torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise ValueError("cell error head: weight and bias must be finite")
        self.error_weight.copy_(w)
        self.error_bias.copy_(b)

    def cell_error_scale(self, latent: torch.Tensor) -> torch.Tensor:
        """τ (B, r) of latents (B, latent), normalized response units (1 when not fitted)."""
        z = latent.to(self.error_weight.dtype)
        return torch.exp(self.error_bias + z @ self.error_weight.T).to(latent.dtype)

    def set_interval_multipliers(
        self,
        table: Sequence[float],
        class_factor: Sequence[float] | None = None,
        class_table: Any = None,
    ) -> None:
        """Multipliers k_p (19,) > 0 at :data:`~neuroscale_coupling.surrogate.calibration.
        LEVELS_P`: the level-p interval of a response component is ±k_p·std. Per symmetry
        class (rows: orders 1, 2, 4, 8): std factors class_factor (4, r) > 0 per response
        component ((4,): one factor for every component) and multipliers class_table
        (4, 19) (:func:`~neuroscale_coupling.surrogate.calibration.fit_symmetry_classes`);
        None: factor 1 and the pooled table for every class."""
        interval_multipliers(0.5, table)  # validates
        k = np.asarray(table, dtype=float)
        classes, r = self.class_std_factor.shape
        factor = np.ones((classes, r)) if class_factor is None else np.asarray(class_factor, float)
        if factor.shape == (classes,):
            factor = np.repeat(factor[:, None], r, axis=1)
        rows = np.tile(k, (classes, 1)) if class_table is None else np.asarray(class_table, float)
        if factor.shape != (classes, r) or np.any(~(factor > 0)) or rows.shape != (classes, k.size):
            raise ValueError(
                f"class factors must be ({classes}, {r}) or ({classes},), all > 0, and the "
                f"class table ({classes}, {k.size}); got {factor.shape}, {rows.shape}"
            )
        for row in rows:
            interval_multipliers(0.5, row)  # validates
        self.interval_table.copy_(torch.as_tensor(k))
        self.class_std_factor.copy_(torch.as_tensor(factor))
        self.class_interval_table.copy_(torch.as_tensor(rows))

    def class_factor(self, symmetry: Any) -> np.ndarray:
        """Std factors (B, r) of the symmetry classes of cells of symmetry orders (B,)."""
        return self.class_std_factor.double().cpu().numpy()[symmetry_class(symmetry)]

    def interval_multipliers(self, p: float | Sequence[float], symmetry: Any = None) -> np.ndarray:
        """k_p for levels p in (0, 1): the calibrated central interval is ±k_p·std
        (Gaussian z_p for a model without a fitted table). Pooled (L,) without
        ``symmetry``; with the symmetry orders (B,) of B cells, (L, B) from their classes'
        tables (the std of :meth:`decode` given the same orders)."""
        if symmetry is None:
            return interval_multipliers(p, self.interval_table.double().cpu().numpy())
        rows = symmetry_class(np.asarray(symmetry))
        table = self.class_interval_table.double().cpu().numpy()
        per_class = np.stack([interval_multipliers(p, t) for t in table], axis=1)  # (L, 4)
        return per_class[:, rows]

    @contextmanager
    def raw_std(self, *, family: bool = False) -> Iterator[None]:
        """Within the block the std is the raw spread of the M samples (scale 1, floor 0;
        with ``family`` the family term stays on); the calibration is restored afterwards."""
        scale, floor, gain, factor = (
            self.std_scale.clone(),
            self.std_floor.clone(),
            self.family_gain.clone(),
            self.class_std_factor.clone(),
        )
        self.std_scale.fill_(1.0)
        self.std_floor.zero_()
        self.class_std_factor.fill_(1.0)
        if not family:
            self.family_gain.zero_()
        try:
            yield
        finally:
            self.std_scale.copy_(scale)
            self.std_floor.copy_(floor)
            self.family_gain.copy_(gain)
            self.class_std_factor.copy_(factor)

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        """As torch's, accepting states saved before the calibration floor, the family
        statistics, the cell error head, the interval table and the symmetry classes
        existed (their defaults: floor 0, no family, τ = 1, Gaussian intervals, the pooled
        calibration for every class), and one class std factor for every component."""
        state = dict(state_dict)
        for name in ("std_floor", "family_mean", "family_precision", "family_scale"):
            state.setdefault(name, getattr(self, name).clone())
        # files without the cell error head and interval table: τ = 1, Gaussian intervals
        for name in ("error_weight", "error_bias"):
            state.setdefault(name, torch.zeros_like(getattr(self, name)))
        gauss = gaussian_multipliers(LEVELS_P)
        state.setdefault("interval_table", self.interval_table.new_tensor(gauss))
        state.setdefault("class_std_factor", torch.ones_like(self.class_std_factor))
        if state["class_std_factor"].ndim == 1:  # one factor per class, every component
            state["class_std_factor"] = (
                state["class_std_factor"][:, None].expand_as(self.class_std_factor).clone()
            )
        state.setdefault(
            "class_interval_table",
            state["interval_table"].repeat(len(SYMMETRY_ORDERS), 1),
        )
        state.setdefault("family_gain", torch.ones_like(self.family_gain))
        return super().load_state_dict(state, *args, **kwargs)

    @torch.no_grad()
    def fit_family(self, latents: torch.Tensor, *, quantile: float = 0.99) -> None:
        """Training-family statistics from the latents (C, latent) of the training cells:
        mean, precision (inverse covariance, ridge 1e-3 × mean variance: a degenerate family
        must not turn round-off into distance) and the unit of :meth:`family_ratio`: the
        ``quantile`` of the leave-one-out Mahalanobis distances, each distinct cell measured
        against the mean and covariance of the other cells (its copies, when a cell was
        drawn more than once, left out with it). In-sample distances understate how far a
        new member of the family lies when the distinct cells are few for the latent width
        (the second mechanical model: 31 distinct images, latent 8; in in-sample units a
        quarter of the held-out cells of its family lay beyond 1.25)."""
        z = latents.detach().to(torch.float64)
        n, dim = z.shape
        uniq, count = torch.unique(z, dim=0, return_counts=True)
        if uniq.shape[0] < 3:
            raise ValueError(
                f"fit_family needs the latents of >= 3 distinct cells; got {uniq.shape[0]}"
            )
        mean = z.mean(0)
        diff = z - mean
        scatter = diff.T @ diff
        ridge = 1e-3 * float(scatter.diagonal().mean()) / (n - 1) + 1e-12
        eye = torch.eye(dim, dtype=z.dtype, device=z.device)
        precision = torch.linalg.inv(scatter / (n - 1) + ridge * eye)
        # Without the m copies of a cell at d = u − mean: mean' = (n mean − m u)/(n − m),
        # scatter' = S − n m/(n − m) d dᵀ, and u − mean' = n/(n − m) d.
        rest = n - count.to(z.dtype)[:, None]  # (U, 1)
        du = uniq - mean
        down = torch.einsum("ui,uj->uij", (n * (n - rest) / rest) * du, du)
        cov = (scatter - down) / (rest - 1)[..., None] + ridge * eye
        sep = (n / rest) * du
        d = (sep * torch.linalg.solve(cov, sep[..., None])[..., 0]).sum(1).clamp_min(0).sqrt()
        dt = self.family_mean.dtype
        self.family_mean.copy_(mean.to(dt))
        self.family_precision.copy_(precision.to(dt))
        self.family_scale.fill_(float(torch.quantile(d, quantile)))

    @staticmethod
    def _mahalanobis(z: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
        diff = z - mean
        return torch.einsum("ni,ij,nj->n", diff, precision, diff).clamp_min(0).sqrt()

    def family_ratio(self, latent: torch.Tensor) -> torch.Tensor:
        """(B,) latent Mahalanobis distance to the training family over its 99th
        percentile (about 1 or below for cells like the training ones; 0 when the family
        was not fitted)."""
        if float(self.family_scale) <= 0:
            return torch.zeros(latent.shape[0], dtype=latent.dtype, device=latent.device)
        z = latent.to(self.family_mean.dtype)
        d = self._mahalanobis(z, self.family_mean, self.family_precision)
        return (d / self.family_scale).to(latent.dtype)

    def kl(self) -> torch.Tensor:
        """Concrete-dropout KL term of the masked decoder layer (0-d tensor)."""
        w = self.decoder.out_weight()
        return self.masks.kl(
            w.reshape(-1, w.shape[-1]),
            weight_reg=self.config.weight_reg,
            dropout_reg=self.config.dropout_reg,
        )

    # -- encoder
    def encode(
        self, coeffs: Sequence[torch.Tensor], *, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """coeffs [approx (B,1,h,w), detail_S (B,3,·,·), …, detail_1] → latent (B, latent).

        With ``return_attention`` also the per-scale attention mass (B, layers, S+1), scales
        in input order (approx, coarsest detail, …, finest detail); sums to 1 over scales.
        NaN for the ablation variants without attention (see :meth:`scale_attention`).
        """
        latent, mass = self.encoder(coeffs)
        if self.config.fraction_input:
            frac = coeffs[0].to(latent.dtype).mean((-2, -1))  # (B, 1), affine in the fraction
            latent = torch.cat([latent, frac], 1)
        return (latent, mass) if return_attention else latent

    def scale_attention(self, coeffs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-scale attention mass (B, layers, S+1), averaged over heads and queries.

        Undefined for the ablation variants without attention layers (``attention=False``,
        ``encoder="cnn"`` or ``"descriptors"``): all NaN, same shape, so that evaluation code
        runs unchanged and reports NaN."""
        return self.encoder(coeffs)[1]

    # -- decoder
    def _normalize(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized states (N, d) and d(normalized)/d(physical) per component (d,)."""
        d = states.shape[-1]
        scale = self.state_scale.expand(d).clone()
        shift = torch.zeros_like(scale)
        theta = layout_of(self.config.physics).theta_index
        if theta is not None:
            scale[theta] = self.theta_scale
            shift[theta] = self.theta_ref
        return (states - shift) / scale, 1.0 / scale

    def decode(
        self,
        latent: torch.Tensor,
        states: torch.Tensor,
        *,
        cells: torch.Tensor | None = None,
        return_samples: bool = False,
        family: torch.Tensor | None = None,
        symmetry: Any = None,
    ) -> SANOPrediction:
        """Decode latents (B, latent) at macro states (N, d).

        Row i uses latent[cells[i]] when ``cells`` (N,) is given, else latent[i] (B = N) or
        the single latent (B = 1). ``family`` (B,): a family ratio per latent row measured
        otherwise (the image distance of :class:`~neuroscale_coupling.surrogate.image_family.
        ImageFamily`); the std's family term uses the larger of it and the latent ratio.
        ``symmetry`` (B,): the symmetry order of each latent row's cell
        (:func:`~neuroscale_coupling.cell.symmetry.symmetry_order`), selecting its class's std
        factor; None: the pooled calibration.
        Differentiable w.r.t. the parameters when grad is enabled (the tangent included,
        for training on tangents).
        """
        cfg = self.config
        d, r = cfg.state_dim, cfg.response_dim
        dtype = self.state_scale.dtype
        states = torch.as_tensor(states, dtype=dtype, device=self.state_scale.device)
        if states.ndim != 2 or states.shape[1] != d:
            raise ValueError(f"states must have shape (N, {d}); got {tuple(states.shape)}")
        n = states.shape[0]
        if family is not None:
            family = torch.as_tensor(family, dtype=dtype, device=latent.device).reshape(-1)
            if family.shape[0] != latent.shape[0]:
                raise ValueError(
                    f"family has {family.shape[0]} ratios for {latent.shape[0]} latent rows"
                )
        factor = None
        if symmetry is not None:
            cls = symmetry_class(np.asarray(symmetry))
            if cls.shape[0] != latent.shape[0]:
                raise ValueError(
                    f"symmetry has {cls.shape[0]} orders for {latent.shape[0]} latent rows"
                )
            factor = self.class_std_factor.to(dtype)[torch.as_tensor(cls, device=latent.device)]
        if cells is not None:
            rows = torch.as_tensor(cells, device=latent.device)
            latent = latent[rows]
            family = None if family is None else family[rows]
            factor = None if factor is None else factor[rows]
        elif latent.shape[0] == 1:
            latent = latent.expand(n, -1)
            family = None if family is None else family.expand(n)
            factor = None if factor is None else factor.expand(n, -1)
        if latent.shape[0] != n:
            raise ValueError(
                f"latent has {latent.shape[0]} rows for {n} states: pass cells=(N,) indices"
            )
        s, ds = self._normalize(states)
        keep = self.masks()  # (M, H)
        # Eval mode: the mean is the expectation over the masks, exact because the masks
        # act linearly on the output (keep / (1 − p) has mean 1): the unmasked output
        # weights. The M fixed masks give the spread. Training: the mean of the M samples
        # (fresh relaxed masks), an unbiased estimate of the same expectation.
        exact_mean = not self.training and keep.shape[0] > 1
        if cfg.physics == "thermal":
            w = self.decoder.out_weight()
            c = w * keep  # (M, H)
            if exact_mean:
                c = torch.cat([w[None], c])
            q_samples, t = self.decoder.flux_and_tangent(s, latent, c, w if exact_mean else None)
            lam = cfg.convex_eps
            g = s[:, :2]
            q_samples = q_samples + 2 * lam * g[:, None]
            gg = 0.5 * (t[:, :, :2] + t[:, :, :2].transpose(1, 2))
            eye = torch.eye(2, dtype=dtype, device=s.device)
            gth = t[:, :, 2:]
            if cfg.linear_term or cfg.quartic_term:
                flux, hess, dth = self.decoder.polynomial(s, latent)
                q_samples = q_samples + flux[:, None]
                gg = gg + hess
                gth = gth + dth[:, :, None]
            tangent = torch.cat([gg + 2 * lam * eye, gth], dim=2)
        else:
            k, jac = self.decoder.hidden_and_jacobian(s, latent)
            out = self.decoder.out_weight()
            w = out[None] * keep[:, None, :]  # (M, 3, H)
            if exact_mean:
                w = torch.cat([out[None], w])
            q_samples = torch.einsum("mrh,nh->nmr", w, k)
            tangent = torch.einsum("rh,nhd->nrd", out if exact_mean else w.mean(0), jac)
            if cfg.linear_term:
                stiff = self.decoder.linear_matrix(latent)
                q_samples = q_samples + torch.einsum("nij,nj->ni", stiff, s)[:, None]
                tangent = tangent + stiff
        rs = self.response_scale
        samples = rs * q_samples
        if exact_mean:
            response, samples = samples[:, 0], samples[:, 1:]
        else:
            response = samples.mean(1)
        tangent = rs * tangent * ds  # chain rule through the state normalization
        m = samples.shape[1]
        std = samples.std(1, correction=0) if m > 1 else torch.zeros_like(response)
        tau = self.cell_error_scale(latent)
        std = torch.sqrt((std * self.std_scale) ** 2 + (self.std_floor * tau) ** 2)
        if factor is not None:
            std = std * factor
        fitted = float(self.family_scale) > 0
        if (fitted or family is not None) and float(self.family_gain) > 0:
            ratio = self.family_ratio(latent)
            if family is not None:
                ratio = torch.maximum(ratio, family)
            excess = (ratio - 1).clamp_min(0)
            size = response.detach().norm(dim=1)
            std = torch.sqrt(std**2 + (self.family_gain * excess * size)[:, None] ** 2)
        if tangent.shape != (n, r, d):  # pragma: no cover - internal consistency
            raise RuntimeError(f"tangent shape {tuple(tangent.shape)} != {(n, r, d)}")
        return SANOPrediction(
            response=response,
            tangent=tangent,
            std=std,
            samples=samples if return_samples else None,
        )

    def forward(
        self,
        coeffs: Sequence[torch.Tensor],
        states: torch.Tensor,
        *,
        cells: torch.Tensor | None = None,
        return_samples: bool = False,
    ) -> SANOPrediction:
        """encode then decode (see :meth:`decode` for ``cells``)."""
        return self.decode(self.encode(coeffs), states, cells=cells, return_samples=return_samples)
