"""Distance of a cell image to the training family, measured on the image itself.

The latent Mahalanobis ratio (:meth:`SANO.family_ratio`) only sees what the encoder learned
to tell apart. An encoder trained on a narrow family can map a foreign cell onto the family:
the first shipped mechanical model (a latent of 8 for two one-parameter generators) placed
laminates and checkerboards at latent ratio 0.3-0.5, inside its family, while its error on
them was 50-77 %. This module looks at the microstructure directly.

**Descriptor.** The periodic two-point correlation function of each phase k ≥ 1,
S2_k(r) = ⟨χ_k(x) χ_k(x + r)⟩ over the cell (one FFT: S2_k = F⁻¹|F χ_k|² / n²). It does not
change when the cell is translated, S2_k(0) is the volume fraction and its decay and shape
carry size, shape, anisotropy and arrangement. It is averaged over the symmetries of the
square (S2(−r) = S2(r), so the mean over r, flip(r), transpose(r), rotation(r) is the D4
mean) and kept at the lags 0 ≤ r_2 ≤ r_1 ≤ R (the fundamental domain), R = n/4 by default.

**Ratio.** The Euclidean distance of a cell's descriptor to the nearest training cell,
divided by the ``quantile`` (0.99) of the nearest-neighbour distances between the distinct
training cells (each left out of its own search). Cells like the training ones lie at about
1 or below; the ratio grows with how far the cell is from every training cell. A family of
one microstructure has no scale: its own cell has ratio 0, any other cell ∞.

The shape of S2 rather than S2 itself is compared, so that the volume fraction does not
dominate every lag: the descriptor of phase k is its volume fraction φ_k = S2_k(0) and the
normalized autocovariance (S2_k(r) − φ_k²)/(φ_k(1 − φ_k)) at the lags r ≠ 0 (1 at r = 0,
→ 0 at long range for a disordered medium, 1 along the layers of a laminate).
"""

import numpy as np
from scipy.spatial import cKDTree

from neuroscale_coupling.cell.microstructure import distinct_images

__all__ = ["ImageFamily", "correlation_descriptors"]


def correlation_descriptors(
    images: np.ndarray, n_phases: int, *, radius: int | None = None
) -> np.ndarray:
    """D4-averaged periodic two-point correlations of phases 1 … n_phases − 1: per phase the
    volume fraction and the normalized autocovariance at the lags 0 ≤ r_2 ≤ r_1 ≤ R, r ≠ 0
    (module doc).

    images (N, n, n) integer phase ids → (N, (n_phases − 1) · (R + 1)(R + 2)/2) float64,
    R = ``radius`` (default n // 4, at most n // 2)."""
    im = np.asarray(images)
    if im.ndim != 3 or im.shape[1] != im.shape[2]:
        raise ValueError(f"images must be square cells (N, n, n); got shape {im.shape}")
    if n_phases < 2:
        raise ValueError(f"n_phases={n_phases}: a family descriptor needs at least two phases")
    n = im.shape[1]
    r = n // 4 if radius is None else int(radius)
    if not 0 <= r <= n // 2:
        raise ValueError(f"radius={radius} must lie in [0, n // 2] = [0, {n // 2}]")
    rows, cols = np.tril_indices(r + 1)
    neg_rows, neg_cols = (-rows) % n, (-cols) % n
    parts = []
    for k in range(1, n_phases):
        chi = (im == k).astype(np.float64)
        s2 = np.fft.irfft2(np.abs(np.fft.rfft2(chi)) ** 2, s=(n, n)) / (n * n)
        # D4 mean at the kept lags only: (r1, r2), (-r1, r2), (r2, r1), (-r2, r1)
        s2 = 0.25 * (
            s2[:, rows, cols] + s2[:, neg_rows, cols] + s2[:, cols, rows] + s2[:, neg_cols, rows]
        )
        vf = s2[:, :1]  # S2(0) = volume fraction, (N, 1)
        var = vf * (1.0 - vf)
        cov = (s2[:, 1:] - vf**2) / np.where(var > 0, var, 1.0)
        parts += [vf, cov]
    return np.concatenate(parts, axis=1)


class ImageFamily:
    """Nearest-training-cell distance in two-point-correlation space (see module doc).

    ``ImageFamily(train_images (C, n, n), n_phases)``; :meth:`ratio` (images (N, n, n)) →
    (N,)."""

    def __init__(
        self,
        images: np.ndarray,
        n_phases: int,
        *,
        radius: int | None = None,
        quantile: float = 0.99,
    ) -> None:
        im = np.asarray(images)
        if im.ndim != 3:
            raise ValueError(f"training images must be (C, n, n); got shape {im.shape}")
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile={quantile} must lie in (0, 1]")
        if im.shape[0] == 0:
            raise ValueError("the training family holds no image")
        uniq = distinct_images(im)[0]
        self.n_phases = int(n_phases)
        self.radius = radius
        self.image_size = int(im.shape[1])
        self._tree = cKDTree(correlation_descriptors(uniq, n_phases, radius=radius))
        self.scale = 0.0
        if uniq.shape[0] > 1:
            loo, _ = self._tree.query(self._tree.data, k=2)
            self.scale = float(np.quantile(loo[:, 1], quantile))

    def ratio(self, images: np.ndarray) -> np.ndarray:
        """Distance to the nearest training cell over the family scale, (N,) float64."""
        im = np.asarray(images)
        if im.ndim != 3 or im.shape[1:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images must have shape (N, {self.image_size}, {self.image_size}) like the "
                f"training cells; got {im.shape}"
            )
        if im.shape[0] == 0:
            return np.zeros(0)
        dist, _ = self._tree.query(correlation_descriptors(im, self.n_phases, radius=self.radius))
        if self.scale > 0:
            return dist / self.scale
        # one training microstructure (or coinciding descriptors): the same cell or foreign
        return np.where(dist > 1e-12, np.inf, 0.0)
