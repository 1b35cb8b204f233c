"""The TOML training configuration: ``[data]``, ``[model]``, ``[training]``, ``[output]``
tables as frozen dataclasses (docs/training.md)::

    cfg = load_config("train.toml")            # TOML → frozen dataclasses

Unknown keys or tables raise ValueError naming them and the known ones; relative paths
resolve against the TOML file's folder. :func:`neuroscale_coupling.training.train.train`
runs what a :class:`TrainConfig` says.
"""

import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from neuroscale_coupling.cell.family import CellFamily, CellMember
from neuroscale_coupling.cell.materials import default_material, material_from_dict
from neuroscale_coupling.cell.state_layout import layout_of
from neuroscale_coupling.data.domain import StateDomain
from neuroscale_coupling.data.spec import DatasetSpec
from neuroscale_coupling.surrogate.config import SANOConfig

__all__ = [
    "DataConfig",
    "GenerateConfig",
    "OutputConfig",
    "TrainConfig",
    "TrainingOptions",
    "load_config",
]


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
    solver ("fem"/"spectral"), solver_options, seed, inner_fraction, inner_scale,
    inner_scale_min (see :class:`DatasetSpec`); save: optional path to write the
    generated dataset to (a later run reuses that file when it holds the same dataset).
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
    inner_fraction: float = 0.0
    inner_scale: float = 0.25
    inner_scale_min: float | None = None
    save: str | None = None

    def __post_init__(self) -> None:
        layout_of(self.physics)
        if not self.members:
            raise ValueError("[data.generate] needs members = [{generator = ..., ...}]")
        for name in ("members", "phases", "lower", "upper"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "solver_options", tuple(sorted(dict(self.solver_options).items())))

    def material(self) -> Any:
        if self.phases:
            return material_from_dict(
                {"physics": self.physics, "phases": [dict(p) for p in self.phases]}
            )
        return default_material(self.physics)

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
            inner_fraction=self.inner_fraction,
            inner_scale=self.inner_scale,
            inner_scale_min=self.inner_scale_min,
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
    lr_schedule "constant" | "cosine" (cosine decay from lr to lr_min over the epochs);
    physics_weight λ, kl_weight γ, tangent_weight w_t; adaptive term balancing with
    adaptive_momentum; physics_fraction: share of each batch that gets an equivariance
    pair; patience: early-stopping epochs without validation improvement (0 = off);
    seed; device "cpu" | "cuda" | "auto"; dtype "float32" | "float64"; augment: random
    D4 transform per sample; calibrate: fit the cell error head (cross-fitted over folds of
    the validation split's distinct images) and the std calibration (validation split);
    progress: tqdm bar (rank 0).
    """

    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "constant"
    lr_min: float = 0.0
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
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"training.lr_schedule={self.lr_schedule!r}: choose 'constant' or 'cosine'"
            )
        if not 0 <= self.lr_min <= self.lr:
            raise ValueError(f"training.lr_min={self.lr_min} must lie in [0, lr={self.lr}]")
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
