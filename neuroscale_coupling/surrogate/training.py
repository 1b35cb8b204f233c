"""Training of the NeuroScale surrogate (SANO): config, loss, loop, calibration, model file.

Pipeline step 5 (DESIGN.md §2, §6)::

    cfg = load_config("train.toml")            # TOML → frozen dataclasses
    result = train(cfg)                         # data, fit, early stopping, calibration, file
    model, meta = load_model("model.pt")        # torch.load(weights_only=True)
    sur = Surrogate.load("model.pt"); q, t, std = sur.predict(images, states)

**Units.** The model works on physical states and returns physical responses: its own
scaling buffers are set from the training domain (``SANO.set_scaling``: G or E divided by
the largest |bound| of those components, no shift so that Q(0) = 0 / Σ(0) = 0 survives;
θ shifted/scaled to the domain; response × the RMS of the training responses). Images
enter through the fitted :class:`WaveletNormalizer`. The per-component
:class:`Normalization` (domain box → [-1, 1], response / per-component RMS) defines the
loss: normalized response and tangent errors, so components of different size count alike.

**Loss** = data + λ·physics + γ·KL:

* data = MSE(normalized response) + w_t·MSE(normalized tangent) at the (optionally D4
  augmented) samples: with ``augment`` each sample is seen under a random symmetry R of
  the square (image R·image, state S_R s, target Q_R y, tangent Q_R T S_R⁻¹), exact for
  isotropic phases.
* physics = **D4 equivariance at states the data never shows**: for a fraction of the
  batch, a fresh uniform state s in the domain box and a random R ≠ identity; residual
  Q_R f(image, s) − f(R image, S_R s) on the response and Q_R f'(image, s) S_R⁻¹ −
  f'(R image, S_R s) on the tangent (normalized MSE). Symmetry and positive definiteness
  of the thermal tangent, Q(0) = 0 and response–tangent consistency are exact by
  construction of the decoder, so penalizing them would be void; equivariance is not built
  into the encoder (it sees wavelet coefficients) and is what a finite data set pins down
  only at its own samples.
* KL = :meth:`SANO.kl` (concrete-dropout term, its own regularization weights).

**Adaptive balancing** (``adaptive = true``): the two data terms (response MSE, tangent
MSE) are each divided by an exponential running mean of their own detached magnitude
(momentum ``adaptive_momentum``, started at the first batch's value), so that each enters
with weight ≈ its nominal weight (1, w_t) whatever its scale, and the balance follows the
terms as they shrink at different rates. The physics term is divided by the sum of the two
data running means (an equivariance residual measured relative to the data error: dividing
a near-zero residual by its own size would amplify it to O(1) and pull the model towards
the trivially equivariant zero output, which we observed). The KL term is not rescaled: it
is a prior term with its own scale and can be negative (entropy part).

**Reproducibility.** ``seed`` fixes the initial weights; epoch e reseeds torch and the
numpy shuffling generator from (seed, e), so a run resumed from a checkpoint (written
atomically after every epoch with the optimizer, running means, best state and history)
retraces the uninterrupted run exactly on the same device.

**Calibration.** On the validation split (eval mode, the fixed MC masks): the std scale s
minimizing the calibration error ``mean_p |coverage_p(s) − p|`` over nominal levels p =
0.05, 0.10, …, 0.95 of the Gaussian intervals ±z_p·s·std (all response components
pooled, normalized units); a log-grid search then a local refinement. ``set_std_scale(s)``.

**MPI.** :func:`train` with a communicator: dataset generation is collective; every rank
trains the same (deterministic) copy; rank 0 alone writes the checkpoint and model file,
followed by a barrier. Data-parallel training is not implemented.
"""

import math
import os
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from neuroscale_coupling.io import torch_save_atomic
from neuroscale_coupling.log import get_logger
from neuroscale_coupling.surrogate.data import (
    CellFamily,
    CellMember,
    Dataset,
    DatasetSpec,
    Normalization,
    StateDomain,
    WaveletNormalizer,
    generate,
    material_from_dict,
    material_to_dict,
    split,
)
from neuroscale_coupling.surrogate.sano import SANO, SANOConfig
from neuroscale_coupling.symmetry import D4, response_matrix, state_matrix, transform_image

