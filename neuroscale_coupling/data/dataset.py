"""The dataset record: samples of (cell, macro state) → homogenized response and tangent.

**File format**: one file written by ``torch.save`` that loads with
``torch.load(path, weights_only=True)``: tensors plus plain dicts/lists/str/int/float/
bool/None (the metadata: spec, per-cell generator parameters, package version); the phase
images bit-packed (:func:`pack_images`, one bit a voxel for two phases). It is written to
a temporary file in the same folder and moved into place with ``os.replace``, so a crash
never leaves a partial file under the final name. The same payload is embedded in model
files (their reference training and validation samples).
"""

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neuroscale_coupling.data.spec import DatasetSpec
from neuroscale_coupling.io import plain_values, torch_save_atomic

__all__ = ["Dataset", "pack_images", "unpack_images"]


_FORMAT = "neuroscale-dataset"


_FORMAT_VERSION = 2  # 2: bit-packed images; version 1 (int8 images) is still read


_READ_VERSIONS = (1, 2)


# ---------------------------------------------------------------------------- helpers
def pack_images(images: np.ndarray) -> tuple[np.ndarray, int]:
    """Phase images (C, n, n), ids 0..127, as bit planes packed 8 voxels a byte.

    Returns (packed (ceil(b·C·n·n / 8),) uint8, b) with b = bits of the largest phase id
    (at least 1): a two-phase image costs one bit a voxel instead of a byte."""
    im = np.asarray(images)
    if im.size and (im.min() < 0 or im.max() > np.iinfo(np.int8).max):
        raise ValueError(f"phase ids must lie in 0..127; got {im.min()}..{im.max()}")
    bits = max(1, int(im.max()).bit_length()) if im.size else 1
    planes = (im.astype(np.uint8)[None] >> np.arange(bits, dtype=np.uint8)[:, None, None, None]) & 1
    return np.packbits(planes.reshape(-1)), bits


