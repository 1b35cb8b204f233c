"""Evaluation of a trained SANO surrogate on held-out microstructures (``neuroscale evaluate``).

::

    res = evaluate_model("model.pt", output="model_evaluation")       # test split
    res = evaluate_model("model.pt", dataset="fresh.pt", output="out")  # fresh held-out data
    res.metrics["rel_l2_response"], res.paths["json"]

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

**Metrics** (all JSON-plain; undefined values such as a relative error against a zero
reference are ``null``):

* ``mse_response``, ``mse_tangent``: mean squared error in physical units over all
  entries; ``*_normalized``: the same after the model's :class:`Normalization` (response /
  per-component training RMS; tangent × state half-width / response scale), as in the loss.
* ``rel_l2_response`` = ‖pred − true‖_F / ‖true‖_F over the whole split, and per
  component (``rel_l2_response_components`` by response name, ``rel_l2_tangent_components``
  as an (r, d) nested list, rows = responses, columns = states); same for the tangent.
* ``calibration_error`` = mean over p = 0.05, 0.10, …, 0.95 of |coverage_p − p|, where
  coverage_p is the share of response errors inside the model's level-p interval ±k_p·std
  (calibrated std and multipliers of the cell's symmetry class,
  :meth:`SANO.interval_multipliers`; Gaussian z_p for a model without a fitted table), all
  components pooled
  (:func:`calibration.calibration_error`), and per component
  (``calibration_error_components`` by response name);
  ``coverage68``, ``coverage95``; ``calibration_curve`` {nominal, empirical}. ``null``
  when the model has no spread (dropout = 0).
* ``n_microstructures``: distinct cell images up to periodic translation;
  ``interval_5_95``: for ``rel_l2_response``, ``rel_l2_tangent`` and
  ``calibration_error``, the 5 %–95 % range over 2000 bootstrap draws of the
  microstructures (:mod:`~neuroscale_coupling.training.metric_spread`: the errors are
  mostly per microstructure, so a split of few distinct images measures them loosely);
  ``by_generator``: the same figures, and the counts, per generator of the family.
* ``attention_per_scale``: the mean attention mass per scale (averaged over the distinct
  test images and the encoder layers; sums to 1), names in ``scale_names`` (approx, then
  details from coarsest to finest, with their coefficient size).

**Files** (rank 0 writes, then a barrier; each written atomically: temp file in the same
folder + ``os.replace``): ``metrics.json``, ``parity.png`` (prediction vs reference per
response component and for the normalized tangent entries), ``calibration.png``
(empirical vs nominal coverage), ``attention.png`` (bar chart per scale).
"""

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from neuroscale_coupling.cell.symmetry import symmetry_order
from neuroscale_coupling.cell.translation import canonical_translation
from neuroscale_coupling.data.dataset import Dataset
from neuroscale_coupling.data.generate import generate
from neuroscale_coupling.data.split import split, translation_groups
from neuroscale_coupling.io import atomic_write
from neuroscale_coupling.log import get_logger
from neuroscale_coupling.surrogate.calibration import LEVELS_P, calibration_error, coverage
from neuroscale_coupling.surrogate.inputs import wavelet_inputs
from neuroscale_coupling.surrogate.model_file import Surrogate
from neuroscale_coupling.training.config import GenerateConfig
from neuroscale_coupling.training.metric_spread import HeldOutErrors, by_generator, group_bootstrap

__all__ = [
    "EvaluationResult",
    "compute_metrics",
    "evaluate_model",
    "fresh_data",
    "held_out_data",
    "overlapping_cells",
    "training_images",
    "write_report",
]

_log = get_logger(__name__)
CURVE_P = tuple(round(0.01 * k, 2) for k in range(1, 100))


@dataclass
class EvaluationResult:
    """metrics (JSON-plain dict, see the module doc); predictions: ``response`` (N, r),
    ``tangent`` (N, r, d), ``std`` (N, r) physical; data: the evaluated Dataset; paths:
    ``json``, ``parity``, ``calibration``, ``attention`` (empty when nothing was written)."""

    metrics: dict[str, Any]
    predictions: dict[str, np.ndarray]
    data: Dataset
    paths: dict[str, str] = field(default_factory=dict)


