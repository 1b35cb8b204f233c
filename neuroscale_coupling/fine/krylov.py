"""Batched Krylov solvers for the spectral cell solver: preconditioned CG with a GMRES
rescue, one independent system per cell (and right-hand side), all systems advanced
together as one tensor (:func:`krylov_solve`).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from neuroscale_coupling.log import get_logger

_log = get_logger(__name__)


def batched_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-system inner product over the three trailing (component, i, j) dimensions."""
    return (x * y).sum(dim=(-3, -2, -1))


def per_system(v: torch.Tensor) -> torch.Tensor:
    return v[..., None, None, None]


@dataclass
class KrylovResult:
    x: torch.Tensor
    iterations: torch.Tensor  # int64, batch shape
    relres: torch.Tensor  # final relative residual, batch shape
    converged: torch.Tensor  # bool, batch shape
    breakdown: torch.Tensor  # bool, batch shape


def pcg(
    apply_a: Callable[[torch.Tensor], torch.Tensor],
    apply_m: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    rtol: torch.Tensor,
    maxiter: int,
    active: torch.Tensor,
) -> KrylovResult:
    """Batched preconditioned CG, x0 = 0. b: (*batch, c, n, n); rtol, active: batch shape.

    Each system has its own α, β and stopping test |r| <= rtol |b|; a system that has
    converged (or is inactive) gets α = 0 and stops changing.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    bnorm = torch.sqrt(batched_dot(b, b))
    tol = rtol * bnorm
    act = active & (bnorm > 0)
    iterations = torch.zeros(b.shape[:-3], dtype=torch.int64, device=b.device)
    breakdown = torch.zeros_like(act)
    rnorm = bnorm.clone()
    z = apply_m(r)
    p = z
    rz = batched_dot(r, z)
    for _ in range(maxiter):
        if not bool(act.any()):
            break
        ap = apply_a(p)
        pap = batched_dot(p, ap)
        bad = act & ~(pap > 0)  # non-positive curvature or NaN
        breakdown |= bad
        act = act & ~bad
        alpha = torch.where(act, rz / torch.where(act, pap, 1.0), 0.0)
        x = x + per_system(alpha) * p
        r = r - per_system(alpha) * ap
        iterations += act
        rnorm = torch.where(act, torch.sqrt(batched_dot(r, r)), rnorm)
        act = act & (rnorm > tol)
        z = apply_m(r)
        rz_new = batched_dot(r, z)
        beta = torch.where(act, rz_new / torch.where(act, rz, 1.0), 0.0)
        p = z + per_system(beta) * p
        rz = rz_new
    relres = torch.where(bnorm > 0, rnorm / torch.where(bnorm > 0, bnorm, 1.0), 0.0)
    return KrylovResult(x, iterations, relres, (rnorm <= tol) & ~breakdown, breakdown)


def gmres(
    apply_a: Callable[[torch.Tensor], torch.Tensor],
    apply_m: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    rtol: torch.Tensor,
    maxiter: int,
    active: torch.Tensor,
    restart: int = 40,
) -> KrylovResult:
    """Batched right-preconditioned restarted GMRES(restart), x0 = 0.

    b: (*batch, c, n, n); rtol, active: batch shape. Arnoldi with modified Gram–Schmidt
    and Givens rotations per system; a system stops (its updates are masked to zero) once
    its residual estimate is below rtol |b|, and the true residual is recomputed at every
    restart. ``maxiter`` counts operator applications.
    """
    dev, dt = b.device, b.dtype
    batch = b.shape[:-3]
    x = torch.zeros_like(b)
    bnorm = torch.sqrt(batched_dot(b, b))
    tol = rtol * bnorm
    act = active & (bnorm > 0)
    iterations = torch.zeros(batch, dtype=torch.int64, device=dev)
    breakdown = torch.zeros_like(act)
    rnorm = bnorm.clone()
    r = b
    total = 0
    while total < maxiter and bool(act.any()):
        if total > 0:
            r = b - apply_a(x)
            rnorm = torch.where(act, torch.sqrt(batched_dot(r, r)), rnorm)
            act = act & (rnorm > tol)
            if not bool(act.any()):
                break
        m = min(restart, maxiter - total)
        beta = torch.where(act, rnorm, 1.0)
        vs = [r / per_system(beta)]
        h = torch.zeros((*batch, m + 1, m), dtype=dt, device=dev)
        cs = torch.zeros((*batch, m), dtype=dt, device=dev)
        sn = torch.zeros((*batch, m), dtype=dt, device=dev)
        gvec = torch.zeros((*batch, m + 1), dtype=dt, device=dev)
        gvec[..., 0] = beta
        live = act.clone()  # systems still iterating in this cycle
        used = torch.zeros(batch, dtype=torch.int64, device=dev)
        k_done = 0
        for k in range(m):
            if not bool(live.any()):
                break
            w = apply_a(apply_m(vs[k]))
            for i in range(k + 1):
                hik = batched_dot(w, vs[i])
                h[..., i, k] = hik
                w = w - per_system(hik) * vs[i]
            hn = torch.sqrt(batched_dot(w, w))
            h[..., k + 1, k] = hn
            vs.append(w / per_system(torch.where(hn > 0, hn, 1.0)))
            for i in range(k):  # apply the previous rotations to column k
                t = cs[..., i] * h[..., i, k] + sn[..., i] * h[..., i + 1, k]
                h[..., i + 1, k] = -sn[..., i] * h[..., i, k] + cs[..., i] * h[..., i + 1, k]
                h[..., i, k] = t
            den = torch.sqrt(h[..., k, k] ** 2 + h[..., k + 1, k] ** 2)
            den1 = torch.where(den > 0, den, 1.0)
            cs[..., k] = torch.where(den > 0, h[..., k, k] / den1, 1.0)
            sn[..., k] = torch.where(den > 0, h[..., k + 1, k] / den1, 0.0)
            h[..., k, k] = den
            h[..., k + 1, k] = 0.0
            gvec[..., k + 1] = -sn[..., k] * gvec[..., k]
            gvec[..., k] = cs[..., k] * gvec[..., k]
            bad = live & ~torch.isfinite(den)
            breakdown |= bad
            live = live & ~bad
            used += live
            iterations += live
            live = live & (gvec[..., k + 1].abs() > tol) & (hn > 0)
            k_done = k + 1
        total += k_done
        # Solve the small triangular systems H[:used, :used] y = g[:used] per system;
        # columns beyond a system's ``used`` count get an identity so y = 0 there.
        if k_done == 0:
            break
        hh = h[..., :k_done, :k_done].clone()
        gg = gvec[..., :k_done].clone()
        idx = torch.arange(k_done, device=dev)
        beyond = idx >= used.unsqueeze(-1)  # (*batch, k_done)
        eye = torch.eye(k_done, dtype=dt, device=dev)
        mask2 = beyond.unsqueeze(-1) | beyond.unsqueeze(-2)
        hh = torch.where(mask2, eye, hh)
        gg = torch.where(beyond, 0.0, gg)
        diag_ok = torch.diagonal(hh, dim1=-2, dim2=-1).abs() > 0
        hh = torch.where(diag_ok.unsqueeze(-1) | ~eye.bool(), hh, eye)
        y = torch.linalg.solve_triangular(hh, gg.unsqueeze(-1), upper=True)[..., 0]
        y = torch.where(act.unsqueeze(-1), y, 0.0)
        # x += M (V y): the preconditioner is linear, so one application suffices.
        vy = vs[0] * per_system(y[..., 0])
        for i in range(1, k_done):
            vy = vy + per_system(y[..., i]) * vs[i]
        x = x + apply_m(vy)
        act = act & ~breakdown
    r = b - apply_a(x)
    rnorm = torch.sqrt(batched_dot(r, r))
    relres = torch.where(bnorm > 0, rnorm / torch.where(bnorm > 0, bnorm, 1.0), 0.0)
    converged = (rnorm <= tol * 1.0000001) | (bnorm == 0)
    return KrylovResult(x, iterations, relres, converged & ~breakdown, breakdown)


def krylov_solve(
    method: str,
    apply_a: Callable[[torch.Tensor], torch.Tensor],
    apply_m: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    rtol: torch.Tensor,
    maxiter: int,
    active: torch.Tensor,
) -> KrylovResult:
    """Solve A x = b per system with ``method``: "gmres", "cg", or "auto" = CG whose
    result is checked against the true residual |b - A x|, GMRES then correcting the
    systems that miss 2 rtol |b| (CG's recurrences assume symmetry, which the EquiNO
    tangent lacks by about 0.1 %; in practice CG still converges, the check makes sure)."""
    if method == "gmres":
        return gmres(apply_a, apply_m, b, rtol, maxiter, active)
    out = pcg(apply_a, apply_m, b, rtol, maxiter, active)
    if method == "cg":
        return out
    bnorm = torch.sqrt(batched_dot(b, b))
    r = b - apply_a(out.x)
    rnorm = torch.sqrt(batched_dot(r, r))
    need = active & (bnorm > 0) & ~(rnorm <= 2 * rtol * bnorm)
    if not bool(need.any()):
        relres = torch.where(bnorm > 0, rnorm / torch.where(bnorm > 0, bnorm, 1.0), 0.0)
        return KrylovResult(out.x, out.iterations, relres, ~need, out.breakdown & need)
    _log.debug("GMRES corrects %d of %d CG solves", int(need.sum()), need.numel())
    # Start from x = 0 where CG made things worse than that.
    worse = need & (rnorm > bnorm)
    x0 = torch.where(per_system(worse), 0.0, out.x)
    r = torch.where(per_system(worse), b, r)
    rnorm = torch.where(worse, bnorm, rnorm)
    rtol2 = torch.where(need, rtol * bnorm / torch.where(need, rnorm, 1.0), 1.0)
    corr = gmres(apply_a, apply_m, r, rtol2, maxiter, need)
    x = x0 + corr.x
    r = b - apply_a(x)
    rnorm = torch.sqrt(batched_dot(r, r))
    relres = torch.where(bnorm > 0, rnorm / torch.where(bnorm > 0, bnorm, 1.0), 0.0)
    converged = ~(active & (bnorm > 0)) | (rnorm <= 2 * rtol * bnorm)
    return KrylovResult(x, out.iterations + corr.iterations, relres, converged, corr.breakdown)
