"""The held-out data a model is evaluated on, and the leak check against its training
cells (``neuroscale evaluate``, :mod:`~neuroscale_coupling.training.evaluate`).

**Which data.** Without ``dataset`` the test split of the dataset the model was trained
on: the training config recorded in the model file names it (``data.dataset``, or
``data.generate`` with its ``save`` file; a generate table without a saved file is
regenerated, collectively, from its seed). It is re-split with the recorded fractions and
``split_seed``; relative data paths resolve against the training config's folder (found
from the model file's path and the recorded ``output.model``), as ``neuroscale train``
resolved them. The train and val cell ids must equal those recorded in the model file
(else the file is not the training dataset: ValueError), and no test cell id may be among
them. With ``dataset`` (a :class:`Dataset` or the path of a saved one, e.g. written by
``generate(spec with another seed).save(path)``) every sample of it is evaluated.
With ``fresh=(n_cells, seed)`` (``--fresh N --seed S``) n_cells cells are drawn afresh
from the family recorded in the model file (its ``data.generate`` table, with ``seed``),
their states solved with the recorded solver, and the cells whose image is that of a
training or validation cell, up to periodic translation, dropped (:func:`fresh_data`). At
32² voxels the one-parameter generators of the shipped families have few distinct
images, all of them in the training dataset: their fresh cells are dropped, and the
fresh data hold the random-inclusion cells.

**Leak check.** Every evaluated cell's image is compared, up to periodic translations,
with the images of the model's recorded train and val cells (rebuilt from the training
dataset file, or redrawn from the recorded generate table: drawing cells needs no fine
solve). A match is refused
(ValueError naming the cells) unless ``allow_overlap``, in which case the cells are listed
under ``overlap_cell_ids`` and ``held_out = false`` in the metrics. When the training
images cannot be rebuilt (the file is gone), ``leak_check = "unavailable"`` is recorded
and a warning logged.
"""

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from mpi4py import MPI

from neuroscale_coupling.cell.translation import canonical_translation
from neuroscale_coupling.data.dataset import Dataset
from neuroscale_coupling.data.generate import generate
from neuroscale_coupling.data.split import split
from neuroscale_coupling.log import get_logger
from neuroscale_coupling.surrogate.model_file import Surrogate
from neuroscale_coupling.training.config import GenerateConfig

__all__ = ["fresh_data", "held_out_data", "overlapping_cells", "training_images"]

_log = get_logger(__name__)


def _train_config(surrogate: Surrogate) -> dict[str, Any]:
    cfg = surrogate.training_config
    if cfg is None or surrogate.split_cell_ids is None:
        raise ValueError(
            "the model file records no training config / split cells: pass held-out data "
            "with --dataset PATH"
        )
    return cfg


def _recorded_ids(surrogate: Surrogate) -> tuple[np.ndarray, np.ndarray]:
    ids = surrogate.split_cell_ids
    if ids is None:
        raise ValueError("the model file records no split cells: pass --dataset PATH")
    return ids


def _generate_config(data_cfg: Mapping[str, Any]) -> GenerateConfig | None:
    gen = data_cfg.get("generate")
    return None if gen is None else GenerateConfig(**dict(gen))


def _training_file(data_cfg: Mapping[str, Any]) -> str | None:
    """Path of a saved training dataset named by the config, when it exists."""
    if data_cfg.get("dataset") is not None:
        return str(data_cfg["dataset"])
    gen = _generate_config(data_cfg)
    if gen is not None and gen.save is not None and os.path.exists(gen.save):
        return gen.save
    return None


def training_images(surrogate: Surrogate) -> tuple[np.ndarray, np.ndarray] | None:
    """(cell ids (K,), images (K, n, n)) of the model's recorded train + val cells.

    From the training dataset file when the config names one that exists, else redrawn
    from the recorded generate table (cells only: no fine solve). None when neither works.
    """
    cfg = _train_config(surrogate)
    data_cfg = dict(cfg.get("data") or {})
    tr, va = _recorded_ids(surrogate)
    ids = np.union1d(tr, va)
    path = _training_file(data_cfg)
    if path is not None:
        if not os.path.exists(path):
            return None
        ds = Dataset.load(path)
        all_ids, images = ds.cell_ids, ds.images
    else:
        gen = _generate_config(data_cfg)
        if gen is None:
            return None
        spec = gen.spec()
        # the cell draw of data.generate: the first child of SeedSequence(spec.seed)
        cell_seed = np.random.SeedSequence(spec.seed).spawn(2)[0]
        images, _ = spec.family.draw(spec.n_cells, cell_seed)
        all_ids = np.arange(spec.n_cells, dtype=np.int64)
    pos = {int(c): i for i, c in enumerate(all_ids)}
    missing = [int(c) for c in ids if int(c) not in pos]
    if missing:
        raise ValueError(
            f"the training cells {missing[:10]} recorded in the model file are not in its "
            "training dataset: the dataset file changed since training"
        )
    return ids, images[[pos[int(c)] for c in ids]]


