"""Where a point's cell comes from (:class:`CellSpec`): the data the macro sends.

The Micro Manager 0.12 hands a micro simulation nothing but its global id at construction
(``MicroSimulation(sim_id)``), and a stateless model's one shared instance is not even told
which point it solves: each ``solve`` sees only that point's read data. So the cell is
built from read data, in one of three ways:

* **a generator parameter** (default): ``generator`` of
  :data:`~neuroscale_coupling.cell.microstructure.GENERATORS` (e.g.
  ``circular_inclusion``) with its parameter ``parameter`` (e.g. ``volume_fraction``) taken
  from the scalar datum ``data`` (e.g. ``Volume-Fraction``), plus fixed ``params``;
* **a function of the coordinates**: ``function`` = ``cell_of(coordinates (N, dim)) ->
  images (N, n, n)`` (as for :meth:`SurrogateClosure.from_coordinates
  <neuroscale_coupling.closure.surrogate_closure.SurrogateClosure.from_coordinates>`), a
  Python callable or an import path ``"package.module:function"``; the coordinates are the
  vector datum ``data`` (default ``Coordinates``), which the macro writes (the Micro
  Manager passes a point's position only to the switching function, not to ``solve``);
* **one fixed cell**: ``generator`` with ``params`` and ``data = None``.

Each distinct datum value is turned into an image once (:meth:`CellSource.image`) and
cached by the caller.
"""

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neuroscale_coupling.cell.microstructure import GENERATORS, make_cell
from neuroscale_coupling.hosts.micro_manager.names import check_data_name

__all__ = ["CellSource", "CellSpec", "resolve_function"]

_KEYS = ("generator", "parameter", "data", "params", "function")


def resolve_function(spec: str | Callable[..., Any]) -> Callable[..., Any]:
    """A callable, or the object an import path ``"package.module:function"`` names."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(
            f"cells.function={spec!r}: give a Python callable or an import path "
            "'package.module:function'"
        )
    module, name = spec.split(":")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"cells.function={spec!r} cannot be loaded ({exc}): the module must be importable "
            "from the folder the Micro Manager runs in (or be installed)"
        ) from exc
    if not callable(obj):
        raise ValueError(f"cells.function={spec!r} names {type(obj).__name__}, not a function")
    return obj


@dataclass(frozen=True)
class CellSpec:
    """How a point's cell is built from its read data (module doc).

    generator, parameter, params: the generator, the parameter taken from the datum and
    fixed parameters. function: ``cell_of(coordinates (N, dim)) -> (N, n, n)``, a callable
    or ``"module:function"`` (instead of a generator). data: the datum's name (None with a
    generator: one fixed cell; default ``Coordinates`` with a function).
    """

    generator: str | None = "circular_inclusion"
    parameter: str = "volume_fraction"
    data: str | None = "Volume-Fraction"
    params: Mapping[str, Any] = field(default_factory=dict)
    function: str | Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.function is not None:
            if self.generator not in (None, "circular_inclusion") or self.params:
                raise ValueError(
                    "cells: give either function (cells from the coordinates) or generator "
                    f"with params, not both (function={self.function!r}, "
                    f"generator={self.generator!r})"
                )
            object.__setattr__(self, "generator", None)
            if self.data is None or self.data == "Volume-Fraction":
                object.__setattr__(self, "data", "Coordinates")
        elif self.generator not in GENERATORS:
            raise ValueError(
                f"cells.generator={self.generator!r}: choose one of {sorted(GENERATORS)}, or "
                "give cells.function"
            )
        if self.data is not None:
            check_data_name(self.data, "cells.data")
        if not isinstance(self.params, Mapping):
            raise TypeError(f"cells.params must be a table of parameters; got {self.params!r}")
        object.__setattr__(self, "params", dict(self.params))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CellSpec":
        """From a settings file's ``cells`` table; unknown keys raise ValueError."""
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise ValueError(f"unknown cells keys {unknown}; known: {list(_KEYS)}")
        d = dict(data)
        if "function" in d and "data" not in d:
            d["data"] = "Coordinates"
        return cls(**d)

    def source(self, n: int) -> "CellSource":
        """The cell source for images of n × n voxels."""
        return CellSource(self, n)


class CellSource:
    """Turns a point's read data into its cell image (n, n) (see :class:`CellSpec`)."""

    def __init__(self, spec: CellSpec, n: int) -> None:
        self.spec = spec
        self.n = int(n)
        self.data = spec.data
        self._function = None if spec.function is None else resolve_function(spec.function)

    def key(self, micro_input: Mapping[str, Any]) -> Any:
        """The hashable key of the point's cell: the datum's value (a float, or a tuple of
        coordinates), None for a fixed cell. KeyError naming the datum when it is missing."""
        if self.data is None:
            return None
        try:
            value = micro_input[self.data]
        except KeyError:
            raise KeyError(
                f"the micro input holds no datum {self.data!r} (the cell's datum; it holds "
                f"{sorted(micro_input)}): add it to read_data of the Micro Manager "
                "configuration and to the preCICE configuration, or set cells.data"
            ) from None
        if self._function is None:
            return float(value)
        return tuple(float(x) for x in np.asarray(value, dtype=np.float64).reshape(-1))

    def image(self, key: Any) -> np.ndarray:
        """The cell image (n, n) int64 of a key from :meth:`key`."""
        spec = self.spec
        if self._function is not None:
            coords = np.asarray(key, dtype=np.float64)[None]
            images = np.asarray(self._function(coords))
            if images.shape == (self.n, self.n):
                images = images[None]
            if images.shape != (1, self.n, self.n):
                raise ValueError(
                    f"cells.function returned shape {images.shape} for coordinates of shape "
                    f"{coords.shape}; it must return ({coords.shape[0]}, {self.n}, {self.n}) "
                    "images at the model's resolution"
                )
            return np.ascontiguousarray(images[0], dtype=np.int64)
        params = dict(spec.params)
        if key is not None:
            params[spec.parameter] = key
        try:
            return make_cell(str(spec.generator), self.n, **params).astype(np.int64)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"cannot build the cell {spec.generator}(n={self.n}, {params}) "
                f"(datum {spec.data!r} = {key!r}): {exc}"
            ) from exc
