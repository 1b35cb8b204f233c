"""The Q1 voxel discretisation shared by the spectral solver: one bilinear element per voxel,
2×2 Gauss points, periodic gradients and their transposes (:class:`Q1Grid`), and per
physics the strain operators, the pointwise law and the reference medium of the
preconditioner (:class:`ThermalVoxelPhysics`, :class:`MechanicalVoxelPhysics`). The FE
solver discretises a voxel image the same way, so both solve the identical problem.
"""

import math

import torch

from neuroscale_coupling.cell.materials import Material

_GAUSS_A = (1.0 - 1.0 / math.sqrt(3.0)) / 2.0


#: Local coordinates (ξ, η) of the Gauss points: (a, a), (1-a, a), (a, 1-a), (1-a, 1-a).
_XI = (_GAUSS_A, 1.0 - _GAUSS_A, _GAUSS_A, 1.0 - _GAUSS_A)


_ETA = (_GAUSS_A, _GAUSS_A, 1.0 - _GAUSS_A, 1.0 - _GAUSS_A)


class Q1Grid:
    """Q1 gradient at the 2×2 Gauss points of a periodic n×n voxel grid and its adjoint.

    Gauss-point arrays are stored component-first, (…, 2, n, n, 4), the last axis being
    the Gauss point of the voxel, so that componentwise products are contiguous.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.n = n
        self.weight = 1.0 / (4.0 * n * n)
        self.xi = torch.tensor(_XI, dtype=dtype, device=device)
        self.eta = torch.tensor(_ETA, dtype=dtype, device=device)

    def grad(self, phi: torch.Tensor) -> torch.Tensor:
        """Nodal values (…, n, n) → gradient at the Gauss points (…, 2, n, n, 4)."""
        n = self.n
        d1 = (torch.roll(phi, -1, -2) - phi) * n  # (φ(i+1, j) - φ(i, j)) / h
        d2 = (torch.roll(phi, -1, -1) - phi) * n  # (φ(i, j+1) - φ(i, j)) / h
        d1s = torch.roll(d1, -1, -1)  # the same difference on the edge j + 1
        d2s = torch.roll(d2, -1, -2)  # on the edge i + 1
        g1 = d1.unsqueeze(-1) * (1 - self.eta) + d1s.unsqueeze(-1) * self.eta
        g2 = d2.unsqueeze(-1) * (1 - self.xi) + d2s.unsqueeze(-1) * self.xi
        return torch.stack((g1, g2), -4)

    def grad_t(self, p: torch.Tensor) -> torch.Tensor:
        """Adjoint of :meth:`grad`: Gauss-point vectors (…, 2, n, n, 4) → nodal (…, n, n)."""
        n = self.n
        p1 = p[..., 0, :, :, :]
        p2 = p[..., 1, :, :, :]
        c1 = (p1 @ (1 - self.eta) + torch.roll(p1 @ self.eta, 1, -1)) * n
        c2 = (p2 @ (1 - self.xi) + torch.roll(p2 @ self.xi, 1, -2)) * n
        return torch.roll(c1, 1, -2) - c1 + torch.roll(c2, 1, -1) - c2


def gauss_last(x: torch.Tensor) -> torch.Tensor:
    """Component-first Gauss array (…, m, n, n, 4) → the laws' layout (…, n, n, 4, m)."""
    return x.movedim(-4, -1)


