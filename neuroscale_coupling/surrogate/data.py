"""Training data for the NeuroScale surrogate: fine solves over a declared domain and family.

Pipeline step 4 (DESIGN.md §2)::

    spec = DatasetSpec(material, family, domain, n_cells=64, states_per_cell=16)
    data = generate(spec, comm=MPI.COMM_WORLD)       # collective; every rank gets it all
    train, val, test = split(data, seed=0)           # by microstructure
    data.save("thermal.pt"); Dataset.load("thermal.pt")
    wav = WaveletNormalizer.fit(train.images, material, levels=3)
    norm = Normalization.fit(train, domain)

* **States** come from a scrambled Sobol sequence (``scipy.stats.qmc``) seeded by the
  spec's seed and scaled to the :class:`StateDomain`; cell ``c`` gets the consecutive
  states ``[c k, (c + 1) k)`` of that sequence (``k = states_per_cell``).
* **Cells** come from a :class:`CellFamily`: a member generator (from
  :data:`neuroscale_coupling.microstructure.GENERATORS`) and its varied parameters are
  drawn from a second scrambled Sobol sequence; generators with a ``seed`` parameter (e.g.
  ``random_inclusions``) get an integer seed per cell unless it is fixed.
* **File format**: one file written by ``torch.save`` that loads with
  ``torch.load(path, weights_only=True)``: tensors plus plain dicts/lists/str/int/float/
  bool/None (the metadata: spec, per-cell generator parameters, package version). It is
  written to a temporary file in the same folder and moved into place with
  ``os.replace``, so a crash never leaves a partial file under the final name.
* **Wavelet normalization**: the phase image is mapped to a scalar field ``v[image]``
  with ``v`` = log of the phase's leading stiffness (log k0, thermal; log K, bulk
  modulus, mechanical), so that cells of different phase laws are comparable on one
  physical scale; then ``pywt.wavedec2`` (periodization) and a mean/std per (level,
  orientation) fitted on the training images.
* **State/response normalization**: states map affinely to [-1, 1] over the domain;
  responses are divided by their per-component RMS over the training set (no shift, so
  a zero state still maps to a zero response); tangents transform consistently, so the
  normalized tangent is the exact derivative of the normalized response with respect to
  the normalized state.
"""

import dataclasses
import inspect
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mpi4py import MPI
from scipy.stats import qmc

from neuroscale_coupling.fine.protocol import FineSolveError
from neuroscale_coupling.io import torch_save_atomic
from neuroscale_coupling.log import get_logger
from neuroscale_coupling.materials import (
    MechanicalMaterial,
    MechanicalPhase,
    ThermalMaterial,
    ThermalPhase,
)
from neuroscale_coupling.microstructure import GENERATORS, make_cell
from neuroscale_coupling.parallel import collective_call
from neuroscale_coupling.translation import canonical_translation

__all__ = [
    "CellFamily",
    "CellMember",
    "Dataset",
    "DatasetSpec",
    "Normalization",
    "StateDomain",
    "WaveletNormalizer",
    "generate",
    "material_from_dict",
    "material_to_dict",
    "pack_images",
    "phase_values",
    "plain_values",
    "split",
    "translation_groups",
    "unpack_images",
]

_log = get_logger(__name__)
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


