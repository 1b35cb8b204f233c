"""How far the held-out figures of ``neuroscale evaluate`` can be trusted.

The errors of a trained surrogate are mostly per microstructure: all states of one cell
image share most of their error (DESIGN.md §6). The samples of a held-out split are
therefore not independent, and its size in samples overstates what it measures. At 32²
voxels a one-parameter generator (a centred disk, centre + corner fibres) has only a few
dozen distinct images, and the mechanical test split holds nine. A figure on such a
split can move by more than its target when other images are held out.

:func:`group_bootstrap` resamples distinct microstructures (translation classes,
:func:`~neuroscale_coupling.surrogate.data.translation_groups`) with replacement and
recomputes the relative L2 errors and the calibration error. It returns the 5 % and
95 % quantiles over the draws. :func:`by_generator` gives the same figures per generator
of the family.

Shapes: err_q, ref_q (N, r) response error and reference; err_t, ref_t (N, r, d)
tangent; hits (L, N, r) bool, |err| inside the level-p interval for the L levels;
group (N,) the sample's microstructure id in [0, G).
"""

from collections.abc import Sequence

import numpy as np

__all__ = ["by_generator", "group_bootstrap"]

QUANTILES = (0.05, 0.95)


def _per_group(values: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Sums (G, k) over the samples of each group of values (N, …) flattened per sample."""
    v = values.reshape(values.shape[0], -1)
    out = np.zeros((n_groups, v.shape[1]))
    np.add.at(out, group, v)
    return out


def _figures(
    weights: np.ndarray,
    eq2: np.ndarray,
    yq2: np.ndarray,
    et2: np.ndarray,
    yt2: np.ndarray,
    hits: np.ndarray | None,
    count: np.ndarray,
    levels: np.ndarray,
) -> dict[str, np.ndarray]:
    """Figures for each row of group weights (B, G) from the per-group sums."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "rel_l2_response": np.sqrt((weights @ eq2) / (weights @ yq2)),
            "rel_l2_tangent": np.sqrt((weights @ et2) / (weights @ yt2)),
        }
        if hits is not None:
            cov = (weights @ hits) / (weights @ count)[:, None]  # (B, L)
            out["calibration_error"] = np.mean(np.abs(cov - levels), axis=1)
    return out


def _sums(
    err_q: np.ndarray,
    ref_q: np.ndarray,
    err_t: np.ndarray,
    ref_t: np.ndarray,
    hits: np.ndarray | None,
    group: np.ndarray,
    n_groups: int,
) -> tuple[np.ndarray, ...]:
    eq2 = _per_group(err_q**2, group, n_groups).sum(1)
    yq2 = _per_group(ref_q**2, group, n_groups).sum(1)
    et2 = _per_group(err_t**2, group, n_groups).sum(1)
    yt2 = _per_group(ref_t**2, group, n_groups).sum(1)
    r = err_q.shape[1]
    count = np.bincount(group, minlength=n_groups).astype(float) * r
    h = None
    if hits is not None:
        h = np.stack([_per_group(hl, group, n_groups).sum(1) for hl in hits], axis=1)  # (G, L)
    return eq2, yq2, et2, yt2, h, count


def group_bootstrap(
    err_q: np.ndarray,
    ref_q: np.ndarray,
    err_t: np.ndarray,
    ref_t: np.ndarray,
    hits: np.ndarray | None,
    levels: Sequence[float],
    group: np.ndarray,
    *,
    draws: int = 2000,
    seed: int = 0,
) -> dict[str, list[float | None]]:
    """5 %–95 % bootstrap intervals of the relative L2 errors of response and tangent and
    of the calibration error (None without hits), resampling the G microstructures with
    replacement (module doc for shapes). Deterministic for a given ``seed``."""
    g = np.asarray(group).reshape(-1)
    if g.shape[0] != err_q.shape[0] or g.size == 0 or g.min() < 0:
        raise ValueError(f"need one group id >= 0 per sample; got {g.shape} for {err_q.shape}")
    n_groups = int(g.max()) + 1
    sums = _sums(err_q, ref_q, err_t, ref_t, hits, g, n_groups)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=draws)
    figs = _figures(weights.astype(float), *sums, np.asarray(levels, dtype=float))
    out: dict[str, list[float | None]] = {}
    for key, v in figs.items():
        v = v[np.isfinite(v)]
        out[key] = [float(x) for x in np.quantile(v, QUANTILES)] if v.size else [None, None]
    if hits is None:
        out["calibration_error"] = [None, None]
    return out


def by_generator(
    err_q: np.ndarray,
    ref_q: np.ndarray,
    err_t: np.ndarray,
    ref_t: np.ndarray,
    hits: np.ndarray | None,
    levels: Sequence[float],
    group: np.ndarray,
    generator: Sequence[str],
) -> dict[str, dict[str, float | int | None]]:
    """Per generator name (one per sample, (N,)): samples, distinct microstructures,
    relative L2 errors of response and tangent, calibration error (None without hits)."""
    gen = np.asarray(generator, dtype=object).reshape(-1)
    g = np.asarray(group).reshape(-1)
    out: dict[str, dict[str, float | int | None]] = {}
    for name in sorted(set(gen.tolist())):
        rows = gen == name
        _, gl = np.unique(g[rows], return_inverse=True)
        n_groups = int(gl.max()) + 1
        sums = _sums(
            err_q[rows],
            ref_q[rows],
            err_t[rows],
            ref_t[rows],
            None if hits is None else hits[:, rows],
            gl.reshape(-1),
            n_groups,
        )
        figs = _figures(np.ones((1, n_groups)), *sums, np.asarray(levels, dtype=float))
        entry: dict[str, float | int | None] = {
            "n_samples": int(rows.sum()),
            "n_microstructures": n_groups,
        }
        for key in ("rel_l2_response", "rel_l2_tangent", "calibration_error"):
            v = figs.get(key)
            entry[key] = None if v is None or not np.isfinite(v[0]) else float(v[0])
        out[str(name)] = entry
    return out