def _known(images: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Mask (C,): images (C, n, n) equal to one of ``known`` (K, n, n) up to a periodic
    translation (the same material; compared as canonical images)."""
    if known.shape[1:] != images.shape[1:]:
        return np.zeros(images.shape[0], dtype=bool)
    seen = {im.astype(np.int8).tobytes() for im in canonical_translation(known)}
    mine = canonical_translation(images).astype(np.int8)
    return np.array([im.tobytes() in seen for im in mine], dtype=bool)


def overlapping_cells(data: Dataset, images: np.ndarray) -> np.ndarray:
    """Cell ids of ``data`` whose image equals one of ``images`` (K, n, n) up to a periodic
    translation (the same material; compared as canonical images), sorted."""
    return np.sort(data.cell_ids[_known(data.images, images)]).astype(np.int64)


def fresh_data(
    surrogate: Surrogate, n_cells: int, seed: int, *, comm: MPI.Comm | None = None
) -> tuple[Dataset, int]:
    """Held-out data drawn afresh from the model's recorded family (collective over comm).

    n_cells cells and their states (the recorded states per cell and domain) drawn from the
    recorded ``data.generate`` table with ``seed``; the cells whose image equals a training
    or validation cell's up to a periodic translation are dropped before the others are
    solved by the recorded fine solver. Returns the data and the number of cells dropped.
    Raises ValueError when the model file records no generate table, the training images
    cannot be rebuilt, or no cell is left."""
    comm = MPI.COMM_WORLD if comm is None else comm
    data_cfg = dict(_train_config(surrogate).get("data") or {})
    gen = _generate_config(data_cfg)
    if gen is None:
        raise ValueError(
            "the model file records no data.generate table to draw fresh cells from: pass "
            "held-out data with --dataset PATH"
        )
    if int(n_cells) < 1:
        raise ValueError(f"fresh n_cells={n_cells} must be >= 1")
    spec = dataclasses.replace(gen.spec(), n_cells=int(n_cells), seed=int(seed))
    known = training_images(surrogate)
    if known is None:
        raise ValueError(
            "cannot rebuild the training images to drop them from the fresh cells: the "
            "training dataset file is gone"
        )
    data = generate(spec, comm=comm, progress=False, skip=lambda ims: _known(ims, known[1]))
    if data.n_cells == 0:
        raise ValueError(
            f"all {spec.n_cells} fresh cells (seed {seed}) are training/validation cells: "
            "draw more cells or use another seed"
        )
    return data, spec.n_cells - data.n_cells


def _test_split(surrogate: Surrogate, comm: MPI.Comm) -> Dataset:
    cfg = _train_config(surrogate)
    data_cfg = dict(cfg.get("data") or {})
    path = _training_file(data_cfg)
    if path is not None:
        if not os.path.exists(path):
            raise ValueError(
                f"the training dataset {path} named in the model file does not exist: "
                "pass held-out data with --dataset PATH"
            )
        full = Dataset.load(path)
    else:
        gen = _generate_config(data_cfg)
        if gen is None:
            raise ValueError("the model file names no training data: use --dataset PATH")
        _log.warning(
            "the training data were generated without a saved file: regenerating %d cells "
            "(set data.generate.save to avoid this)",
            gen.n_cells,
        )
        full = generate(gen.spec(), comm=comm, progress=False)
    fractions = tuple(float(x) for x in data_cfg.get("split", (0.7, 0.15, 0.15)))
    seed = int(data_cfg.get("split_seed", 0))
    tr, va, te = split(full, fractions, seed=seed)  # type: ignore[arg-type]
    rec_tr, rec_va = _recorded_ids(surrogate)
    if not (
        np.array_equal(np.sort(tr.cell_ids), np.sort(rec_tr))
        and np.array_equal(np.sort(va.cell_ids), np.sort(rec_va))
    ):
        raise ValueError(
            "re-splitting the training dataset does not give the train/val cells recorded "
            "in the model file: it is not the dataset the model was trained on; pass "
            "held-out data with --dataset PATH"
        )
    leaked = np.intersect1d(te.cell_ids, np.union1d(rec_tr, rec_va))
    if leaked.size:  # pragma: no cover - split() keeps the parts disjoint
        raise RuntimeError(f"test cells {leaked.tolist()} are among the training cells")
    if len(te) == 0:
        raise ValueError(
            f"the test split is empty (split fractions {list(fractions)}): pass held-out "
            "data with --dataset PATH"
        )
    return te


def held_out_data(
    surrogate: Surrogate,
    dataset: Dataset | str | os.PathLike[str] | None = None,
    *,
    comm: MPI.Comm | None = None,
    allow_overlap: bool = False,
    fresh: tuple[int, int] | None = None,
) -> tuple[Dataset, dict[str, Any]]:
    """The data to evaluate on and a plain info dict (source, leak check).

    dataset None: the test split of the training dataset (see the module doc; collective
    over comm when it must be regenerated), or with ``fresh=(n_cells, seed)`` fresh cells
    (:func:`fresh_data`, collective); a Dataset or a saved dataset path: all of it.
    Raises ValueError when an evaluated cell is a train/val cell of the model (by cell id
    for the training dataset, by image otherwise) unless ``allow_overlap``.
    """
    comm = MPI.COMM_WORLD if comm is None else comm
    if fresh is not None and dataset is not None:
        raise ValueError("give either a dataset or fresh=(n_cells, seed), not both")
    if fresh is not None:
        data, dropped = fresh_data(surrogate, *fresh, comm=comm)
        source = (
            f"{fresh[0]} fresh cells (seed {fresh[1]}), {dropped} of them training/validation "
            "cells, dropped"
        )
    elif dataset is None:
        data = _test_split(surrogate, comm)
        source = "test split of the training dataset"
    elif isinstance(dataset, Dataset):
        data, source = dataset, "dataset given"
    else:
        data, source = Dataset.load(dataset), f"file {os.fspath(dataset)}"
    _check_compatible(surrogate, data)
    info: dict[str, Any] = {"source": source, "n_cells": data.n_cells, "n_samples": len(data)}
    try:
        known = training_images(surrogate)
    except ValueError as exc:
        _log.warning("leak check unavailable: %s", exc)
        known = None
    if known is None:
        _log.warning(
            "cannot rebuild the training images: the evaluated cells are not checked against "
            "the training set"
        )
        info.update(leak_check="unavailable", overlap_cell_ids=[], held_out=None)
        return data, info
    overlap = overlapping_cells(data, known[1])
    if overlap.size and not allow_overlap:
        raise ValueError(
            f"cells {overlap.tolist()[:20]} of the evaluation data ({source}) have the image "
            "of a training/validation cell of the model: evaluate on held-out cells (e.g. "
            "generate with another seed) or pass --allow-overlap to flag them instead"
        )
    if overlap.size:
        _log.warning("evaluation cells %s are training/validation cells", overlap.tolist())
    info.update(
        leak_check="images", overlap_cell_ids=overlap.tolist(), held_out=not bool(overlap.size)
    )
    return data, info


def _check_compatible(surrogate: Surrogate, data: Dataset) -> None:
    physics = data.metadata.get("physics")
    if physics is not None and physics != surrogate.physics:
        raise ValueError(f"the data are {physics!r} but the model is {surrogate.physics!r}")
    d = surrogate.domain.dim
    if data.states.ndim != 2 or data.states.shape[1] != d:
        raise ValueError(f"the data have states {data.states.shape}; the model takes (N, {d})")
    n = surrogate.image_size
    if data.images.shape[-1] != n:
        raise ValueError(
            f"the data have {data.images.shape[-1]}x{data.images.shape[-1]} cells but the "
            f"model takes {n}x{n}: generate with n = {n}"
        )
    if len(data) == 0:
        raise ValueError("the evaluation data hold no samples")
