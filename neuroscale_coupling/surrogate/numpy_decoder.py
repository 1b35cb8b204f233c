"""A plain-numpy float64 copy of the SANO thermal decoder, cheap enough to call per point.

The preCICE Micro Manager calls a micro simulation's ``solve`` once per macro point, and
torch costs microseconds per operation: one point decoded through
:meth:`~neuroscale_coupling.surrogate.model_file.Surrogate.decode` costs about 1.7 ms.
:class:`ThermalNumpyDecoder` computes the same answer for one point — response Q (2,),
its exact tangent dQ/d(G1, G2, θ) (2, 3) and the calibrated std (2,), as
:meth:`SANO.decode <neuroscale_coupling.surrogate.model.SANO.decode>` in eval mode (the
thermal potential decoder with its zero mode and polynomial terms, the fixed dropout
masks with the exact mean, the cell error scale, the symmetry class factor and the family
term) — from the model's float64 weights in plain numpy, about 110 small array operations
on (2, 10, H) jets. What depends on the cell alone (the latent part of both context
layers, the cell error scale, the class factor, the family term) is computed once per
cell (:meth:`ThermalNumpyDecoder.cell`). The operations are the torch decoder's, in the
same order up to summation order and algebraically equal forms of sigmoid and softplus
(overflow-free), so answers agree with the float64 torch decoder to round-off (about
1e-15 relative).

It is a second implementation of :mod:`~neuroscale_coupling.surrogate.decoders`' thermal
decoder, kept for its speed (the Micro Manager adapter's 0.1 ms a point against 1.7 ms): a
change to that decoder must be made here too; tests/test_micro_manager.py compares the two
for the shipped model and for every decoder option.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from neuroscale_coupling.surrogate.model import SANO, symmetry_class

__all__ = ["CellConstants", "ThermalNumpyDecoder"]

#: torch's softplus is the identity above this argument (beta = 1).
_SOFTPLUS_THRESHOLD = 20.0
#: exp is capped here inside sigmoid: sigmoid(40) is 1 in float64, as torch returns.
_EXP_CAP = 40.0


@dataclass(frozen=True)
class CellConstants:
    """What the decoder needs of one cell (:meth:`ThermalNumpyDecoder.cell`).

    ctx (C,): latent part of the context layers plus their biases (the trunk's H units,
    then the polynomial terms' H when the model has them); floor_tau (2,): std
    floor × cell error scale τ(z); factor (2,): the std factor of the cell's symmetry
    class; family_coef: family_gain · max(0, ratio − 1), the family term's coefficient of
    ‖Q‖; family_ratio: the ratio itself.
    """

    ctx: np.ndarray
    floor_tau: tuple[float, float]
    factor: tuple[float, float]
    family_coef: float
    family_ratio: float


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy().copy()


def _silu_derivs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """silu(x), silu'(x) (:func:`~neuroscale_coupling.surrogate.jets.silu_derivs`)."""
    ex = np.exp(np.minimum(x, _EXP_CAP))
    opx = 1.0 + ex
    sig = ex / opx  # 1 − sig = 1 / opx
    return x * sig, sig * (1.0 + x / opx)


def _softplus_derivs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """softplus(x), softplus'(x), softplus''(x), with torch's identity branch above 20
    (:func:`~neuroscale_coupling.surrogate.jets.softplus_derivs`)."""
    ex = np.exp(np.minimum(x, _SOFTPLUS_THRESHOLD))
    opx = 1.0 + ex
    f0 = np.log1p(ex)
    f1 = ex / opx
    f2 = f1 / opx
    if x.max() > _SOFTPLUS_THRESHOLD:
        lin = x > _SOFTPLUS_THRESHOLD
        f0, f1, f2 = np.where(lin, x, f0), np.where(lin, 1.0, f1), np.where(lin, 0.0, f2)
    return f0, f1, f2


def _softplus_d12(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """softplus'(x), softplus''(x) (as :func:`_softplus_derivs`)."""
    ex = np.exp(np.minimum(x, _SOFTPLUS_THRESHOLD))
    opx = 1.0 + ex
    f1 = ex / opx
    f2 = f1 / opx
    if x.max() > _SOFTPLUS_THRESHOLD:
        lin = x > _SOFTPLUS_THRESHOLD
        f1, f2 = np.where(lin, 1.0, f1), np.where(lin, 0.0, f2)
    return f1, f2


def _softplus(x: float) -> float:
    """torch's softplus of one float (identity above 20)."""
    return x if x > _SOFTPLUS_THRESHOLD else math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    """sigmoid of one float, without overflow."""
    ex = math.exp(min(x, _EXP_CAP))
    return ex / (1.0 + ex)


class ThermalNumpyDecoder:
    """Float64 numpy copy of ``SANO.decode`` for one point of a thermal model (module doc).

    model: a thermal SANO in eval mode (any dtype: its weights are read in float64, so the
    answers equal those of its float64 copy). Read once: later changes to the model (online
    enrichment) are not seen.
    """

    def __init__(self, model: SANO) -> None:
        cfg = model.config
        if cfg.physics != "thermal":
            raise ValueError(
                f"the numpy decoder decodes thermal models; this one is {cfg.physics!r}: "
                "use decoder='torch'"
            )
        if model.training:
            raise ValueError("the numpy decoder reads a model in eval mode: call model.eval()")
        dec = model.decoder
        self.hidden, self.layers = cfg.hidden, cfg.decoder_layers
        self.convex_eps = float(cfg.convex_eps)
        odd = cfg.zero_mode == "odd"
        self._odd = odd
        # branch 0 evaluates G, branch 1 −G (odd) or 0 (shift): the G argument's factor and
        # the derivative dg/dG of each branch
        self._amul = np.array([1.0, -1.0] if odd else [1.0, 0.0])[:, None]  # (2, 1)
        self._sign = np.array([1.0, -1.0] if odd else [1.0, 1.0])
        h = self.hidden
        with torch.no_grad():
            self._terms = ("linear",) * cfg.linear_term + ("quartic",) * cfg.quartic_term
            # Both context layers (the trunk's, and the polynomial terms' when present) read
            # (z, θ): one vector of their pre-activations, z's part computed per cell.
            ctx_layers = [dec.ctx] + ([dec.lin_ctx] if self._terms else [])
            w_ctx = np.concatenate([_np(lin.weight) for lin in ctx_layers])  # (C, L + 1)
            self._ctx_wz, self._ctx_wth = w_ctx[:, :-1].copy(), w_ctx[:, -1].copy()
            self._ctx_b = np.concatenate([_np(lin.bias) for lin in ctx_layers])
            # Every θ-linear layer of the trunk reads the trunk context u, the polynomial
            # head reads its own: one block matrix, per trunk layer k the rows of g_gate_k,
            # u_bias_k and (k > 0) h_gate_{k-1}, then the head.
            blocks, biases, self._rows = [], [], []
            start = 0
            for k in range(self.layers):
                lins = [dec.g_gate[k], dec.u_bias[k]] + ([dec.h_gate[k - 1]] if k else [])
                here = []
                for lin in lins:
                    blocks.append(_np(lin.weight))
                    biases.append(_np(lin.bias))
                    here.append(slice(start, start + h))
                    start += h
                self._rows.append(here)
            n_head = 3 * len(self._terms)
            big = np.zeros((w_ctx.shape[0], start + n_head))
            big[:h, :start] = np.concatenate(blocks).T
            bias = np.concatenate([*biases, np.zeros(n_head)])
            if self._terms:
                big[h:, start:] = _np(dec.lin.weight).T
                bias[start:] = _np(dec.lin.bias)
            self._gates_t, self._gates_b = np.ascontiguousarray(big), bias
            self._head = slice(start, start + n_head)
            self._w_in_t = [
                np.ascontiguousarray(_np(dec.g_in[k].weight).T) for k in range(self.layers)
            ]
            # (2 i, 2 branch, H): sign of the branch · column i of W_g
            self._sign_wg = [w[:, None, :] * self._sign[None, :, None] for w in self._w_in_t]
            self._h_t = [np.ascontiguousarray(_np(F.softplus(hr).t())) for hr in dec.h_raw]
            w = dec.out_weight()
            keep = model.masks()  # (M, H), fixed in eval mode
            self._exact_mean = keep.shape[0] > 1
            c = w * keep
            if self._exact_mean:
                c = torch.cat([w[None], c])
            c_t = _np(c).T  # (H, M(+1))
            if self._exact_mean:  # sample columns centred: their products are deviations
                c_t[:, 1:] -= c_t[:, 1:].mean(1, keepdims=True)
            # both branches at once: (2H, M(+1)), the second branch added (odd) or
            # subtracted (shift)
            self._c_t2 = np.ascontiguousarray(np.concatenate([c_t, c_t if odd else -c_t]))
            self._cbar = _np(w if self._exact_mean else c.mean(0))
            self._state_scale = float(model.state_scale)
            self._theta_ref = float(model.theta_ref)
            self._theta_scale = float(model.theta_scale)
            self._rs = float(model.response_scale)
            self._std_scale = float(model.std_scale)
            self._std_floor = _np(model.std_floor)
            self._error_w, self._error_b = _np(model.error_weight), _np(model.error_bias)
            self._class_factor = _np(model.class_std_factor)
            self._family_gain = float(model.family_gain)
            self._family_fitted = float(model.family_scale) > 0
            self._family_mean = _np(model.family_mean)
            self._family_precision = _np(model.family_precision)
            self._family_scale = float(model.family_scale)
        self._m = keep.shape[0]
        if not self._exact_mean and self._m != 1:  # pragma: no cover - SANO eval invariant
            raise RuntimeError("a model in eval mode with several masks decodes the exact mean")

    # ------------------------------------------------------------------ per cell
    def cell(self, latent: np.ndarray, family: float, symmetry: int) -> CellConstants:
        """The constants of one cell from its float64 latent (L,), its family ratio as
        :meth:`Surrogate.family_ratio <neuroscale_coupling.surrogate.model_file.Surrogate.
        family_ratio>` measures it and its symmetry order (1, 2, 4 or 8)."""
        z = np.asarray(latent, dtype=np.float64).reshape(-1)
        ratio = float(family)
        if self._family_fitted:
            d = z - self._family_mean
            latent_ratio = np.sqrt(max(float(d @ self._family_precision @ d), 0.0))
            ratio = max(ratio, latent_ratio / self._family_scale)
        tau = np.exp(self._error_b + z @ self._error_w.T)
        cls = int(symmetry_class(np.array([symmetry]))[0])
        coef = self._family_gain * max(ratio - 1.0, 0.0) if self._family_gain > 0 else 0.0
        return CellConstants(
            ctx=self._ctx_wz @ z + self._ctx_b,
            floor_tau=tuple((self._std_floor * tau).tolist()),
            factor=tuple(self._class_factor[cls].tolist()),
            family_coef=coef,
            family_ratio=ratio,
        )

    # ------------------------------------------------------------------ per point
    # The jet of the last layer's pre-activation is held as pre (10, 2, H): jet row, branch
    # (G and −G, or G and 0), hidden unit. Rows: 0 value, 1 ∂θ, 2–3 ∂G1, ∂G2, 4–9 the G
    # rows of the Hessian ∂G_i ∂(θ, G1, G2) (i = 1, 2), so that every update below works on
    # contiguous rows.

    def decode(
        self, cell: CellConstants, g1: float, g2: float, theta: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Response Q (2,), tangent dQ/d(G1, G2, θ) (2, 3) and calibrated std (2,) of one
        cell at the physical state (G1, G2, θ)."""
        q0, q1, k00, k01, k10, k11, k0t, k1t, s0, s1 = self.decode_floats(cell, g1, g2, theta)
        tangent = np.array([[k00, k01, k0t], [k10, k11, k1t]])
        return np.array([q0, q1]), tangent, np.array([s0, s1])

    def decode_floats(self, cell: CellConstants, g1: float, g2: float, theta: float) -> tuple:
        """:meth:`decode` as ten floats: Q1, Q2, dQ/dG row-major (4), dQ/dθ (2), std (2)."""
        h = self.hidden
        ss = self._state_scale
        s1, s2 = g1 / ss, g2 / ss
        th = (theta - self._theta_ref) / self._theta_scale
        wth = self._ctx_wth
        u = np.empty((2, wth.shape[0]))
        u[0], u1 = _silu_derivs(cell.ctx + th * wth)
        np.multiply(u1, wth, out=u[1])
        v = u @ self._gates_t  # (2, ·): the gates' (and head's) values and θ-derivatives
        v[0] += self._gates_b
        pre = np.zeros((10, 2, h))
        hb = pre[4:].reshape(2, 3, 2, h)
        for k in range(self.layers):
            rows = self._rows[k]
            if k > 0:
                gate = v[:, rows[2]]
                q0, q1, _ = _softplus_derivs(gate[0])
                pre = self._gated(pre, q0, q1 * gate[1])
                pre = (pre.reshape(20, h) @ self._h_t[k - 1]).reshape(10, 2, h)
                hb = pre[4:].reshape(2, 3, 2, h)
            b, c = v[:, rows[0]], v[:, rows[1]]  # (2, H): (b0, b1), (c0, c1)
            wt = self._w_in_t[k]
            a = s1 * wt[0] + s2 * wt[1]  # W_g G (H,)
            swg = self._sign_wg[k]  # (2 i, 2 branch, H): sign · W_g column i
            pre[0:2] += (a * b)[:, None] * self._amul + c[:, None]  # value, ∂θ
            pre[2:4] += swg * b[0]  # ∂G_i = sign W_g b0
            hb[:, 0] += swg * b[1]  # ∂G_i ∂θ = sign W_g b1
        # flux samples and Hessian rows of Σ c_h k_h, the zero-mode fix over the branches
        f1, f2 = _softplus_d12(pre[0])  # (2, H)
        jac_g = pre[2:4]  # (2 i, 2, H)
        w1, w2 = f1 * self._cbar, f2 * self._cbar
        q = (f1 * jac_g).reshape(2, 2 * h) @ self._c_t2  # (2, M(+1)): mean, deviations
        jac = pre[1:4].reshape(3, 2 * h)
        if self._odd:
            hes = (hb.reshape(6, 2 * h) @ w1.reshape(2 * h)).reshape(2, 3)
            hes += (jac_g * w2).reshape(2, 2 * h) @ jac.T
            hes *= 0.5
            q *= 0.5
        else:  # G columns of branch G, θ column of G minus that of 0
            per = [
                (hb[:, :, p] @ w1[p]).reshape(2, 3) + (jac_g[:, p] * w2[p]) @ pre[1:4, p].T
                for p in (0, 1)
            ]
            hes = per[0]
            hes[:, 0] -= per[1][:, 0]
        (t0t, t01, t02), (t1t, t11, t12) = hes.tolist()  # columns (θ, G1, G2)
        k01 = 0.5 * (t02 + t11)
        gg = [t01, k01, k01, t12]  # symmetric G-G block, row-major
        gth = [t0t, t1t]
        lam2 = 2.0 * self.convex_eps
        fl1, fl2 = lam2 * s1, lam2 * s2
        if self._terms:
            p1, p2 = self._polynomial(
                s1, s2, v[0, self._head].tolist(), v[1, self._head].tolist(), gg, gth
            )
            fl1, fl2 = fl1 + p1, fl2 + p2
        rs = self._rs
        m0, m1 = q[:, 0].tolist()
        r0, r1 = rs * (m0 + fl1), rs * (m1 + fl2)
        if self._exact_mean:  # spread of the M samples (the shared terms cancel)
            dev = q[:, 1:]
            v0, v1 = (dev * dev).sum(1).tolist()
            scale = rs * self._std_scale / math.sqrt(self._m)
            sp0, sp1 = math.sqrt(v0) * scale, math.sqrt(v1) * scale
        else:
            sp0 = sp1 = 0.0
        ft0, ft1 = cell.floor_tau
        fa0, fa1 = cell.factor
        sd0 = math.sqrt(sp0 * sp0 + ft0 * ft0) * fa0
        sd1 = math.sqrt(sp1 * sp1 + ft1 * ft1) * fa1
        if cell.family_coef > 0:
            fam = cell.family_coef * math.sqrt(r0 * r0 + r1 * r1)
            sd0, sd1 = math.sqrt(sd0 * sd0 + fam * fam), math.sqrt(sd1 * sd1 + fam * fam)
        dg, dt = rs / ss, rs / self._theta_scale
        return (
            r0, r1,
            (gg[0] + lam2) * dg, gg[1] * dg, gg[2] * dg, (gg[3] + lam2) * dg,
            gth[0] * dt, gth[1] * dt,
            sd0, sd1,
        )  # fmt: skip

    @staticmethod
    def _gated(pre: np.ndarray, gt0: np.ndarray, gt1: np.ndarray) -> np.ndarray:
        """Jet of softplus(pre)·gate, pre (10, 2, H), gate (H,) a function of θ only with
        ∂_θ gate = gt1 (:meth:`ThermalPotentialDecoder._gated_softplus_jet`)."""
        f0, f1, f2 = _softplus_derivs(pre[0])
        y = pre * (f1 * gt0)  # rows 1–9: σ'·gate times the jet; row 0 is set below
        h = pre.shape[2]
        jf = pre[2:4] * (f2 * gt0)  # (2 i, 2, H)
        yh = y[4:].reshape(2, 3, 2, h)
        yh += jf[:, None] * pre[1:4][None]  # σ''·gate J_Gi J_j
        y[0] = f0 * gt0
        y[1] += f0 * gt1
        yh[:, 0] += (f1 * gt1) * pre[2:4]  # σ' ∂θgate J_Gi
        return y

    def _polynomial(
        self,
        g1: float,
        g2: float,
        raw: list[float],
        draw: list[float],
        gg: list[float],
        gth: list[float],
    ) -> tuple[float, float]:
        """The polynomial terms of the potential at normalized G = (g1, g2)
        (:meth:`ThermalPotentialDecoder.polynomial`) from the head's raw entries and their
        θ-derivatives (3 per term): returns their flux and adds their ∂/∂G to gg (row-major
        2×2) and ∂/∂θ to gth, in place."""
        f1 = f2 = 0.0
        for k, term in enumerate(self._terms):
            a0, a1, a2 = raw[3 * k : 3 * k + 3]
            d0, d1, d2 = draw[3 * k : 3 * k + 3]
            # L = [[l0, 0], [a2, l1]], A = L Lᵀ, dA = dL Lᵀ + L dLᵀ (spd_jet, d = 2)
            l0, l1 = _softplus(a0), _softplus(a1)
            m0, m1 = _sigmoid(a0) * d0, _sigmoid(a1) * d1
            b00, b01, b11 = l0 * l0, a2 * l0, a2 * a2 + l1 * l1
            e00 = 2.0 * (m0 * l0)
            e01 = d2 * l0 + a2 * m0
            e11 = 2.0 * (d2 * a2 + m1 * l1)
            bg0, bg1 = b00 * g1 + b01 * g2, b01 * g1 + b11 * g2
            dbg0, dbg1 = e00 * g1 + e01 * g2, e01 * g1 + e11 * g2
            if term == "linear":  # ½ Gᵀ A G: flux A G, ∂/∂G A, ∂/∂θ A' G
                f1, f2 = f1 + bg0, f2 + bg1
                gg[0] += b00
                gg[1] += b01
                gg[2] += b01
                gg[3] += b11
                gth[0] += dbg0
                gth[1] += dbg1
            else:  # ¼ (Gᵀ B G)²: flux q B G, ∂/∂G q B + 2 (BG)(BG)ᵀ, ∂/∂θ q' BG + q B'G
                qv = g1 * bg0 + g2 * bg1
                dq = g1 * dbg0 + g2 * dbg1
                f1, f2 = f1 + qv * bg0, f2 + qv * bg1
                gg[0] += qv * b00 + 2.0 * bg0 * bg0
                gg[1] += qv * b01 + 2.0 * bg0 * bg1
                gg[2] += qv * b01 + 2.0 * bg1 * bg0
                gg[3] += qv * b11 + 2.0 * bg1 * bg1
                gth[0] += dq * bg0 + qv * dbg0
                gth[1] += dq * bg1 + qv * dbg1
        return f1, f2
