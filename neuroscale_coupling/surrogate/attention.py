"""Scale-adaptive attention across the wavelet tokens of all scales.

Tokens carry a scale id (0 = approximation, 1..S = detail levels, coarsest first). Each
layer computes softmax(Q Kᵀ/√d_k) explicitly so that the attention mass that the queries put
on every scale's tokens can be returned: ``scale_mass`` (B, S+1), averaged over heads and
queries, sums to one over scales.
"""

import math

import torch
from torch import nn

__all__ = ["ScaleAttentionLayer", "periodic_features"]


def periodic_features(pos: torch.Tensor, n_freqs: int) -> torch.Tensor:
    """Fourier features of cell positions pos (N, 2) in [0, 1)²: (N, 4·n_freqs).

    sin/cos(2π k x_i), k = 1..n_freqs: periodic with the cell, so tokens on opposite edges
    of the cell are neighbours.
    """
    k = torch.arange(1, n_freqs + 1, dtype=pos.dtype, device=pos.device)
    arg = 2 * math.pi * pos[:, :, None] * k  # (N, 2, K)
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1).reshape(pos.shape[0], -1)


class ScaleAttentionLayer(nn.Module):
    """Pre-norm transformer layer whose attention reports its mass per scale.

    Args:
        d_model: token width.
        heads: number of heads (must divide d_model).
    """

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be a multiple of heads={heads}")
        self.heads = heads
        self.d_k = d_model // heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model)
        )

    def forward(
        self, x: torch.Tensor, scale_onehot: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, d_model), scale_onehot (N, S+1) → (x (B, N, d_model), mass (B, S+1))."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, self.d_k).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, d_k)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.d_k), dim=-1)
        att = (w @ v).transpose(1, 2).reshape(b, n, d)
        x = x + self.out(att)
        x = x + self.mlp(self.norm2(x))
        mass = (w @ scale_onehot.to(w.dtype)).mean(dim=(1, 2))  # (B, S+1)
        return x, mass