# ============================================================================ data
def _train_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    extra = meta.get("extra") or {}
    if "train_config" not in extra or "split_cells" not in extra:
        raise ValueError(
            "the model file records no training config / split cells (extra.train_config, "
            "extra.split_cells): pass held-out data with --dataset PATH"
        )
    return dict(extra["train_config"])


def _recorded_ids(meta: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    cells = meta["extra"]["split_cells"]
    return (
        np.asarray(cells["train"], dtype=np.int64),
        np.asarray(cells["val"], dtype=np.int64),
    )


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


def training_images(meta: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """(cell ids (K,), images (K, n, n)) of the model's recorded train + val cells.

    From the training dataset file when the config names one that exists, else redrawn
    from the recorded generate table (cells only: no fine solve). None when neither works.
    """
    cfg = _train_config(meta)
    data_cfg = dict(cfg.get("data") or {})
    tr, va = _recorded_ids(meta)
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
    meta: Mapping[str, Any], n_cells: int, seed: int, *, comm: MPI.Comm | None = None
) -> tuple[Dataset, int]:
    """Held-out data drawn afresh from the model's recorded family (collective over comm).

    n_cells cells and their states (the recorded states per cell and domain) drawn from the
    recorded ``data.generate`` table with ``seed``; the cells whose image equals a training
    or validation cell's up to a periodic translation are dropped before the others are
    solved by the recorded fine solver. Returns the data and the number of cells dropped.
    Raises ValueError when the model file records no generate table, the training images
    cannot be rebuilt, or no cell is left."""
    comm = MPI.COMM_WORLD if comm is None else comm
    data_cfg = dict(_train_config(meta).get("data") or {})
    gen = _generate_config(data_cfg)
    if gen is None:
        raise ValueError(
            "the model file records no data.generate table to draw fresh cells from: pass "
            "held-out data with --dataset PATH"
        )
    if int(n_cells) < 1:
        raise ValueError(f"fresh n_cells={n_cells} must be >= 1")
    spec = dataclasses.replace(gen.spec(), n_cells=int(n_cells), seed=int(seed))
    known = training_images(meta)
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


def _test_split(meta: Mapping[str, Any], comm: MPI.Comm) -> Dataset:
    cfg = _train_config(meta)
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
    rec_tr, rec_va = _recorded_ids(meta)
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
    meta: Mapping[str, Any],
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
        data, dropped = fresh_data(meta, *fresh, comm=comm)
        source = (
            f"{fresh[0]} fresh cells (seed {fresh[1]}), {dropped} of them training/validation "
            "cells, dropped"
        )
    elif dataset is None:
        data = _test_split(meta, comm)
        source = "test split of the training dataset"
    elif isinstance(dataset, Dataset):
        data, source = dataset, "dataset given"
    else:
        data, source = Dataset.load(dataset), f"file {os.fspath(dataset)}"
    _check_compatible(meta, data)
    info: dict[str, Any] = {"source": source, "n_cells": data.n_cells, "n_samples": len(data)}
    try:
        known = training_images(meta)
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


def _check_compatible(meta: Mapping[str, Any], data: Dataset) -> None:
    cfg = meta["config"]
    physics = data.metadata.get("physics")
    if physics is not None and physics != cfg["physics"]:
        raise ValueError(f"the data are {physics!r} but the model is {cfg['physics']!r}")
    d = meta["domain_obj"].dim
    if data.states.ndim != 2 or data.states.shape[1] != d:
        raise ValueError(f"the data have states {data.states.shape}; the model takes (N, {d})")
    if data.images.shape[-1] != int(cfg["image_size"]):
        raise ValueError(
            f"the data have {data.images.shape[-1]}x{data.images.shape[-1]} cells but the "
            f"model takes {cfg['image_size']}x{cfg['image_size']}: generate with n = "
            f"{cfg['image_size']}"
        )
    if len(data) == 0:
        raise ValueError("the evaluation data hold no samples")


# ============================================================================ metrics
def _rel(err: np.ndarray, ref: np.ndarray, axis: Any = None) -> Any:
    num = np.sqrt(np.sum(err**2, axis=axis))
    den = np.sqrt(np.sum(ref**2, axis=axis))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def _plain_num(x: Any) -> Any:
    """numpy → nested lists of float with NaN/inf as None."""
    a = np.asarray(x, dtype=float)
    if a.ndim == 0:
        v = float(a)
        return v if np.isfinite(v) else None
    return [_plain_num(v) for v in a]


def scale_names(meta: Mapping[str, Any]) -> list[str]:
    """Names of the attention scales in input order: approx, details coarsest → finest."""
    cfg = meta["config"]
    n, levels = int(cfg["image_size"]), int(cfg["levels"])
    coarse = n >> levels
    names = [f"approx {coarse}x{coarse}"]
    for k in range(levels):
        m = coarse << k
        names.append(f"detail {m}x{m}")
    return names


def compute_metrics(
    surrogate: Surrogate, data: Dataset, *, levels: Sequence[float] = LEVELS_P
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metrics of the module doc on ``data`` (every sample) and the predictions.

    Returns (metrics (JSON-plain), {"response" (N, r), "tangent" (N, r, d), "std" (N, r)})."""
    meta = surrogate.metadata
    material = surrogate.material
    norm = meta["normalization_obj"]
    images = data.sample_images()
    q, t, s = surrogate.predict(images, data.states)
    yq, yt = data.response, data.tangent
    eq, et = q - yq, t - yt
    eqn = norm.response_to(q) - norm.response_to(yq)
    etn = norm.tangent_to(t) - norm.tangent_to(yt)
    rn, sn = list(material.response_names), list(material.state_names)
    m: dict[str, Any] = {
        "n_samples": len(data),
        "n_cells": data.n_cells,
        "cell_ids": [int(c) for c in data.cell_ids],
        "response_names": rn,
        "state_names": sn,
        "mse_response": float(np.mean(eq**2)),
        "mse_tangent": float(np.mean(et**2)),
        "mse_response_normalized": float(np.mean(eqn**2)),
        "mse_tangent_normalized": float(np.mean(etn**2)),
        "rel_l2_response": _plain_num(_rel(eq, yq)),
        "rel_l2_tangent": _plain_num(_rel(et, yt)),
        "rel_l2_response_components": dict(zip(rn, _plain_num(_rel(eq, yq, axis=0)), strict=True)),
        "rel_l2_tangent_components": _plain_num(_rel(et, yt, axis=0)),
        "std_scale": float(meta.get("std_scale", 1.0)),
        "domain_fraction_outside": float(
            np.mean(~surrogate.domain.contains(data.states, tol=1e-12))
        ),
    }
    symmetry = symmetry_order(data.images)[data.cell_index]
    hits = None  # (L, N, r): |err| inside the level-p interval of the row's class
    if np.any(s > 0):

        def k(p: Sequence[float]) -> np.ndarray:
            return surrogate.model.interval_multipliers(p, symmetry)  # (L, N)

        k_levels = k(levels)
        hits = np.abs(eq)[None] <= k_levels[:, :, None] * s[None]
        cov = coverage(eq, s, CURVE_P, k(CURVE_P))
        c2 = coverage(eq, s, (0.68, 0.95), k((0.68, 0.95)))
        per_component = np.abs(hits.mean(axis=1) - np.asarray(levels)[:, None]).mean(axis=0)
        m.update(
            calibration_error=calibration_error(eq, s, levels, k_levels),
            calibration_error_components=dict(zip(rn, per_component.tolist(), strict=True)),
            coverage68=float(c2[0]),
            coverage95=float(c2[1]),
            calibration_curve={"nominal": list(CURVE_P), "empirical": cov.tolist()},
        )
    else:
        m.update(
            calibration_error=None,
            calibration_error_components=None,
            coverage68=None,
            coverage95=None,
            calibration_curve=None,
        )
    # spread of the figures over the held-out microstructures, and per generator
    group = translation_groups(data.images)[data.cell_index]
    errors = HeldOutErrors(eq, yq, et, yt, hits, levels, group)
    m["n_microstructures"] = int(group.max()) + 1 if group.size else 0
    m["interval_5_95"] = group_bootstrap(errors) if group.size else {}
    names = [str(c.get("generator", "unknown")) for c in data.cells] or ["unknown"] * data.n_cells
    m["by_generator"] = by_generator(errors, np.asarray(names, dtype=object)[data.cell_index])
    # attention: once per distinct image of the split
    model = surrogate.model
    p = model.state_scale
    with torch.no_grad():
        mass = model.scale_attention(
            wavelet_inputs(
                surrogate.wavelet,
                data.images,
                p.dtype,
                p.device,
                canonical=model.config.canonical_translation,
            )
        )
    att = mass.double().cpu().numpy().mean(axis=(0, 1))
    m["scale_names"] = scale_names(meta)
    m["attention_per_scale"] = att.tolist()
    m["attention_per_scale_per_layer"] = mass.double().cpu().numpy().mean(axis=0).tolist()
    return m, {"response": q, "tangent": t, "std": s}


# ============================================================================ files
def write_report(
    metrics: Mapping[str, Any],
    predictions: Mapping[str, np.ndarray],
    data: Dataset,
    folder: str | os.PathLike[str],
    *,
    normalization: Any = None,
) -> dict[str, str]:
    """Write metrics.json, parity.png, calibration.png, attention.png into ``folder``
    (not collective; each file atomically). Returns their paths by key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(folder)
    paths = {
        "json": out / "metrics.json",
        "parity": out / "parity.png",
        "calibration": out / "calibration.png",
        "attention": out / "attention.png",
    }
    text = json.dumps(dict(metrics), indent=2, allow_nan=False)
    atomic_write(paths["json"], lambda fh: fh.write(text.encode()))

    def save(fig: Any, key: str) -> None:
        atomic_write(paths[key], lambda fh: fig.savefig(fh, format="png", dpi=110))
        plt.close(fig)

    # parity: one panel per response component + the normalized tangent entries
    rn = list(metrics["response_names"])
    q, yq = predictions["response"], data.response
    t, yt = predictions["tangent"], data.tangent
    if normalization is not None:
        t, yt = normalization.tangent_to(t), normalization.tangent_to(yt)
    fig, axes = plt.subplots(1, len(rn) + 1, figsize=(3.4 * (len(rn) + 1), 3.4))
    for i, ax in enumerate(axes[:-1]):
        _parity(ax, yq[:, i], q[:, i], predictions["std"][:, i])
        rel = metrics["rel_l2_response_components"][rn[i]]
        ax.set_title(f"{rn[i]}  (rel. L2 {rel:.3g})" if rel is not None else rn[i])
    _parity(axes[-1], yt.ravel(), t.ravel(), None)
    rel_t = metrics["rel_l2_tangent"]
    label = "tangent (normalized)" if normalization is not None else "tangent"
    axes[-1].set_title(f"{label}\nrel. L2 {rel_t:.3g}" if rel_t is not None else label, fontsize=10)
    fig.suptitle(f"parity on {metrics['n_samples']} held-out samples ({metrics['n_cells']} cells)")
    fig.tight_layout()
    save(fig, "parity")

    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    curve = metrics.get("calibration_curve")
    if curve is not None:
        ax.plot(curve["nominal"], curve["empirical"], "C0-", label="model")
        ax.set_title(f"calibration error {metrics['calibration_error']:.3g}")
    else:
        ax.set_title("no predictive spread (dropout = 0)")
    ax.set_xlabel("nominal coverage")
    ax.set_ylabel("empirical coverage")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    fig.tight_layout()
    save(fig, "calibration")

    fig, ax = plt.subplots(figsize=(1.2 * len(metrics["scale_names"]) + 2.5, 3.4))
    ax.bar(range(len(metrics["scale_names"])), metrics["attention_per_scale"], color="C2")
    ax.set_xticks(range(len(metrics["scale_names"])), metrics["scale_names"], rotation=20)
    ax.set_ylabel("mean attention mass")
    ax.set_title("attention per scale")
    fig.tight_layout()
    save(fig, "attention")
    return {k: str(v) for k, v in paths.items()}


def _parity(ax: Any, ref: np.ndarray, pred: np.ndarray, std: np.ndarray | None) -> None:
    lo = float(min(ref.min(), pred.min()))
    hi = float(max(ref.max(), pred.max()))
    if std is not None and np.any(std > 0):
        ax.errorbar(ref, pred, yerr=std, fmt="none", ecolor="0.7", lw=0.6, zorder=1)
    ax.scatter(ref, pred, s=6, zorder=2)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("reference")
    ax.set_ylabel("surrogate")


# ============================================================================ driver
def _with_config_paths(meta: Mapping[str, Any], model_path: str | os.PathLike[str]) -> dict:
    """Metadata whose recorded relative data paths (``data.dataset``, ``data.generate.save``)
    are resolved against the training config's folder, the folder that the recorded
    relative ``output.model`` path leads from to the model file (as ``neuroscale train``
    resolves them). Paths that do not exist there are left as recorded."""
    extra = dict(meta.get("extra") or {})
    cfg = extra.get("train_config")
    out = (cfg or {}).get("output", {}).get("model")
    if not cfg or not out or os.path.isabs(out):
        return dict(meta)
    base = Path(model_path).resolve().parent
    for _ in Path(out).parent.parts:
        base = base.parent
    data = dict(cfg.get("data") or {})

    def resolved(path: Any) -> Any:
        if path is None or os.path.isabs(path) or not (base / path).exists():
            return path
        return str(base / path)

    data["dataset"] = resolved(data.get("dataset"))
    if data.get("generate"):
        data["generate"] = {**data["generate"], "save": resolved(data["generate"].get("save"))}
    extra["train_config"] = {**cfg, "data": data}
    return {**meta, "extra": extra}


def evaluate_model(
    model: str | os.PathLike[str] | Surrogate,
    *,
    dataset: Dataset | str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    comm: MPI.Comm | None = None,
    allow_overlap: bool = False,
    device: str = "cpu",
    fresh: tuple[int, int] | None = None,
) -> EvaluationResult:
    """Evaluate a model file (or Surrogate) on held-out data; write the report when
    ``output`` is given (rank 0, then a barrier). Collective over comm (default
    COMM_WORLD): every rank computes the same metrics. See :func:`held_out_data` for
    ``dataset`` / ``allow_overlap`` / ``fresh``."""
    comm = MPI.COMM_WORLD if comm is None else comm
    sur = model if isinstance(model, Surrogate) else Surrogate.load(model, device=device)
    meta = sur.metadata if isinstance(model, Surrogate) else _with_config_paths(sur.metadata, model)
    data, info = held_out_data(meta, dataset, comm=comm, allow_overlap=allow_overlap, fresh=fresh)
    metrics, pred = compute_metrics(sur, data)
    metrics = {**info, **metrics}
    if not isinstance(model, Surrogate):
        metrics["model"] = os.fspath(model)
    paths: dict[str, str] = {}
    if output is not None:
        err: Exception | None = None
        if comm.rank == 0:
            try:
                paths = write_report(
                    metrics, pred, data, output, normalization=sur.metadata["normalization_obj"]
                )
            except Exception as exc:  # re-raised after telling the other ranks
                err = exc
        failed = comm.bcast(err is not None, root=0)
        if err is not None:
            raise err
        if failed:
            raise RuntimeError("writing the evaluation report failed on rank 0")
        paths = comm.bcast(paths, root=0)
    return EvaluationResult(metrics=metrics, predictions=pred, data=data, paths=paths)
