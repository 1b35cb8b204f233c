"""Exact homogenized responses that serve as references for the fine solvers.

Laminates. In a laminate whose layers are normal to e_n, the cell solution is uniform
in each layer: the gradient (strain) components tangential to the layers equal the
macro ones, the others (thermal g_n; mechanical ε_nn and ε12) jump so that the flux
(traction) components across the layers, q_n (σ_nn, σ12), are continuous, while their
volume average equals the macro state. For nonlinear laws this is a small nonlinear
system per state, solved here by Newton to round-off, and the tangent follows by
implicit differentiation. For linear conductivity it reduces to K_nn = ⟨1/k⟩⁻¹ and
K_tt = ⟨k⟩.
"""

from collections.abc import Sequence

import numpy as np

from neuroscale_coupling.cell.materials import Material, MechanicalMaterial, ThermalMaterial
from neuroscale_coupling.fine.protocol import FineSolveError, Homogenized

__all__ = ["laminate_exact"]


def _jump_components(material: Material, normal: int) -> list[int]:
    """Indices of the local gradient/strain components that jump across the layers."""
    if normal not in (1, 2):
        raise ValueError(f"normal={normal!r}: give 1 (layers normal to e1) or 2")
    if isinstance(material, ThermalMaterial):
        return [normal - 1]
    return [normal - 1, 2]


def _local(material: Material, y: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, ...]:
    """Local law of every phase at y (N, P, k): response (N, P, k), tangent (N, P, k, k)
    and, for thermal, ∂q/∂θ (N, P, k)."""
    import torch

    table = torch.from_numpy(material.parameter_table())
    fields = {name: table[:, c] for c, name in enumerate(material.parameter_names)}
    yt = torch.from_numpy(y)
    if isinstance(material, ThermalMaterial):
        q, a, dq_dtheta = material.law.torch_form(fields, torch.from_numpy(theta)[:, None], yt)
        return q.numpy(), a.numpy(), dq_dtheta.numpy()
    sigma, c = material.law.torch_form(fields, yt)
    return sigma.numpy(), c.numpy(), np.zeros_like(y)


def laminate_exact(
    material: Material,
    fractions: Sequence[float],
    states: np.ndarray,
    *,
    normal: int = 1,
    tol: float = 1e-13,
    max_iter: int = 50,
) -> Homogenized:
    """Exact response and tangent of a laminate of the material's phases.

    fractions: (P,) volume fraction of each phase (P = material.n_phases, sum 1).
    states: (N, d) macro states. Returns Homogenized with response (N, r) and
    tangent (N, r, d), computed to round-off.
    """
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (material.n_phases,) or np.any(f < 0) or abs(f.sum() - 1) > 1e-12:
        raise ValueError(
            f"fractions={f.tolist()} must hold one non-negative fraction per phase "
            f"({material.n_phases}) summing to 1"
        )
    s = material.check_states(states)
    n_pts, n_ph = s.shape[0], f.size
    thermal = isinstance(material, ThermalMaterial)
    if not thermal and not isinstance(material, MechanicalMaterial):
        raise TypeError(f"unsupported material {type(material).__name__}")
    y_macro = s[:, :2] if thermal else s
    theta = s[:, 2] if thermal else np.zeros(n_pts)
    k = y_macro.shape[1]
    jc = _jump_components(material, normal)
    nj = len(jc)
    n_lay = n_ph * nj
    n_unknown = n_lay + nj

    def unpack(x: np.ndarray) -> np.ndarray:
        y = np.repeat(y_macro[:, None, :], n_ph, axis=1)
        y[:, :, jc] = x[:, :n_lay].reshape(n_pts, n_ph, nj)
        return y

    # Unknowns x: the jumping components of every layer, then the common flux/traction t.
    x = np.concatenate([np.tile(y_macro[:, jc], (1, n_ph)), np.zeros((n_pts, nj))], axis=1)
    x[:, n_lay:] = _local(material, unpack(x), theta)[0].mean(axis=1)[:, jc]
    jac = np.zeros((n_pts, n_unknown, n_unknown))
    jac[:, :n_lay, n_lay:] = np.tile(-np.eye(nj), (n_ph, 1))
    jac[:, n_lay:, :n_lay] = np.kron(f[None, :], np.eye(nj))
    for _ in range(max_iter):
        y = unpack(x)
        resp, tang, dth = _local(material, y, theta)
        res = np.concatenate(
            [
                (resp[:, :, jc] - x[:, None, n_lay:]).reshape(n_pts, -1),
                np.einsum("p,npj->nj", f, y[:, :, jc]) - y_macro[:, jc],
            ],
            axis=1,
        )
        for p in range(n_ph):
            jac[:, p * nj : (p + 1) * nj, p * nj : (p + 1) * nj] = tang[:, p][:, jc][:, :, jc]
        r_scale = np.abs(resp).max(axis=(1, 2)) + np.finfo(float).tiny
        y_scale = np.abs(y_macro).max(axis=1) + np.finfo(float).tiny
        if np.all(np.abs(res[:, :n_lay]).max(axis=1) <= tol * r_scale) and np.all(
            np.abs(res[:, n_lay:]).max(axis=1) <= tol * y_scale
        ):
            break
        x = x - np.linalg.solve(jac, res[..., None])[..., 0]
    else:
        bad = int(np.argmax(np.abs(res).max(axis=1)))
        raise FineSolveError(bad, s[bad], "laminate Newton iteration did not converge")
    response = np.einsum("p,npk->nk", f, resp)

    # Implicit differentiation: dx/dstate = -F_x^{-1} F_state.
    d = s.shape[1]
    free = [c for c in range(k) if c not in jc]
    f_state = np.zeros((n_pts, n_unknown, d))
    for p in range(n_ph):
        r0 = p * nj
        for c in free:
            f_state[:, r0 : r0 + nj, c] = tang[:, p][:, jc, c]
        if thermal:
            f_state[:, r0 : r0 + nj, 2] = dth[:, p][:, jc]
    for i, c in enumerate(jc):
        f_state[:, n_lay + i, c] = -1.0
    dx = -np.linalg.solve(jac, f_state)
    dy = np.zeros((n_pts, n_ph, k, d))
    for c in free:
        dy[:, :, c, c] = 1.0
    dy[:, :, jc, :] = dx[:, :n_lay].reshape(n_pts, n_ph, nj, d)
    tangent = np.einsum("p,npkl,npld->nkd", f, tang, dy)
    if thermal:
        tangent[:, :, 2] += np.einsum("p,npk->nk", f, dth)
    return Homogenized(
        response=response, tangent=tangent, newton_iterations=np.zeros(n_pts, dtype=np.int64)
    )
