"""FFT-accelerated Q1 cell solver (FFT-Galerkin, Newton–Krylov), batched over cells in torch.

The discrete problem is the one shared with the FE solver (docs/design.md): nodes at the
voxel corners, node (i, j) at (i/n, j/n), periodic; one bilinear (Q1) element per voxel,
element (i, j) = voxel ``image[i, j]`` with corners (i, j), (i+1, j), (i, j+1), (i+1, j+1)
mod n; 2×2 Gauss quadrature (local points a and 1 - a, a = (1 - 1/√3)/2, weights h²/4).

Operators, all written with ``torch.roll`` and batched over any leading dimensions:

* D: nodal fluctuation → gradient/strain at the 4 Gauss points of every voxel, stored
  component-first: φ (…, 1, n, n) → (…, 2, n, n, 4) (thermal) or u (…, 2, n, n) →
  ε (…, 3, n, n, 4) (mechanical, tensor-shear Voigt);
* Dᵀ: its adjoint with the internal-work pairing (σ11ε11 + σ22ε22 + 2σ12ε12);
* residual r = Dᵀ W q(G + Dφ), Jacobian action J δ = Dᵀ W A D δ, W = h²/4.

Newton's linear systems are solved by a batched Krylov method preconditioned with the
inverse of a reference operator Dᵀ W C_ref D, C_ref isotropic and constant over the
cell. That operator is a periodic convolution, so it is diagonal per wavevector (a
scalar for thermal, a 2×2 block for mechanical). Its symbol comes from applying it to a
unit impulse and taking the FFT; the zero wavevector (constants / rigid translations,
the null space) is mapped to 0, so every iterate keeps a zero-mean fluctuation.

Krylov method: batched preconditioned CG (per-system α, β and convergence masks). The
thermal Jacobian is symmetric positive definite; the EquiNO matrix law has a slightly
non-symmetric tangent (about 0.1 %, :mod:`neuroscale_coupling.cell.laws.equino`), for
which CG has no guarantee. By default (``krylov="auto"``) every CG result is therefore
checked against its true residual |b - J x|, and a batched right-preconditioned
restarted GMRES corrects the systems that miss the tolerance (rare in practice). The
residual's round-off mean is projected out before every solve: the exact residual sums to
zero over the nodes.

Newton: Eisenstat–Walker forcing terms for the inexact steps, then a per-cell
backtracking (Armijo) line search on |r|, which makes the softening EquiNO matrix at
strains of ±0.04 and the thermal law with β > 0 robust. The test is |r| <= rtol |r_0|;
a cell that passes it by less than a factor 100 takes one more ("polishing") step, as
the response error is about cond(J)·|r| and that step is cheap near convergence.

The consistent tangent solves J ψ_j = -∂r/∂s_j for the d state components at once (the
right-hand sides are stacked in front of the batch dimension) and returns
d⟨q⟩/ds_j = ⟨∂q/∂s_j + A Dψ_j⟩.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from neuroscale_coupling.cell.materials import Material, MechanicalMaterial, ThermalMaterial
from neuroscale_coupling.fine.krylov import batched_dot, krylov_solve, per_system
from neuroscale_coupling.fine.protocol import FineSolveError, Homogenized, broadcast_cells
from neuroscale_coupling.fine.voxel_q1 import (
    GaussTangent,
    MechanicalVoxelPhysics,
    Q1Grid,
    ThermalVoxelPhysics,
    VoxelPhysics,
    gauss_last,
    zero_mean,
)
from neuroscale_coupling.log import get_logger

__all__ = ["SolveStatistics", "SpectralSolver"]


_log = get_logger(__name__)


#: Armijo constant and maximum number of step halvings of the backtracking line search.
_ARMIJO = 1e-4


_MAX_HALVINGS = 20


#: Newton forcing terms (Eisenstat–Walker choice 2): the Krylov tolerance of Newton step
#: k is η_k = γ (|r_k| / |r_{k-1}|)², safeguarded by γ η_{k-1}² when that exceeds 0.1,
#: capped at _FORCING_MAX, and no tighter than needed to land below the polishing
#: threshold (0.5 _POLISH tol / |r_k|) nor than cg_rtol.
_FORCING_GAMMA = 0.9


_FORCING_MAX = 0.1


#: Polishing: a converged cell with |r| > _POLISH · tol takes one more Newton step with
#: Krylov tolerance _POLISH_ETA (kept only where it lowers |r|).
_POLISH = 1e-2


_POLISH_ETA = 1e-3


#: Absolute floor of the Newton test, in units of eps · max |q| of the cell.
_FLOOR = 1e3


@dataclass(frozen=True)
class SolveStatistics:
    """Diagnostics of the last :meth:`SpectralSolver.solve` call over N points.

    * newton_iterations: (N,) Newton iterations per point (polishing step included);
    * krylov_iterations: (N, max_newton + 1) Krylov iterations of each Newton step (0
      after convergence; the last column only serves a polishing step);
    * tangent_krylov_iterations: (N, d) iterations of the unit-load solves;
    * line_search_halvings: (N,) total step halvings;
    * seconds: wall time of the call.
    """

    newton_iterations: np.ndarray
    krylov_iterations: np.ndarray
    tangent_krylov_iterations: np.ndarray
    line_search_halvings: np.ndarray
    seconds: float

    def krylov_per_newton_step(self) -> float:
        """Mean Krylov iterations per Newton step over all points (nan when none)."""
        steps = int(self.newton_iterations.sum())
        return float(self.krylov_iterations.sum() / steps) if steps else float("nan")


def _resolve_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device: give 'cpu' or 'cuda'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={device!r} was requested but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}): "
            "use device='cpu' or run on a machine with a GPU"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported: give 'cpu' or 'cuda'")
    return dev


class SpectralSolver:
    """Batched FFT-preconditioned Newton–Krylov solver of Q1 voxel cell problems.

    Implements :class:`~neuroscale_coupling.fine.protocol.FineSolver` for
    :class:`ThermalMaterial` and :class:`MechanicalMaterial`. Solves run on the calling
    process only (not collective) and are deterministic.

    Keyword options:

    * ``device``: None/"cpu" (default) or "cuda" (RuntimeError when torch sees no GPU);
    * ``dtype``: torch.float64 (default); float32 only with rtol, cg_rtol >= 1e-6;
    * ``rtol``: Newton stops when |r| <= rtol |r_0| (r_0: residual of the zero
      fluctuation), or below the round-off floor 1e3 eps max|q|;
    * ``max_newton``: Newton iterations before FineSolveError;
    * ``cg_rtol``: relative tolerance of the unit-load tangent solves (Newton steps use
      adaptive forcing terms between cg_rtol and 0.1);
    * ``max_cg``: Krylov iterations per linear solve;
    * ``batch_size``: cells solved together; larger calls are processed in chunks
      (memory roughly 2 KB × batch_size × n² for mechanical cells);
    * ``krylov``: "auto" (CG, checked against the true residual, GMRES correcting the
      misses), "cg" (CG only) or "gmres".

    Attributes after a solve: ``last_statistics`` (:class:`SolveStatistics`).
    """

    def __init__(
        self,
        material: Material,
        *,
        device: Any = None,
        dtype: torch.dtype = torch.float64,
        rtol: float = 1e-10,
        max_newton: int = 30,
        cg_rtol: float = 1e-12,
        max_cg: int = 3000,
        batch_size: int = 32,
        krylov: str = "auto",
    ) -> None:
        if not isinstance(material, ThermalMaterial | MechanicalMaterial):
            raise TypeError(
                f"SpectralSolver supports ThermalMaterial and MechanicalMaterial; "
                f"got {type(material).__name__}"
            )
        if dtype not in (torch.float64, torch.float32):
            raise TypeError(f"dtype={dtype!r}: give torch.float64 (default) or torch.float32")
        for name, value in (("rtol", rtol), ("cg_rtol", cg_rtol)):
            if not (isinstance(value, int | float) and 0 < value < 1):
                raise ValueError(f"{name}={value!r} must be a number in (0, 1)")
        if dtype == torch.float32 and min(rtol, cg_rtol) < 1e-6:
            raise ValueError(
                f"dtype=float32 cannot reach rtol={rtol} / cg_rtol={cg_rtol}: "
                "use torch.float64 or tolerances >= 1e-6"
            )
        for name, value in (
            ("max_newton", max_newton),
            ("max_cg", max_cg),
            ("batch_size", batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if krylov not in ("auto", "cg", "gmres"):
            raise ValueError(f"krylov={krylov!r}: choose 'auto', 'cg' or 'gmres'")
        self.material = material
        self.device = _resolve_device(device)
        self.dtype = dtype
        self.rtol = float(rtol)
        self.max_newton = int(max_newton)
        self.cg_rtol = float(cg_rtol)
        self.max_cg = int(max_cg)
        self.batch_size = int(batch_size)
        self.krylov = krylov
        self.last_statistics: SolveStatistics | None = None
        self._symbols: dict[int, list[torch.Tensor]] = {}

    # ------------------------------------------------------------------ public API
    def solve(self, cells: Any, states: Any) -> Homogenized:
        """Solve the cell problems of N points (not collective).

        cells: int array (N, n, n), or one image (n, n) shared by all points.
        states: (N, d) or (d,), d = material.state_dim. Returns response (N, r) and
        tangent (N, r, d) as numpy float64. Raises FineSolveError naming the first point
        that did not converge; statistics land in ``last_statistics``.
        """
        return self._solve(cells, states)[0]

    def solve_with_fields(self, cells: Any, states: Any) -> tuple[Homogenized, np.ndarray]:
        """As :meth:`solve`, and also the nodal fluctuation fields: (N, 1, n, n) φ for
        thermal, (N, 2, n, n) u for mechanical (node (i, j) at (i/n, j/n))."""
        return self._solve(cells, states)

    # ------------------------------------------------------------------ internals
    def _solve(self, cells: Any, states: Any) -> tuple[Homogenized, np.ndarray]:
        t0 = time.perf_counter()
        s = self.material.check_states(states)
        d, r_dim = self.material.state_dim, self.material.response_dim
        if s.shape[0] == 0:
            n = int(np.shape(cells)[-1]) if np.ndim(cells) >= 2 else 0
            c = 1 if isinstance(self.material, ThermalMaterial) else 2
            self.last_statistics = SolveStatistics(
                *(
                    np.zeros(shape, dtype=np.int64)
                    for shape in ((0,), (0, self.max_newton + 1), (0, d), (0,))
                ),
                seconds=time.perf_counter() - t0,
            )
            empty = Homogenized(
                np.zeros((0, r_dim)), np.zeros((0, r_dim, d)), np.zeros(0, np.int64)
            )
            return empty, np.zeros((0, c, n, n))
        images = broadcast_cells(_check_same_shape(cells), s.shape[0], self.material.n_phases)
        n_pts, n = s.shape[0], images.shape[-1]
        physics = self._physics(n)
        response = np.zeros((n_pts, r_dim))
        tangent = np.zeros((n_pts, r_dim, d))
        newton = np.zeros(n_pts, dtype=np.int64)
        krylov = np.zeros((n_pts, self.max_newton + 1), dtype=np.int64)
        tan_krylov = np.zeros((n_pts, d), dtype=np.int64)
        halvings = np.zeros(n_pts, dtype=np.int64)
        fields_out = np.zeros((n_pts, physics.c, n, n))
        for start in range(0, n_pts, self.batch_size):
            stop = min(start + self.batch_size, n_pts)
            out = self._solve_chunk(physics, images[start:stop], s[start:stop], start)
            response[start:stop] = out["response"]
            tangent[start:stop] = out["tangent"]
            newton[start:stop] = out["newton"]
            krylov[start:stop] = out["krylov"]
            tan_krylov[start:stop] = out["tangent_krylov"]
            halvings[start:stop] = out["halvings"]
            fields_out[start:stop] = out["u"]
        seconds = time.perf_counter() - t0
        self.last_statistics = SolveStatistics(newton, krylov, tan_krylov, halvings, seconds)
        if n_pts:
            _log.debug(
                "%d %s cells at n=%d: %.1f Newton its, %.1f %s its per Newton step, "
                "%.1f per tangent solve, %.3g s",
                n_pts,
                self.material.physics,
                n,
                newton.mean(),
                self.last_statistics.krylov_per_newton_step(),
                self.krylov,
                tan_krylov.mean(),
                seconds,
            )
        return Homogenized(response, tangent, newton), fields_out

    def _physics(self, n: int) -> VoxelPhysics:
        grid = Q1Grid(n, self.dtype, self.device)
        if isinstance(self.material, ThermalMaterial):
            return ThermalVoxelPhysics(self.material, grid)
        return MechanicalVoxelPhysics(self.material, grid)

    def _basis_symbols(self, physics: VoxelPhysics) -> list[torch.Tensor]:
        """Symbols (c, c, n, n//2+1), complex, of Dᵀ W C_b D for each reference basis C_b."""
        n = physics.grid.n
        if n not in self._symbols:
            c = physics.c
            impulse = torch.zeros((c, c, n, n), dtype=self.dtype, device=self.device)
            for b in range(c):
                impulse[b, b, 0, 0] = 1.0
            symbols = []
            for cb in physics.reference_basis():
                eps = physics.strain(impulse)  # (b, m, n, n, 4): impulse in component b
                stress = torch.einsum("ij,bjxyq->bixyq", cb, eps)
                resp = physics.strain_t(physics.grid.weight * stress)  # (b, a, n, n)
                symbols.append(torch.fft.rfft2(resp.transpose(0, 1)))  # (a, b, n, nf)
            self._symbols[n] = symbols
        return self._symbols[n]

    def _preconditioner(
        self, physics: VoxelPhysics, tangent: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """z = (Dᵀ W C_ref D)⁻¹ r per cell, zero mode → 0; r: (…, B, c, n, n)."""
        coef = physics.reference_coefficients(tangent)  # (B, nb)
        basis = self._basis_symbols(physics)
        sym = sum(
            coef[:, b].reshape(-1, 1, 1, 1, 1).to(basis[b].dtype) * basis[b]
            for b in range(len(basis))
        )  # (B, c, c, n, nf)
        if physics.c == 1:
            s00 = sym[:, 0, 0].clone()
            s00[:, 0, 0] = 1.0
            inv = (1.0 / s00).unsqueeze(1).unsqueeze(1)
        else:
            det = sym[:, 0, 0] * sym[:, 1, 1] - sym[:, 0, 1] * sym[:, 1, 0]
            det[:, 0, 0] = 1.0
            inv = torch.stack(
                (
                    torch.stack((sym[:, 1, 1], -sym[:, 0, 1]), 1),
                    torch.stack((-sym[:, 1, 0], sym[:, 0, 0]), 1),
                ),
                1,
            ) / det.unsqueeze(1).unsqueeze(1)
        inv[..., 0, 0] = 0.0  # zero wavevector: constants / translations → 0
        n = physics.grid.n

        def apply(r: torch.Tensor) -> torch.Tensor:
            rh = torch.fft.rfft2(r)  # (…, B, c, n, nf)
            zh = (inv * rh.unsqueeze(-4)).sum(-3)
            return torch.fft.irfft2(zh, s=(n, n))

        return apply

    def _solve_chunk(
        self, physics: VoxelPhysics, images: np.ndarray, states: np.ndarray, offset: int
    ) -> dict[str, np.ndarray]:
        dev, dt = self.device, self.dtype
        n_b, n = images.shape[0], images.shape[-1]
        c, m, d = physics.c, physics.m, physics.d
        w = physics.grid.weight
        fields = {
            k: torch.as_tensor(v, dtype=dt, device=dev).unsqueeze(-1).expand(n_b, n, n, 4)
            for k, v in self.material.fields(images).items()
        }
        st = torch.as_tensor(states, dtype=dt, device=dev)
        macro = st[:, :m].reshape(n_b, 1, 1, 1, m)
        reasons: list[str | None] = physics.check_law(fields, st)
        failed = torch.tensor([r is not None for r in reasons], device=dev)

        def evaluate(u: torch.Tensor) -> tuple[torch.Tensor, ...]:
            flux, a, extra = physics.law(fields, st, macro + gauss_last(physics.strain(u)))
            res = zero_mean(physics.strain_t(w * flux.movedim(-1, -4)))
            return flux, a, extra, res, torch.sqrt(batched_dot(res, res))

        def jacobian(a: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
            wa = GaussTangent(a, w)

            def apply(v: torch.Tensor) -> torch.Tensor:
                return physics.strain_t(wa.apply(physics.strain(v)))

            return apply

        u = torch.zeros((n_b, c, n, n), dtype=dt, device=dev)
        flux, a, extra, res, rn = evaluate(u)
        r0 = rn.clone()
        qmax = flux.abs().flatten(1).amax(1)
        floor = _FLOOR * torch.finfo(dt).eps * qmax
        tol = torch.maximum(self.rtol * r0, floor)
        conv = (rn <= tol) & ~failed
        history = [(rn / torch.where(r0 > 0, r0, 1.0)).cpu()]
        newton = torch.zeros(n_b, dtype=torch.int64, device=dev)
        krylov_its = torch.zeros((n_b, self.max_newton + 1), dtype=torch.int64, device=dev)
        halvings = torch.zeros(n_b, dtype=torch.int64, device=dev)
        rn_prev, eta_prev = rn, torch.ones_like(rn)
        polished = torch.zeros(n_b, dtype=torch.bool, device=dev)
        for it in range(self.max_newton + 1):
            conv = (rn <= tol) & ~failed
            # A converged cell whose residual is within a factor 1/_POLISH of the test
            # gets one more Newton step: the response error is about cond(J) times the
            # residual, and a step at that point costs little (quadratic convergence).
            polish = conv & ~polished & (rn > torch.maximum(_POLISH * tol, floor))
            act = polish if it == self.max_newton else (~conv & ~failed) | polish
            if not bool(act.any()):
                break
            eta = self._forcing(it, rn, rn_prev, eta_prev, tol)
            eta = torch.where(polish, max(_POLISH_ETA, self.cg_rtol), eta)
            rn_prev, eta_prev = rn.clone(), eta
            lin = krylov_solve(
                self.krylov,
                jacobian(a),
                self._preconditioner(physics, a),
                -res,
                eta,
                self.max_cg,
                act,
            )
            krylov_its[:, it] = lin.iterations
            newton += act
            delta = lin.x
            # Backtracking line search on |r| (Armijo), per cell.
            step = torch.ones(n_b, dtype=dt, device=dev)
            pending = act.clone()
            for _ in range(_MAX_HALVINGS + 1):
                t_flux, t_a, t_extra, t_res, t_rn = evaluate(u + per_system(step) * delta)
                ok = (
                    pending
                    & torch.isfinite(t_rn)
                    & ((t_rn <= (1 - _ARMIJO * step) * rn) | (~polish & (t_rn <= tol)))
                )
                if bool(ok.any()):
                    u = torch.where(per_system(ok), u + per_system(step) * delta, u)
                    sel = ok.reshape(-1, 1, 1, 1, 1)
                    flux = torch.where(sel, t_flux, flux)
                    a = torch.where(sel.unsqueeze(-1), t_a, a)
                    extra = torch.where(sel.unsqueeze(-1), t_extra, extra)
                    res = torch.where(per_system(ok), t_res, res)
                    rn = torch.where(ok, t_rn, rn)
                pending = pending & ~ok
                if not bool(pending.any()):
                    break
                step = torch.where(pending, 0.5 * step, step)
                halvings += pending
            rel_now = (rn / torch.where(r0 > 0, r0, 1.0)).cpu()
            history.append(rel_now)
            for i in torch.nonzero(pending & ~polish).flatten().tolist():
                tail = [float(h[i]) for h in history[-5:]]
                reasons[i] = (
                    f"the line search found no decrease of the residual after "
                    f"{_MAX_HALVINGS} step halvings in Newton iteration {it + 1} "
                    f"(relative residual history tail {_fmt(tail)}; Krylov relative "
                    f"residual {float(lin.relres[i]):.3g}); if this is round-off, loosen rtol"
                )
            failed = failed | (pending & ~polish)  # a polishing step may simply not help
            polished = polished | polish
        conv = (rn <= tol) & ~failed
        for i in torch.nonzero(~conv & ~failed).flatten().tolist():
            tail = [float(h[i]) for h in history[-5:]]
            nonfinite = not math.isfinite(tail[-1])
            reasons[i] = (
                "the residual became NaN/Inf"
                if nonfinite
                else f"Newton did not converge in max_newton={self.max_newton} iterations "
                f"to rtol={self.rtol:g} (relative residual history tail {_fmt(tail)}); "
                "raise max_newton or check the state"
            )
        self._raise_first(reasons, states, offset)

        # Consistent tangent: J ψ_j = -∂r/∂s_j, all d right-hand sides in one batch.
        # ∂flux/∂state, component-first: (d, B, m, n, n, 4)
        cols = torch.cat((a, extra), -1).permute(5, 0, 4, 1, 2, 3)
        rhs = -zero_mean(physics.strain_t(w * cols))  # (d, B, c, n, n)
        ones = torch.ones((d, n_b), dtype=torch.bool, device=dev)
        lin = krylov_solve(
            self.krylov,
            jacobian(a),
            self._preconditioner(physics, a),
            rhs,
            torch.full((d, n_b), self.cg_rtol, dtype=dt, device=dev),
            self.max_cg,
            ones,
        )
        for j, i in torch.nonzero(~lin.converged).tolist():
            if reasons[i] is None:
                reasons[i] = (
                    f"the unit-load solve for d/d{self.material.state_names[j]} of the "
                    f"consistent tangent reached relative residual {float(lin.relres[j, i]):.3g} "
                    f"> cg_rtol={self.cg_rtol:g} after {int(lin.iterations[j, i])} iterations "
                    f"(max_cg={self.max_cg}); raise max_cg or loosen cg_rtol"
                )
        self._raise_first(reasons, states, offset)
        dflux = cols + GaussTangent(a, 1.0).apply(physics.strain(lin.x))
        tangent = dflux.mean(dim=(-3, -2, -1)).permute(1, 2, 0)  # (B, m, d)
        return {
            "response": flux.mean(dim=(1, 2, 3)).cpu().double().numpy(),
            "tangent": tangent.cpu().double().numpy(),
            "newton": newton.cpu().numpy(),
            "krylov": krylov_its.cpu().numpy(),
            "tangent_krylov": lin.iterations.T.cpu().numpy(),
            "halvings": halvings.cpu().numpy(),
            "u": u.cpu().double().numpy(),
        }

    def _forcing(
        self,
        it: int,
        rn: torch.Tensor,
        rn_prev: torch.Tensor,
        eta_prev: torch.Tensor,
        tol: torch.Tensor,
    ) -> torch.Tensor:
        """Per-cell Krylov tolerance of Newton step ``it`` (B,)."""
        if it == 0:
            eta = torch.full_like(rn, _FORCING_MAX)
        else:
            eta = _FORCING_GAMMA * (rn / torch.where(rn_prev > 0, rn_prev, 1.0)) ** 2
            safe = _FORCING_GAMMA * eta_prev**2
            eta = torch.where(safe > 0.1, torch.maximum(eta, safe), eta)
        eta = torch.maximum(eta, 0.5 * _POLISH * tol / torch.where(rn > 0, rn, 1.0))
        return torch.clamp(eta, min=self.cg_rtol, max=_FORCING_MAX)

    @staticmethod
    def _raise_first(reasons: list[str | None], states: np.ndarray, offset: int) -> None:
        for i, reason in enumerate(reasons):
            if reason is not None:
                raise FineSolveError(offset + i, states[i], reason)


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def _check_same_shape(cells: Any) -> Any:
    """Reject a ragged list of images with a clear message (one call shares n)."""
    if isinstance(cells, list | tuple) and len(cells) > 0:
        shapes = {np.shape(c) for c in cells}
        if len(shapes) > 1:
            raise ValueError(
                f"all cell images of one solve call must share the resolution n; got shapes "
                f"{sorted(shapes)}: resample them or solve each resolution in its own call"
            )
    return cells