def unpack_images(packed: np.ndarray, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_images`: int8 images of ``shape`` (C, n, n)."""
    count = bits * int(np.prod(shape))
    planes = np.unpackbits(np.asarray(packed, dtype=np.uint8), count=count)
    planes = planes.reshape(bits, *shape).astype(np.int8)
    return np.sum(planes << np.arange(bits, dtype=np.int8)[:, None, None, None], axis=0).astype(
        np.int8
    )


# ---------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class Dataset:
    """Samples of (cell, macro state) → homogenized response and tangent.

    images: (C, n, n) int8 phase images; cell_ids: (C,) int64 index of each cell in the
    generated dataset (kept through splits); cell_index: (N,) int64 row of ``images`` of
    each sample; states: (N, d); response: (N, r); tangent: (N, r, d) float64;
    newton_iterations: (N,) int64; cells: per cell ``{"generator", "params"}``;
    metadata: plain dict (``spec`` as :meth:`DatasetSpec.to_dict`, ``version``,
    ``generation`` timings, ``split`` after :func:`split`).
    """

    images: np.ndarray
    cell_ids: np.ndarray
    cell_index: np.ndarray
    states: np.ndarray
    response: np.ndarray
    tangent: np.ndarray
    newton_iterations: np.ndarray
    cells: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.states.shape[0])

    @property
    def n_cells(self) -> int:
        return int(self.images.shape[0])

    @property
    def spec(self) -> DatasetSpec:
        """The generating spec, rebuilt from the metadata."""
        return DatasetSpec.from_dict(self.metadata["spec"])

    def sample_images(self) -> np.ndarray:
        """Image of each sample, (N, n, n) int8 (a gathered copy)."""
        return self.images[self.cell_index]

    def select_cells(self, rows: Any, *, split_name: str | None = None) -> "Dataset":
        """A dataset with only the cells ``rows`` (indices into ``images``) and their samples."""
        rows = np.asarray(rows, dtype=np.int64)
        remap = np.full(self.n_cells, -1, dtype=np.int64)
        remap[rows] = np.arange(rows.size)
        keep = np.flatnonzero(remap[self.cell_index] >= 0)
        meta = dict(self.metadata)
        if split_name is not None:
            meta["split"] = {**meta.get("split", {}), "name": split_name}
        return Dataset(
            images=self.images[rows],
            cell_ids=self.cell_ids[rows],
            cell_index=remap[self.cell_index[keep]],
            states=self.states[keep],
            response=self.response[keep],
            tangent=self.tangent[keep],
            newton_iterations=self.newton_iterations[keep],
            cells=[self.cells[int(r)] for r in rows] if self.cells else [],
            metadata=meta,
        )

    def sample_rows(self, max_rows: int, seed: int = 0) -> "Dataset":
        """At most ``max_rows`` samples drawn without replacement (all rows when there are
        fewer), in their original order; every cell image is kept."""
        n = len(self)
        if n <= max_rows:
            return self
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))
        return dataclasses.replace(
            self,
            cell_index=self.cell_index[rows],
            states=self.states[rows],
            response=self.response[rows],
            tangent=self.tangent[rows],
            newton_iterations=self.newton_iterations[rows],
        )

    # -------------------------------------------------------------- file I/O
    def to_payload(self) -> dict[str, Any]:
        """The dataset as a dict of tensors and plain values (what :meth:`save` writes;
        also embedded in model files): ``format``, ``format_version``, the images bit-packed
        (``images`` uint8, ``image_shape``, ``image_bits``: :func:`pack_images`), tensors
        ``cell_ids`` … ``newton_iterations``, plain ``cells``/``metadata``."""
        import torch

        def tensor(a: np.ndarray, dtype: Any) -> Any:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype))

        packed, bits = pack_images(self.images)
        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "images": tensor(packed, np.uint8),
            "image_shape": [int(k) for k in self.images.shape],
            "image_bits": bits,
            "cell_ids": tensor(self.cell_ids, np.int64),
            "cell_index": tensor(self.cell_index, np.int64),
            "states": tensor(self.states, np.float64),
            "response": tensor(self.response, np.float64),
            "tangent": tensor(self.tangent, np.float64),
            "newton_iterations": tensor(self.newton_iterations, np.int64),
            "cells": plain_values(self.cells),
            "metadata": plain_values(self.metadata),
        }

    @classmethod
    def from_payload(cls, payload: Any, where: str = "payload") -> "Dataset":
        """Rebuild a dataset from :meth:`to_payload`; ``where`` names the source in errors."""
        if not isinstance(payload, Mapping) or payload.get("format") != _FORMAT:
            raise ValueError(f"{where} is not a neuroscale dataset (no format={_FORMAT!r})")
        version = payload.get("format_version")
        if version not in _READ_VERSIONS:
            raise ValueError(
                f"{where} has dataset format version {version}; this library reads versions "
                f"{list(_READ_VERSIONS)}: regenerate the dataset"
            )
        names = ("cell_ids", "cell_index", "states", "response", "tangent", "newton_iterations")
        arrays = {k: payload[k].numpy() for k in names}
        if version == 1:
            arrays["images"] = payload["images"].numpy()
        else:
            shape = tuple(int(k) for k in payload["image_shape"])
            arrays["images"] = unpack_images(
                payload["images"].numpy(), int(payload["image_bits"]), shape
            )
        return cls(**arrays, cells=list(payload["cells"]), metadata=dict(payload["metadata"]))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the dataset to ``path`` atomically (not collective: call on one rank).

        The file loads with ``torch.load(path, weights_only=True)`` (see
        :meth:`to_payload`). It is written to a temporary file in the same folder and
        moved over ``path`` with ``os.replace`` only when complete.
        """
        torch_save_atomic(path, self.to_payload())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Dataset":
        """Read a file written by :meth:`save` (``torch.load(weights_only=True)``)."""
        import torch

        payload = torch.load(os.fspath(path), weights_only=True, map_location="cpu")
        return cls.from_payload(payload, os.fspath(path))
