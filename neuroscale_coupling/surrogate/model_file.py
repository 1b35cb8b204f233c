"""The SANO model file and the physical-unit predictor around it ::

    save_model("model.pt", model, domain=..., wavelet=..., normalization=..., material=...)
    model, meta = load_model("model.pt")        # torch.load(weights_only=True)
    sur = Surrogate.load("model.pt"); p = sur.predict(images, states, level=0.95)
    p.response, p.tangent, p.std, p.lower, p.upper

**Units.** The model works on physical states and returns physical responses: its own
scaling buffers are set from the training domain (``SANO.set_scaling``: G or E divided by
the largest |bound| of those components, no shift so that Q(0) = 0 / Σ(0) = 0 survives;
θ shifted/scaled to the domain; response × the RMS of the training responses). Images
enter through the fitted :class:`WaveletNormalizer` (:func:`wavelet_inputs`).
"""

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuroscale_coupling.cell.family import CellFamily
from neuroscale_coupling.cell.materials import Material, material_from_dict, material_to_dict
from neuroscale_coupling.cell.microstructure import distinct_images
from neuroscale_coupling.cell.symmetry import symmetry_order
from neuroscale_coupling.data.dataset import Dataset
from neuroscale_coupling.data.domain import StateDomain
from neuroscale_coupling.io import plain_values, torch_save_atomic
from neuroscale_coupling.surrogate.config import SANOConfig
from neuroscale_coupling.surrogate.image_family import ImageFamily
from neuroscale_coupling.surrogate.inputs import WaveletNormalizer, wavelet_inputs
from neuroscale_coupling.surrogate.model import SANO
from neuroscale_coupling.surrogate.normalization import Normalization

__all__ = [
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "EncodedCells",
    "Prediction",
    "Surrogate",
    "load_model",
    "save_model",
]

MODEL_FORMAT = "neuroscale-sano-model"
MODEL_FORMAT_VERSION = 1


def save_model(
    path: str | os.PathLike[str],
    model: SANO,
    *,
    domain: StateDomain,
    wavelet: WaveletNormalizer,
    normalization: Normalization,
    material: Any,
    family: Mapping[str, Any] | None = None,
    history: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    reference: Mapping[str, Dataset] | None = None,
) -> None:
    """Write the model file atomically (temp file + os.replace; not collective).

    A dict of tensors and plain types, loadable with ``torch.load(weights_only=True)``:
    format, format_version, version (package), config (SANOConfig.to_dict()), state_dict
    (CPU tensors), dtype, domain, wavelet, normalization, material, family, std_scale,
    history, extra, reference. reference: named datasets kept with the model (training
    writes "train": every training cell and a replay sample of its rows, "val": a
    calibration sample of the validation split), used by the surrogate closure for the
    family distance, online enrichment and recalibration.
    """
    import neuroscale_coupling

    payload = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "version": neuroscale_coupling.__version__,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "dtype": str(model.state_scale.dtype).removeprefix("torch."),
        "domain": domain.to_dict(),
        "wavelet": wavelet.to_dict(),
        "normalization": normalization.to_dict(),
        "material": material_to_dict(material),
        "family": plain_values(dict(family)) if family is not None else None,
        "std_scale": float(model.std_scale),
        "history": plain_values(dict(history or {})),
        "extra": plain_values(dict(extra or {})),
        "reference": {k: d.to_payload() for k, d in dict(reference or {}).items()},
    }
    torch_save_atomic(path, payload)


