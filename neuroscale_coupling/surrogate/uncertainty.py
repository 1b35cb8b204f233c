"""Monte Carlo dropout with a fixed set of masks and a concrete-dropout KL term.

At inference the M keep-masks come from a stored uniform-noise buffer (``noise`` (M, H)),
thresholded at the dropout rate: the M sampled networks are fixed, so the mean prediction is
a smooth deterministic function of the input and does not depend on how points are split
over ranks. The buffer changes only through :meth:`MCDropoutMasks.reset` (explicit seed).
In training mode fresh noise is drawn each call and the masks are the concrete (relaxed
Bernoulli) relaxation, so the dropout rate p can be learned (Gal, Hron & Kendall 2017).
"""

import math

import torch
from torch import nn

__all__ = ["MCDropoutMasks"]


class MCDropoutMasks(nn.Module):
    """M dropout keep-masks over H units, scaled by 1/(1 − p).

    Args:
        units: H, width of the masked layer.
        samples: M.
        p: initial dropout rate in [0, 1); p = 0 gives all-ones masks (no spread).
        learn_p: learn p (concrete dropout) when p > 0.
        temperature: concrete relaxation temperature (training only).
        seed: seed of the fixed inference masks.
    """

    def __init__(
        self,
        units: int,
        samples: int,
        p: float,
        *,
        learn_p: bool = True,
        temperature: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate p={p} must be in [0, 1)")
        if samples < 1:
            raise ValueError(f"samples={samples} must be >= 1")
        self.units, self.samples, self.temperature = units, samples, temperature
        self.enabled = p > 0.0
        logit = math.log(p / (1 - p)) if self.enabled else 0.0
        self.p_logit = nn.Parameter(torch.tensor(logit), requires_grad=learn_p and self.enabled)
        self.register_buffer("noise", torch.empty(samples, units))
        self.reset(seed)

    @property
    def p(self) -> torch.Tensor:
        """Current dropout rate (0-d tensor; exactly 0 when dropout is disabled)."""
        if not self.enabled:
            return torch.zeros((), dtype=self.noise.dtype, device=self.noise.device)
        return torch.sigmoid(self.p_logit)

    def reset(self, seed: int) -> None:
        """Regenerate the fixed inference masks from ``seed`` (the only way they change)."""
        gen = torch.Generator().manual_seed(int(seed))
        u = torch.rand(self.samples, self.units, generator=gen, dtype=torch.float64)
        self.noise.copy_(u.to(self.noise.dtype))

    def forward(self) -> torch.Tensor:
        """Keep-masks (M, H), already divided by (1 − p); fixed in eval mode.

        Without dropout a single all-ones mask (1, H): every sample would be identical.
        """
        if not self.enabled:
            return torch.ones_like(self.noise[:1])
        p = self.p.to(self.noise.dtype)
        if self.training:
            eps = torch.finfo(self.noise.dtype).eps
            u = torch.rand_like(self.noise).clamp(eps, 1 - eps)
            drop_logit = (torch.log(p) - torch.log1p(-p) + torch.log(u) - torch.log1p(-u)) / (
                self.temperature
            )
            keep = 1 - torch.sigmoid(drop_logit)
        else:
            keep = (self.noise >= p).to(self.noise.dtype)
        return keep / (1 - p)

    def kl(self, weight: torch.Tensor, *, weight_reg: float, dropout_reg: float) -> torch.Tensor:
        """Concrete-dropout KL approximation for the masked layer's weights (out, H).

        weight_reg·‖W‖²/(1 − p) + dropout_reg·H·(p log p + (1 − p) log(1 − p)); without
        dropout only the weight term weight_reg·‖W‖² remains.
        """
        sq = weight.pow(2).sum()
        if not self.enabled:
            return weight_reg * sq
        p = self.p
        neg_entropy = p * torch.log(p) + (1 - p) * torch.log1p(-p)
        return weight_reg * sq / (1 - p) + dropout_reg * self.units * neg_entropy