class VoxelPhysics:
    """What differs between thermal and mechanical cells.

    c: nodal components of the fluctuation; m: components of the local gradient/strain
    (the first m state components are the macro gradient/strain; the remaining d - m
    enter the law explicitly, e.g. θ). ``reference_basis``: constant tangents (m, m)
    whose combinations form the isotropic reference medium. Gauss-point arrays are
    component-first, (…, m, n, n, 4).
    """

    c: int
    m: int
    d: int

    def __init__(self, material: Material, grid: Q1Grid) -> None:
        self.material = material
        self.grid = grid

    def strain(self, u: torch.Tensor) -> torch.Tensor:
        """D: nodal (…, c, n, n) → Gauss (…, m, n, n, 4)."""
        raise NotImplementedError

    def strain_t(self, s: torch.Tensor) -> torch.Tensor:
        """Dᵀ with the work pairing: Gauss (…, m, n, n, 4) → nodal (…, c, n, n)."""
        raise NotImplementedError

    def law(
        self, fields: dict[str, torch.Tensor], states: torch.Tensor, strain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flux (B, n, n, 4, m), tangent (B, n, n, 4, m, m) and ∂flux/∂(extra states)
        (B, n, n, 4, m, d - m) at the total strain (B, n, n, 4, m)."""
        raise NotImplementedError

    def reference_basis(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def reference_coefficients(self, tangent: torch.Tensor) -> torch.Tensor:
        """Per-cell coefficients (B, len(basis)) of the reference medium."""
        raise NotImplementedError

    def check_law(self, fields: dict[str, torch.Tensor], states: torch.Tensor) -> list[str | None]:
        """Per-point reason why the cell problem is ill-posed, or None (the law's
        :meth:`~neuroscale_coupling.cell.laws.base.PhaseLaw.check` over the cell's voxels)."""
        b = states.shape[0]
        values = {k: v.reshape(b, -1).cpu().numpy() for k, v in fields.items()}
        return self.material.law.check(values, states.cpu().numpy())


class ThermalVoxelPhysics(VoxelPhysics):
    c, m, d = 1, 2, 3

    def strain(self, u: torch.Tensor) -> torch.Tensor:
        return self.grid.grad(u[..., 0, :, :])

    def strain_t(self, s: torch.Tensor) -> torch.Tensor:
        return self.grid.grad_t(s).unsqueeze(-3)

    def law(
        self, fields: dict[str, torch.Tensor], states: torch.Tensor, strain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        theta = states[:, 2].reshape(-1, 1, 1, 1)
        q, a, dq_dtheta = self.material.law.torch_form(fields, theta, strain)
        return q, a, dq_dtheta.unsqueeze(-1)

    def reference_basis(self) -> list[torch.Tensor]:
        return [torch.eye(2, dtype=self.grid.xi.dtype, device=self.grid.xi.device)]

    def reference_coefficients(self, tangent: torch.Tensor) -> torch.Tensor:
        # Mean conductivity (trace / 2); for a scalar problem only the scale matters.
        k = 0.5 * (tangent[..., 0, 0] + tangent[..., 1, 1])
        return k.mean(dim=(1, 2, 3)).unsqueeze(-1)


class MechanicalVoxelPhysics(VoxelPhysics):
    c, m, d = 2, 3, 3

    def strain(self, u: torch.Tensor) -> torch.Tensor:
        g = self.grid.grad(u)  # (…, 2 components, 2 derivatives, n, n, 4)
        return torch.stack(
            (
                g[..., 0, 0, :, :, :],
                g[..., 1, 1, :, :, :],
                0.5 * (g[..., 0, 1, :, :, :] + g[..., 1, 0, :, :, :]),
            ),
            -4,
        )

    def strain_t(self, s: torch.Tensor) -> torch.Tensor:
        # Internal work σ11 ε11 + σ22 ε22 + 2 σ12 ε12 = Σ_ck σ_ck ∂_k u_c.
        s11, s22, s12 = s[..., 0, :, :, :], s[..., 1, :, :, :], s[..., 2, :, :, :]
        p = torch.stack((torch.stack((s11, s12), -4), torch.stack((s12, s22), -4)), -5)
        return self.grid.grad_t(p)

    def law(
        self, fields: dict[str, torch.Tensor], states: torch.Tensor, strain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sigma, c = self.material.law.torch_form(fields, strain)
        return sigma, c, sigma.new_zeros((*sigma.shape, 0))

    def reference_basis(self) -> list[torch.Tensor]:
        kw = {"dtype": self.grid.xi.dtype, "device": self.grid.xi.device}
        m = torch.tensor([1.0, 1.0, 0.0], **kw)
        mm = m[:, None] * m[None, :]
        return [mm, torch.eye(3, **kw) - mm / 3]  # σ = K tr(ε) m + μ (ε - tr(ε)/3 m)

    def reference_coefficients(self, tangent: torch.Tensor) -> torch.Tensor:
        # Isotropic projection (K, μ) of the work-conjugate tangent T = diag(1, 1, 2) C at
        # every Gauss point, then the geometric mean of the extremes over the cell: this
        # minimises max ratio / min ratio of the pointwise moduli to the reference ones.
        t = tangent
        mu = 0.25 * (t[..., 0, 0] - t[..., 0, 1] - t[..., 1, 0] + t[..., 1, 1]) + 0.5 * t[..., 2, 2]
        bulk = 0.25 * (t[..., 0, 0] + t[..., 0, 1] + t[..., 1, 0] + t[..., 1, 1]) - mu / 6
        out = []
        for v in (bulk, mu):
            v = v.flatten(1)
            hi = v.amax(1)
            lo = torch.clamp(v.amin(1), min=1e-12 * hi)
            out.append(torch.sqrt(lo * hi))
        return torch.stack(out, -1)


class GaussTangent:
    """The pointwise tangent, weighted and stored component-first for the Jacobian action.

    a: (B, n, n, 4, m, m) from the law; ``apply(e)`` maps Gauss strains (…, B, m, n, n, 4)
    to W A e with the same shape (componentwise products, no m×m temporaries).
    """

    def __init__(self, a: torch.Tensor, weight: float) -> None:
        self.m = a.shape[-1]
        self.cf = (weight * a).permute(0, 4, 5, 1, 2, 3).contiguous()  # (B, m, m, n, n, 4)

    def apply(self, e: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in range(self.m):
            y = self.cf[:, i, 0] * e[..., 0, :, :, :]
            for j in range(1, self.m):
                y = y.addcmul_(self.cf[:, i, j], e[..., j, :, :, :])
            rows.append(y)
        return torch.stack(rows, -4)


def zero_mean(r: torch.Tensor) -> torch.Tensor:
    """Remove the per-component mean of nodal residuals (…, c, n, n).

    The exact residual Dᵀ(·) sums to zero over the nodes (constants / translations are
    the null space); the computed one carries a mean of round-off size eps·|q| that no
    Krylov iterate can cancel, which would stall the solves once |r| is small.
    """
    return r - r.mean(dim=(-2, -1), keepdim=True)
