"""The micro models' settings (:class:`MicroSettings`) and where they are read from.

The Micro Manager 0.12 passes a micro simulation nothing from its JSON configuration:
the class is constructed as ``MicroSimulation(sim_id)`` and its ``solve`` gets the read
data and dt. So the settings (model file, fallback thresholds, cell source, data names)
come, in this order, from

1. :func:`configure` (a Python driver that builds the Micro Manager itself, the tests);
2. the file named by the environment variable ``NEUROSCALE_MICRO_CONFIG``;
3. ``neuroscale-micro.toml`` (or ``neuroscale-micro.json``) in the current folder: the
   folder ``micro-manager-precice`` runs in, next to its configuration (the Micro Manager
   itself imports ``micro_file_names`` from that folder);
4. the defaults (the shipped thermal model), with a warning that no file was found.

A file is TOML or JSON (by its suffix). A JSON file may be the Micro Manager's own
configuration: its top-level ``"neuroscale"`` object is then used — precice-adapter-schema
allows such solver-specific objects, but only strings, numbers, objects and arrays as their
direct members, so this file keeps every boolean inside a table. Relative paths (the model
file) are read from the settings file's folder. Keys::

    model = "thermal_sano.pt"      # omitted: the shipped thermal model
    decoder = "numpy"              # "numpy" (per-point numpy copy) or "torch"
    [fallback]                     # FallbackPolicy, plus:
    std_rel = 0.05                 # std_abs, rel_floor, domain_tol, family_threshold
    fine_solve = true              # the surrogate model solves its fallback points itself
    [cells]                        # CellSpec: generator/parameter/data/params or function/data
    generator = "circular_inclusion"
    data = "Volume-Fraction"
    [names]                        # DataNames
    flux = "Flux"
    [fine]                         # FESolver options (degree, rtol, max_newton, petsc_options)
    degree = 1
    [switching]                    # the models' indices in micro_file_names
    fine = 0
    surrogate = 1

``inf`` switches a fallback test off (TOML ``inf``; JSON: the string ``"inf"``).
"""

import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from neuroscale_coupling.closure.fallback import FallbackPolicy
from neuroscale_coupling.hosts.micro_manager.cells import CellSpec
from neuroscale_coupling.hosts.micro_manager.names import DataNames
from neuroscale_coupling.log import get_logger

__all__ = [
    "ENV_VAR",
    "FILE_NAMES",
    "MicroSettings",
    "configure",
    "current_settings",
    "load_settings",
]

#: The environment variable naming a settings file.
ENV_VAR = "NEUROSCALE_MICRO_CONFIG"
#: Settings files looked for in the current folder, in this order.
FILE_NAMES = ("neuroscale-micro.toml", "neuroscale-micro.json")
#: The top-level object of a JSON file (e.g. the Micro Manager's configuration) that holds
#: the settings.
JSON_SECTION = "neuroscale"

_DECODERS = ("numpy", "torch")
_POLICY_KEYS = tuple(f.name for f in fields(FallbackPolicy))

log = get_logger(__name__)


