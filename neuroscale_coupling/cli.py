"""The ``neuroscale`` command.

``neuroscale homogenize`` solves the periodic cell problem of one cell at one or more
macro states and prints the homogenized response and its consistent tangent::

    neuroscale homogenize --cell circular_inclusion --n 64 --param volume_fraction=0.3 \\
        --physics thermal --phase k0=1,beta=0.5 --phase k0=10 --state 1,0.5,0.2 --solver fem

``neuroscale train --config FILE.toml [--resume]`` trains a SANO surrogate as the TOML file
says (see :mod:`neuroscale_coupling.training.config`), prints progress and the final
validation metrics, and writes the model file.

``neuroscale evaluate MODEL [--dataset PATH | --fresh N [--seed S]] [--output DIR]
[--allow-overlap]`` evaluates a model file on held-out microstructures: by default the test
split of the dataset it was trained on (re-split with the recorded fractions and seed,
checked against the recorded train/val cells), or all samples of ``--dataset`` (e.g.
generated with another seed), refused when one of its cells has a training/validation
image unless ``--allow-overlap``, or N cells drawn afresh from the recorded family and
solved (``--fresh``; those with a training/validation image dropped). It prints MSE,
relative L2 errors of response and tangent, calibration error and coverage, their 5–95 %
range over the distinct microstructures, the same figures per generator, and the mean
attention per scale, and writes ``metrics.json``, ``parity.png``,
``calibration.png`` and ``attention.png`` to DIR (default ``MODEL_STEM_evaluation`` next to
the model); see :mod:`neuroscale_coupling.training.evaluate`.
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuroscale_coupling import __version__
from neuroscale_coupling.cell.materials import Material, default_material, material_from_dict
from neuroscale_coupling.cell.microstructure import (
    GENERATORS,
    from_array,
    make_cell,
    phase_fractions,
)
from neuroscale_coupling.cell.state_layout import PHYSICS
from neuroscale_coupling.fine import SOLVERS
from neuroscale_coupling.log import configure, get_logger

__all__ = ["main"]

log = get_logger(__name__)

DEFAULT_STATES = {"thermal": "1,0.5,0.2", "mechanical": "0.02,-0.01,0.01"}


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _key_values(text: str, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {text!r}: write key=value pairs separated by commas")
        out[key.strip()] = _number(value.strip())
    return out


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"{what} {text!r}: write numbers separated by commas") from None


def build_material(physics: str, phases: Sequence[str]) -> Material:
    """Material from ``--phase`` strings (the phases' parameters as key=value lists);
    without any, the built-in material of ``physics`` (:func:`default_material`)."""
    if not phases:
        return default_material(physics)
    return material_from_dict(
        {"physics": physics, "phases": [_key_values(p, "--phase") for p in phases]}
    )


def _cell(args: argparse.Namespace) -> tuple[np.ndarray, dict[str, Any]]:
    if args.image is not None:
        image = from_array(np.load(args.image))
        return image, {"image": str(args.image)}
    params: dict[str, Any] = {}
    for p in args.param:
        params.update(_key_values(p, "--param"))
    return make_cell(args.cell, args.n, **params), {"generator": args.cell, "n": args.n, **params}


def _format_matrix(rows: np.ndarray, row_names: Sequence[str], col_names: Sequence[str]) -> str:
    head = " " * 10 + "".join(f"{c:>16}" for c in col_names)
    body = [
        f"{r:>10}" + "".join(f"{v:16.8g}" for v in row)
        for r, row in zip(row_names, rows, strict=True)
    ]
    return "\n".join([head, *body])


def homogenize(args: argparse.Namespace) -> int:
    """Run ``neuroscale homogenize``; returns the exit status."""
    material = build_material(args.physics, args.phase)
    image, cell_info = _cell(args)
    from_array(image, n_phases=material.n_phases)
    states = material.check_states(
        [_floats(s, "--state") for s in (args.state or [DEFAULT_STATES[args.physics]])]
    )
    options: dict[str, Any] = {}
    if args.solver == "fem":
        from neuroscale_coupling.fine.fem import FESolver

        solver: Any = FESolver(material, degree=args.degree)
    else:
        from neuroscale_coupling.fine.spectral import SpectralSolver

        if args.device:
            options["device"] = args.device
        solver = SpectralSolver(material, **options)
    t0 = time.perf_counter()
    result = solver.solve(image, states)
    seconds = time.perf_counter() - t0

    fractions = phase_fractions(image, material.n_phases)
    print(f"neuroscale {__version__}: {material.physics} homogenization, solver {args.solver}")
    print(
        f"cell {cell_info}, {image.shape[0]}x{image.shape[1]} voxels, phase fractions "
        + ", ".join(f"{f:.4f}" for f in fractions)
    )
    for i, state in enumerate(states):
        print(
            f"\nstate {i}: "
            + ", ".join(f"{n}={v:.6g}" for n, v in zip(material.state_names, state, strict=True))
        )
        print(
            "response: "
            + ", ".join(
                f"{n}={v:.10g}"
                for n, v in zip(material.response_names, result.response[i], strict=True)
            )
        )
        print("tangent d(response)/d(state):")
        print(_format_matrix(result.tangent[i], material.response_names, material.state_names))
        print(f"Newton iterations: {int(result.newton_iterations[i])}")
    print(f"\nsolved {len(states)} point(s) in {seconds:.3f} s")
    if args.json:
        record = {
            "version": __version__,
            "physics": material.physics,
            "solver": args.solver,
            "cell": cell_info,
            "phase_fractions": fractions.tolist(),
            "phases": [vars(p) for p in material.phases],
            "state_names": list(material.state_names),
            "response_names": list(material.response_names),
            "states": states.tolist(),
            "response": result.response.tolist(),
            "tangent": result.tangent.tolist(),
            "newton_iterations": result.newton_iterations.tolist(),
            "seconds": seconds,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2))
        print(f"wrote {args.json}")
    return 0


def train(args: argparse.Namespace) -> int:
    """Run ``neuroscale train``; returns the exit status (collective under MPI)."""
    from mpi4py import MPI

    from neuroscale_coupling.training.config import load_config
    from neuroscale_coupling.training.train import train as run_training

    comm = MPI.COMM_WORLD
    cfg = load_config(args.config)
    t0 = time.perf_counter()
    result = run_training(cfg, comm=comm, resume=args.resume)
    seconds = time.perf_counter() - t0
    if comm.rank == 0:
        h = result.history
        print(f"neuroscale {__version__}: trained SANO ({result.model.config.physics})")
        for e, (tl, vl) in enumerate(zip(h["train_data"], h["val_loss"], strict=True)):
            print(f"epoch {e + 1:4d}: train data loss {tl:.6g}, validation loss {vl:.6g}")
        print("final validation metrics:")
        for k, v in result.metrics.items():
            print(f"  {k} = {v:.6g}")
        print(f"wrote {cfg.output.model} ({seconds:.1f} s)")
    return 0


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.6g}"


def evaluate(args: argparse.Namespace) -> int:
    """Run ``neuroscale evaluate``; returns the exit status (collective under MPI)."""
    from mpi4py import MPI

    from neuroscale_coupling.training.evaluate import evaluate_model

    comm = MPI.COMM_WORLD
    model = Path(args.model)
    if not model.exists():
        raise ValueError(f"model file {model} does not exist")
    output = args.output if args.output is not None else model.with_name(model.stem + "_evaluation")
    res = evaluate_model(
        model,
        dataset=args.dataset,
        output=output,
        comm=comm,
        allow_overlap=args.allow_overlap,
        fresh=None if args.fresh is None else (args.fresh, args.seed),
    )
    m = res.metrics
    if comm.rank == 0:
        print(f"neuroscale {__version__}: evaluated {model}")
        print(f"data: {m['source']}, {m['n_cells']} cells, {m['n_samples']} samples")
        if m.get("held_out") is False:
            print(f"WARNING: cells {m['overlap_cell_ids']} are training/validation cells")
        elif m.get("held_out") is None:
            print("WARNING: the cells could not be checked against the training set")
        print(
            f"  mse_response = {_fmt(m['mse_response'])} (normalized "
            f"{_fmt(m['mse_response_normalized'])})"
        )
        print(
            f"  mse_tangent = {_fmt(m['mse_tangent'])} (normalized "
            f"{_fmt(m['mse_tangent_normalized'])})"
        )
        comps = ", ".join(f"{k} {_fmt(v)}" for k, v in m["rel_l2_response_components"].items())
        print(f"  rel_l2_response = {_fmt(m['rel_l2_response'])} ({comps})")
        print(f"  rel_l2_tangent = {_fmt(m['rel_l2_tangent'])}")
        per = m["calibration_error_components"] or {}
        comps = f" ({', '.join(f'{k} {_fmt(v)}' for k, v in per.items())})" if per else ""
        print(
            f"  calibration_error = {_fmt(m['calibration_error'])}{comps}, coverage68 = "
            f"{_fmt(m['coverage68'])}, coverage95 = {_fmt(m['coverage95'])}"
        )
        spread = ", ".join(
            f"{k} [{_fmt(lo)}, {_fmt(hi)}]" for k, (lo, hi) in m["interval_5_95"].items()
        )
        print(f"  5-95 % over {m['n_microstructures']} distinct microstructures: {spread}")
        for name, g in m["by_generator"].items():
            print(
                f"  {name} ({g['n_microstructures']} microstructures, {g['n_samples']} "
                f"samples): rel_l2_response {_fmt(g['rel_l2_response'])}, rel_l2_tangent "
                f"{_fmt(g['rel_l2_tangent'])}, calibration_error {_fmt(g['calibration_error'])}"
            )
        att = ", ".join(
            f"{n} {a:.4f}" for n, a in zip(m["scale_names"], m["attention_per_scale"], strict=True)
        )
        print(f"  attention per scale: {att}")
        print(f"wrote {', '.join(res.paths.values())}")
    return 0


_EXAMPLES = """examples:
  neuroscale homogenize --cell circular_inclusion --n 64 --param volume_fraction=0.3 \\
      --physics thermal --phase k0=1,beta=0.5 --phase k0=10 --state 1,0.5,0.2
  neuroscale homogenize --image my_cell.npy --physics mechanical --state 0.02,0,0.01
  neuroscale train --config examples/train/thermal.toml
  neuroscale evaluate examples/train/models/thermal_sano.pt --fresh 200 --seed 1

'neuroscale COMMAND --help' describes each command."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuroscale",
        description="Two-scale (FE²) closures: homogenize a periodic cell with a fine-scale\n"
        "solver, train a SANO surrogate of the homogenized response, and evaluate it on\n"
        "held-out microstructures.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser(
        "homogenize",
        help="homogenized response and tangent of one cell",
        description="Solve the periodic cell problem and print the homogenized response "
        "and its consistent tangent.",
    )
    cell = h.add_mutually_exclusive_group()
    cell.add_argument(
        "--cell",
        default="circular_inclusion",
        choices=sorted(GENERATORS),
        help="cell generator (default circular_inclusion)",
    )
    cell.add_argument("--image", type=Path, help="a .npy file holding an (n, n) phase image")
    h.add_argument("--n", type=int, default=64, help="voxels per side for generators (64)")
    h.add_argument(
        "--param",
        action="append",
        default=[],
        help="generator parameters key=value[,key=value] (e.g. volume_fraction=0.3)",
    )
    h.add_argument("--physics", choices=PHYSICS, default="thermal")
    h.add_argument(
        "--phase",
        action="append",
        default=[],
        help="phase parameters, phase 0 first: thermal k0=,alpha=,beta=; "
        "mechanical K=,G=,c1=,c2= (default thermal k0=1 | k0=10; mechanical "
        "EquiNO matrix | fibre)",
    )
    h.add_argument(
        "--state",
        action="append",
        help="macro state, comma separated: thermal G1,G2,theta; mechanical "
        "E11,E22,E12 (tensor shear); repeat for several states",
    )
    h.add_argument("--solver", choices=SOLVERS, default="spectral")
    h.add_argument("--degree", type=int, default=1, help="FE degree (fem solver)")
    h.add_argument("--device", help="torch device for the spectral solver (cpu, cuda)")
    h.add_argument("--json", type=Path, help="write the results to this JSON file")
    h.set_defaults(func=homogenize)
    t = sub.add_parser(
        "train",
        help="train a SANO surrogate from a TOML config",
        description="Generate or load a dataset, train and calibrate a SANO surrogate, "
        "and write the model file; the TOML tables are described in docs/training.md.",
    )
    t.add_argument("--config", type=Path, required=True, help="TOML training config")
    t.add_argument(
        "--resume", action="store_true", help="continue from the config's checkpoint file"
    )
    t.set_defaults(func=train)
    e = sub.add_parser(
        "evaluate",
        help="evaluate a SANO model on held-out microstructures",
        description="Metrics (MSE, relative L2 of response and tangent, calibration, "
        "attention per scale), parity and calibration plots on held-out cells; "
        "docs/training.md explains each figure.",
    )
    e.add_argument("model", type=Path, help="model file written by neuroscale train")
    e.add_argument(
        "--dataset",
        type=Path,
        help="saved dataset of held-out cells (default: the test split of the training data)",
    )
    e.add_argument(
        "--output", type=Path, help="folder for metrics.json and the plots (MODEL_evaluation)"
    )
    e.add_argument(
        "--allow-overlap",
        action="store_true",
        help="flag instead of refusing evaluation cells that are training/validation cells",
    )
    e.add_argument(
        "--fresh",
        type=int,
        metavar="N",
        help="evaluate on N cells drawn afresh from the model's recorded family and solved "
        "(those that are training/validation cells dropped) instead of the test split",
    )
    e.add_argument(
        "--seed", type=int, default=1000, help="seed of the fresh cells and states (--fresh)"
    )
    e.set_defaults(func=evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neuroscale`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    configure("INFO" if args.verbose else "WARNING")
    try:
        return int(args.func(args))
    except (ValueError, TypeError, OSError) as exc:
        print(f"neuroscale {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
