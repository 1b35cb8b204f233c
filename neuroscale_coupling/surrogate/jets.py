"""Activations with their derivatives, and the symmetric positive definite matrix jet, as
the decoders propagate them explicitly (values, gradients and Hessian rows in one batched
pass, no nested autodiff).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import jacfwd


def value_and_jac(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """s ↦ (J (H, d), value (H,)) by forward-mode autodiff in one pass."""

    def both(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = fn(s)
        return y, y

    return jacfwd(both, has_aux=True)


def silu(x: torch.Tensor) -> torch.Tensor:
    """x·sigmoid(x), written out so that nested forward-mode AD works without autograd."""
    return x * torch.sigmoid(x)


def silu_derivs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """silu(x), silu'(x), silu''(x)."""
    sig = torch.sigmoid(x)
    one_minus = 1 - sig
    return x * sig, sig * (1 + x * one_minus), sig * one_minus * (2 + x * (1 - 2 * sig))


def softplus_derivs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softplus(x), softplus'(x), softplus''(x), consistent with F.softplus's linear branch
    (x > 20: value x, slope 1, curvature 0), as torch's own derivative rules are."""
    sig = torch.sigmoid(x)
    lin = x > 20.0
    d1 = torch.where(lin, torch.ones_like(sig), sig)
    d2 = torch.where(lin, torch.zeros_like(sig), sig * (1 - sig))
    return F.softplus(x), d1, d2


def spd_jet(
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
