"""Evaluation of a trained SANO surrogate on held-out microstructures (``neuroscale evaluate``).

::

    res = evaluate_model("model.pt", output="model_evaluation")       # test split
    res = evaluate_model("model.pt", dataset="fresh.pt", output="out")  # fresh held-out data
    res.metrics["rel_l2_response"], res.paths["json"]

**Which data** and the **leak check**: :mod:`~neuroscale_coupling.training.held_out`.

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
from neuroscale_coupling.data.dataset import Dataset
from neuroscale_coupling.data.split import translation_groups
from neuroscale_coupling.io import atomic_write
from neuroscale_coupling.log import get_logger
from neuroscale_coupling.surrogate.calibration import LEVELS_P, calibration_error, coverage
from neuroscale_coupling.surrogate.config import SANOConfig
from neuroscale_coupling.surrogate.inputs import wavelet_inputs
from neuroscale_coupling.surrogate.model_file import Surrogate
from neuroscale_coupling.training.held_out import held_out_data
from neuroscale_coupling.training.metric_spread import HeldOutErrors, by_generator, group_bootstrap

__all__ = [
    "EvaluationResult",
    "compute_metrics",
    "evaluate_model",
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


def scale_names(config: SANOConfig) -> list[str]:
    """Names of the attention scales in input order: approx, details coarsest → finest."""
    n, levels = config.image_size, config.levels
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
    material = surrogate.material
    norm = surrogate.normalization
    images = data.sample_images()
    pred = surrogate.predict(images, data.states)
    q, t, s = pred.response, pred.tangent, pred.std
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
        "std_scale": surrogate.std_scale,
        "domain_fraction_outside": float(
            np.mean(~surrogate.domain.contains(data.states, tol=1e-12))
        ),
    }
    symmetry = symmetry_order(data.images)[data.cell_index]
    hits = None  # (L, N, r): |err| inside the level-p interval of the row's class
    if np.any(s > 0):

        def k(p: Sequence[float]) -> np.ndarray:
            return surrogate.interval_multipliers(p, symmetry)  # (L, N)

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
    m["scale_names"] = scale_names(surrogate.config)
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
    data, info = held_out_data(sur, dataset, comm=comm, allow_overlap=allow_overlap, fresh=fresh)
    metrics, pred = compute_metrics(sur, data)
    metrics = {**info, **metrics}
    if not isinstance(model, Surrogate):
        metrics["model"] = os.fspath(model)
    paths: dict[str, str] = {}
    if output is not None:
        err: Exception | None = None
        if comm.rank == 0:
            try:
                paths = write_report(metrics, pred, data, output, normalization=sur.normalization)
            except Exception as exc:  # re-raised after telling the other ranks
                err = exc
        failed = comm.bcast(err is not None, root=0)
        if err is not None:
            raise err
        if failed:
            raise RuntimeError("writing the evaluation report failed on rank 0")
        paths = comm.bcast(paths, root=0)
    return EvaluationResult(metrics=metrics, predictions=pred, data=data, paths=paths)
