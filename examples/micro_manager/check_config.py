"""The neuroscale_coupling micro models in preCICE's Micro Manager: an example case folder.

This folder is the micro side of a two-scale heat conduction case modelled on preCICE's
two-scale heat conduction tutorial: a macro heat solver (any preCICE participant; the
tutorial's is Nutils or DuMux) owns the mesh ``Macro-Mesh`` whose vertices are its
quadrature points, and the Micro Manager runs one micro model per vertex:

* ``micro-manager-config.json`` — the Micro Manager 0.12 configuration: the fine model
  (an FE cell solve) and the surrogate (the shipped SANO model), both stateless, with
  model switching (the surrogate's fallback tests move a point to the fine model: state
  outside the training domain, cell outside the training family, std above 5 %) and the
  interpolation of crashed points (KNN, which needs scikit-learn:
  ``pip install "micro-manager-precice[sklearn]"``);
* ``neuroscale-micro.toml`` — the micro models' settings (model file, fallback thresholds,
  cell source), read from the folder the Micro Manager runs in;
* this script.

Per vertex the macro writes ``Temperature-Gradient`` (vector), ``Temperature`` and
``Volume-Fraction`` (the cell: a circular inclusion of that fraction) and reads ``Flux``
(vector, Q = ⟨k(θ, g) g⟩, minus the physical heat flux), the tangent ``K00 … K11``
(∂Q/∂G) and ``DQ0-DTemperature``, ``DQ1-DTemperature`` (∂Q/∂θ), ``Flux-Std`` (vector, the
calibrated std of Q) and ``Exact``; the Micro Manager adds ``Model-Resolution`` (0 fine,
1 surrogate). The preCICE configuration (``../precice-config.xml``) declares these data on
``Macro-Mesh``, the Micro Manager receiving the mesh with direct access. With preCICE
installed (pyprecice and micro-manager-precice), run the macro participant and, in this
folder, ``mpiexec -n 2 micro-manager-precice micro-manager-config.json`` (two ranks: the
configuration's ``decomposition``).

Without preCICE this script checks the folder: it validates the configuration with the
Micro Manager's own parser when the Micro Manager can be imported (with preCICE's schema
otherwise), loads the settings, and answers three sample points with the surrogate, the
fine model and the switching function::

    .venv/bin/python examples/micro_manager/check_config.py
"""

import argparse
import json
from pathlib import Path

import numpy as np

from neuroscale_coupling.hosts import micro_manager as nmm

HERE = Path(__file__).resolve().parent


def check_configuration(path: Path) -> str:
    """Validate the Micro Manager configuration; returns how it was checked."""
    try:
        import micro_manager  # needs pyprecice
    except ImportError:
        micro_manager = None
    if micro_manager is not None:
        config = micro_manager.Config(str(path))
        config.read_json_micro_manager()
        return f"parsed by the Micro Manager: models {config.micro_file_names()}"
    try:
        from preciceadapterschema import validate
    except ImportError:
        return "not validated (install precice-adapter-schema, or the Micro Manager)"
    validate(json.loads(path.read_text()))
    return "validated against preCICE's adapter schema (the Micro Manager needs pyprecice)"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=HERE / "micro-manager-config.json")
    ap.add_argument("--settings", type=Path, default=HERE / "neuroscale-micro.toml")
    args = ap.parse_args(argv)
    print("configuration:", check_configuration(args.config))
    nmm.configure(args.settings)
    settings = nmm.current_settings()
    names = settings.names
    cfg = json.loads(args.config.read_text())["interfaces"][0]
    read = {d["name"] for d in cfg["read_data"]}
    written = {d["name"] for d in cfg["write_data"]}
    missing = ({*names.read, settings.cells.data} - read) | (set(names.write) - written)
    if missing:
        raise SystemExit(f"the configuration lacks the data {sorted(missing)} the models use")
    surrogate = nmm.SurrogateMicroSimulation(1)
    fine = nmm.FineMicroSimulation(0)
    points = [
        ("inside the training domain", [1.0, -0.5], 0.4, 0.3),
        ("near a bound", [1.9, 0.2], 0.9, 0.5),
        ("outside (|G1| > 2)", [3.0, 0.0], 0.5, 0.3),
    ]
    answers = []
    for label, g, theta, vf in points:
        x = {
            names.temperature_gradient: np.array(g),
            names.temperature: theta,
            cells_datum(settings): vf,
        }
        to = nmm.switching_function(settings.surrogate_index, np.zeros(2), 0.0, x, None)
        model = fine if to else surrogate
        out = model.solve(x, 0.01)
        answers.append(out)
        q, k = out[names.flux], [out[n] for n in names.conductivity]
        print(
            f"{label:28s} switching {to:+d} -> {'fine' if to else 'surrogate':9s} "
            f"Q = ({q[0]:.4f}, {q[1]:.4f})  K = {np.round(k, 3).tolist()}  "
            f"std = {np.round(out[names.flux_std], 4).tolist()}  exact = {out[names.exact]:.0f}"
        )
    return answers


def cells_datum(settings: nmm.MicroSettings) -> str:
    if settings.cells.data is None:
        raise SystemExit("this check expects cells read from a datum (cells.data)")
    return settings.cells.data


if __name__ == "__main__":
    main()
