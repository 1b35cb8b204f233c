"""The preCICE data names the micro models read and write (:class:`DataNames`).

The defaults follow preCICE's two-scale heat conduction tutorial (scalar conductivity
entries ``K00 … K11``) and preCICE's naming rule, which the Micro Manager 0.12 enforces on
its configuration through ``precice-adapter-schema``:
``^[A-Z][a-zA-Z0-9]*(-[A-Za-z0-9]+)*$`` (``Temperature-Gradient``, ``K00``).

Read (per point, from the macro): the temperature gradient G (vector, 2 components) and the
temperature θ (scalar), plus the datum the cell comes from (``[cells] data``, e.g. a volume
fraction). Written: the homogenized flux Q = ⟨k(θ, g) g⟩ (vector; the library's sign
convention: Q points along G, the physical heat flux is −Q for G = ∇T), the tangent as
scalars — ``K00, K01, K10, K11`` = ∂Q_i/∂G_j and ``DQ0-DTemperature, DQ1-DTemperature`` =
∂Q_i/∂θ — the calibrated standard deviation of Q (vector; 0 for a fine solve) and ``Exact``
(1.0 where a fine solve answered, else 0.0).
"""

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["NAME_PATTERN", "DataNames", "check_data_name"]

#: preCICE's rule for data names, as precice-adapter-schema (used by the Micro Manager
#: 0.12 to validate its configuration) states it.
NAME_PATTERN = re.compile(r"^[A-Z][a-zA-Z0-9]*(?:-[A-Za-z0-9]+)*$")


def check_data_name(name: Any, what: str) -> str:
    """``name`` if it is a valid preCICE data name, else ValueError naming it."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{what}={name!r} is not a valid preCICE data name: it must match "
            f"{NAME_PATTERN.pattern} (a capital letter, then letters and digits, parts "
            "joined by '-', e.g. 'Temperature-Gradient' or 'K00')"
        )
    return name


@dataclass(frozen=True)
class DataNames:
    """Names of the data exchanged per point (see the module doc for their meaning).

    temperature_gradient (vector, 2), temperature (scalar): read. flux (vector, 2),
    conductivity (4 scalars, ∂Q_i/∂G_j row-major), flux_temperature_derivative (2
    scalars, ∂Q_i/∂θ), flux_std (vector, 2), exact (scalar): written. fallback_reason
    (scalar, 0 surrogate, k + 1 = FALLBACK_REASONS[k]): written when not None.
    """

    temperature_gradient: str = "Temperature-Gradient"
    temperature: str = "Temperature"
    flux: str = "Flux"
    conductivity: tuple[str, str, str, str] = ("K00", "K01", "K10", "K11")
    flux_temperature_derivative: tuple[str, str] = ("DQ0-DTemperature", "DQ1-DTemperature")
    flux_std: str = "Flux-Std"
    exact: str = "Exact"
    fallback_reason: str | None = None

    def __post_init__(self) -> None:
        for f, n in (("conductivity", 4), ("flux_temperature_derivative", 2)):
            value = getattr(self, f)
            if isinstance(value, str) or len(tuple(value)) != n:
                raise ValueError(f"DataNames.{f} must hold {n} names; got {value!r}")
            object.__setattr__(self, f, tuple(value))
        names = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "fallback_reason":
                continue
            for i, name in enumerate(value if isinstance(value, tuple) else (value,)):
                label = f"DataNames.{f.name}" + (f"[{i}]" if isinstance(value, tuple) else "")
                names.append(check_data_name(name, label))
        doubles = sorted({n for n in names if names.count(n) > 1})
        if doubles:
            raise ValueError(f"DataNames uses {doubles} for more than one datum: give each its own")

    @property
    def read(self) -> tuple[str, ...]:
        """The names read from the macro (without the cell's datum)."""
        return (self.temperature_gradient, self.temperature)

    @property
    def write(self) -> tuple[str, ...]:
        """The names written, in the order of the answer."""
        extra = () if self.fallback_reason is None else (self.fallback_reason,)
        return (
            self.flux,
            *self.conductivity,
            *self.flux_temperature_derivative,
            self.flux_std,
            self.exact,
            *extra,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataNames":
        """From a plain mapping (a settings file's ``names`` table); unknown keys raise."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown data name keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