def load_model(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[SANO, dict[str, Any]]:
    """Rebuild the model (eval mode, on ``device``) and its metadata from :func:`save_model`.

    metadata: the file's plain entries plus rebuilt objects ``domain_obj`` (StateDomain),
    ``wavelet_obj`` (WaveletNormalizer), ``normalization_obj`` (Normalization),
    ``material_obj``, ``reference_obj`` (name → Dataset, see :func:`save_model`)."""
    payload = torch.load(os.fspath(path), weights_only=True, map_location="cpu")
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a NeuroScale model file (no format={MODEL_FORMAT!r})")
    if payload.get("format_version") != MODEL_FORMAT_VERSION:
        raise ValueError(
            f"{path} has model format {payload.get('format_version')}; this library reads "
            f"{MODEL_FORMAT_VERSION}: retrain or convert the model"
        )
    model = SANO(SANOConfig.from_dict(payload["config"])).to(getattr(torch, payload["dtype"]))
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    meta["domain_obj"] = StateDomain.from_dict(payload["domain"])
    meta["wavelet_obj"] = WaveletNormalizer.from_dict(payload["wavelet"])
    meta["normalization_obj"] = Normalization.from_dict(payload["normalization"])
    meta["material_obj"] = material_from_dict(payload["material"])
    meta["reference_obj"] = {
        k: Dataset.from_payload(d, f"{path}: reference {k!r}")
        for k, d in dict(payload.get("reference", {})).items()
    }
    return model, meta


@dataclass(frozen=True)
class Prediction:
    """Answer of :meth:`Surrogate.predict` for N points, physical units, float64.

    response (N, r); tangent (N, r, d), the exact derivative of the response; std (N, r),
    the calibrated standard deviation (with the cell's symmetry class and family term);
    level: the nominal level p of ``half_width`` or None; half_width (N, r): the calibrated
    central interval of level p is response ± half_width (k_p · std, k_p of the cell's
    class: the errors are not Gaussian), None without a level.
    """

    response: np.ndarray
    tangent: np.ndarray
    std: np.ndarray
    level: float | None = None
    half_width: np.ndarray | None = None

    @property
    def lower(self) -> np.ndarray:
        """response − half_width (N, r) (needs a level)."""
        return self.response - self._half_width()

    @property
    def upper(self) -> np.ndarray:
        """response + half_width (N, r) (needs a level)."""
        return self.response + self._half_width()

    def _half_width(self) -> np.ndarray:
        if self.half_width is None:
            raise ValueError("this prediction has no interval: call predict(..., level=p)")
        return self.half_width


@dataclass(frozen=True)
class EncodedCells:
    """Distinct cells encoded once for many decodes (a run's cells do not change).

    images (U, n, n); latent (U, L) on the model's device and dtype; family_ratio (U,)
    (:meth:`Surrogate.family_ratio`); symmetry (U,) symmetry orders
    (:func:`~neuroscale_coupling.cell.symmetry.symmetry_order`).
    """

    images: np.ndarray
    latent: torch.Tensor
    family_ratio: np.ndarray
    symmetry: np.ndarray


class Surrogate:
    """A trained SANO model with what it was trained on: the one door to a model file.

    ``Surrogate.load(path)`` (or ``Surrogate(model, metadata)`` from :func:`load_model` or
    :func:`~neuroscale_coupling.training.train.train`). :meth:`predict` answers in
    physical units; :meth:`encode` / :meth:`decode` split it for callers that decode the
    same cells many times (the closure). The properties say what the model was trained on.
    ``model`` is the torch module (for training and online enrichment).
    """

    def __init__(
        self,
        model: SANO,
        metadata: Mapping[str, Any],
        *,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model = model.eval()
        self._meta = dict(metadata)
        self.path = None if path is None else Path(path)
        #: The phases the model was trained for (the fine solver of a fallback uses it).
        self.material: Material = self._meta["material_obj"]
        #: The box of macro states the model was trained on.
        self.domain: StateDomain = self._meta["domain_obj"]
        #: The input normalization of cell images.
        self.wavelet: WaveletNormalizer = self._meta["wavelet_obj"]
        #: State/response normalization of the loss.
        self.normalization: Normalization = self._meta["normalization_obj"]
        train = self.replay_data
        self._image_family = (
            None if train is None else ImageFamily(train.images, self.material.n_phases)
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str = "cpu") -> "Surrogate":
        """Read a model file (``torch.load(weights_only=True)``), the model on ``device``."""
        return cls(*load_model(path, device=device), path=path)

    def to(self, *, dtype: torch.dtype | None = None, device: Any = None) -> "Surrogate":
        """An independent copy whose model has ``dtype`` / lives on ``device`` (the others
        are shared: they are not changed by predictions or enrichment)."""
        other = copy.copy(self)
        model = copy.deepcopy(self.model)
        other.model = model.to(dtype=dtype, device=device).eval()
        return other

    # ------------------------------------------------------------------ what it knows
    @property
    def config(self) -> SANOConfig:
        """The architecture."""
        return self.model.config

    @property
    def physics(self) -> str:
        return self.config.physics

    @property
    def image_size(self) -> int:
        """n of the (n, n) cell images the model reads."""
        return self.config.image_size

    @property
    def response_scale(self) -> np.ndarray:
        """(r,) the RMS of each response component over the training data: the reference
        size of the fallback's relative std test."""
        return np.asarray(self.normalization.response_scale, dtype=float)

    @property
    def cell_family(self) -> CellFamily | None:
        """The family the training cells were drawn from (rebuilt from the file; draw
        fresh cells with ``cell_family.draw(n, seed)``), None when it was not recorded."""
        family = self._meta.get("family")
        return None if family is None else CellFamily.from_dict(family)

    @property
    def has_family_statistics(self) -> bool:
        """True when the training cells' latent statistics were fitted (SANO.fit_family):
        the closure's family test needs them."""
        return float(self.model.family_scale) > 0

    @property
    def replay_data(self) -> Dataset | None:
        """The training cells (every one) and a replay sample of their rows, as recorded in
        the file (online enrichment replays them); None when absent."""
        return dict(self._meta.get("reference_obj") or {}).get("train")

    @property
    def calibration_data(self) -> Dataset | None:
        """A sample of the validation split (online enrichment recalibrates on it); None
        when absent."""
        return dict(self._meta.get("reference_obj") or {}).get("val")

    @property
    def training_images(self) -> np.ndarray | None:
        """(C, n, n) the images of the training cells, None when not recorded."""
        data = self.replay_data
        return None if data is None else data.images

    @property
    def validation_images(self) -> np.ndarray | None:
        """(V, n, n) the images of the recorded validation sample, None when not recorded."""
        data = self.calibration_data
        return None if data is None else data.images

    @property
    def training_config(self) -> dict[str, Any] | None:
        """The ``neuroscale train`` configuration the model came from (plain dict), with the
        recorded relative data paths resolved against the training config's folder when the
        model was loaded from a file (as ``neuroscale train`` resolved them); None when not
        recorded."""
        cfg = dict(self._meta.get("extra") or {}).get("train_config")
        if cfg is None or self.path is None:
            return None if cfg is None else dict(cfg)
        return _resolve_config_paths(dict(cfg), self.path)

    @property
    def split_cell_ids(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(train ids, val ids) int64: the dataset cell ids of the training and validation
        splits, None when not recorded."""
        cells = dict(self._meta.get("extra") or {}).get("split_cells")
        if cells is None:
            return None
        return (
            np.asarray(cells["train"], dtype=np.int64),
            np.asarray(cells["val"], dtype=np.int64),
        )

    @property
    def std_scale(self) -> float:
        """The calibrated scale of the dropout spread."""
        return float(self.model.std_scale)

    # ------------------------------------------------------------------ answers
    def model_inputs(self, images: np.ndarray) -> list[torch.Tensor]:
        """The model's input coefficients of images (B, n, n), on its device and dtype."""
        p = self.model.state_scale
        canonical = self.model.config.canonical_translation
        return wavelet_inputs(self.wavelet, images, p.dtype, p.device, canonical=canonical)

    def family_ratio(self, images: np.ndarray, latent: torch.Tensor | None = None) -> np.ndarray:
        """Family ratio (N,) of images (N, n, n): the larger of the latent Mahalanobis ratio
        (:meth:`SANO.family_ratio`) and the image two-point-correlation ratio
        (:class:`ImageFamily`, when the model file holds its training cells). About 1 or
        below inside the training family. ``latent`` (N, L): the images' latents, if known."""
        im = np.asarray(images)
        if latent is None:
            with torch.no_grad():
                latent = self.model.encode(self.model_inputs(im))
        with torch.no_grad():
            ratio = self.model.family_ratio(latent).double().cpu().numpy()
        if self._image_family is not None:
            ratio = np.maximum(ratio, self._image_family.ratio(im))
        return ratio

    def encode(self, images: np.ndarray, *, family_ratio: np.ndarray | None = None) -> EncodedCells:
        """Encode distinct images (U, n, n) once (no grad); ``family_ratio`` (U,): ratios
        measured before (e.g. with the model as loaded), else computed now."""
        im = np.asarray(images)
        p = self.model.state_scale
        if im.shape[0] == 0:
            empty = torch.zeros((0, self.config.latent), dtype=p.dtype, device=p.device)
            return EncodedCells(im, empty, np.zeros(0), np.zeros(0, dtype=np.int64))
        with torch.no_grad():
            latent = self.model.encode(self.model_inputs(im))
        ratio = self.family_ratio(im, latent) if family_ratio is None else family_ratio
        return EncodedCells(im, latent, np.asarray(ratio, dtype=float), symmetry_order(im))

    def decode(
        self, cells: EncodedCells, states: np.ndarray, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Response (N, r), tangent (N, r, d) and calibrated std (N, r), float64 numpy, at
        states (N, d) of the cells ``cells`` rows ``rows`` (N,) (no grad).

        The network is evaluated inside its training box (``domain``) only. At a state s
        beyond it, with p the nearest state of the box and e = s − p, the answer is the
        first-order expansion Q(p) + T(p) e, T = dQ/ds the network's tangent. Its
        consistent tangent is T(p) + H(p) e in the components that lie inside and T(p) in
        those clipped, H(p) e the derivative of T along e from a central difference of the
        tangent (two extra decodes of those points only). The expansion is C¹ across the
        box's faces and grows only linearly, where the network's own extrapolation is
        arbitrary (and made a host's Newton diverge). Its std is the network's at p and the
        size of the next term, ½ eᵀH e, added in quadrature: it grows as |e|², so the
        fallback's uncertainty test bounds the expansion's error.
        """
        st = np.asarray(states, dtype=float)
        box = self.domain
        nearest = np.clip(st, box.lower, box.upper)
        response, tangent, std = self._decode_network(cells, nearest, rows)
        out = np.flatnonzero((nearest != st).any(axis=1))
        if out.size:
            e = st[out] - nearest[out]  # (k, d)
            # central difference of T along e, with a step of 1e-3 half-widths at most
            h = 1e-3 / np.abs(e / box.half_width).max(axis=1, keepdims=True)
            pm = np.concatenate([nearest[out] + h * e, nearest[out] - h * e])
            _, t_pm, _ = self._decode_network(cells, pm, np.tile(np.asarray(rows)[out], 2))
            he = (t_pm[: out.size] - t_pm[out.size :]) / (2 * h[:, :, None])  # (k, r, d)
            response[out] += np.einsum("krd,kd->kr", tangent[out], e)
            tangent[out] += np.where((e == 0)[:, None, :], he, 0.0)
            std[out] = np.hypot(std[out], 0.5 * np.einsum("krd,kd->kr", he, e))
        return response, tangent, std

    def _decode_network(
        self, cells: EncodedCells, states: np.ndarray, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The network itself at states (N, d) of ``cells`` rows ``rows`` (N,)."""
        p = self.model.state_scale
        if states.shape[0] == 0:
            d, r = self.config.state_dim, self.config.response_dim
            return np.zeros((0, r)), np.zeros((0, r, d)), np.zeros((0, r))
        with torch.no_grad():
            pred = self.model.decode(
                cells.latent,
                torch.as_tensor(states, dtype=p.dtype, device=p.device),
                cells=torch.as_tensor(rows, device=p.device),
                family=torch.as_tensor(cells.family_ratio, dtype=p.dtype),
                symmetry=cells.symmetry,
            )
        return tuple(x.double().cpu().numpy() for x in (pred.response, pred.tangent, pred.std))  # type: ignore[return-value]

    def predict(
        self,
        images: np.ndarray,
        states: np.ndarray,
        *,
        level: float | None = None,
        chunk: int = 4096,
    ) -> Prediction:
        """images (N, n, n) phase ids, states (N, d) physical → :class:`Prediction`
        (response, tangent, calibrated std and, with ``level`` p in (0, 1), the half-width
        of the calibrated central interval of that level), physical units, float64.

        Each distinct image is encoded once; the decoder runs in chunks of ``chunk``."""
        im = np.asarray(images)
        st = np.asarray(states, dtype=float)
        cfg = self.config
        if (
            im.ndim != 3
            or st.ndim != 2
            or im.shape[0] != st.shape[0]
            or st.shape[1] != cfg.state_dim
        ):
            raise ValueError(
                f"need images (N, n, n) and states (N, {cfg.state_dim}); got {im.shape}, {st.shape}"
            )
        uniq, inv = distinct_images(im)
        cells = self.encode(uniq)
        parts = [
            self.decode(cells, st[lo : lo + chunk], inv[lo : lo + chunk])
            for lo in range(0, max(st.shape[0], 1), chunk)
        ]
        response, tangent, std = (np.concatenate([q[k] for q in parts]) for k in range(3))
        if level is None:
            return Prediction(response, tangent, std)
        k = self.interval_multipliers(level, cells.symmetry)[0, inv]  # (N,)
        return Prediction(response, tangent, std, float(level), k[:, None] * std)

    def interval_multipliers(self, p: float | Sequence[float], symmetry: Any = None) -> np.ndarray:
        """k_p for levels p in (0, 1): the calibrated central interval is ±k_p·std.
        Pooled (L,) without ``symmetry``; with the symmetry orders (B,) of B cells
        (:func:`~neuroscale_coupling.cell.symmetry.symmetry_order`), (L, B) from their
        classes' tables."""
        return self.model.interval_multipliers(p, symmetry)


def _resolve_config_paths(cfg: dict[str, Any], model_path: Path) -> dict[str, Any]:
    """The training config with its recorded relative data paths (``data.dataset``,
    ``data.generate.save``) resolved against the training config's folder, the folder that
    the recorded relative ``output.model`` path leads from to the model file (as
    ``neuroscale train`` resolves them). Paths that do not exist there are left as
    recorded."""
    out = cfg.get("output", {}).get("model")
    if not out or os.path.isabs(out):
        return cfg
    base = model_path.resolve().parent
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
    return {**cfg, "data": data}
