"""How far the held-out figures of ``neuroscale evaluate`` can be trusted.

The errors of a trained surrogate are mostly per microstructure: all states of one cell
image share most of their error. The samples of a held-out split are
therefore not independent, and its size in samples overstates what it measures. At 32²
voxels a one-parameter generator (a centred disk, centre + corner fibres) has only a few
dozen distinct images, and the mechanical test split holds nine. A figure on such a
split can move by more than its target when other images are held out.

:func:`group_bootstrap` resamples distinct microstructures (translation classes,
:func:`~neuroscale_coupling.data.split.translation_groups`) with replacement and
recomputes the relative L2 errors and the calibration error. It returns the 5 % and
95 % quantiles over the draws. :func:`by_generator` gives the same figures per generator
of the family.

The held-out samples travel as :class:`HeldOutErrors` (shapes there).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["HeldOutErrors", "by_generator", "group_bootstrap"]

QUANTILES = (0.05, 0.95)
FIGURES = ("rel_l2_response", "rel_l2_tangent", "calibration_error")


@dataclass(frozen=True)
class HeldOutErrors:
    """err_q, ref_q (N, r): response error and reference; err_t, ref_t (N, r, d): tangent;
    hits (L, N, r) bool: |err| inside the level-p interval, for the L ``levels`` (None
    without a predictive spread); group (N,): the sample's microstructure id (>= 0)."""

    err_q: np.ndarray
    ref_q: np.ndarray
    err_t: np.ndarray
    ref_t: np.ndarray
    hits: np.ndarray | None
    levels: Sequence[float]
    group: np.ndarray

    def rows(self, mask: np.ndarray) -> "HeldOutErrors":
        """The samples where mask (N,) holds, microstructure ids renumbered densely."""
        return HeldOutErrors(
            self.err_q[mask],
            self.ref_q[mask],
            self.err_t[mask],
            self.ref_t[mask],
            None if self.hits is None else self.hits[:, mask],
            self.levels,
            np.unique(self.group[mask], return_inverse=True)[1].reshape(-1),
        )

    def group_sums(self) -> tuple[np.ndarray, ...]:
        """Per microstructure (G rows): Σ err_q², Σ ref_q², Σ err_t², Σ ref_t², hits per
        level (G, L) or None, and the count of response entries."""
        g = np.asarray(self.group).reshape(-1)
        if g.shape[0] != self.err_q.shape[0] or g.size == 0 or g.min() < 0:
            raise ValueError(
                f"need one group id >= 0 per sample; got {g.shape} for {self.err_q.shape}"
            )
        n_groups = int(g.max()) + 1

        def per_group(values: np.ndarray) -> np.ndarray:
            out = np.zeros((n_groups, int(np.prod(values.shape[1:], dtype=np.int64))))
            np.add.at(out, g, values.reshape(values.shape[0], -1))
            return out.sum(1)

        hits = None
        if self.hits is not None:
            hits = np.stack([per_group(h) for h in self.hits], axis=1)  # (G, L)
        count = np.bincount(g, minlength=n_groups).astype(float) * self.err_q.shape[1]
        sq = [per_group(a**2) for a in (self.err_q, self.ref_q, self.err_t, self.ref_t)]
        return (*sq, hits, count)

    def figures(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Relative L2 errors and calibration error (B,) for rows of microstructure weights
        (B, G) (a row of ones: the figures of the samples themselves)."""
        eq2, yq2, et2, yt2, hits, count = self.group_sums()
        with np.errstate(divide="ignore", invalid="ignore"):
            out = {
                "rel_l2_response": np.sqrt((weights @ eq2) / (weights @ yq2)),
                "rel_l2_tangent": np.sqrt((weights @ et2) / (weights @ yt2)),
            }
            if hits is not None:
                cov = (weights @ hits) / (weights @ count)[:, None]  # (B, L)
                levels = np.asarray(self.levels, dtype=float)
                out["calibration_error"] = np.mean(np.abs(cov - levels), axis=1)
        return out


def group_bootstrap(
    errors: HeldOutErrors, *, draws: int = 2000, seed: int = 0
) -> dict[str, list[float | None]]:
    """5 %–95 % bootstrap intervals of the relative L2 errors of response and tangent and
    of the calibration error (None without hits), resampling the G microstructures with
    replacement. Deterministic for a given ``seed``."""
    n_groups = errors.group_sums()[-1].shape[0]
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=draws)
    figs = errors.figures(weights.astype(float))
    out: dict[str, list[float | None]] = {}
    for key in FIGURES:
        v = figs.get(key)
        v = np.zeros(0) if v is None else v[np.isfinite(v)]
        out[key] = [float(x) for x in np.quantile(v, QUANTILES)] if v.size else [None, None]
    return out


def by_generator(
    errors: HeldOutErrors, generator: Sequence[str]
) -> dict[str, dict[str, float | int | None]]:
    """Per generator name (one per sample, (N,)): samples, distinct microstructures,
    relative L2 errors of response and tangent, calibration error (None without hits)."""
    gen = np.asarray(generator, dtype=object).reshape(-1)
    out: dict[str, dict[str, float | int | None]] = {}
    for name in sorted(set(gen.tolist())):
        part = errors.rows(gen == name)
        n_groups = int(part.group.max()) + 1
        figs = part.figures(np.ones((1, n_groups)))
        entry: dict[str, float | int | None] = {
            "n_samples": int(part.group.size),
            "n_microstructures": n_groups,
        }
        for key in FIGURES:
            v = figs.get(key)
            entry[key] = None if v is None or not np.isfinite(v[0]) else float(v[0])
        out[str(name)] = entry
    return out
