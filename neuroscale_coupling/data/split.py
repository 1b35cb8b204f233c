"""Splitting a dataset by microstructure: cells equal up to a periodic translation form one
group, and whole groups go to one of train, val and test (pipeline step 4).
"""

import numpy as np

from neuroscale_coupling.cell.translation import canonical_translation
from neuroscale_coupling.data.dataset import Dataset

__all__ = ["split", "translation_groups"]


# ---------------------------------------------------------------------------- split
def translation_groups(images: np.ndarray) -> np.ndarray:
    """Group id (C,) of images (C, n, n): equal up to a periodic translation (equal
    canonical images, :func:`~neuroscale_coupling.cell.translation.canonical_translation`);
    ids dense and ordered by the group's smallest distinct image."""
    c = images.shape[0]
    raw = np.unique(images.reshape(c, -1), axis=0, return_inverse=True)[1].reshape(-1)
    canon = canonical_translation(images).reshape(c, -1)
    cid = np.unique(canon, axis=0, return_inverse=True)[1].reshape(-1)
    first = np.full(int(cid.max()) + 1 if c else 0, np.iinfo(np.int64).max)
    np.minimum.at(first, cid, raw)
    return np.unique(first[cid], return_inverse=True)[1].reshape(-1)


def split(
    dataset: Dataset,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    *,
    seed: int = 0,
) -> tuple[Dataset, Dataset, Dataset]:
    """Split into (train, val, test) by microstructure.

    Cells whose images are equal up to a periodic translation form one group (a family can
    draw the same voxel image twice, and a translated cell is the same material), and whole
    groups go to one split, so no microstructure of the val or test split occurs in train.
    Groups are numbered by their smallest distinct image (byte order), so a dataset without
    translated copies splits as by identical images. Groups are shuffled with ``seed`` and
    dealt to test, then val, until each holds at least its fraction of the samples; the rest
    is train. Deterministic (the same on every rank). Raises ValueError when there are fewer
    groups than non-empty splits.
    """
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or np.any(f < 0) or not np.isclose(f.sum(), 1.0) or f[0] <= 0:
        raise ValueError(
            f"fractions={fractions!r}: give three non-negative numbers (train, val, test) "
            "summing to 1 with train > 0"
        )
    group = translation_groups(dataset.images)
    n_groups = int(group.max()) + 1 if group.size else 0
    needed = 1 + int(f[1] > 0) + int(f[2] > 0)
    if n_groups < needed:
        raise ValueError(
            f"the dataset has {n_groups} distinct microstructures but the split needs at "
            f"least {needed}: generate more cells"
        )
    samples_per_cell = np.bincount(dataset.cell_index, minlength=dataset.n_cells)
    samples_per_group = np.bincount(group, weights=samples_per_cell, minlength=n_groups)
    order = np.random.default_rng(seed).permutation(n_groups)
    total = float(samples_per_cell.sum())
    label = np.zeros(n_groups, dtype=np.int64)  # 0 train, 1 val, 2 test
    pos = 0
    for which in (2, 1):
        if f[which] == 0:
            continue
        reserve = 1 + int(which == 2 and f[1] > 0)  # groups left for the later splits
        target = f[which] * total
        got = 0.0
        while pos < n_groups - reserve:
            nxt = samples_per_group[order[pos]]
            if got > 0 and abs(got + nxt - target) >= abs(got - target):
                break
            label[order[pos]] = which
            got += nxt
            pos += 1
    cell_label = label[group]
    info = {"fractions": f.tolist(), "seed": int(seed), "by": "distinct image"}
    out = []
    for which, name in enumerate(("train", "val", "test")):
        part = dataset.select_cells(np.flatnonzero(cell_label == which), split_name=name)
        part.metadata["split"] = {**info, "name": name}
        out.append(part)
    return out[0], out[1], out[2]
