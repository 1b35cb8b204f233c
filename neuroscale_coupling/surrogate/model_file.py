"""The SANO model file and the physical-unit predictor around it (DESIGN.md §6)::

    save_model("model.pt", model, domain=..., wavelet=..., normalization=..., material=...)
    model, meta = load_model("model.pt")        # torch.load(weights_only=True)
    sur = Surrogate.load("model.pt"); q, t, std = sur.predict(images, states)

**Units.** The model works on physical states and returns physical responses: its own
scaling buffers are set from the training domain (``SANO.set_scaling``: G or E divided by
the largest |bound| of those components, no shift so that Q(0) = 0 / Σ(0) = 0 survives;
θ shifted/scaled to the domain; response × the RMS of the training responses). Images
enter through the fitted :class:`WaveletNormalizer` (:func:`wavelet_inputs`).
"""

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from neuroscale_coupling.cell.materials import material_from_dict, material_to_dict
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


class Surrogate:
    """Trained SANO with its normalizers: physical-unit predictions.

    ``Surrogate.load(path)`` or ``Surrogate(model, metadata)`` (from :func:`load_model`).
    """

    def __init__(self, model: SANO, metadata: Mapping[str, Any]) -> None:
        self.model = model.eval()
        self.metadata = dict(metadata)
        self.wavelet: WaveletNormalizer = self.metadata["wavelet_obj"]
        self.domain: StateDomain = self.metadata["domain_obj"]
        self.material = self.metadata["material_obj"]
        train = self.metadata.get("reference_obj", {}).get("train")
        self.image_family = (
            None if train is None else ImageFamily(train.images, self.material.n_phases)
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str = "cpu") -> "Surrogate":
        return cls(*load_model(path, device=device))

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
        if self.image_family is not None:
            ratio = np.maximum(ratio, self.image_family.ratio(im))
        return ratio

    def predict(
        self, images: np.ndarray, states: np.ndarray, *, chunk: int = 4096
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """images (N, n, n) phase ids, states (N, d) physical → response (N, r), tangent
        (N, r, d), std (N, r) (calibrated, with the cell's symmetry class), physical units,
        float64 numpy arrays. The level-p interval of row i is ±k·std with k from
        ``model.interval_multipliers(p, symmetry_order(images))[:, i]``.

        Each distinct image is encoded once; the decoder runs in chunks of ``chunk``."""
        im = np.asarray(images)
        st = np.asarray(states, dtype=float)
        cfg = self.model.config
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
        p = self.model.state_scale
        with torch.no_grad():
            latent = self.model.encode(self.model_inputs(uniq))
            family = torch.as_tensor(self.family_ratio(uniq, latent), dtype=p.dtype)
            symmetry = symmetry_order(uniq)
            outs = []
            for lo in range(0, st.shape[0], chunk):
                sl = slice(lo, lo + chunk)
                pred = self.model.decode(
                    latent,
                    torch.as_tensor(st[sl], dtype=p.dtype, device=p.device),
                    cells=torch.as_tensor(inv[sl], device=p.device),
                    family=family,
                    symmetry=symmetry,
                )
                outs.append([pred.response, pred.tangent, pred.std])
        return tuple(torch.cat([o[k] for o in outs]).double().cpu().numpy() for k in range(3))  # type: ignore[return-value]
