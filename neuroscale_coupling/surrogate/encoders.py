"""The SANO encoders: wavelet coefficients of a cell image → latent (B, latent) and the
per-scale attention mass.

Ablation variants (``SANOConfig.encoder`` / ``attention``; the decoders are the same in
every variant, so a comparison isolates the encoder):

* ``encoder="wavelet", attention=True`` (default): wavelet tokens per scale (patch
  projection + learned scale embedding + periodic Fourier position encoding), scale-adaptive
  attention across all tokens (:mod:`~neuroscale_coupling.surrogate.attention`), mean
  pooling, LayerNorm, linear head (:class:`MultiScaleEncoder`).
* ``attention=False``: the same tokens are mean-pooled directly (no attention layers);
  the per-scale attention mass is undefined and :meth:`SANO.scale_attention` returns NaN.
* ``encoder="cnn"``: plain periodic CNN on the image. The received coefficients are turned
  back into an n × n field by the exact periodized Haar synthesis (fixed, in torch), one
  channel per band (1 + 3S channels whose sum is the inverse transform); a learned 1 × 1
  convolution combines them, which undoes the per-band scaling of the
  :class:`~neuroscale_coupling.surrogate.inputs.WaveletNormalizer` exactly (the band means
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
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from neuroscale_coupling.surrogate.attention import ScaleAttentionLayer, periodic_features
from neuroscale_coupling.surrogate.config import SANOConfig
from neuroscale_coupling.surrogate.jets import silu

__all__ = ["CNNEncoder", "DescriptorEncoder", "MultiScaleEncoder", "haar_band_fields"]


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
            x = silu(conv(x))
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
        x = silu(self.inp(x))
        for lin in self.mid:
            x = silu(lin(x))
        return self.head(x), _no_attention(self.cfg, x)
