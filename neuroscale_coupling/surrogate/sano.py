"""SANO: scale-adaptive neural operator surrogate of the homogenized cell response.

Input: per-level wavelet coefficients of the cell image, in PyWavelets ``wavedec2`` order
with the three details of a level stacked: ``coeffs = [approx (B, 1, h_S, w_S),
detail_S (B, 3, h_S, w_S), …, detail_1 (B, 3, h_1, w_1)]`` (coarsest first; level 1 is the
finest; sizes n/2^l for ``mode="periodization"``, other sizes are padded periodically).

Pipeline: tokens per scale (patch projection + learned scale embedding + periodic Fourier
position encoding) → scale-adaptive attention across all tokens (per-scale attention mass
exposed) → mean pooling → latent (B, latent). ``encode`` and ``decode`` are separate so
that a closure encodes a cell once and decodes many macro states.

Decoders (response and tangent consistent by construction; the tangent is the exact
derivative of the returned mean response: mechanical by explicit forward propagation of
the hidden layers' Jacobian w.r.t. E (measured 5x faster than batched torch.func jacfwd),
thermal by explicit forward propagation of value, gradient and the G rows of the Hessian
through the layers (plain differentiable torch code, batched over points, the M masks
sharing everything below the last hidden layer; ``odd`` evaluates G and −G and ``shift``
evaluates G and 0 in one batch, so both modes cost about the same):

* thermal: potential Ψ(z, G, θ) = Σ_j c_j k_j(z, G, θ) + λ|G|², k the last layer of a
  partially input-convex network (convex non-decreasing softplus, non-negative
  hidden-to-hidden weights, G entering affinely), c ≥ 0. Q = ∂Ψ/∂G, dQ/dG = ∂²Ψ/∂G² is
  symmetric positive definite (≥ 2λ), dQ/dθ = ∂²Ψ/∂G∂θ. Q(0) = 0 by construction:
  ``zero_mode="odd"`` uses k(G) ← ½(k(G) + k(−G)) (Ψ even, so Q odd in G: exact for the
  project's laws, q = k(θ, |g|) g), ``"shift"`` uses k(G) − k(0) − ∇_G k(0)·G.
* mechanical: stress head Σ(z, E) = W (k(z, E)), k an MLP; tangent dΣ/dE its Jacobian.
  Σ(0) = 0: ``"odd"`` uses ½(k(E) − k(−E)), ``"shift"`` uses k(E) − k(0).
* ``linear_term``: a term linear in the driving variable is added, from a matrix that is
  symmetric positive definite by construction (A = L Lᵀ, L lower triangular with a softplus
  diagonal, from a linear head on a context layer of z (and θ)). Thermal: ½ Gᵀ A(z, θ) G
  joins the potential, so Q gains A G, dQ/dG gains A and dQ/dθ gains (∂A/∂θ) G (∂A/∂θ by
  the same explicit θ-jet). ``quartic_term`` (thermal): ¼ (Gᵀ B(z, θ) G)² joins it too, B
  symmetric positive definite — convex, and the leading nonlinearity of the project's
  conductivities k0 (1 + αθ)(1 + β|g|²), whose potential is quadratic plus quartic in g.
  Both thermal terms start near zero. Mechanical: Σ gains D⁻¹ A(z) E with D = diag(1, 1, 2) (the
  tensor-shear Voigt order: the term derives from the energy ½ Eᵀ A E) and the tangent
  D⁻¹ A. The network then learns the nonlinear remainder around the effective stiffness.

``fraction_input``: the last latent component is not learned but the cell mean of the
normalized approximation coefficients (an affine function of the volume fraction, see the
``descriptors`` variant below), so that the decoder sees the first-order parameter of the
effective response exactly, for cells the encoder never saw.

Uncertainty: M fixed Monte Carlo dropout masks on the last hidden layer (the M samples
share the trunk and the derivatives of the hidden layer). The masks act linearly on the
output, so their expectation is exact: in eval mode the mean response and its tangent are
those of the unmasked output weights (the limit M → ∞ of the sample mean; with M = 16
fixed masks the sample mean itself was 2.8 % off on the thermal test split, the exact
mean 2.1 %), and the M samples give the spread. In training the mean of M fresh relaxed
masks is used, an unbiased estimate of it. Returned: mean response, its tangent, and
per-component calibrated std √((std_scale · spread)² + (std_floor · τ(z))² + (family_gain ·
e · ‖response‖)²). The three terms are:
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
  :mod:`neuroscale_coupling.surrogate.family`, which
  :class:`~neuroscale_coupling.surrogate.model_file.Surrogate` passes) replaces ρ where
  it is larger.

The calibrated central interval of level p is ±k_p·std, k_p from the fitted table
``interval_table`` (:meth:`SANO.interval_multipliers`; the errors are not Gaussian).
Per symmetry class of the cell (its :func:`~neuroscale_coupling.symmetry.symmetry_order`,
passed as ``decode(symmetry=…)``), the std of response component j is multiplied by
``class_std_factor[class, j]`` and the multipliers come from ``class_interval_table``
(:func:`~neuroscale_coupling.surrogate.calibration.fit_symmetry_classes`). Without it,
the pooled calibration applies.
Buffers default to scale 1, floor 0, τ = 1, Gaussian k_p, class factors 1 and no family
(ρ = 0): the raw spread. :meth:`SANO.kl` is the concrete-dropout KL term for the loss.

Ablation variants (``SANOConfig.encoder`` / ``attention``; the decoders are the same in
every variant, so a comparison isolates the encoder):

* ``encoder="wavelet", attention=True`` (default): the pipeline above.
* ``attention=False``: the same tokens are mean-pooled directly (no attention layers);
  the per-scale attention mass is undefined and :meth:`SANO.scale_attention` returns NaN.
* ``encoder="cnn"``: plain periodic CNN on the image. The received coefficients are turned
  back into an n × n field by the exact periodized Haar synthesis (fixed, in torch), one
  channel per band (1 + 3S channels whose sum is the inverse transform); a learned 1 × 1
  convolution combines them, which undoes the per-band scaling of the
  :class:`~neuroscale_coupling.surrogate.data.WaveletNormalizer` exactly (the band means
  only add a fixed 2^l-periodic offset pattern, which is not supplied). With the Haar
  wavelet (the training default) the network thus sees the phase-value image itself;
  with another wavelet it sees an orthogonal (invertible) rearrangement of it. Then
  ``layers + 1`` 3 × 3 convolutions with circular padding (SiLU), each followed by 2 × 2
  average pooling while the grid is larger than ``tokens_side``, global mean pooling,
  LayerNorm, linear head. ``attention`` is ignored. Needs periodization sizes n/2^l.
* ``encoder="descriptors"``: an MLP on one scalar cell descriptor, the cell mean of the
  normalized coarsest approximation coefficients. The low-pass filter of an orthogonal
  wavelet preserves means (× 2^S), so this is an affine function of the mean of the
  phase-value field, i.e. of the phase-1 volume fraction for two phases (exactly, with any
  orthogonal wavelet and periodization); the MLP's first layer is affine, so this is the
  same model class as an MLP on the volume fraction. ``attention`` is ignored.

Symmetry (D4): the model receives wavelet coefficients, so the group acts at the image
level through :func:`d4_average` (caller side), which averages any predictor over the 8
transforms and is exactly equivariant.
"""

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacfwd

