"""Families of cells: generators with parameter ranges, drawn reproducibly (pipeline step 1).

A :class:`CellFamily` is a list of :class:`CellMember` (a generator of
:data:`~neuroscale_coupling.cell.microstructure.GENERATORS` with fixed parameters, varied
parameter ranges and a weight) at one resolution n. Member choice and varied parameters
come from one scrambled Sobol sequence (:func:`sobol_points`); generators with a ``seed``
parameter (e.g. ``random_inclusions``) get an integer seed per cell unless it is fixed.
A new generator is a function ``f(n, **params) -> (n, n) int`` registered in
``GENERATORS``.
"""

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from neuroscale_coupling.cell.microstructure import GENERATORS, make_cell
from neuroscale_coupling.checks import check_count
from neuroscale_coupling.io import plain_values

__all__ = ["CellFamily", "CellMember"]


def sobol_points(dim: int, n: int, seed: np.random.SeedSequence) -> np.ndarray:
    """First n points (n, dim) in [0, 1) of a Sobol sequence scrambled by ``seed``."""
    if n == 0:
        return np.zeros((0, dim))
    from scipy.stats import qmc

    sampler = qmc.Sobol(dim, scramble=True, rng=np.random.default_rng(seed))
    m = max(0, int(np.ceil(np.log2(n))))
    return sampler.random_base2(m)[:n]


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
        object.__setattr__(self, "n", check_count("n", self.n, 2))

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
        n_cells = check_count("n_cells", n_cells, 0)
        ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        sobol_seed, int_seed = ss.spawn(2)
        dim = 1 + max(len(m.ranges) for m in self.members)
        u = sobol_points(dim, n_cells, sobol_seed)
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