__all__ = [
    "DataConfig",
    "GenerateConfig",
    "OutputConfig",
    "Surrogate",
    "TrainConfig",
    "TrainResult",
    "TrainingOptions",
    "calibration_error",
    "coverage",
    "fit_std_scale",
    "load_config",
    "load_model",
    "save_model",
    "train",
]

_log = get_logger(__name__)
MODEL_FORMAT = "neuroscale-sano-model"
MODEL_FORMAT_VERSION = 1
_CKPT_FORMAT = "neuroscale-sano-checkpoint"
LEVELS_P = tuple(round(0.05 * k, 2) for k in range(1, 20))


# ============================================================================ config
def _from_mapping(cls: type, d: Mapping[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in [{where}]; known keys: {sorted(known)}")
    return cls(**d)


@dataclass(frozen=True)
class GenerateConfig:
    """A dataset to generate (the ``[data.generate]`` table).

    physics: "thermal" | "mechanical"; phases: per phase a dict of law parameters (thermal
    k0, alpha, beta; mechanical K, G, c1, c2), default thermal k0 = 1 | 10, mechanical
    EquiNO; n: cell resolution; members: list of {generator, fixed, ranges, weight} (see
    :class:`CellMember`); lower/upper: (d,) state domain bounds; n_cells, states_per_cell,
    solver ("fem"/"spectral"), solver_options, seed; save: optional path to write the
    generated dataset to.
    """

    physics: str
    n: int
    members: tuple[Any, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    n_cells: int
    states_per_cell: int
    phases: tuple[Any, ...] = ()
    solver: str = "fem"
    solver_options: Any = ()
    seed: int = 0
    save: str | None = None

    def __post_init__(self) -> None:
        if self.physics not in ("thermal", "mechanical"):
            raise ValueError(f"physics={self.physics!r}: choose 'thermal' or 'mechanical'")
        if not self.members:
            raise ValueError("[data.generate] needs members = [{generator = ..., ...}]")
        for name in ("members", "phases", "lower", "upper"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "solver_options", tuple(sorted(dict(self.solver_options).items())))

    def material(self) -> Any:
        from neuroscale_coupling.materials import (
            EQUINO_FIBRE,
            EQUINO_MATRIX,
            MechanicalMaterial,
            ThermalMaterial,
            ThermalPhase,
        )

        if self.phases:
            return material_from_dict(
                {"physics": self.physics, "phases": [dict(p) for p in self.phases]}
            )
        if self.physics == "thermal":
            return ThermalMaterial(phases=(ThermalPhase(1.0), ThermalPhase(10.0)))
        return MechanicalMaterial(phases=(EQUINO_MATRIX, EQUINO_FIBRE))

    def spec(self) -> DatasetSpec:
        """The :class:`DatasetSpec` this table describes."""
        material = self.material()
        members = tuple(
            CellMember(
                m["generator"],
                fixed=dict(m.get("fixed", {})),
                ranges={k: tuple(v) for k, v in dict(m.get("ranges", {})).items()},
                weight=float(m.get("weight", 1.0)),
            )
            for m in self.members
        )
        return DatasetSpec(
            material,
            CellFamily(members, self.n),
            StateDomain.for_material(material, self.lower, self.upper),
            n_cells=self.n_cells,
            states_per_cell=self.states_per_cell,
            solver=self.solver,
            solver_options=dict(self.solver_options),
            seed=self.seed,
        )


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: exactly one of ``dataset`` (path of a saved Dataset) or ``generate``.

    split: (train, val, test) fractions, split by microstructure with split_seed;
    wavelet: PyWavelets name for the :class:`WaveletNormalizer` (levels = model.levels).
    """

    dataset: str | None = None
    generate: GenerateConfig | None = None
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int = 0
    wavelet: str = "haar"

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.generate is None):
            raise ValueError(
                "[data] needs exactly one of dataset = 'path' or a [data.generate] table"
            )
        object.__setattr__(self, "split", tuple(float(x) for x in self.split))


@dataclass(frozen=True)
class TrainingOptions:
    """``[training]``.

    epochs, batch_size, lr (Adam), grad_clip (max global gradient norm, 0 = off);
    physics_weight λ, kl_weight γ, tangent_weight w_t; adaptive term balancing with
    adaptive_momentum; physics_fraction: share of each batch that gets an equivariance
    pair; patience: early-stopping epochs without validation improvement (0 = off);
    seed; device "cpu" | "cuda" | "auto"; dtype "float32" | "float64"; augment: random
    D4 transform per sample; calibrate: fit the std scale on the validation split;
    progress: tqdm bar (rank 0).
    """

    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    grad_clip: float = 1.0
    physics_weight: float = 0.1
    kl_weight: float = 1.0
    tangent_weight: float = 1.0
    adaptive: bool = True
    adaptive_momentum: float = 0.9
    physics_fraction: float = 0.25
    patience: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    augment: bool = True
    calibrate: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"training.{name}={getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"training.lr={self.lr} must be > 0")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"training.device={self.device!r}: choose cpu, cuda or auto")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"training.dtype={self.dtype!r}: choose float32 or float64")
        if not 0 <= self.physics_fraction <= 1:
            raise ValueError(f"training.physics_fraction={self.physics_fraction} not in [0, 1]")
        if not 0 <= self.adaptive_momentum < 1:
            raise ValueError(f"training.adaptive_momentum={self.adaptive_momentum} not in [0,1)")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("training.device='cuda' but no CUDA device: use 'cpu' or 'auto'")
        return torch.device(self.device)


@dataclass(frozen=True)
class OutputConfig:
    """``[output]``: model file path; checkpoint path (default: model path + '.ckpt')."""

    model: str = "model.pt"
    checkpoint: str | None = None

    @property
    def checkpoint_path(self) -> str:
        return self.checkpoint if self.checkpoint is not None else self.model + ".ckpt"


@dataclass(frozen=True)
class TrainConfig:
    """The whole training configuration. model: SANOConfig fields; ``physics`` and
    ``image_size`` default to the dataset's."""

    data: DataConfig
    model: Any = ()
    training: TrainingOptions = field(default_factory=TrainingOptions)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        model = dict(self.model)
        known = {f.name for f in fields(SANOConfig)}
        unknown = sorted(set(model) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown} in [model]; known keys: {sorted(known)}")
        object.__setattr__(self, "model", tuple(sorted(model.items())))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = dict(self.model)
        if self.data.generate is not None:
            g = d["data"]["generate"]
            g["solver_options"] = dict(self.data.generate.solver_options)
        return d

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], *, base: str | os.PathLike[str] = "."
    ) -> "TrainConfig":
        """Build from a nested dict (the TOML tables); relative paths resolve against base."""
        unknown = sorted(set(d) - {"data", "model", "training", "output"})
        if unknown:
            raise ValueError(f"unknown tables {unknown}: use data, model, training, output")
        if "data" not in d:
            raise ValueError("the config needs a [data] table")
        root = Path(base)

        def resolve(p: str | None) -> str | None:
            return None if p is None else str(root / Path(p).expanduser())

        data = dict(d["data"])
        if "generate" in data and data["generate"] is not None:
            gen = dict(data["generate"])
            if "save" in gen:
                gen["save"] = resolve(gen["save"])
            data["generate"] = _from_mapping(GenerateConfig, gen, "data.generate")
        if data.get("dataset") is not None:
            data["dataset"] = resolve(data["dataset"])
        out = dict(d.get("output", {}))
        for k in ("model", "checkpoint"):
            if out.get(k) is not None:
                out[k] = resolve(out[k])
        return cls(
            data=_from_mapping(DataConfig, data, "data"),
            model=dict(d.get("model", {})),
            training=_from_mapping(TrainingOptions, dict(d.get("training", {})), "training"),
            output=_from_mapping(OutputConfig, out, "output"),
        )


def load_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Read a TOML training config; relative paths are relative to the file's folder."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{p} is not valid TOML: {exc}") from exc
    return TrainConfig.from_dict(raw, base=p.parent)


# ============================================================================ calibration
def _z(p: np.ndarray) -> np.ndarray:
    from scipy.stats import norm

    return norm.ppf((1 + np.asarray(p, dtype=float)) / 2)


def coverage(err: np.ndarray, std: np.ndarray, p: float | Sequence[float]) -> np.ndarray:
    """Empirical coverage of the Gaussian intervals ±z_p·std: share of |err| <= z_p std.

    err, std: same shape (any); p: nominal level(s); returns one value per level."""
    e = np.abs(np.asarray(err, dtype=float)).ravel()
    s = np.asarray(std, dtype=float).ravel()
    z = np.atleast_1d(_z(p))
    return np.array([(e <= zi * s).mean() for zi in z])


def calibration_error(
    err: np.ndarray, std: np.ndarray, levels: Sequence[float] = LEVELS_P
) -> float:
    """mean over nominal levels p of |coverage(p) − p| (DESIGN.md §6)."""
    return float(np.mean(np.abs(coverage(err, std, levels) - np.asarray(levels))))


def fit_std_scale(err: np.ndarray, std: np.ndarray, levels: Sequence[float] = LEVELS_P) -> float:
    """Scale s minimizing calibration_error(err, s·std): log grid 1e-3…1e3, then refinement.

    Ties are broken by the scale closest (in log) to 1. Raises ValueError without spread."""
    s = np.asarray(std, dtype=float)
    if not np.any(s > 0):
        raise ValueError("the model has no spread (std = 0): train with dropout > 0")
    grid = np.logspace(-3, 3, 601)
    for _ in range(2):
        ce = np.array([calibration_error(err, g * s, levels) for g in grid])
        best = np.flatnonzero(ce <= ce.min() + 1e-12)
        g0 = grid[best[np.argmin(np.abs(np.log(grid[best])))]]
        grid = g0 * np.logspace(-0.02, 0.02, 81)
    return float(g0)


# ============================================================================ model file
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
) -> None:
    """Write the model file atomically (temp file + os.replace; not collective).

    A dict of tensors and plain types, loadable with ``torch.load(weights_only=True)``:
    format, format_version, version (package), config (SANOConfig.to_dict()), state_dict
    (CPU tensors), dtype, domain, wavelet, normalization, material, family, std_scale,
    history, extra.
    """
    import neuroscale_coupling
    from neuroscale_coupling.surrogate.data import _plain

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
        "family": _plain(dict(family)) if family is not None else None,
        "std_scale": float(model.std_scale),
        "history": _plain(dict(history or {})),
        "extra": _plain(dict(extra or {})),
    }
    torch_save_atomic(path, payload)