@dataclass(frozen=True)
class MicroSettings:
    """Settings of the micro models (module doc for the file keys).

    model: model file (None: the shipped thermal model). decoder: "numpy" (the per-point
    numpy copy of the decoder, :mod:`~neuroscale_coupling.surrogate.numpy_decoder`) or
    "torch" (:meth:`Surrogate.decode` per point, ~15× slower). policy: the fallback tests.
    fine_solve: the surrogate model answers its fallback points with a fine solve (exact =
    1); False: it answers with the surrogate everywhere and leaves the fallback to the
    model switching. cells, names: see :class:`CellSpec`, :class:`DataNames`. fine:
    keyword options of :class:`~neuroscale_coupling.fine.fem.FESolver`. fine_index,
    surrogate_index: the models' positions in ``micro_file_names`` (the Micro Manager's
    resolutions, highest fidelity first). source: where the settings came from.
    """

    model: str | None = None
    decoder: str = "numpy"
    policy: FallbackPolicy = field(default_factory=FallbackPolicy)
    fine_solve: bool = True
    cells: CellSpec = field(default_factory=CellSpec)
    names: DataNames = field(default_factory=DataNames)
    fine: Mapping[str, Any] = field(default_factory=dict)
    fine_index: int = 0
    surrogate_index: int = 1
    source: str = "defaults"

    def __post_init__(self) -> None:
        for name, kind in (("policy", FallbackPolicy), ("cells", CellSpec), ("names", DataNames)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(
                    f"MicroSettings.{name} must be a {kind.__name__}; got {getattr(self, name)!r}"
                )
        if self.decoder not in _DECODERS:
            raise ValueError(f"decoder={self.decoder!r}: choose one of {_DECODERS}")
        if not isinstance(self.fine_solve, bool):
            raise TypeError(f"fallback.fine_solve must be true or false; got {self.fine_solve!r}")
        for name in ("fine_index", "surrogate_index"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"switching index {name}={v!r} must be an integer >= 0")
        if self.fine_index == self.surrogate_index:
            raise ValueError(
                f"switching: the fine and surrogate models have the same index "
                f"{self.fine_index}: give their positions in micro_file_names"
            )
        if not isinstance(self.fine, Mapping):
            raise TypeError(f"fine must be a table of FESolver options; got {self.fine!r}")
        object.__setattr__(self, "fine", dict(self.fine))

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        base: str | os.PathLike[str] | None = None,
        source: str = "",
    ) -> "MicroSettings":
        """From a plain mapping (a settings file's content); relative model paths are read
        from ``base``. Unknown keys raise ValueError naming them."""
        known = ("model", "decoder", "fallback", "cells", "names", "fine", "switching")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(
                f"unknown settings keys {unknown} in {source or 'settings'}; known: {known}"
            )
        kwargs: dict[str, Any] = {"source": source or "a mapping"}
        if data.get("model") is not None:
            model = Path(str(data["model"])).expanduser()
            if not model.is_absolute() and base is not None:
                model = Path(base) / model
            kwargs["model"] = str(model)
        if "decoder" in data:
            kwargs["decoder"] = data["decoder"]
        fb = dict(_table(data, "fallback"))
        if "fine_solve" in fb:
            kwargs["fine_solve"] = fb.pop("fine_solve")
        bad = sorted(set(fb) - set(_POLICY_KEYS))
        if bad:
            raise ValueError(f"unknown fallback keys {bad}; known: {[*_POLICY_KEYS, 'fine_solve']}")
        kwargs["policy"] = FallbackPolicy(**{k: _number(f"fallback.{k}", v) for k, v in fb.items()})
        if "cells" in data:
            kwargs["cells"] = CellSpec.from_dict(_table(data, "cells"))
        if "names" in data:
            kwargs["names"] = DataNames.from_dict(dict(_table(data, "names")))
        if "fine" in data:
            kwargs["fine"] = dict(_table(data, "fine"))
        sw = dict(_table(data, "switching"))
        bad = sorted(set(sw) - {"fine", "surrogate"})
        if bad:
            raise ValueError(f"unknown switching keys {bad}; known: ['fine', 'surrogate']")
        if "fine" in sw:
            kwargs["fine_index"] = sw["fine"]
        if "surrogate" in sw:
            kwargs["surrogate_index"] = sw["surrogate"]
        return cls(**kwargs)


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise TypeError(f"settings key {key!r} must be a table (an object); got {value!r}")
    return value


def _number(what: str, value: Any) -> float:
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity"):
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what}={value!r} must be a number (or 'inf' to switch the test off)")
    return float(value)


def load_settings(path: str | os.PathLike[str] | None = None) -> MicroSettings:
    """Settings from ``path`` (TOML or JSON), or from where the module doc says."""
    if path is None:
        env = os.environ.get(ENV_VAR)
        if env:
            path = env
            if not Path(env).is_file():
                raise FileNotFoundError(
                    f"{ENV_VAR}={env!r} names no file: point it at a TOML or JSON settings "
                    "file (or unset it)"
                )
        else:
            for name in FILE_NAMES:
                if Path(name).is_file():
                    path = Path(name).resolve()
                    break
    if path is None:
        log.warning(
            "no micro-model settings found (%s unset, no %s in %s): using the defaults "
            "(the shipped thermal model, default data names)",
            ENV_VAR, " or ".join(FILE_NAMES), os.getcwd(),
        )  # fmt: skip
        return MicroSettings()
    p = Path(path)
    text = p.read_text()
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p} is not valid JSON: {exc}") from exc
        if isinstance(data, dict) and JSON_SECTION in data:
            data = data[JSON_SECTION]
    elif p.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{p} is not valid TOML: {exc}") from exc
        if JSON_SECTION in data and isinstance(data[JSON_SECTION], dict) and len(data) == 1:
            data = data[JSON_SECTION]
    else:
        raise ValueError(f"settings file {p}: give a .toml or .json file")
    if not isinstance(data, dict):
        raise ValueError(f"settings file {p} must hold a table (object) of settings")
    return MicroSettings.from_dict(data, base=p.resolve().parent, source=str(p))


_configured: MicroSettings | None = None


def configure(settings: MicroSettings | Mapping[str, Any] | str | os.PathLike[str] | None) -> None:
    """Use ``settings`` (a MicroSettings, a mapping of file keys or a settings file) in
    this process from now on; None goes back to the environment variable / file lookup.
    Micro models built before keep the settings they were built with."""
    global _configured
    from neuroscale_coupling.hosts.micro_manager import engine

    if settings is None or isinstance(settings, MicroSettings):
        _configured = settings
    elif isinstance(settings, Mapping):
        _configured = MicroSettings.from_dict(settings, base=os.getcwd(), source="configure()")
    else:
        _configured = load_settings(settings)
    engine.reset()


def current_settings() -> MicroSettings:
    """The settings :func:`configure` set, else :func:`load_settings`."""
    return _configured if _configured is not None else load_settings()
