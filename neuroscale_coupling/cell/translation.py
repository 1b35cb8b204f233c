"""Canonical translation of periodic cells.

The homogenized response of a periodic cell does not change when the cell is translated:
a rolled image is the same material. A learned encoder is not translation-invariant by
construction. :func:`canonical_translation` rolls each image to a canonical position
before encoding, so that translated copies of a cell get the same latent.

Per axis, the phase-id profile p_j (sum over the other axis) has the Fourier modes
F_k = Σ_j p_j exp(−2πi k j / n). The first mode k ≥ 1 with |F_k| > 1e-6 · F_0 gives the
profile's circular mean position μ = −arg(F_k) · n / (2πk), defined modulo n/k. The image
is rolled by the integer s = ⌊(c − μ) mod (n/k) + ½⌋, c = (n − 1)/2, so that μ lands
within half a voxel of the cell centre.

Under an integer translation t, μ moves by t, so s moves by −t: translated copies become
the same image when k = 1 decides. When all modes below k vanish (k > 1, as for the
n/2-periodic profiles of the centre-and-corner fibres), the roll is known modulo n/k only.
Of the candidate rolls, the lexicographically largest image is kept; it is the same for
every translate. A profile without a non-vanishing mode (each row of a 2 × 2 checkerboard
holds the same phase mix) makes every roll along its axis a candidate. Cells centred on
the grid centre stay as they are: the project's single inclusions and centre-and-corner
fibres. Uniform images are not moved. A profile that
happens to have 0 < |F_1| ≤ 1e-6 · F_0 is treated as if F_1 vanished. Its copies still
agree when shifted by a multiple of n/k. Other shifts of it may canonicalize differently.
"""

import numpy as np

__all__ = ["canonical_translation"]

_TOL = 1e-6


def _axis_shifts(profiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer roll (B,) per profile (B, n) that brings its circular mean to (n − 1)/2, and
    the mode k (B,) that decided it (the roll is defined modulo n/k; k = n for a profile
    without a non-vanishing mode: every roll is a candidate)."""
    b, n = profiles.shape
    f = np.fft.rfft(profiles, axis=1)  # (B, n//2 + 1)
    mass = np.abs(f[:, :1])
    strong = np.abs(f[:, 1:]) > _TOL * np.maximum(mass, 1e-300)  # (B, n//2)
    has = strong.any(axis=1)
    k = np.where(has, strong.argmax(axis=1) + 1, 1)
    phase = np.angle(f[np.arange(b), k])
    period = n / k
    mu = -phase * n / (2 * np.pi * k)
    r = np.mod((n - 1) / 2 - mu, period)
    s = np.mod(np.floor(r + 0.5), period)
    return np.where(has, s, 0).astype(np.int64), np.where(has, k, n)


def canonical_translation(images: np.ndarray) -> np.ndarray:
    """Images (B, n, n) (or one (n, n)) of phase ids rolled to their canonical position.

    Integer rolls, so phase ids and fractions are unchanged. The input is not modified."""
    im = np.asarray(images)
    single = im.ndim == 2
    batch = im[None] if single else im
    if batch.ndim != 3:
        raise ValueError(f"images must have shape (B, n, n) or (n, n); got {im.shape}")
    values = batch.astype(float)
    s0, k0 = _axis_shifts(values.sum(axis=2))  # profile along axis 0 of the image
    s1, k1 = _axis_shifts(values.sum(axis=1))
    n0, n1 = batch.shape[1:]
    rows = (np.arange(n0)[None, :] - s0[:, None]) % n0  # (B, n0)
    cols = (np.arange(n1)[None, :] - s1[:, None]) % n1
    out = batch[np.arange(batch.shape[0])[:, None, None], rows[:, :, None], cols[:, None, :]]
    # A mode k > 1 fixes the roll modulo n/k only: of the k0·k1 candidate rolls, keep the
    # lexicographically largest image (the same set of candidates for every translate).
    uniform = np.all(batch == batch[:, :1, :1], axis=(1, 2))
    for b in np.flatnonzero(((k0 > 1) | (k1 > 1)) & ~uniform):
        p0, p1 = n0 // k0[b], n1 // k1[b]
        candidates = [
            np.roll(out[b], (i * p0, j * p1), axis=(0, 1))
            for i in range(k0[b])
            for j in range(k1[b])
        ]
        out[b] = max(candidates, key=lambda c: c.tobytes())
    return out[0] if single else out