def plain_values(value: Any) -> Any:
    """Convert to types ``torch.load(weights_only=True)`` and JSON accept."""
    if isinstance(value, Mapping):
        return {str(k): plain_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_values(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain_values(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(
        f"value {value!r} of type {type(value).__name__} cannot be stored in dataset "
        "metadata: use numbers, strings, lists or dicts of them (e.g. dtype='float32')"
    )


def _sobol(dim: int, n: int, seed: np.random.SeedSequence) -> np.ndarray:
    """First n points (n, dim) in [0, 1) of a Sobol sequence scrambled by ``seed``."""
    if n == 0:
        return np.zeros((0, dim))
    sampler = qmc.Sobol(dim, scramble=True, rng=np.random.default_rng(seed))
    m = max(0, int(np.ceil(np.log2(n))))
    return sampler.random_base2(m)[:n]


def _check_count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}={value!r}: give an integer >= {minimum}")
    return int(value)


def material_to_dict(material: ThermalMaterial | MechanicalMaterial) -> dict[str, Any]:
    """Plain description ``{"physics", "phases": [{param: value}]}`` of a material."""
    if not isinstance(material, ThermalMaterial | MechanicalMaterial):
        raise TypeError(
            f"expected a ThermalMaterial or MechanicalMaterial; got {type(material).__name__}"
        )
    return {
        "physics": material.physics,
        "phases": [
            {nm: float(getattr(p, nm)) for nm in material.parameter_names} for p in material.phases
        ],
    }


def material_from_dict(d: Mapping[str, Any]) -> ThermalMaterial | MechanicalMaterial:
    """Inverse of :func:`material_to_dict`."""
    physics = d.get("physics")
    if physics == "thermal":
        return ThermalMaterial(phases=tuple(ThermalPhase(**p) for p in d["phases"]))
    if physics == "mechanical":
        return MechanicalMaterial(phases=tuple(MechanicalPhase(**p) for p in d["phases"]))
    raise ValueError(f"unknown physics {physics!r} in a material record: 'thermal'/'mechanical'")


def phase_values(material: ThermalMaterial | MechanicalMaterial) -> np.ndarray:
    """Scalar value per phase used to turn a phase image into a field, shape (n_phases,).

    log k0 (thermal) or log K (bulk modulus, mechanical): a physical scale shared by
    cells of different phase laws, where the raw phase id would not be.
    """
    name = "k0" if isinstance(material, ThermalMaterial) else "K"
    return np.log(np.array([float(getattr(p, name)) for p in material.phases]))


# ---------------------------------------------------------------------------- domain
@dataclass(frozen=True)
class StateDomain:
    """Axis-aligned box of macro states: ``lower[j] <= state[j] <= upper[j]``.

    lower, upper: (d,) floats with lower < upper; names: (d,) component names (e.g. the
    material's ``state_names``).
    """

    lower: tuple[float, ...]
    upper: tuple[float, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        lo = tuple(float(x) for x in np.atleast_1d(np.asarray(self.lower, dtype=float)))
        hi = tuple(float(x) for x in np.atleast_1d(np.asarray(self.upper, dtype=float)))
        names = tuple(str(n) for n in self.names)
        if not (len(lo) == len(hi) == len(names) >= 1):
            raise ValueError(
                f"a StateDomain needs lower, upper and names of one length d >= 1; got "
                f"{len(lo)}, {len(hi)}, {len(names)}"
            )
        bad = [j for j in range(len(lo)) if not (np.isfinite(lo[j]) and lo[j] < hi[j] < np.inf)]
        if bad:
            j = bad[0]
            raise ValueError(
                f"domain component {names[j]!r} has bounds [{lo[j]}, {hi[j]}]: give finite "
                "bounds with lower < upper"
            )
        object.__setattr__(self, "lower", lo)
        object.__setattr__(self, "upper", hi)
        object.__setattr__(self, "names", names)

    @property
    def dim(self) -> int:
        return len(self.lower)

    @property
    def center(self) -> np.ndarray:
        """(d,) box centre."""
        return (np.asarray(self.lower) + np.asarray(self.upper)) / 2

    @property
    def half_width(self) -> np.ndarray:
        """(d,) half of the box edge lengths."""
        return (np.asarray(self.upper) - np.asarray(self.lower)) / 2

    def _states(self, states: Any) -> np.ndarray:
        s = np.asarray(states, dtype=float)
        if s.ndim == 1:
            s = s[None, :]
        if s.ndim != 2 or s.shape[1] != self.dim:
            raise ValueError(
                f"states must have shape (N, {self.dim}) (columns {self.names}); got "
                f"{np.shape(states)}"
            )
        return s

    def distance_outside(self, states: Any) -> np.ndarray:
        """How far each state lies outside the box, in units of the half-widths, (N,).

        max_j of the excess over the nearer bound divided by half_width[j]: 0 inside, 1
        when a component is one half-width beyond its bound. NaN states give NaN.
        """
        s = self._states(states)
        excess = np.maximum(np.asarray(self.lower) - s, s - np.asarray(self.upper))
        return np.max(np.maximum(excess, 0.0) / self.half_width, axis=1, initial=0.0)

    def contains(self, states: Any, *, tol: float = 0.0) -> np.ndarray:
        """Boolean mask (N,): the state lies in the box enlarged by ``tol`` half-widths."""
        return self.distance_outside(states) <= tol

    def sample(self, n: int, seed: int | np.random.SeedSequence = 0) -> np.ndarray:
        """n states (n, d) from a scrambled Sobol sequence scaled to the box."""
        ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        u = _sobol(self.dim, _check_count("n", n, 0), ss)
        return qmc.scale(u, self.lower, self.upper) if n else u

    def to_unit(self, states: Any) -> np.ndarray:
        """Affine map of states (N, d) onto [-1, 1]^d (the box)."""
        return (self._states(states) - self.center) / self.half_width

    def from_unit(self, u: Any) -> np.ndarray:
        """Inverse of :meth:`to_unit`."""
        return self.center + self._states(u) * self.half_width

    def to_dict(self) -> dict[str, Any]:
        return {"lower": list(self.lower), "upper": list(self.upper), "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StateDomain":
        return cls(tuple(d["lower"]), tuple(d["upper"]), tuple(d["names"]))

    @classmethod
    def for_material(
        cls,
        material: ThermalMaterial | MechanicalMaterial,
        lower: Sequence[float],
        upper: Sequence[float],
    ) -> "StateDomain":
        """A box with the material's state names."""
        return cls(tuple(lower), tuple(upper), material.state_names)


# ---------------------------------------------------------------------------- family
@dataclass(frozen=True)
class CellMember:
    """One generator of a cell family.

    generator: a name in ``microstructure.GENERATORS``; fixed: keyword parameters kept
    constant; ranges: ``{param: (low, high)}`` varied uniformly (quasi-random) per cell;
    weight: relative probability of this member. Mappings are stored as sorted tuples.
    """

    generator: str
    fixed: Any = ()
    ranges: Any = ()
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.generator not in GENERATORS:
            raise ValueError(
                f"unknown cell generator {self.generator!r}: choose one of {sorted(GENERATORS)}"
            )
        fixed = tuple(sorted(dict(self.fixed).items()))
        ranges = tuple(
            sorted((str(k), (float(v[0]), float(v[1]))) for k, v in dict(self.ranges).items())
        )
        params = inspect.signature(GENERATORS[self.generator]).parameters
        for k, _ in (*fixed, *ranges):
            if k not in params or k == "n":
                raise ValueError(
                    f"generator {self.generator!r} has no parameter {k!r}: its parameters "
                    f"are {[p for p in params if p != 'n']}"
                )
        both = {k for k, _ in fixed} & {k for k, _ in ranges}
        if both:
            raise ValueError(f"parameters {sorted(both)} are both fixed and varied: pick one")
        for k, (lo, hi) in ranges:
            if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
                raise ValueError(f"range of {k!r} is [{lo}, {hi}]: give finite low <= high")
        if not (np.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"member weight={self.weight!r} must be > 0")
        object.__setattr__(self, "fixed", fixed)
        object.__setattr__(self, "ranges", ranges)
        object.__setattr__(self, "weight", float(self.weight))

    @property
    def seeded(self) -> bool:
        """True when the generator takes a ``seed`` that the family draws per cell."""
        params = inspect.signature(GENERATORS[self.generator]).parameters
        return "seed" in params and "seed" not in dict(self.fixed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator,
            "fixed": plain_values(dict(self.fixed)),
            "ranges": {k: [lo, hi] for k, (lo, hi) in self.ranges},
            "weight": self.weight,
        }


@dataclass(frozen=True)
class CellFamily:
    """A declared family of cells: members (generators with parameter ranges) at resolution n."""

    members: tuple[CellMember, ...]
    n: int

    def __post_init__(self) -> None:
        members = tuple(self.members)
        if not members or not all(isinstance(m, CellMember) for m in members):
            raise ValueError("a CellFamily needs at least one CellMember")
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "n", _check_count("n", self.n, 2))

    def draw(
        self, n_cells: int, seed: int | np.random.SeedSequence = 0
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Draw ``n_cells`` cells reproducibly from ``seed``.

        Returns images (n_cells, n, n) int8 and, per cell, ``{"generator", "params"}``
        (plain types). Member choice and varied parameters come from one scrambled
        Sobol sequence (column 0 picks the member by weight, the next columns the
        parameters in sorted name order); seeded generators get an integer seed.
        Raises ValueError naming the cell when a generator rejects its parameters.
        """
        n_cells = _check_count("n_cells", n_cells, 0)
        ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        sobol_seed, int_seed = ss.spawn(2)
        dim = 1 + max(len(m.ranges) for m in self.members)
        u = _sobol(dim, n_cells, sobol_seed)
        seeds = np.random.default_rng(int_seed).integers(0, 2**31 - 1, size=n_cells)
        weights = np.array([m.weight for m in self.members])
        edges = np.cumsum(weights) / weights.sum()
        which = np.minimum(np.searchsorted(edges, u[:, 0], side="right"), len(self.members) - 1)
        images = np.zeros((n_cells, self.n, self.n), dtype=np.int8)
        records: list[dict[str, Any]] = []
        for c in range(n_cells):
            member = self.members[int(which[c])]
            params: dict[str, Any] = dict(member.fixed)
            for k, (name, (lo, hi)) in enumerate(member.ranges):
                params[name] = lo + (hi - lo) * float(u[c, 1 + k])
            if member.seeded:
                params["seed"] = int(seeds[c])
            try:
                image = make_cell(member.generator, self.n, **params)
            except (ValueError, TypeError) as exc:
                raise ValueError(
                    f"cell {c} of the family (generator {member.generator!r}, parameters "
                    f"{params}) could not be built: {exc}; narrow the parameter ranges"
                ) from exc
            if image.max() > np.iinfo(np.int8).max:
                raise ValueError(f"cell {c} has phase id {image.max()} > 127: too many phases")
            images[c] = image
            records.append({"generator": member.generator, "params": plain_values(params)})
        return images, records

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "members": [m.to_dict() for m in self.members]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CellFamily":
        members = tuple(
            CellMember(
                m["generator"],
                fixed={k: tuple(v) if isinstance(v, list) else v for k, v in m["fixed"].items()},
                ranges={k: tuple(v) for k, v in m["ranges"].items()},
                weight=m["weight"],
            )
            for m in d["members"]
        )
        return cls(members, int(d["n"]))


# ---------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class DatasetSpec:
    """Everything that determines a dataset.

    material: the phase laws; family: cells; domain: macro states (its dimension must
    equal material.state_dim); n_cells cells with states_per_cell states each
    (N = n_cells × states_per_cell samples); solver: "fem" or "spectral" with
    solver_options (plain values; for the spectral solver ``dtype`` as "float64" or
    "float32"); seed: drives cells and states. inner_fraction, inner_scale: a share
    ``inner_fraction`` of the states comes from the box shrunk by ``inner_scale`` about its
    centre in the gradient/strain components (θ keeps its full range): a Sobol sequence over
    the box puts few samples at small loads, where responses are small and a fit measured
    in absolute terms is loose; these samples make it tight there too. inner_scale_min
    (default: inner_scale): each inner sample gets its own shrink factor, log-uniform in
    [inner_scale_min, inner_scale], so that every order of magnitude of the load down to
    inner_scale_min is sampled alike (a law that is stiffest at zero strain, the EquiNO
    matrix, needs its tangent there: without it the mechanical model was 2.5 % off on Σ at
    |E| ≤ 1e-3 against 0.3 % at 0.04; with inner_scale_min = 0.005, 0.55 % and 0.4 %).
    """

    material: ThermalMaterial | MechanicalMaterial
    family: CellFamily
    domain: StateDomain
    n_cells: int
    states_per_cell: int
    solver: str = "fem"
    solver_options: Any = ()
    seed: int = 0
    inner_fraction: float = 0.0
    inner_scale: float = 0.25
    inner_scale_min: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.inner_fraction <= 1:
            raise ValueError(f"inner_fraction={self.inner_fraction} must lie in [0, 1]")
        if not 0 < self.inner_scale <= 1:
            raise ValueError(f"inner_scale={self.inner_scale} must lie in (0, 1]")
        if self.inner_scale_min is None:
            object.__setattr__(self, "inner_scale_min", self.inner_scale)
        if not 0 < self.inner_scale_min <= self.inner_scale:  # type: ignore[operator]
            raise ValueError(
                f"inner_scale_min={self.inner_scale_min} must lie in (0, inner_scale="
                f"{self.inner_scale}]"
            )
        if not isinstance(self.material, ThermalMaterial | MechanicalMaterial):
            raise TypeError(
                f"material must be a ThermalMaterial or MechanicalMaterial; got "
                f"{type(self.material).__name__}"
            )
        if not isinstance(self.family, CellFamily):
            raise TypeError(f"family must be a CellFamily; got {type(self.family).__name__}")
        if not isinstance(self.domain, StateDomain):
            raise TypeError(f"domain must be a StateDomain; got {type(self.domain).__name__}")
        if self.domain.names != self.material.state_names:
            raise ValueError(
                f"the domain has components {self.domain.names} but "
                f"{self.material.physics} states have {self.material.state_names}: build "
                "it with StateDomain.for_material"
            )
        _check_count("n_cells", self.n_cells)
        _check_count("states_per_cell", self.states_per_cell)
        _check_count("seed", self.seed, 0)
        if self.solver not in ("fem", "spectral"):
            raise ValueError(f"solver={self.solver!r}: choose 'fem' or 'spectral'")
        opts = tuple(sorted(dict(self.solver_options).items()))
        plain_values(dict(opts))  # raises TypeError for values that cannot be stored
        object.__setattr__(self, "solver_options", opts)

    @property
    def n_samples(self) -> int:
        return self.n_cells * self.states_per_cell

    def sample_states(self, seed: np.random.SeedSequence) -> np.ndarray:
        """The N states (N, d), in random order: Sobol over the box and, for a share
        inner_fraction, over the inner box (see the class doc)."""
        n = self.n_samples
        n_inner = round(self.inner_fraction * n)
        if n_inner == 0:
            return self.domain.sample(n, seed)
        outer_seed, inner_seed, order_seed = seed.spawn(3)
        outer = self.domain.sample(n - n_inner, outer_seed)
        inner = self.domain.sample(n_inner, inner_seed)
        loads = np.array([name != "theta" for name in self.domain.names])
        c = self.domain.center
        shrink: float | np.ndarray = self.inner_scale
        if self.inner_scale_min != self.inner_scale:
            lo, hi = np.log(self.inner_scale_min), np.log(self.inner_scale)  # type: ignore[arg-type]
            u = np.random.default_rng(inner_seed.spawn(1)[0]).random((n_inner, 1))
            shrink = np.exp(lo + (hi - lo) * u)
        inner[:, loads] = c[loads] + shrink * (inner[:, loads] - c[loads])
        states = np.concatenate([outer, inner])
        return states[np.random.default_rng(order_seed).permutation(n)]

    def make_solver(self) -> Any:
        """The fine solver this spec names (imports DOLFINx or torch on demand)."""
        from neuroscale_coupling.fine import make_solver

        opts = dict(self.solver_options)
        if self.solver == "spectral" and isinstance(opts.get("dtype"), str):
            import torch

            opts["dtype"] = getattr(torch, opts["dtype"])
        return make_solver(self.solver, self.material, **opts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "material": material_to_dict(self.material),
            "family": self.family.to_dict(),
            "domain": self.domain.to_dict(),
            "n_cells": self.n_cells,
            "states_per_cell": self.states_per_cell,
            "solver": self.solver,
            "solver_options": plain_values(dict(self.solver_options)),
            "seed": self.seed,
            "inner_fraction": self.inner_fraction,
            "inner_scale": self.inner_scale,
            "inner_scale_min": self.inner_scale_min,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DatasetSpec":
        return cls(
            material=material_from_dict(d["material"]),
            family=CellFamily.from_dict(d["family"]),
            domain=StateDomain.from_dict(d["domain"]),
            n_cells=int(d["n_cells"]),
            states_per_cell=int(d["states_per_cell"]),
            solver=d["solver"],
            solver_options=dict(d["solver_options"]),
            seed=int(d["seed"]),
            inner_fraction=float(d.get("inner_fraction", 0.0)),
            inner_scale=float(d.get("inner_scale", 0.25)),
            inner_scale_min=d.get("inner_scale_min"),
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


def _allgather_rows(comm: MPI.Comm, rows: np.ndarray) -> np.ndarray:
    """Concatenate every rank's rows (n_r, …) in rank order on every rank (collective)."""
    rows = np.ascontiguousarray(rows)
    counts = np.array(comm.allgather(rows.shape[0]), dtype=np.int64)
    width = int(np.prod(rows.shape[1:], dtype=np.int64))
    out = np.empty((int(counts.sum()), *rows.shape[1:]), dtype=rows.dtype)
    mpi_type = MPI._typedict[rows.dtype.char]
    comm.Allgatherv(
        [rows.reshape(-1), mpi_type], [out.reshape(-1), (counts * width).tolist(), mpi_type]
    )
    return out


def generate(
    spec: DatasetSpec,
    *,
    comm: MPI.Comm | None = None,
    progress: bool = True,
    skip: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Dataset:
    """Solve the spec's (cell, state) samples with its fine solver (collective over comm).

    Cells are drawn from ``spec.family`` and states from a scrambled Sobol sequence over
    ``spec.domain``, both from ``spec.seed`` (identical on every rank and for any number
    of ranks). Cells are block-distributed over the ranks (rank r solves cells
    [C r / P, C (r + 1) / P) with all their states); results are gathered on every rank,
    so the returned Dataset is the same on all ranks and the same as on one rank.
    A tqdm progress bar (rank 0's share) shows when ``progress``. A failed fine solve
    raises on every rank: FineSolveError naming the sample, its cell and its state on the
    failing rank, RuntimeError quoting it on the others. comm: default MPI.COMM_WORLD.
    skip: images (C, n, n) of the drawn cells → bool (C,), True for cells not to solve
    (e.g. known cells); the others keep their draw index as cell id and their states.
    """
    from tqdm.auto import tqdm

    import neuroscale_coupling

    comm = MPI.COMM_WORLD if comm is None else comm
    t0 = time.perf_counter()
    cell_seed, state_seed = np.random.SeedSequence(spec.seed).spawn(2)
    images, records = spec.family.draw(spec.n_cells, cell_seed)
    states = spec.sample_states(state_seed)
    k = spec.states_per_cell
    r, d = spec.material.response_dim, spec.material.state_dim
    solved = np.arange(spec.n_cells, dtype=np.int64)
    if skip is not None:
        solved = np.flatnonzero(~np.asarray(skip(images), dtype=bool).reshape(-1))
        images, records = images[solved], [records[int(i)] for i in solved]
        states = states.reshape(spec.n_cells, k, d)[solved].reshape(-1, d)
    n_cells = solved.size
    first = n_cells * comm.rank // comm.size
    last = n_cells * (comm.rank + 1) // comm.size
    n_local = (last - first) * k

    def work() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        response = np.zeros((n_local, r))
        tangent = np.zeros((n_local, r, d))
        iterations = np.zeros(n_local, dtype=np.int64)
        if n_local == 0:
            return response, tangent, iterations
        solver = spec.make_solver()
        bar = tqdm(
            total=n_local,
            desc=f"fine solves ({spec.solver}, rank 0 of {comm.size})",
            unit="sample",
            disable=not progress or comm.rank != 0,
        )
        with bar:
            for c in range(first, last):
                lo = (c - first) * k
                sl = slice(c * k, (c + 1) * k)
                try:
                    res = solver.solve(images[c].astype(np.int64), states[sl])
                except FineSolveError as exc:
                    g = c * k + exc.index
                    raise FineSolveError(
                        g,
                        states[g],
                        f"sample {g} (cell {solved[c]}: {records[c]}): {exc.reason}",
                    ) from exc
                response[lo : lo + k] = res.response
                tangent[lo : lo + k] = res.tangent
                iterations[lo : lo + k] = res.newton_iterations
                bar.update(k)
        return response, tangent, iterations

    t_solve = time.perf_counter()
    response, tangent, iterations = collective_call(comm, work, "dataset generation")
    t_solve = time.perf_counter() - t_solve
    response = _allgather_rows(comm, response)
    tangent = _allgather_rows(comm, tangent)
    iterations = _allgather_rows(comm, iterations)
    seconds = time.perf_counter() - t0
    max_solve = comm.allreduce(t_solve, op=MPI.MAX)
    n_samples = n_cells * k
    _log.info(
        "generated %d samples (%d cells) in %.2f s on %d ranks (%.3g s per sample per rank)",
        n_samples,
        n_cells,
        seconds,
        comm.size,
        max_solve * comm.size / max(n_samples, 1),
    )
    metadata = {
        "spec": spec.to_dict(),
        "version": neuroscale_coupling.__version__,
        "physics": spec.material.physics,
        "state_names": list(spec.material.state_names),
        "response_names": list(spec.material.response_names),
        "generation": {
            "ranks": comm.size,
            "seconds": seconds,
            "solve_seconds_max_rank": max_solve,
            "seconds_per_sample_per_rank": max_solve * comm.size / max(n_samples, 1),
        },
    }
    return Dataset(
        images=images,
        cell_ids=solved,
        cell_index=np.repeat(np.arange(n_cells, dtype=np.int64), k),
        states=states,
        response=response,
        tangent=tangent,
        newton_iterations=iterations,
        cells=records,
        metadata=metadata,
    )


# ---------------------------------------------------------------------------- split
def translation_groups(images: np.ndarray) -> np.ndarray:
    """Group id (C,) of images (C, n, n): equal up to a periodic translation (equal
    canonical images, :func:`~neuroscale_coupling.translation.canonical_translation`);
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
        levels = _check_count("levels", levels)
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


@dataclass(frozen=True)
class Normalization:
    """Affine normalization of states, responses and tangents.

    u = (state - state_center) / state_half_width  (the domain box → [-1, 1]^d);
    y = response / response_scale;  dy/du = diag(1/response_scale) T diag(state_half_width),
    so normalized tangents are exact derivatives of normalized responses.
    state_center, state_half_width: (d,); response_scale: (r,) > 0.
    """

    state_center: tuple[float, ...]
    state_half_width: tuple[float, ...]
    response_scale: tuple[float, ...]

    @classmethod
    def fit(cls, train: Dataset, domain: StateDomain) -> "Normalization":
        """States from the domain; response_scale = per-component RMS over ``train``."""
        rms = np.sqrt(np.mean(train.response**2, axis=0))
        scale = np.where(rms > 0, rms, 1.0)
        return cls(
            tuple(float(x) for x in domain.center),
            tuple(float(x) for x in domain.half_width),
            tuple(float(x) for x in scale),
        )

    def states_to(self, states: Any) -> np.ndarray:
        """(N, d) → normalized (N, d)."""
        return (np.asarray(states, dtype=float) - self.state_center) / self.state_half_width

    def states_from(self, u: Any) -> np.ndarray:
        return np.asarray(u, dtype=float) * self.state_half_width + self.state_center

    def response_to(self, response: Any) -> np.ndarray:
        """(N, r) → normalized (N, r)."""
        return np.asarray(response, dtype=float) / self.response_scale

    def response_from(self, y: Any) -> np.ndarray:
        return np.asarray(y, dtype=float) * self.response_scale

    def tangent_to(self, tangent: Any) -> np.ndarray:
        """(N, r, d) → normalized (N, r, d)."""
        t = np.asarray(tangent, dtype=float)
        return t * np.asarray(self.state_half_width) / np.asarray(self.response_scale)[:, None]

    def tangent_from(self, tn: Any) -> np.ndarray:
        t = np.asarray(tn, dtype=float)
        return t * np.asarray(self.response_scale)[:, None] / np.asarray(self.state_half_width)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state_center": list(self.state_center),
            "state_half_width": list(self.state_half_width),
            "response_scale": list(self.response_scale),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Normalization":
        return cls(
            tuple(float(x) for x in d["state_center"]),
            tuple(float(x) for x in d["state_half_width"]),
            tuple(float(x) for x in d["response_scale"]),
        )