def load_model(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[SANO, dict[str, Any]]:
    """Rebuild the model (eval mode, on ``device``) and its metadata from :func:`save_model`.

    metadata: the file's plain entries plus rebuilt objects ``domain_obj`` (StateDomain),
    ``wavelet_obj`` (WaveletNormalizer), ``normalization_obj`` (Normalization),
    ``material_obj``."""
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
    return model, meta


def _coeff_tensors(
    wav: WaveletNormalizer, images: np.ndarray, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Normalized wavelet coefficients as SANO input [approx (B,1,m,m), details (B,3,·,·)…]."""
    c = wav.transform(images)
    return [torch.as_tensor(c[0][:, None], dtype=dtype, device=device)] + [
        torch.as_tensor(np.ascontiguousarray(x), dtype=dtype, device=device) for x in c[1:]
    ]


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

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str = "cpu") -> "Surrogate":
        return cls(*load_model(path, device=device))

    def predict(
        self, images: np.ndarray, states: np.ndarray, *, chunk: int = 4096
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """images (N, n, n) phase ids, states (N, d) physical → response (N, r), tangent
        (N, r, d), std (N, r) (calibrated), physical units, float64 numpy arrays.

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
        uniq, inv = np.unique(im.reshape(im.shape[0], -1), axis=0, return_inverse=True)
        uniq = uniq.reshape(-1, *im.shape[1:])
        inv = inv.reshape(-1)
        p = self.model.state_scale
        with torch.no_grad():
            latent = self.model.encode(_coeff_tensors(self.wavelet, uniq, p.dtype, p.device))
            outs = []
            for lo in range(0, st.shape[0], chunk):
                sl = slice(lo, lo + chunk)
                pred = self.model.decode(
                    latent,
                    torch.as_tensor(st[sl], dtype=p.dtype, device=p.device),
                    cells=torch.as_tensor(inv[sl], device=p.device),
                )
                outs.append([pred.response, pred.tangent, pred.std])
        return tuple(torch.cat([o[k] for o in outs]).double().cpu().numpy() for k in range(3))  # type: ignore[return-value]


# ============================================================================ training
@dataclass
class TrainResult:
    """model (eval, calibrated, best validation state), metadata as stored in the model
    file, history per epoch (train/val losses, seconds), metrics (final validation)."""

    model: SANO
    metadata: dict[str, Any]
    history: dict[str, list[float]]
    metrics: dict[str, float]


class _Split:
    """Tensors of one split on the device, with the 8 D4-transformed coefficient sets."""

    def __init__(
        self,
        ds: Dataset,
        wav: WaveletNormalizer,
        physics: str,
        dtype: torch.dtype,
        device: torch.device,
        augment: bool,
    ) -> None:
        self.n_cells = ds.n_cells
        self.images = ds.images
        rots = D4 if augment else D4[:1]
        ims = np.concatenate([transform_image(ds.images, r) for r in rots])  # (8C, n, n)
        self.coeffs = _coeff_tensors(wav, ims, dtype, device)
        self.cell = torch.as_tensor(ds.cell_index, device=device)
        self.states = torch.as_tensor(ds.states, dtype=dtype, device=device)
        self.response = torch.as_tensor(ds.response, dtype=dtype, device=device)
        self.tangent = torch.as_tensor(ds.tangent, dtype=dtype, device=device)
        self.n = len(ds)


def _group_tensors(physics: str, dtype: torch.dtype, device: torch.device) -> tuple:
    s = np.stack([state_matrix(r, physics) for r in D4])
    q = np.stack([response_matrix(r, physics) for r in D4])
    s_inv = np.linalg.inv(s)
    return tuple(torch.as_tensor(a, dtype=dtype, device=device) for a in (s, q, s_inv))


class _Trainer:
    def __init__(
        self, cfg: TrainConfig, train: Dataset, val: Dataset, material: Any, domain: StateDomain
    ) -> None:
        opt = cfg.training
        self.cfg, self.opt = cfg, opt
        self.device = opt.torch_device()
        self.dtype = getattr(torch, opt.dtype)
        self.domain = domain
        self.material = material
        mcfg = dict(cfg.model)
        mcfg.setdefault("physics", material.physics)
        mcfg.setdefault("image_size", int(train.images.shape[-1]))
        if mcfg["physics"] != material.physics:
            raise ValueError(
                f"model.physics={mcfg['physics']!r} but the data are {material.physics!r}"
            )
        self.model_config = SANOConfig(**mcfg)
        self.physics = material.physics
        self.wav = WaveletNormalizer.fit(
            train.images, material, levels=self.model_config.levels, wavelet=cfg.data.wavelet
        )
        self.norm = Normalization.fit(train, domain)
        torch.manual_seed(opt.seed)
        model = SANO(self.model_config).to(self.dtype)
        hw, c = domain.half_width, domain.center
        lo, hi = np.abs(domain.lower), np.abs(domain.upper)
        nmac = 2 if self.physics == "thermal" else 3
        rms = float(np.sqrt(np.mean(train.response**2))) or 1.0
        kw: dict[str, float] = {
            "state_scale": float(max(lo[:nmac].max(), hi[:nmac].max())),
            "response_scale": rms,
        }
        if self.physics == "thermal":
            kw.update(theta_ref=float(c[2]), theta_scale=float(hw[2]))
        model.set_scaling(**kw)
        self.model = model.to(self.device)
        self.optim = torch.optim.Adam(self.model.parameters(), lr=opt.lr)
        d, t = self.dtype, self.device
        self.rscale = torch.as_tensor(self.norm.response_scale, dtype=d, device=t)
        self.hw = torch.as_tensor(self.norm.state_half_width, dtype=d, device=t)
        self.lo = torch.as_tensor(domain.lower, dtype=d, device=t)
        self.hi = torch.as_tensor(domain.upper, dtype=d, device=t)
        self.S, self.Q, self.Sinv = _group_tensors(self.physics, d, t)
        self.train = _Split(
            train, self.wav, self.physics, d, t, opt.augment or opt.physics_weight > 0
        )
        self.val = _Split(val, self.wav, self.physics, d, t, False)
        self.ema: dict[str, float] = {}
        self.history: dict[str, list[float]] = {
            k: []
            for k in (
                "train_loss",
                "train_data",
                "train_physics",
                "kl",
                "val_loss",
                "val_response_mse",
                "val_tangent_mse",
                "seconds",
            )
        }
        self.epoch = 0
        self.best_val = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0

    # -- pieces
    def _nresp(self, r: torch.Tensor) -> torch.Tensor:
        return r / self.rscale

    def _ntan(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.hw / self.rscale[:, None]

    def _predict(self, split: _Split, keys: torch.Tensor, states: torch.Tensor) -> Any:
        uniq, inv = torch.unique(keys, return_inverse=True)
        latent = self.model.encode([c[uniq] for c in split.coeffs])
        return self.model.decode(latent, states, cells=inv)

    def _batch_loss(self, idx: torch.Tensor, gen: np.random.Generator) -> dict[str, torch.Tensor]:
        """Loss terms of one batch; the data samples and the physics pairs share one
        encode (distinct (image, symmetry) keys) and one decode call."""
        sp = self.train
        b = idx.numel()
        dev = self.device
        cell = sp.cell[idx]
        if self.opt.augment:
            rot = torch.as_tensor(gen.integers(0, 8, size=b), device=dev)
        else:
            rot = torch.zeros(b, dtype=torch.long, device=dev)
        S, Q, Si = self.S[rot], self.Q[rot], self.Sinv[rot]
        states = torch.einsum("nij,nj->ni", S, sp.states[idx])
        y = torch.einsum("nij,nj->ni", Q, sp.response[idx])
        t = Q @ sp.tangent[idx] @ Si
        keys = [rot * sp.n_cells + cell]
        all_states = [states]
        m = math.ceil(self.opt.physics_fraction * b) if self.opt.physics_weight > 0 else 0
        if m:
            c2 = cell[:m]
            r2 = torch.as_tensor(gen.integers(1, 8, size=m), device=dev)
            u = torch.as_tensor(gen.random((m, self.lo.numel())), dtype=self.dtype, device=dev)
            s = self.lo + (self.hi - self.lo) * u
            keys += [c2, r2 * sp.n_cells + c2]
            all_states += [s, torch.einsum("nij,nj->ni", self.S[r2], s)]
        pred = self._predict(sp, torch.cat(keys), torch.cat(all_states))
        out = {
            "response": ((self._nresp(pred.response[:b] - y)) ** 2).mean(),
            "tangent": ((self._ntan(pred.tangent[:b] - t)) ** 2).mean(),
        }
        if m:
            qa, qb = pred.response[b : b + m], pred.response[b + m :]
            ta, tb = pred.tangent[b : b + m], pred.tangent[b + m :]
            q2 = self.Q[r2]
            res_q = torch.einsum("nij,nj->ni", q2, qa) - qb
            res_t = q2 @ ta @ self.Sinv[r2] - tb
            out["physics"] = (self._nresp(res_q) ** 2).mean() + (self._ntan(res_t) ** 2).mean()
        else:
            out["physics"] = torch.zeros((), dtype=self.dtype, device=dev)
        out["kl"] = self.model.kl()
        return out

    def _combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        opt = self.opt
        weights = {"response": 1.0, "tangent": opt.tangent_weight}
        total = opt.kl_weight * terms["kl"]
        if not opt.adaptive:
            total = total + opt.physics_weight * terms["physics"]
            return total + sum(w * terms[k] for k, w in weights.items())
        mom = opt.adaptive_momentum
        for k, w in weights.items():
            if w == 0:
                continue
            mag = float(terms[k].detach())
            self.ema[k] = mom * self.ema[k] + (1 - mom) * mag if k in self.ema else mag
            total = total + w * terms[k] / max(self.ema[k], 1e-30)
        if opt.physics_weight > 0:
            # Relative to the data error, not to itself: a near-zero residual divided by
            # its own size would be amplified to O(1) and drive the model to zero output.
            scale = self.ema.get("response", 1.0) + self.ema.get("tangent", 0.0)
            total = total + opt.physics_weight * terms["physics"] / max(scale, 1e-30)
        return total

    def validate(self, split: _Split | None = None) -> dict[str, float]:
        sp = self.val if split is None else split
        self.model.eval()
        with torch.no_grad():
            pred = self._predict(sp, sp.cell, sp.states)
        r = float((self._nresp(pred.response - sp.response) ** 2).mean())
        t = float((self._ntan(pred.tangent - sp.tangent) ** 2).mean())
        return {"loss": r + self.opt.tangent_weight * t, "response_mse": r, "tangent_mse": t}

    def run_epoch(self) -> None:
        opt = self.opt
        e = self.epoch
        if e == 0:
            self.history["initial_val_loss"] = [self.validate()["loss"]]
        torch.manual_seed(opt.seed * 1_000_003 + e + 1)
        gen = np.random.default_rng([opt.seed, e])
        t0 = time.perf_counter()
        self.model.train()
        order = torch.as_tensor(gen.permutation(self.train.n), device=self.device)
        sums = {"loss": 0.0, "data": 0.0, "physics": 0.0, "kl": 0.0}
        nb = 0
        for lo in range(0, self.train.n, opt.batch_size):
            idx = order[lo : lo + opt.batch_size]
            terms = self._batch_loss(idx, gen)
            loss = self._combine(terms)
            self.optim.zero_grad(set_to_none=True)
            loss.backward()
            if opt.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), opt.grad_clip)
            self.optim.step()
            sums["loss"] += float(loss.detach())
            sums["data"] += float(
                terms["response"].detach() + opt.tangent_weight * terms["tangent"].detach()
            )
            sums["physics"] += float(terms["physics"].detach())
            sums["kl"] += float(terms["kl"].detach())
            nb += 1
        v = self.validate()
        h = self.history
        h["train_loss"].append(sums["loss"] / nb)
        h["train_data"].append(sums["data"] / nb)
        h["train_physics"].append(sums["physics"] / nb)
        h["kl"].append(sums["kl"] / nb)
        h["val_loss"].append(v["loss"])
        h["val_response_mse"].append(v["response_mse"])
        h["val_tangent_mse"].append(v["tangent_mse"])
        h["seconds"].append(time.perf_counter() - t0)
        if v["loss"] < self.best_val:
            self.best_val = v["loss"]
            self.best_state = {k: x.detach().clone() for k, x in self.model.state_dict().items()}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        self.epoch += 1

    @property
    def stopped(self) -> bool:
        p = self.opt.patience
        return self.epoch >= self.opt.epochs or (p > 0 and self.bad_epochs >= p)

    # -- checkpoint
    def checkpoint(self) -> dict[str, Any]:
        return {
            "format": _CKPT_FORMAT,
            "config": _plain_config(self.cfg),
            "epoch": self.epoch,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optim.state_dict(),
            "ema": dict(self.ema),
            "best_val": self.best_val,
            "best_state": None
            if self.best_state is None
            else {k: v.cpu() for k, v in self.best_state.items()},
            "bad_epochs": self.bad_epochs,
            "history": {k: list(v) for k, v in self.history.items()},
        }

    def restore(self, ck: Mapping[str, Any], path: str) -> None:
        if ck.get("format") != _CKPT_FORMAT:
            raise ValueError(f"{path} is not a NeuroScale training checkpoint")
        mine = _plain_config(self.cfg)
        theirs = dict(ck["config"])
        # epochs/patience/progress may change on resume; the rest must match.
        for d in (mine, theirs):
            for k in ("epochs", "patience", "progress"):
                d["training"].pop(k, None)
        if mine != theirs:
            raise ValueError(
                f"checkpoint {path} was written by a different configuration: resume with "
                "the same config (only training.epochs/patience/progress may change) or "
                "start afresh without --resume"
            )
        self.model.load_state_dict(ck["model"])
        self.optim.load_state_dict(ck["optimizer"])
        self.ema = dict(ck["ema"])
        self.epoch = int(ck["epoch"])
        self.best_val = float(ck["best_val"])
        bs = ck["best_state"]
        self.best_state = None if bs is None else {k: v.to(self.device) for k, v in bs.items()}
        self.bad_epochs = int(ck["bad_epochs"])
        self.history = {k: list(v) for k, v in ck["history"].items()}

    # -- calibration
    def val_errors(self) -> tuple[np.ndarray, np.ndarray]:
        """Normalized response errors and raw (unscaled) std on the validation split."""
        sp = self.val
        self.model.eval()
        old = float(self.model.std_scale)
        self.model.set_std_scale(1.0)
        with torch.no_grad():
            pred = self._predict(sp, sp.cell, sp.states)
        self.model.set_std_scale(old)
        err = self._nresp(pred.response - sp.response).double().cpu().numpy()
        std = self._nresp(pred.std).double().cpu().numpy()
        return err, std


def _plain_config(cfg: TrainConfig) -> dict[str, Any]:
    from neuroscale_coupling.surrogate.data import _plain

    return _plain(cfg.to_dict())


def _load_data(cfg: TrainConfig, comm: MPI.Comm, progress: bool) -> Dataset:
    if cfg.data.dataset is not None:
        return Dataset.load(cfg.data.dataset)
    gen = cfg.data.generate
    if gen is None:  # pragma: no cover - DataConfig guarantees one of the two
        raise ValueError("[data] needs dataset or generate")
    data = generate(gen.spec(), comm=comm, progress=progress)
    if gen.save is not None:
        if comm.rank == 0:
            data.save(gen.save)
        comm.barrier()
    return data


def train(
    cfg: TrainConfig,
    *,
    comm: MPI.Comm | None = None,
    resume: bool = False,
    dataset: Dataset | None = None,
) -> TrainResult:
    """Train, calibrate and save a SANO model as ``cfg`` says (collective over comm).

    dataset: use this Dataset instead of cfg.data (e.g. already generated). resume: continue
    from cfg.output.checkpoint_path when it exists (it must come from the same config). The
    returned model holds the best-validation weights, calibrated; the model file is written
    to cfg.output.model by rank 0.
    """
    from tqdm.auto import tqdm

    comm = MPI.COMM_WORLD if comm is None else comm
    opt = cfg.training
    show = opt.progress and comm.rank == 0
    data = dataset if dataset is not None else _load_data(cfg, comm, show)
    spec = data.spec
    material, domain = spec.material, spec.domain
    tr, va, _ = split(data, cfg.data.split, seed=cfg.data.split_seed)
    if len(va) == 0:
        raise ValueError("the validation split is empty: generate more cells or raise split[1]")
    t = _Trainer(cfg, tr, va, material, domain)
    ckpt = cfg.output.checkpoint_path
    if resume and os.path.exists(ckpt):
        t.restore(torch.load(ckpt, weights_only=True, map_location=t.device), ckpt)
        _log.info("resumed from %s at epoch %d", ckpt, t.epoch)
    bar = tqdm(
        total=opt.epochs,
        initial=min(t.epoch, opt.epochs),
        desc="training SANO",
        unit="epoch",
        disable=not show,
    )
    with bar:
        while not t.stopped:
            t.run_epoch()
            if comm.rank == 0:
                torch_save_atomic(ckpt, t.checkpoint())
            h = t.history
            bar.set_postfix(train=f"{h['train_data'][-1]:.3g}", val=f"{h['val_loss'][-1]:.3g}")
            bar.update(1)
    if t.best_state is not None:
        t.model.load_state_dict(t.best_state)
    final = t.validate()
    metrics: dict[str, float] = {
        "val_loss": final["loss"],
        "val_response_mse": final["response_mse"],
        "val_tangent_mse": final["tangent_mse"],
        "epochs": float(t.epoch),
    }
    sd = t.model.config.dropout > 0
    err, std = t.val_errors() if opt.calibrate and sd else (None, None)
    if std is not None and not np.any(std > 0):
        _log.warning(
            "the fixed MC-dropout masks give no spread on the validation split (std = 0): "
            "std scale left at 1; raise model.dropout or model.samples"
        )
    elif std is not None:
        s = fit_std_scale(err, std)
        before = coverage(err, std, (0.68, 0.95))
        after = coverage(err, s * std, (0.68, 0.95))
        metrics.update(
            std_scale=s,
            calibration_error_before=calibration_error(err, std),
            calibration_error_after=calibration_error(err, s * std),
            coverage68_before=float(before[0]),
            coverage95_before=float(before[1]),
            coverage68_after=float(after[0]),
            coverage95_after=float(after[1]),
        )
        t.model.set_std_scale(s)
    t.model.eval()
    hist = {k: list(v) for k, v in t.history.items()}
    extra = {
        "metrics": metrics,
        "train_config": _plain_config(cfg),
        "split_cells": {"train": tr.cell_ids.tolist(), "val": va.cell_ids.tolist()},
    }
    if comm.rank == 0:
        save_model(
            cfg.output.model,
            t.model,
            domain=domain,
            wavelet=t.wav,
            normalization=t.norm,
            material=material,
            family=spec.family.to_dict(),
            history=hist,
            extra=extra,
        )
    comm.barrier()
    meta = {
        "domain_obj": domain,
        "wavelet_obj": t.wav,
        "normalization_obj": t.norm,
        "material_obj": material,
        "std_scale": float(t.model.std_scale),
        "extra": extra,
    }
    return TrainResult(model=t.model, metadata=meta, history=hist, metrics=metrics)
