"""The state domain: the axis-aligned box of macro states a dataset covers and a model was
trained on (:class:`StateDomain`); the fallback's domain test measures distances to it.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from neuroscale_coupling.cell.family import sobol_points
from neuroscale_coupling.cell.materials import MechanicalMaterial, ThermalMaterial
from neuroscale_coupling.checks import check_count

__all__ = ["StateDomain"]


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
        u = sobol_points(self.dim, check_count("n", n, 0), ss)
        from scipy.stats import qmc

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
