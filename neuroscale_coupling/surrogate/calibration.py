"""Calibration of the surrogate's standard deviation (DESIGN.md §6).

The calibrated std is σ = √((s·spread)² + c²): the spread of the fixed MC-dropout samples
scaled by s, plus a floor c added in quadrature (normalized units: responses divided by
their per-component RMS). The spread alone tracks the error's variation from point to
point but not its size everywhere — the errors of a trained model have a part that the
dropout samples do not see — so a scale alone cannot match every nominal level (measured on
the thermal model: calibration error 0.045 with s alone, 0.010 with s and c).
:func:`fit_std_calibration` minimizes the calibration error ``mean_p |coverage_p − p|``
over nominal levels p = 0.05, 0.10, …, 0.95 (:data:`LEVELS_P`) of the Gaussian intervals
±z_p·σ (all response components pooled): for each floor on a grid (0 and a log grid
relative to the RMS error) the best scale by a log-grid search and a local refinement.
Training fits (s, c) on the validation split (eval mode, the fixed MC masks) and stores
them with ``SANO.set_std_scale`` / ``set_std_floor``; online enrichment refits them on the
model file's reference validation rows.
"""

from collections.abc import Sequence

import numpy as np

__all__ = ["LEVELS_P", "calibration_error", "coverage", "fit_std_calibration", "fit_std_scale"]

LEVELS_P = tuple(round(0.05 * k, 2) for k in range(1, 20))


def _z(p: np.ndarray) -> np.ndarray:
    from scipy.stats import norm

    return norm.ppf((1 + np.asarray(p, dtype=float)) / 2)


def coverage(err: np.ndarray, std: np.ndarray, p: float | Sequence[float]) -> np.ndarray:
    """Empirical coverage of the Gaussian intervals ±z_p·std: share of |err| <= z_p std.

    err, std: same shape (any); p: nominal level(s); returns one value per level."""
    e = np.abs(np.asarray(err, dtype=float)).ravel()
    s = np.asarray(std, dtype=float).ravel()
    z = np.atleast_1d(_z(p))
    return np.array([(e <= zi * s).mean() for zi in z])


def calibration_error(
    err: np.ndarray, std: np.ndarray, levels: Sequence[float] = LEVELS_P
) -> float:
    """mean over nominal levels p of |coverage(p) − p| (DESIGN.md §6)."""
    return float(np.mean(np.abs(coverage(err, std, levels) - np.asarray(levels))))


def fit_std_scale(
    err: np.ndarray,
    std: np.ndarray,
    levels: Sequence[float] = LEVELS_P,
    *,
    floor: float = 0.0,
    points: int = 601,
) -> float:
    """Scale s minimizing calibration_error(err, √((s·std)² + floor²)): log grid 1e-3…1e3
    with ``points`` values, then a local refinement.

    Ties are broken by the scale closest (in log) to 1. Raises ValueError without spread."""
    s = np.asarray(std, dtype=float)
    if not np.any(s > 0):
        raise ValueError("the model has no spread (std = 0): train with dropout > 0")
    grid = np.logspace(-3, 3, points)
    for _ in range(2):
        ce = np.array([calibration_error(err, np.hypot(g * s, floor), levels) for g in grid])
        best = np.flatnonzero(ce <= ce.min() + 1e-12)
        g0 = grid[best[np.argmin(np.abs(np.log(grid[best])))]]
        grid = g0 * np.logspace(-0.02, 0.02, 81)
    return float(g0)


def fit_std_calibration(
    err: np.ndarray, std: np.ndarray, levels: Sequence[float] = LEVELS_P
) -> tuple[float, float]:
    """(scale s, floor c) minimizing calibration_error(err, √((s·std)² + c²)).

    c from 0 and 24 values log-spaced in [1e-3, 1] × the RMS error; for each the scale by
    :func:`fit_std_scale`. Ties go to the smaller floor. err, std: same shape."""
    e = np.asarray(err, dtype=float)
    rms = float(np.sqrt(np.mean(e**2))) or 1.0
    s_arr = np.asarray(std, dtype=float)

    def fit(c: float) -> tuple[float, float, float]:
        s = fit_std_scale(e, s_arr, levels, floor=c, points=121)
        return calibration_error(e, np.hypot(s * s_arr, c), levels), s, c

    best = fit(0.0)
    for c in rms * np.logspace(-3, 0, 24):
        trial = fit(float(c))
        if trial[0] < best[0] - 1e-12:
            best = trial
    return best[1], best[2]
