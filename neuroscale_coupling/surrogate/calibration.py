"""Calibration of the surrogate's uncertainty (docs/design.md).

The std returned per point and component is

    std_j = κ_class,j · √((s·spread_j)² + (c·τ_j(z))²)     (response component j)

* spread: the spread of the M fixed MC-dropout samples. It sees how the last decoder layer
  varies, which tracks the error from state to state within a cell.
* τ(z) = exp(b + W z): a cell-level error scale from the cell's latent z (normalized response
  units, per component). The errors of a trained model are mostly a per-cell generalization
  error that the dropout spread does not see: on the thermal family, held-out cells with
  four random inclusions have about four times the error of single-inclusion cells.
  :func:`fit_cell_error_head` regresses the log of each cell's RMS response error on its
  latent (ridge). The fit uses held-out (validation) cells: on training cells the model
  errs less where it generalizes worse than it fits (thermal, 3000 cells: random inclusions
  1.2 % in training, 2.1 % held out). :func:`cross_fit_cell_error` gives out-of-fold τ
  for the calibration below, so the calibration sees τ as it will be for new cells.
* (s, c) and the interval multipliers are fitted on the validation split by
  :func:`fit_calibration`:
  - the mix of the two terms is the one with the best interval score (a proper scoring rule:
    narrow intervals, misses charged by their distance) at the validation coverage;
  - the overall size makes std an RMS-consistent standard deviation (mean of err²/std² = 1);
  - the predictive distribution is not forced to be Gaussian. Its level-p central interval
    is ±k_p·std, with k_p the conformal quantile of |err|/std on the validation split (split
    conformal prediction, level by level).

  The errors are heavy-tailed relative to any smooth std model. On the thermal validation
  split a Gaussian shape covered 0.81 at the 95 % level. Then no (s, c) matches every level.
* per symmetry class of the cell (:func:`fit_symmetry_classes`, Mondrian conformal
  prediction): std factors per response component and multipliers for each class with
  enough validation microstructures. The pooled calibration is exact on the validation
  mix of cells and components only: on 500 fresh random-inclusion cells (thermal family,
  no symmetry) it gave a calibration error of 0.064 (coverage 0.58 at 68 %), the
  per-class one 0.005.

Calibration error = mean over nominal levels p = 0.05, 0.10, …, 0.95 (:data:`LEVELS_P`) of
|coverage_p − p|, coverage_p the share of |err| ≤ k_p·std, all response components pooled
(k_p of each row's class when given per row). Without fitted multipliers, k_p = z_p
(Gaussian).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "LEVELS_P",
    "Calibration",
    "calibration_error",
    "coverage",
    "cross_fit_cell_error",
    "fit_calibration",
    "fit_cell_error_head",
    "fit_symmetry_classes",
    "gaussian_multipliers",
    "interval_multipliers",
]

LEVELS_P = tuple(round(0.05 * k, 2) for k in range(1, 20))
#: A symmetry class needs this many distinct validation microstructures for its own
#: calibration; with fewer it keeps the pooled one.
MIN_CLASS_MICROSTRUCTURES = 10


def gaussian_multipliers(p: float | Sequence[float]) -> np.ndarray:
    """z_p with P(|N(0, 1)| ≤ z_p) = p, for each level p in (0, 1)."""
    from scipy.stats import norm

    return np.atleast_1d(norm.ppf((1 + np.asarray(p, dtype=float)) / 2))


def interval_multipliers(
    p: float | Sequence[float], table: Sequence[float] | None = None
) -> np.ndarray:
    """Half-width multipliers k_p of the level-p central intervals ±k_p·std.

    table: k at the levels :data:`LEVELS_P` (as fitted by :func:`fit_calibration`), or None
    for the Gaussian z_p. Between table levels the ratio k/z_p is interpolated linearly in
    p; beyond 0.05 and 0.95 the end ratios hold. Levels must lie in (0, 1)."""
    lv = np.atleast_1d(np.asarray(p, dtype=float))
    if np.any((lv <= 0) | (lv >= 1)):
        raise ValueError(f"interval levels {lv.tolist()} must lie in (0, 1)")
    z = gaussian_multipliers(lv)
    if table is None:
        return z
    k = np.asarray(table, dtype=float).reshape(-1)
    if k.shape != (len(LEVELS_P),) or np.any(~(k > 0)):
        raise ValueError(f"the multiplier table must hold {len(LEVELS_P)} values > 0; got {k}")
    ratio = k / gaussian_multipliers(LEVELS_P)
    return z * np.interp(lv, LEVELS_P, ratio)


def coverage(
    err: np.ndarray,
    std: np.ndarray,
    p: float | Sequence[float],
    multipliers: np.ndarray | Sequence[float] | None = None,
) -> np.ndarray:
    """Empirical coverage: share of |err| ≤ k_p·std for each level p.

    err, std: same shape (N, …). multipliers: k_p per level (L,), or per level and row
    (L, N) (per-row calibration, e.g. by symmetry class); None for the Gaussian z_p.
    Returns one value per level."""
    e = np.abs(np.asarray(err, dtype=float))
    s = np.asarray(std, dtype=float)
    lv = np.atleast_1d(np.asarray(p, dtype=float))
    k = gaussian_multipliers(lv) if multipliers is None else np.asarray(multipliers, float)
    if k.shape[0] != lv.size or k.ndim > 2 or (k.ndim == 2 and k.shape[1] != e.shape[0]):
        raise ValueError(
            f"multipliers of shape {k.shape} for {lv.size} levels and {e.shape[0]} rows"
        )
    e, s = e.reshape(e.shape[0], -1), s.reshape(s.shape[0], -1)
    if k.ndim == 1:
        return np.array([(e <= ki * s).mean() for ki in k])
    return np.array([(e <= ki[:, None] * s).mean() for ki in k])


def calibration_error(
    err: np.ndarray,
    std: np.ndarray,
    levels: Sequence[float] = LEVELS_P,
    multipliers: np.ndarray | Sequence[float] | None = None,
) -> float:
    """mean over nominal levels p of |coverage(p) − p|; multipliers as in
    :func:`coverage`."""
    cov = coverage(err, std, levels, multipliers)
    return float(np.mean(np.abs(cov - np.asarray(levels))))


def fit_cell_error_head(
    latents: np.ndarray, err: np.ndarray, cells: np.ndarray, *, ridge: float = 10.0
) -> tuple[np.ndarray, np.ndarray]:
    """Cell-level error scale τ(z) = exp(bias + weight·z), fitted by ridge regression.

    The target is log(RMS over the cell's states of each response component's error
    + 1e-3 × that component's overall RMS).

    latents: (C, L), one per cell. err: (N, r) normalized response errors. cells: (N,) row's
    cell index in [0, C). ridge: penalty on the weights of the standardized latent
    (per cell).

    Returns weight (r, L) and bias (r,) acting on the raw latent. Every cell needs >= 1 row.
    """
    z = np.asarray(latents, dtype=float)
    e = np.asarray(err, dtype=float)
    c = np.asarray(cells).reshape(-1)
    n_cells = z.shape[0]
    count = np.bincount(c, minlength=n_cells)
    if e.ndim != 2 or c.shape[0] != e.shape[0] or np.any(count == 0):
        raise ValueError(
            f"need err (N, r), cells (N,) with every one of the {n_cells} cells present; "
            f"got err {e.shape}, cells {c.shape}, {int(np.sum(count == 0))} cells without rows"
        )
    ms = np.stack(
        [np.bincount(c, weights=e[:, j] ** 2, minlength=n_cells) for j in range(e.shape[1])], 1
    )
    rms = np.sqrt(ms / count[:, None])
    target = np.log(rms + 1e-3 * np.sqrt(np.mean(e**2, axis=0)) + 1e-300)  # (C, r)
    mean, scale = z.mean(0), z.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    x = (z - mean) / scale
    y0 = target.mean(0)
    coef = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ (target - y0))  # (L, r)
    weight = (coef / scale[:, None]).T
    bias = y0 - weight @ mean
    return weight, bias


def cross_fit_cell_error(
    latents: np.ndarray,
    err: np.ndarray,
    cells: np.ndarray,
    groups: np.ndarray,
    *,
    folds: int = 5,
    ridge: float = 10.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell error head fitted on held-out errors, with out-of-fold τ for calibrating on them.

    The groups (distinct images) are dealt at random into ``folds`` folds. Each fold's τ
    comes from a head fitted on the other folds. The returned head is fitted on all cells.
    A head fitted on training errors would understate the error of new cells wherever the
    model generalizes worse than it fits.

    latents (C, L), err (N, r), cells (N,) as in :func:`fit_cell_error_head`; groups (C,)
    group id per cell (cells with equal ids share a fold).

    Returns weight (r, L), bias (r,) and the out-of-fold τ (C, r).
    """
    z = np.asarray(latents, dtype=float)
    c = np.asarray(cells).reshape(-1)
    _, g = np.unique(np.asarray(groups).reshape(-1), return_inverse=True)
    n_groups = int(g.max()) + 1
    if n_groups < folds:
        raise ValueError(f"{n_groups} distinct cells cannot fill {folds} folds: use fewer folds")
    fold_of_group = np.random.default_rng(seed).permutation(n_groups) % folds
    fold = fold_of_group[g]  # (C,)
    e = np.asarray(err, dtype=float)
    tau = np.empty((z.shape[0], e.shape[1]))
    for k in range(folds):
        inside = fold != k
        keep_rows = inside[c]
        renum = np.cumsum(inside) - 1
        w, b = fit_cell_error_head(z[inside], e[keep_rows], renum[c[keep_rows]], ridge=ridge)
        tau[~inside] = np.exp(z[~inside] @ w.T + b)
    weight, bias = fit_cell_error_head(z, e, c, ridge=ridge)
    return weight, bias, tau


@dataclass(frozen=True)
class Calibration:
    """Fitted uncertainty calibration (see module doc).

    scale: s on the dropout spread; floor: c on the cell error scale τ (normalized units);
    multipliers: k_p at :data:`LEVELS_P` (19,); mix: the angle φ of the two terms
    (0: spread alone, π/2: τ alone)."""

    scale: float
    floor: float
    multipliers: np.ndarray
    mix: float


def _conformal_quantiles(score: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """Split-conformal quantiles: the ⌈(n + 1) p⌉-th smallest score (capped at n)."""
    z = np.sort(score)
    n = z.size
    rank = np.minimum(np.ceil((n + 1) * np.asarray(levels)).astype(int), n)
    return z[rank - 1]


def _interval_score(e: np.ndarray, std: np.ndarray, k: np.ndarray) -> float:
    """Mean over points and the levels :data:`LEVELS_P` of the interval score of ±k_p·std
    for |err| = e: 2h + (2/(1 − p))·max(0, e − h), h = k_p·std (Gneiting & Raftery 2007,
    a proper scoring rule: narrow intervals, and misses charged by their distance)."""
    h = k[:, None] * std[None]
    alpha = 1.0 - np.asarray(LEVELS_P)[:, None]
    return float(np.mean(2 * h + (2 / alpha) * np.maximum(0.0, e[None] - h)))


def fit_calibration(
    err: np.ndarray,
    spread: np.ndarray,
    tau: np.ndarray | None = None,
    *,
    mixes: int = 41,
) -> Calibration:
    """Fit (s, c) and the interval multipliers on validation errors (module doc).

    err, spread, tau: (N, r) normalized errors, raw dropout spread, cell error scale (None:
    τ = 1, a constant floor). The mix angle φ runs over ``mixes`` values in [0, π/2]; each φ
    gives exact validation coverage after the conformal step, and the kept one has the
    smallest mean interval score (:func:`_interval_score`). Raises ValueError without
    errors or when neither term can carry the std.
    """
    e = np.abs(np.asarray(err, dtype=float)).ravel()
    sp = np.asarray(spread, dtype=float).ravel()
    ta = np.ones_like(sp) if tau is None else np.asarray(tau, dtype=float).ravel()
    if not (e.size and e.size == sp.size == ta.size):
        raise ValueError(
            "err, spread and tau must have the same non-zero size; "
            f"got {e.size}, {sp.size}, {ta.size}"
        )
    if np.any(~np.isfinite(e)) or np.any(~(ta > 0)):
        raise ValueError("errors must be finite and the cell error scale τ > 0")
    s_rms = float(np.sqrt(np.mean(sp**2)))
    t_rms = float(np.sqrt(np.mean(ta**2)))
    angles = np.linspace(0.0, np.pi / 2, mixes) if s_rms > 0 else np.array([np.pi / 2])
    best = None
    for phi in angles:
        sigma = np.hypot(np.cos(phi) * sp / (s_rms or 1.0), np.sin(phi) * ta / t_rms)
        if np.any(sigma <= 0):
            continue  # a point with no spread cannot be covered by the spread alone
        kappa = float(np.sqrt(np.mean((e / sigma) ** 2))) or 1.0
        std = kappa * sigma
        k = _conformal_quantiles(e / std, LEVELS_P)
        score = _interval_score(e, std, k)
        if best is None or score < best[0]:
            best = (score, phi, kappa, k)
    if best is None:
        raise ValueError("no std model covers every point: the spread is zero at some points")
    _, phi, kappa, k = best
    if not np.all(k > 0):
        raise ValueError("the validation errors are zero at too many points to calibrate")
    scale = kappa * np.cos(phi) / (s_rms or 1.0)
    floor = kappa * np.sin(phi) / t_rms
    return Calibration(
        scale=float(scale), floor=float(floor), multipliers=np.asarray(k, float), mix=float(phi)
    )


def _coverage_error_of_factors(ratio: np.ndarray, factors: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Calibration error of one component's intervals ±κ·k_p·std for each factor κ.

    ratio: (N,) |err|/std; factors: (F,) candidate κ; k: (19,) multipliers at LEVELS_P.
    Returns (F,) mean over p of |share of ratio ≤ κ k_p − p|."""
    z = np.sort(ratio)
    share = np.searchsorted(z, factors[:, None] * k[None], side="right") / z.size  # (F, 19)
    return np.mean(np.abs(share - np.asarray(LEVELS_P)), axis=1)


def _component_calibration(
    ratio: np.ndarray, orbits: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Std factors κ (r,), one per orbit of response components, and multipliers k_p
    (19,) shared by the components, fitted on ratio (N, r) = |err| / std; None when an
    orbit has no error to calibrate on.

    κ starts RMS-consistent per orbit (mean of (ratio / κ)² = 1 over its components);
    k_p are then the conformal quantiles of ratio / κ, components pooled, and each orbit's
    κ is moved (factors 1/4 to 4 of it) to the value with the smallest calibration error
    of its own components under those k_p. The components' errors differ in shape as well
    as size, so RMS-consistency alone leaves one component over- and another
    under-covered. Two rounds; the last k_p are refitted, so the pooled coverage is the
    conformal one."""
    kappa = np.ones(ratio.shape[1])
    for orbit in orbits:
        kappa[list(orbit)] = np.sqrt(np.mean(ratio[:, list(orbit)] ** 2))
    if not np.all(kappa > 0):
        return None
    moves = np.geomspace(0.25, 4.0, 161)
    for _ in range(2):
        k = _conformal_quantiles((ratio / kappa).ravel(), LEVELS_P)
        if not np.all(k > 0):
            return None
        for orbit in orbits:
            candidates = kappa[orbit[0]] * moves
            errors = _coverage_error_of_factors(ratio[:, list(orbit)].ravel(), candidates, k)
            kappa[list(orbit)] = candidates[np.argmin(errors)]
    k = _conformal_quantiles((ratio / kappa).ravel(), LEVELS_P)
    return (kappa, k) if np.all(k > 0) else None


def fit_symmetry_classes(
    err: np.ndarray,
    std: np.ndarray,
    order: np.ndarray,
    group: np.ndarray,
    orbits: Sequence[Sequence[int]] | None = None,
    *,
    min_microstructures: int = MIN_CLASS_MICROSTRUCTURES,
) -> tuple[np.ndarray, np.ndarray]:
    """Calibration per symmetry class of the cell and per orbit of response components
    (Mondrian split conformal prediction).

    The share of the error that the cell error scale τ explains differs between classes of
    cells. On the thermal family, the std pooled over the validation split covered the
    random-inclusion cells (no symmetry) 0.58 of the time at the 68 % level, and the
    square-symmetric inclusion cells more than nominal. A class is the cell's symmetry
    order (:func:`~neuroscale_coupling.cell.symmetry.symmetry_order`), known from the image.
    It differs between components too: with one factor for all components, the
    mechanical shear stress Σ12 was covered 0.84 of the time at the 95 % level and Σ11,
    Σ22 0.99. Per class c, :func:`_component_calibration` fits a std factor κ_c,j per
    orbit of components j and multipliers k_p,c on the class's validation errors. The
    components of an orbit (:func:`~neuroscale_coupling.cell.symmetry.response_orbits`: Q1
    and Q2; Σ11 and Σ22) share their factor, so the std stays equivariant under the
    square's symmetries (a rotated cell at the rotated state gets the rotated std). A
    class with fewer than ``min_microstructures`` distinct validation microstructures gets
    the factors and multipliers fitted on every class together: its own would rest on too
    few independent errors (the errors are mostly per microstructure).

    err, std: (N, r) errors and pooled calibrated std; order, group: (N,) the row's
    symmetry order (1, 2, 4 or 8) and microstructure id; orbits: index tuples that
    partition range(r) (None: each component alone).
    Returns factor (4, r) and multipliers (4, 19), rows in the order 1, 2, 4, 8.
    """
    from neuroscale_coupling.cell.symmetry import SYMMETRY_ORDERS

    e = np.abs(np.asarray(err, dtype=float))
    sd = np.asarray(std, dtype=float)
    o = np.asarray(order).reshape(-1)
    g = np.asarray(group).reshape(-1)
    if e.shape != sd.shape or e.ndim != 2 or o.shape != g.shape or o.size != e.shape[0]:
        raise ValueError(
            f"need err and std (N, r), order and group (N,); got {e.shape}, {sd.shape}, "
            f"{o.shape}, {g.shape}"
        )
    if not set(np.unique(o).tolist()) <= set(SYMMETRY_ORDERS):
        raise ValueError(f"symmetry orders must be among {SYMMETRY_ORDERS}; got {np.unique(o)}")
    r = e.shape[1]
    orbits = tuple((j,) for j in range(r)) if orbits is None else tuple(map(tuple, orbits))
    if sorted(j for orbit in orbits for j in orbit) != list(range(r)):
        raise ValueError(f"orbits {orbits} must partition the {r} response components")
    ratio = e / sd
    every = _component_calibration(ratio, orbits)
    if every is None:
        raise ValueError(
            "the validation errors vanish for a whole orbit of response components or at "
            "too many points to calibrate"
        )
    factor = np.tile(every[0], (len(SYMMETRY_ORDERS), 1))
    table = np.tile(every[1], (len(SYMMETRY_ORDERS), 1))
    for i, value in enumerate(SYMMETRY_ORDERS):
        rows = o == value
        if np.unique(g[rows]).size < min_microstructures:
            continue
        own = _component_calibration(ratio[rows], orbits)
        if own is not None:
            factor[i], table[i] = own
    return factor, table
