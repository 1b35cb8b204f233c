"""The model inputs: per-scale normalized wavelet coefficients of cell images.

The phase image is mapped to a scalar field ``v[image]`` with ``v`` = log of the phase's
leading stiffness (log k0, thermal; log K, bulk modulus, mechanical,
:func:`~neuroscale_coupling.cell.materials.phase_values`), so that cells of different
phase laws are comparable on one physical scale; then ``pywt.wavedec2`` (periodization)
and a mean/std per (level, orientation) fitted on the training images
(:class:`WaveletNormalizer`). :func:`wavelet_inputs` turns images into the tensors the
encoder reads, optionally after the canonical translation.
"""

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from neuroscale_coupling.cell.materials import MechanicalMaterial, ThermalMaterial, phase_values
from neuroscale_coupling.cell.translation import canonical_translation
from neuroscale_coupling.checks import check_count

__all__ = ["WaveletNormalizer", "wavelet_inputs"]


# ---------------------------------------------------------------------------- normalization
@dataclass(frozen=True)
class WaveletNormalizer:
    """Per-scale normalization of the 2D wavelet transform of cell images.

    The image (…, n, n) becomes the field ``values[image]`` (see :func:`phase_values`),
    transformed by ``pywt.wavedec2(wavelet, mode="periodization", level=levels)``.
    approx_mean/approx_std: scalars for the coarsest approximation; detail_mean,
    detail_std: (levels, 3) for the (horizontal, vertical, diagonal) details, row 0 the
    coarsest level (pywt order). A band with zero spread in the training set keeps std 1.
    """

    wavelet: str
    levels: int
    values: tuple[float, ...]
    approx_mean: float
    approx_std: float
    detail_mean: tuple[tuple[float, float, float], ...]
    detail_std: tuple[tuple[float, float, float], ...]

    @staticmethod
    def _decompose(
        images: Any, values: np.ndarray, wavelet: str, levels: int
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        import pywt

        im = np.asarray(images)
        if im.ndim < 2 or im.shape[-1] != im.shape[-2]:
            raise ValueError(f"images must have shape (…, n, n); got {im.shape}")
        n = im.shape[-1]
        if levels < 1 or n % (2**levels):
            raise ValueError(
                f"levels={levels} does not fit cells of n={n}: n must be a multiple of "
                f"2**levels; lower levels"
            )
        if im.size and (im.min() < 0 or im.max() >= values.size):
            raise ValueError(
                f"images hold phase ids outside 0..{values.size - 1}: use the material "
                "the normalizer was fitted for"
            )
        fld = values[im.astype(np.int64)]
        with warnings.catch_warnings():  # "boundary effects": harmless with periodization
            warnings.simplefilter("ignore", UserWarning)
            coeffs = pywt.wavedec2(fld, wavelet, mode="periodization", level=levels, axes=(-2, -1))
        return coeffs[0], [np.stack(c, axis=-3) for c in coeffs[1:]]

    @classmethod
    def fit(
        cls,
        images: Any,
        material: ThermalMaterial | MechanicalMaterial,
        *,
        levels: int = 3,
        wavelet: str = "haar",
    ) -> "WaveletNormalizer":
        """Fit the per-scale statistics on training images (C, n, n)."""
        import pywt

        if wavelet not in pywt.wavelist(kind="discrete"):
            raise ValueError(f"wavelet={wavelet!r} is not a discrete PyWavelets wavelet")
        levels = check_count("levels", levels)
        values = phase_values(material)
        approx, details = cls._decompose(images, values, wavelet, levels)

        def stats(a: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
            mean = a.mean(axis=axes)
            std = a.std(axis=axes)
            scale = max(float(np.max(np.abs(values))), 1.0)
            return mean, np.where(std > 1e-12 * scale, std, 1.0)

        am, asd = stats(approx, tuple(range(approx.ndim)))
        dm, dsd = zip(*(stats(d, (0, 2, 3)) for d in details), strict=True)
        return cls(
            wavelet=wavelet,
            levels=levels,
            values=tuple(float(v) for v in values),
            approx_mean=float(am),
            approx_std=float(asd),
            detail_mean=tuple(tuple(float(x) for x in m) for m in dm),
            detail_std=tuple(tuple(float(x) for x in s) for s in dsd),
        )

    def transform(self, images: Any) -> list[np.ndarray]:
        """Normalized coefficients of images (B, n, n), batched (no per-image loop).

        Returns ``[approx (B, m, m), details_S (B, 3, m, m), …, details_1 (B, 3, n/2,
        n/2)]`` with m = n / 2**levels, coarsest first (as pywt.wavedec2).
        """
        approx, details = self._decompose(
            images, np.asarray(self.values), self.wavelet, self.levels
        )
        out = [(approx - self.approx_mean) / self.approx_std]
        for d, m, s in zip(details, self.detail_mean, self.detail_std, strict=True):
            out.append((d - np.asarray(m)[:, None, None]) / np.asarray(s)[:, None, None])
        return out

    def inverse(self, coefficients: Sequence[np.ndarray]) -> np.ndarray:
        """The field ``values[image]`` (B, n, n) back from :meth:`transform`'s output."""
        import pywt

        a = coefficients[0] * self.approx_std + self.approx_mean
        rest = []
        for d, m, s in zip(coefficients[1:], self.detail_mean, self.detail_std, strict=True):
            x = d * np.asarray(s)[:, None, None] + np.asarray(m)[:, None, None]
            rest.append((x[..., 0, :, :], x[..., 1, :, :], x[..., 2, :, :]))
        return pywt.waverec2([a, *rest], self.wavelet, mode="periodization", axes=(-2, -1))

    def to_dict(self) -> dict[str, Any]:
        return {
            "wavelet": self.wavelet,
            "levels": self.levels,
            "values": list(self.values),
            "approx_mean": self.approx_mean,
            "approx_std": self.approx_std,
            "detail_mean": [list(m) for m in self.detail_mean],
            "detail_std": [list(s) for s in self.detail_std],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "WaveletNormalizer":
        return cls(
            wavelet=str(d["wavelet"]),
            levels=int(d["levels"]),
            values=tuple(float(v) for v in d["values"]),
            approx_mean=float(d["approx_mean"]),
            approx_std=float(d["approx_std"]),
            detail_mean=tuple(tuple(float(x) for x in m) for m in d["detail_mean"]),
            detail_std=tuple(tuple(float(x) for x in s) for s in d["detail_std"]),
        )


def wavelet_inputs(
    wav: WaveletNormalizer,
    images: np.ndarray,
    dtype: torch.dtype,
    device: torch.device,
    *,
    canonical: bool = False,
) -> list[torch.Tensor]:
    """Normalized wavelet coefficients as SANO input [approx (B,1,m,m), details (B,3,·,·)…]
    of images (B, n, n); with ``canonical`` (``SANOConfig.canonical_translation``) of the
    images rolled to their canonical position (:mod:`neuroscale_coupling.cell.translation`)."""
    c = wav.transform(canonical_translation(images) if canonical else images)
    return [torch.as_tensor(c[0][:, None], dtype=dtype, device=device)] + [
        torch.as_tensor(np.ascontiguousarray(x), dtype=dtype, device=device) for x in c[1:]
    ]
