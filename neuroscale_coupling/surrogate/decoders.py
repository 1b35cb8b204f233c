"""The SANO decoders: latent z and macro state → response and its exact tangent.

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
"""

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neuroscale_coupling.surrogate.config import SANOConfig
from neuroscale_coupling.surrogate.jets import (
    silu,
    silu_derivs,
    softplus_derivs,
    spd_jet,
    value_and_jac,
)

__all__ = ["StressDecoder", "ThermalPotentialDecoder"]


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
        u0, u1, _ = silu_derivs(self.lin_ctx(torch.cat([z, s[:, 2:]], 1)))
        du = u1 * self.lin_ctx.weight[:, -1]
        raw, draw = self.lin(u0), F.linear(du, self.lin.weight)
        out = []
        for k in range(self.n_poly):
            spd, dspd = spd_jet(raw[:, 3 * k : 3 * k + 3], draw[:, 3 * k : 3 * k + 3])
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
        u = silu(self.ctx(torch.cat([z, th])))
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
        j0, k0 = value_and_jac(at_theta)(g0)
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
        u0, u1, _ = silu_derivs(ctx)
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
                q0, q1, _ = softplus_derivs(e0)
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
        f0, f1, f2 = softplus_derivs(v)
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
        _, f1, f2 = softplus_derivs(v)
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
        spd, _ = spd_jet(self.lin(silu(self.ctx(z))))
        return self.voigt_inv.to(spd)[:, None] * spd

    def _raw(self, e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        u = silu(self.ctx(z))
        h = silu(self.e_in(e) * self.e_gate(u) + self.u_bias(u))
        for lin, ctx in zip(self.mid, self.mid_ctx, strict=True):
            h = silu(lin(h) + ctx(u))
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
        h, dh, _ = silu_derivs(pre)
        jac = dh[:, :, None] * jac
        for lin, ctx in zip(self.mid, self.mid_ctx, strict=True):
            h, dh, _ = silu_derivs(lin(h) + ctx(u))
            jac = dh[:, :, None] * (lin.weight @ jac)
        return h, jac

    def hidden_and_jacobian(
        self, e: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k (N, H) of :meth:`hidden` and its Jacobian dk/dE (N, H, 3), batched over points
        e (N, 3), latents z (N, L); both branches of the zero-mode fix in one batch."""
        u = silu(self.ctx(z))
        n = e.shape[0]
        other = -e if self.zero_mode == "odd" else torch.zeros_like(e)
        h, jac = self._raw_jet(torch.cat([e, other]), torch.cat([u, u]))
        if self.zero_mode == "odd":
            return 0.5 * (h[:n] - h[n:]), 0.5 * (jac[:n] + jac[n:])
        return h[:n] - h[n:], jac[:n]