from neuroscale_coupling.log import get_logger
from neuroscale_coupling.surrogate.attention import ScaleAttentionLayer, periodic_features
from neuroscale_coupling.surrogate.calibration import (
    LEVELS_P,
    gaussian_multipliers,
    interval_multipliers,
)
from neuroscale_coupling.surrogate.uncertainty import MCDropoutMasks
from neuroscale_coupling.symmetry import (
    D4,
    SYMMETRY_ORDERS,
    response_matrix,
    state_matrix,
    transform_image,
)

__all__ = ["SANO", "SANOConfig", "SANOPrediction", "d4_average"]


def _symmetry_class(order: np.ndarray) -> np.ndarray:
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

_DIMS = {"thermal": (3, 2), "mechanical": (3, 3)}  # physics -> (state dim d, response dim r)
_ENCODERS = ("wavelet", "cnn", "descriptors")


@dataclass(frozen=True)
class SANOConfig:
    """Architecture of a SANO model (recorded in model files via to_dict/from_dict).

    physics: "thermal" (state (G1, G2, θ), response Q) or "mechanical" (E → Σ).
    image_size: n of the cell images the patch sizes are chosen for.
    levels: S wavelet levels. tokens_side: at most this many tokens per side per level.
    d_model, heads, layers: attention encoder. pos_freqs: Fourier frequencies per axis.
    latent: latent width. hidden, decoder_layers: decoder width and depth.
    dropout: MC dropout rate p on the last decoder layer (0 disables the spread);
    learn_dropout: concrete dropout (p learned). samples: M fixed masks; mask_seed.
    convex_eps: λ of the λ|G|² term (thermal). zero_mode: "odd" or "shift" (see module doc).
    concrete_temperature, weight_reg, dropout_reg: concrete-dropout relaxation and KL weights.
    encoder: "wavelet" (default), "cnn" or "descriptors"; attention: attention layers of the
    wavelet encoder (False: mean pooling of the tokens). Ablation variants, see module doc.
    fraction_input: the last latent component is the cell mean of the normalized
    approximation coefficients (an affine function of the volume fraction, see module doc)
    instead of a learned one. linear_term: the response gets a term linear in the driving
    variable with a symmetric positive definite matrix of (z, θ); quartic_term (thermal):
    the potential gets ¼ (Gᵀ B G)² (see module doc). canonical_translation: images are
    rolled to their canonical position before the wavelet transform, in training and at
    inference (:mod:`neuroscale_coupling.translation`), so that translated copies of a
    periodic cell get the same latent (the encoder is not translation-invariant by
    itself). All are off by default (and in model files written before they existed).
    Measured on the mechanical family (15 epochs, test split): fraction_input and
    linear_term on, 2.3 % error on Σ against 4.5 % off. On the thermal family a linear
    term started at A ≈ I/2 stalled training on a linear fit; the thermal terms now start
    near zero.
    """

    physics: str = "thermal"
    image_size: int = 64
    levels: int = 3
    tokens_side: int = 8
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    pos_freqs: int = 4
    latent: int = 64
    hidden: int = 64
    decoder_layers: int = 2
    dropout: float = 0.1
    learn_dropout: bool = True
    samples: int = 16
    mask_seed: int = 0
    convex_eps: float = 1e-3
    zero_mode: str = "odd"
    concrete_temperature: float = 0.1
    weight_reg: float = 1e-6
    dropout_reg: float = 1e-5
    encoder: str = "wavelet"
    attention: bool = True
    fraction_input: bool = False
    linear_term: bool = False
    quartic_term: bool = False
    canonical_translation: bool = False

    def __post_init__(self) -> None:
        if self.encoder not in _ENCODERS:
            raise ValueError(
                f"unknown encoder {self.encoder!r}: choose one of {', '.join(_ENCODERS)}"
            )
        for name in ("attention", "canonical_translation"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if self.physics not in _DIMS:
            raise ValueError(f"unknown physics {self.physics!r}: choose 'thermal' or 'mechanical'")
        if self.zero_mode not in ("odd", "shift"):
            raise ValueError(f"unknown zero_mode {self.zero_mode!r}: choose 'odd' or 'shift'")
        if self.image_size >> self.levels < 1:
            raise ValueError(
                f"levels={self.levels} too many for image_size={self.image_size}: "
                "need image_size >= 2**levels"
            )
        for name in ("levels", "tokens_side", "d_model", "heads", "layers", "latent", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.quartic_term and self.physics != "thermal":
            raise ValueError("quartic_term is a term of the thermal potential: physics='thermal'")
        if self.fraction_input and self.latent < 2:
            raise ValueError(
                f"latent={self.latent} leaves no learned component next to the volume "
                "fraction (fraction_input=True): use latent >= 2"
            )
        if self.decoder_layers < 1:
            raise ValueError(f"decoder_layers={self.decoder_layers} must be >= 1")
        if self.convex_eps <= 0:
            raise ValueError(f"convex_eps={self.convex_eps} must be > 0 (strict convexity)")

    @property
    def learned_latent(self) -> int:
        """Latent components the encoder learns (the rest is the volume-fraction input)."""
        return self.latent - int(self.fraction_input)

    @property
    def state_dim(self) -> int:
        return _DIMS[self.physics][0]

    @property
    def response_dim(self) -> int:
        return _DIMS[self.physics][1]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON / weights_only-safe)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SANOConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SANOConfig keys {unknown}; known: {sorted(known)}")
        return cls(**data)


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


# ----------------------------------------------------------------------------- encoder


class MultiScaleEncoder(nn.Module):
    """Wavelet coefficients → latent (B, latent), with per-scale attention mass."""

    def __init__(self, cfg: SANOConfig) -> None:
        super().__init__()
        self.cfg = cfg
        s = cfg.levels
        sizes = [cfg.image_size >> s] + [cfg.image_size >> (s - i) for i in range(s)]
        self.patches = [max(1, size // cfg.tokens_side) for size in sizes]
        self.proj = nn.ModuleList(
            nn.Conv2d(1 if i == 0 else 3, cfg.d_model, p, stride=p)
            for i, p in enumerate(self.patches)
        )
        self.scale_embedding = nn.Embedding(s + 1, cfg.d_model)
        self.pos_proj = nn.Linear(4 * cfg.pos_freqs, cfg.d_model, bias=False)
        self.layers = nn.ModuleList(
            ScaleAttentionLayer(cfg.d_model, cfg.heads)
            for _ in range(cfg.layers if cfg.attention else 0)
        )
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.learned_latent)

    def _tokens(self, coeffs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if len(coeffs) != cfg.levels + 1:
            raise ValueError(
                f"expected {cfg.levels + 1} coefficient tensors [approx, detail_S, …, detail_1]; "
                f"got {len(coeffs)}"
            )
        tokens, scale_ids = [], []
        for i, (c, p, proj) in enumerate(zip(coeffs, self.patches, self.proj, strict=True)):
            want = 1 if i == 0 else 3
            if c.ndim != 4 or c.shape[1] != want:
                raise ValueError(
                    f"coefficient tensor {i} must have shape (B, {want}, h, w); "
                    f"got {tuple(c.shape)}"
                )
            c = c.to(self.head.weight.dtype)
            h, w = c.shape[-2:]
            ph, pw = (-h) % p, (-w) % p
            if ph or pw:
                c = F.pad(c, (0, pw, 0, ph), mode="circular")
            t = proj(c)  # (B, d, h', w')
            hh, ww = t.shape[-2:]
            a = (torch.arange(hh, dtype=t.dtype, device=t.device) * p + p / 2) / h
            b = (torch.arange(ww, dtype=t.dtype, device=t.device) * p + p / 2) / w
            pos = torch.stack(torch.meshgrid(a, b, indexing="ij"), -1).reshape(-1, 2)
            t = t.flatten(2).transpose(1, 2) + self.pos_proj(periodic_features(pos, cfg.pos_freqs))
            tokens.append(t + self.scale_embedding.weight[i])
            scale_ids.append(torch.full((hh * ww,), i, dtype=torch.long, device=t.device))
        return torch.cat(tokens, 1), torch.cat(scale_ids)

    def forward(self, coeffs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """coeffs → (latent (B, latent), attention mass per layer and scale (B, layers, S+1));
        the mass is NaN without attention layers (``attention=False``)."""
        x, ids = self._tokens(coeffs)
        if not self.cfg.attention:
            return self.head(self.norm(x.mean(1))), _no_attention(self.cfg, x)
        onehot = F.one_hot(ids, self.cfg.levels + 1)
        masses = []
        for layer in self.layers:
            x, m = layer(x, onehot)
            masses.append(m)
        return self.head(self.norm(x.mean(1))), torch.stack(masses, 1)


def _no_attention(cfg: SANOConfig, like: torch.Tensor) -> torch.Tensor:
    """NaN attention mass (B, layers, S+1) of an encoder without attention layers."""
    shape = (like.shape[0], cfg.layers, cfg.levels + 1)
    return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)


def _check_coeffs(cfg: SANOConfig, coeffs: Sequence[torch.Tensor]) -> None:
    if len(coeffs) != cfg.levels + 1:
        raise ValueError(
            f"expected {cfg.levels + 1} coefficient tensors [approx, detail_S, …, detail_1]; "
            f"got {len(coeffs)}"
        )
    for i, c in enumerate(coeffs):
        want = 1 if i == 0 else 3
        if c.ndim != 4 or c.shape[1] != want:
            raise ValueError(
                f"coefficient tensor {i} must have shape (B, {want}, h, w); got {tuple(c.shape)}"
            )


# Periodized Haar synthesis, pywt convention: rows A, H, V, D; column 2p + q is the output
# pixel (2i + p, 2j + q) of coefficient (i, j).
_HAAR_SYNTHESIS = (
    (0.5, 0.5, 0.5, 0.5),
    (0.5, 0.5, -0.5, -0.5),
    (0.5, -0.5, 0.5, -0.5),
    (0.5, -0.5, -0.5, 0.5),
)


def haar_band_fields(coeffs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-band periodized Haar synthesis: [approx (B,1,m,m), detail_S (B,3,m,m), …,
    detail_1 (B,3,n/2,n/2)] → (B, 1 + 3S, n, n), channel k the inverse transform of band k
    alone (approx, then H, V, D per level, coarsest first). The channel sum equals
    ``pywt.waverec2(..., "haar", mode="periodization")``."""
    m = int(coeffs[0].shape[-1])
    n = m << (len(coeffs) - 1)
    k = torch.tensor(_HAAR_SYNTHESIS, dtype=coeffs[0].dtype, device=coeffs[0].device)
    out = [coeffs[0].repeat_interleave(n // m, -2).repeat_interleave(n // m, -1) * (m / n)]
    for i, c in enumerate(coeffs[1:]):
        size = m << i
        if tuple(c.shape[-2:]) != (size, size):
            raise ValueError(
                f"encoder='cnn' needs periodization sizes: detail {i} has shape "
                f"{tuple(c.shape[-2:])}, expected ({size}, {size})"
            )
        b = c.shape[0]
        y = (c[..., None] * k[1:, None, None, :]).reshape(b, 3, size, size, 2, 2)
        y = y.permute(0, 1, 2, 4, 3, 5).reshape(b, 3, 2 * size, 2 * size)
        f = n // (2 * size)
        if f > 1:
            y = y.repeat_interleave(f, -2).repeat_interleave(f, -1) / f
        out.append(y)
    return torch.cat(out, 1)


class CNNEncoder(nn.Module):
    """Ablation: plain periodic CNN (``encoder="cnn"``, see module doc) → latent (B, latent)."""

    def __init__(self, cfg: SANOConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Conv2d(1 + 3 * cfg.levels, d, 1)
        self.convs = nn.ModuleList(
            nn.Conv2d(d, d, 3, padding=1, padding_mode="circular") for _ in range(cfg.layers + 1)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.learned_latent)

    def forward(self, coeffs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """coeffs → (latent (B, latent), NaN attention mass (B, layers, S+1))."""
        _check_coeffs(self.cfg, coeffs)
        dt = self.head.weight.dtype
        x = self.embed(haar_band_fields([c.to(dt) for c in coeffs]))
        for conv in self.convs:
            x = _silu(conv(x))
            if x.shape[-1] > self.cfg.tokens_side and x.shape[-1] % 2 == 0:
                x = F.avg_pool2d(x, 2)
        x = x.mean((-2, -1))
        return self.head(self.norm(x)), _no_attention(self.cfg, x)


class DescriptorEncoder(nn.Module):
    """Ablation: MLP on the cell mean of the normalized approximation coefficients (an affine
    function of the volume fraction, see module doc) → latent (B, latent)."""

    def __init__(self, cfg: SANOConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.inp = nn.Linear(1, d)
        self.mid = nn.ModuleList(nn.Linear(d, d) for _ in range(cfg.layers))
        self.head = nn.Linear(d, cfg.learned_latent)

    def forward(self, coeffs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """coeffs → (latent (B, latent), NaN attention mass (B, layers, S+1))."""
        _check_coeffs(self.cfg, coeffs)
        x = coeffs[0].to(self.head.weight.dtype).mean((-2, -1))  # (B, 1)
        x = _silu(self.inp(x))
        for lin in self.mid:
            x = _silu(lin(x))
        return self.head(x), _no_attention(self.cfg, x)


# ----------------------------------------------------------------------------- decoders


def _value_and_jac(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """s ↦ (J (H, d), value (H,)) by forward-mode autodiff in one pass."""

    def both(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = fn(s)
        return y, y

    return jacfwd(both, has_aux=True)


def _silu(x: torch.Tensor) -> torch.Tensor:
    """x·sigmoid(x), written out so that nested forward-mode AD works without autograd."""
    return x * torch.sigmoid(x)


def _silu_derivs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """silu(x), silu'(x), silu''(x)."""
    sig = torch.sigmoid(x)
    one_minus = 1 - sig
    return x * sig, sig * (1 + x * one_minus), sig * one_minus * (2 + x * (1 - 2 * sig))


def _softplus_derivs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softplus(x), softplus'(x), softplus''(x), consistent with F.softplus's linear branch
    (x > 20: value x, slope 1, curvature 0), as torch's own derivative rules are."""
    sig = torch.sigmoid(x)
    lin = x > 20.0
    d1 = torch.where(lin, torch.ones_like(sig), sig)
    d2 = torch.where(lin, torch.zeros_like(sig), sig * (1 - sig))
    return F.softplus(x), d1, d2


def _spd_jet(
    a: torch.Tensor, da: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Symmetric positive definite A = L Lᵀ (N, d, d) from raw entries a (N, d(d+1)/2):
    L lower triangular, diagonal softplus(a[:, :d]) > 0, below it a[:, d:] (row-major).
    With da (N, d(d+1)/2) = ∂a/∂t also ∂A/∂t = dL Lᵀ + L dLᵀ (N, d, d), else None."""
    k = a.shape[1]
    d = (math.isqrt(8 * k + 1) - 1) // 2
    rows, cols = torch.tril_indices(d, d, -1, device=a.device)
    diag = torch.arange(d, device=a.device)

    def lower(diag_vals: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        m = a.new_zeros(a.shape[0], d, d)
        m[:, diag, diag] = diag_vals
        m[:, rows, cols] = off
        return m

    low = lower(F.softplus(a[:, :d]), a[:, d:])
    spd = low @ low.transpose(1, 2)
    if da is None:
        return spd, None
    dlow = lower(torch.sigmoid(a[:, :d]) * da[:, :d], da[:, d:])
    dspd = dlow @ low.transpose(1, 2)
    return spd, dspd + dspd.transpose(1, 2)


# Jet layout of the thermal decoder: value, gradient w.r.t. s = (G1, G2, θ) and the two
# Hessian rows ∂_{G_i} ∂_s (i = 1, 2), stacked on axis -2 ahead of the hidden axis (H):
# index 0 value, 1..3 gradient, 4 + 3 i + j = ∂²/∂G_i∂s_j. Rows G of the Hessian are closed
# under the layers (the θ-only gates never produce a G row), so ∂²/∂θ² is never formed.
_J, _H = slice(1, 4), slice(4, 10)
_CHUNK = 1024  # points per block in ThermalPotentialDecoder.flux_and_tangent


class ThermalPotentialDecoder(nn.Module):
    """Partially input-convex network k(z, G, θ) (H,), convex in G for every (z, θ).

    The decoder propagates value, gradient and the G rows of the Hessian w.r.t. the state
    explicitly through the layers (:meth:`jet`), batched over points; no nested autodiff.
    """

    def __init__(self, cfg: SANOConfig) -> None:
        super().__init__()
        h, n = cfg.hidden, cfg.decoder_layers
        self.zero_mode = cfg.zero_mode
        self.ctx = nn.Linear(cfg.latent + 1, h)
        self.g_in = nn.ModuleList(nn.Linear(2, h, bias=False) for _ in range(n))
        self.g_gate = nn.ModuleList(nn.Linear(h, h) for _ in range(n))
        self.u_bias = nn.ModuleList(nn.Linear(h, h) for _ in range(n))
        self.h_gate = nn.ModuleList(nn.Linear(h, h) for _ in range(n - 1))
        init = float(np.log(np.expm1(1.0 / h)))
        self.h_raw = nn.ParameterList(
            nn.Parameter(init + 0.1 * torch.randn(h, h)) for _ in range(n - 1)
        )
        self.out_raw = nn.Parameter(float(np.log(np.expm1(1.0))) + 0.1 * torch.randn(h))
        # The polynomial terms (linear_term: ½ Gᵀ A G, quartic_term: ¼ (Gᵀ B G)²) have their
        # own context layer, and start near zero (softplus(−4) diagonals, small weights):
        # started at A ≈ I/2 the training stalled on a linear fit (validation loss 0.46
        # against 0.10 after 4 epochs).
        self.cfg_linear = cfg.linear_term
        self.n_poly = int(cfg.linear_term) + int(cfg.quartic_term)
        self.lin_ctx = nn.Linear(cfg.latent + 1, h) if self.n_poly else None
        self.lin = nn.Linear(h, 3 * self.n_poly) if self.n_poly else None
        if self.lin is not None:
            with torch.no_grad():
                self.lin.weight.mul_(0.1)
                self.lin.bias.zero_()
                self.lin.bias.view(self.n_poly, 3)[:, :2] = -4.0

    def out_weight(self) -> torch.Tensor:
        """Non-negative output weights (H,)."""
        return F.softplus(self.out_raw)

    def poly_matrices(
        self, s: torch.Tensor, z: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The symmetric positive definite matrices of the polynomial terms, A (if
        linear_term) then B (if quartic_term), each with its θ-derivative, (N, 2, 2) each, at
        normalized states s (N, 3), latents z (N, L)."""
        if self.lin is None or self.lin_ctx is None:
            raise RuntimeError("poly_matrices needs linear_term or quartic_term")
        u0, u1, _ = _silu_derivs(self.lin_ctx(torch.cat([z, s[:, 2:]], 1)))
        du = u1 * self.lin_ctx.weight[:, -1]
        raw, draw = self.lin(u0), F.linear(du, self.lin.weight)
        out = []
        for k in range(self.n_poly):
            spd, dspd = _spd_jet(raw[:, 3 * k : 3 * k + 3], draw[:, 3 * k : 3 * k + 3])
            out.append((spd, dspd))
        return out  # type: ignore[return-value]

    def polynomial(
        self, s: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flux (N, 2), ∂/∂G (N, 2, 2) and ∂/∂θ (N, 2) of the polynomial terms of the
        potential, ½ Gᵀ A G (flux A G) and ¼ (Gᵀ B G)² (flux q B G, q = Gᵀ B G; ∂/∂G
        q B + 2 (B G)(B G)ᵀ; ∂/∂θ (Gᵀ B' G) B G + q B' G), normalized units."""
        g = s[:, :2]
        mats = self.poly_matrices(s, z)
        flux = torch.zeros_like(g)
        hess = g.new_zeros(g.shape[0], 2, 2)
        dth = torch.zeros_like(g)
        if self.cfg_linear:
            a, da = mats.pop(0)
            flux = flux + torch.einsum("nij,nj->ni", a, g)
            hess = hess + a
            dth = dth + torch.einsum("nij,nj->ni", da, g)
        if mats:
            b, db = mats.pop(0)
            bg, dbg = torch.einsum("nij,nj->ni", b, g), torch.einsum("nij,nj->ni", db, g)
            q, dq = (g * bg).sum(1, keepdim=True), (g * dbg).sum(1, keepdim=True)
            flux = flux + q * bg
            hess = hess + q[..., None] * b + 2 * bg[:, :, None] * bg[:, None, :]
            dth = dth + dq * bg + q * dbg
        return flux, hess, dth

    def _raw(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g, th = s[:2], s[2:]
        u = _silu(self.ctx(torch.cat([z, th])))
        h = None
        for k in range(len(self.g_in)):
            pre = self.g_in[k](g) * self.g_gate[k](u) + self.u_bias[k](u)
            if h is not None:
                gate = F.softplus(self.h_gate[k - 1](u))
                pre = pre + F.linear(h * gate, F.softplus(self.h_raw[k - 1]))
            h = F.softplus(pre)
        return h

    def hidden(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """k(s) (H,) for one point s = (G1, G2, θ) (3,), latent z (L,), with ∇_G k(0) = 0.

        Reference implementation (single point, torch.func-compatible); :meth:`jet` is the
        batched fast path the model uses.
        """
        if self.zero_mode == "odd":
            flip = torch.tensor([-1.0, -1.0, 1.0], dtype=s.dtype, device=s.device)
            return 0.5 * (self._raw(s, z) + self._raw(s * flip, z))
        th = s[2:]

        def at_theta(g: torch.Tensor) -> torch.Tensor:
            return self._raw(torch.cat([g, th]), z)

        g0 = torch.zeros_like(s[:2])
        j0, k0 = _value_and_jac(at_theta)(g0)
        return self._raw(s, z) - k0 - j0 @ s[:2]

    @staticmethod
    def _theta_linear(
        lin: nn.Linear, u: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Linear layer on a θ-jet (value, ∂_θ), each (N, H). ∂²_θ is never needed: only
        the G rows of the Hessian are propagated."""
        return lin(u[0]), F.linear(u[1], lin.weight)

    def jet(self, s: torch.Tensor, z: torch.Tensor, g: torch.Tensor, sign: torch.Tensor) -> Any:
        """Explicit derivative propagation of the raw network (before the zero-mode fix).

        s (N, 3) normalized states (only θ = s[:, 2] is read), z (N, L) latents, g (P, N, 2)
        the G argument of each of P branches, sign (P,) the derivative dg/dG of the branch
        (g = sign·G, or G = 0 with sign 1 for the value at zero). Returns the jet of the
        last layer's pre-activation, (P, N, 10, H) in the layout of ``_J``/``_H`` above.
        """
        th = s[:, 2:]
        ctx = self.ctx(torch.cat([z, th], 1))
        w_th = self.ctx.weight[:, -1]
        u0, u1, _ = _silu_derivs(ctx)
        u = (u0, u1 * w_th)  # θ-jet of the context (N, H) each
        n_pts, n_h = u0.shape
        p = g.shape[0]
        sg = sign.to(u0)[:, None, None]  # (P, 1, 1)
        pre = torch.zeros(p, n_pts, 10, n_h, dtype=u0.dtype, device=u0.device)
        for k in range(len(self.g_in)):
            b0, b1 = self._theta_linear(self.g_gate[k], u)
            c0, c1 = self._theta_linear(self.u_bias[k], u)
            if k > 0:
                e0, e1 = self._theta_linear(self.h_gate[k - 1], u)
                q0, q1, _ = _softplus_derivs(e0)
                y = self._gated_softplus_jet(pre, q0, q1 * e1)
                pre = y @ F.softplus(self.h_raw[k - 1]).t()
            # + a·b + c, a = W_g g (G only), b and c θ only:
            # value a b0 + c0, ∂_G = sign W_g b0, ∂_θ = a b1 + c1, ∂_G∂_θ = sign W_g b1.
            a = self.g_in[k](g)  # (P, N, H)
            wg = self.g_in[k].weight.t()  # (2, H)
            pre[:, :, 0] += a * b0 + c0
            pre[:, :, 1:3] += sg[..., None] * wg * b0[:, None]
            pre[:, :, 3] += a * b1 + c1
            pre[:, :, 6] += sg * wg[0] * b1
            pre[:, :, 9] += sg * wg[1] * b1
        return pre

    @staticmethod
    def _gated_softplus_jet(
        pre: torch.Tensor, gt0: torch.Tensor, gt1: torch.Tensor
    ) -> torch.Tensor:
        """Jet of softplus(pre) ∘ gate, pre (P, N, 10, H), gate (N, H) depending on θ only
        with ∂_θ gate = gt1: σ·gate, (σ' J)·gate + σ ∂_θgate e_θ, (σ' H + σ'' J_G J)·gate +
        σ' J_G ∂_θgate e_θᵀ."""
        v, jac = pre[:, :, 0], pre[:, :, _J]
        f0, f1, f2 = _softplus_derivs(v)
        y = torch.empty_like(pre)
        y[:, :, 1:] = pre[:, :, 1:] * (f1 * gt0)[:, :, None]
        hes = y[:, :, _H].unflatten(2, (2, 3))
        hes.addcmul_((jac[:, :, :2] * (f2 * gt0)[:, :, None])[:, :, :, None], jac[:, :, None])
        y[:, :, 0] = f0 * gt0
        y[:, :, 3] += f0 * gt1
        fj = f1 * gt1
        y[:, :, 6] += fj * jac[:, :, 0]
        y[:, :, 9] += fj * jac[:, :, 1]
        return y

    def flux_and_tangent(
        self, s: torch.Tensor, z: torch.Tensor, c: torch.Tensor, cbar: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample flux and mean Hessian rows of Σ_h c_h k_h (no λ|G|² term).

        s (N, 3) normalized states, z (N, L) latents, c (M, H) output weights × masks.
        Returns q (N, M, 2) = ∂_G (c_m · k) and t (N, 2, 3) = ∂_G ∂_s (c̄ · k), c̄ = ``cbar``
        (H,) or by default the mean over the M rows, with the zero-mode correction (``odd``:
        average of G and −G in one batch; ``shift``: minus the value and G-gradient at
        G = 0, one batch as well).
        """
        chunk = _CHUNK
        if s.shape[0] > chunk:  # cache-sized blocks of points (the jets are ~20 H floats/point)
            parts = [
                self.flux_and_tangent(s[i : i + chunk], z[i : i + chunk], c, cbar)
                for i in range(0, s.shape[0], chunk)
            ]
            return torch.cat([q for q, _ in parts]), torch.cat([t for _, t in parts])
        gv = s[:, :2]
        if self.zero_mode == "odd":
            g = torch.stack([gv, -gv])
            sign = torch.tensor([1.0, -1.0])
        else:
            g = torch.stack([gv, torch.zeros_like(gv)])
            sign = torch.tensor([1.0, 1.0])
        pre = self.jet(s, z, g, sign)  # (2, N, 10, H)
        v, jac = pre[:, :, 0], pre[:, :, _J]
        _, f1, f2 = _softplus_derivs(v)
        jg = f1[:, :, None] * jac[:, :, :2]  # ∂_G k per branch (2, N, 2, H)
        cbar = c.mean(0) if cbar is None else cbar
        # Hessian rows, contracted with c̄ before the (large) elementwise products
        w1, w2 = f1 * cbar, f2 * cbar  # (2, N, H)
        hes = torch.einsum("pnkh,pnh->pnk", pre[:, :, _H], w1).unflatten(2, (2, 3))
        hes = hes + torch.einsum("pnih,pnjh,pnh->pnij", jac[:, :, :2], jac, w2)
        if self.zero_mode == "odd":
            q = 0.5 * torch.einsum("mh,nih->nmi", c, jg[0] + jg[1])
            t = 0.5 * (hes[0] + hes[1])
        else:
            q = torch.einsum("mh,nih->nmi", c, jg[0] - jg[1])
            t = torch.cat([hes[0, :, :, :2], hes[0, :, :, 2:] - hes[1, :, :, 2:]], 2)
        return q, t


class StressDecoder(nn.Module):
    """MLP k(z, E) (H,) with k(z, 0) = 0; Σ = W (mask ∘ k)."""

    def __init__(self, cfg: SANOConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.zero_mode = cfg.zero_mode
        self.ctx = nn.Linear(cfg.latent, h)
        self.e_in = nn.Linear(3, h, bias=False)
        self.e_gate = nn.Linear(h, h)
        self.u_bias = nn.Linear(h, h)
        self.mid = nn.ModuleList(nn.Linear(h, h) for _ in range(cfg.decoder_layers - 1))
        self.mid_ctx = nn.ModuleList(nn.Linear(h, h) for _ in range(cfg.decoder_layers - 1))
        self.out = nn.Linear(h, 3, bias=False)
        self.lin = nn.Linear(h, 6) if cfg.linear_term else None
        # Σ = D⁻¹ ∂W/∂E in the tensor-shear Voigt order (E12 counts twice in Σ:E)
        self.register_buffer("voigt_inv", torch.tensor([1.0, 1.0, 0.5]), persistent=False)

    def out_weight(self) -> torch.Tensor:
        """Output weights (3, H)."""
        return self.out.weight

    def linear_matrix(self, z: torch.Tensor) -> torch.Tensor:
        """Stiffness C(z) (N, 3, 3) of the linear term Σ = C E: C = D⁻¹ A with A symmetric
        positive definite and D = diag(1, 1, 2) (tensor-shear Voigt), so that the term
        derives from the energy ½ Eᵀ A E; latents z (N, L)."""
        if self.lin is None:
            raise RuntimeError("linear_matrix needs a model with linear_term=True")
        spd, _ = _spd_jet(self.lin(_silu(self.ctx(z))))
        return self.voigt_inv.to(spd)[:, None] * spd

    def _raw(self, e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        u = _silu(self.ctx(z))
        h = _silu(self.e_in(e) * self.e_gate(u) + self.u_bias(u))
        for lin, ctx in zip(self.mid, self.mid_ctx, strict=True):
            h = _silu(lin(h) + ctx(u))
        return h

    def hidden(self, e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """k(E) (H,) for one point E (3,), latent z (L,), with k(0) = 0.

        Reference implementation (single point, torch.func-compatible);
        :meth:`hidden_and_jacobian` is the batched fast path the model uses."""
        if self.zero_mode == "odd":
            return 0.5 * (self._raw(e, z) - self._raw(-e, z))
        return self._raw(e, z) - self._raw(torch.zeros_like(e), z)

    def _raw_jet(self, e: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw hidden layer (B, H) and its Jacobian w.r.t. E (B, H, 3), forward propagated:
        e (B, 3), context u (B, H)."""
        pre = self.e_in(e) * self.e_gate(u) + self.u_bias(u)
        jac = self.e_gate(u)[:, :, None] * self.e_in.weight  # (B, H, 3)
        h, dh, _ = _silu_derivs(pre)
        jac = dh[:, :, None] * jac
        for lin, ctx in zip(self.mid, self.mid_ctx, strict=True):
            h, dh, _ = _silu_derivs(lin(h) + ctx(u))
            jac = dh[:, :, None] * (lin.weight @ jac)
        return h, jac

    def hidden_and_jacobian(
        self, e: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k (N, H) of :meth:`hidden` and its Jacobian dk/dE (N, H, 3), batched over points
        e (N, 3), latents z (N, L); both branches of the zero-mode fix in one batch."""
        u = _silu(self.ctx(z))
        n = e.shape[0]
        other = -e if self.zero_mode == "odd" else torch.zeros_like(e)
        h, jac = self._raw_jet(torch.cat([e, other]), torch.cat([u, u]))
        if self.zero_mode == "odd":
            return 0.5 * (h[:n] - h[n:]), 0.5 * (jac[:n] + jac[n:])
        return h[:n] - h[n:], jac[:n]


# ----------------------------------------------------------------------------- model


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
        return self.class_std_factor.double().cpu().numpy()[_symmetry_class(symmetry)]

    def interval_multipliers(self, p: float | Sequence[float], symmetry: Any = None) -> np.ndarray:
        """k_p for levels p in (0, 1): the calibrated central interval is ±k_p·std
        (Gaussian z_p for a model without a fitted table). Pooled (L,) without
        ``symmetry``; with the symmetry orders (B,) of B cells, (L, B) from their classes'
        tables (the std of :meth:`decode` given the same orders)."""
        if symmetry is None:
            return interval_multipliers(p, self.interval_table.double().cpu().numpy())
        rows = _symmetry_class(np.asarray(symmetry))
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
        if self.config.physics == "thermal":
            scale[2] = self.theta_scale
            shift[2] = self.theta_ref
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
        otherwise (the image distance of :class:`~neuroscale_coupling.surrogate.family.
        ImageFamily`); the std's family term uses the larger of it and the latent ratio.
        ``symmetry`` (B,): the symmetry order of each latent row's cell
        (:func:`~neuroscale_coupling.symmetry.symmetry_order`), selecting its class's std
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
            cls = _symmetry_class(np.asarray(symmetry))
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


# ----------------------------------------------------------------------------- symmetry


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def d4_average(
    predict_fn: Callable[[np.ndarray, np.ndarray], Sequence[Any]],
    images: np.ndarray,
    states: np.ndarray,
    physics: str,
) -> tuple[np.ndarray, ...]:
    """Average a predictor over the 8 symmetries of the square; the result is D4-equivariant.

    predict_fn(images (N, n, n), states (N, d)) returns (response (N, r), tangent (N, r, d))
    or (response, tangent, std (N, r)) (numpy or torch). For each R in D4 the predictor runs
    on (transform_image(image, R), S_R state) and its output is mapped back:
    response Q_R⁻¹ f, tangent Q_R⁻¹ F' S_R (the exact derivative of the averaged response),
    variance (Q_R⁻¹)∘² std² (Q_R is a signed permutation). Returns the averaged tuple of the
    same length; std = sqrt of the mean mapped variance.
    """
    images = np.asarray(images)
    states = np.asarray(states, dtype=float)
    acc: list[np.ndarray] | None = None
    for rot in D4:
        s_r = state_matrix(rot, physics)
        q_inv = np.linalg.inv(response_matrix(rot, physics))
        out = [_np(o) for o in predict_fn(transform_image(images, rot), states @ s_r.T)]
        if len(out) not in (2, 3):
            raise ValueError(f"predict_fn must return 2 or 3 arrays; got {len(out)}")
        mapped = [out[0] @ q_inv.T, q_inv @ out[1] @ s_r]
        if len(out) == 3:
            mapped.append(out[2] ** 2 @ (q_inv**2).T)
        acc = mapped if acc is None else [a + b for a, b in zip(acc, mapped, strict=True)]
    res = [a / len(D4) for a in acc]
    if len(res) == 3:
        res[2] = np.sqrt(res[2])
    return tuple(res)
