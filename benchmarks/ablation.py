"""SANO ablation: the same data and training budget for four encoders.

Variants (decoders identical, see ``neuroscale_coupling.surrogate.model`` module doc):

* ``sano``: wavelet tokens + scale-adaptive attention (the shipped thermal model's
  ``[model]`` table in examples/train/thermal.toml);
* ``no-attention``: wavelet tokens mean-pooled directly;
* ``cnn``: plain periodic CNN on the image (exact Haar synthesis of the coefficients);
* ``descriptors``: MLP on the volume fraction (cell mean of the approximation band).

One thermal dataset (circular_inclusion + random_inclusions + centre_and_corner_fibres,
volume fraction 0.05-0.6, k0 = 1 | 10 with the nonlinear phases of
examples/train/thermal.toml, n² cells, FE solver), split once by microstructure; every
variant trains with the same epochs / batch / lr / seed and is evaluated on the same test
split. Prints one table: variant, parameters, train seconds, relative L2 error of the
response and of the tangent, calibration error of the std. Usage::

    .venv/bin/python benchmarks/ablation.py [--cells 120] [--states 16] [--epochs 30] [--n 16]
"""

import argparse
import math
import tempfile
import time
import tomllib
from pathlib import Path

import dolfinx_solver  # noqa: F401  (must precede dolfinx/petsc4py)
import torch

from neuroscale_coupling.data.generate import generate
from neuroscale_coupling.data.split import split
from neuroscale_coupling.surrogate.model_file import Surrogate
from neuroscale_coupling.training.config import (
    DataConfig,
    GenerateConfig,
    OutputConfig,
    TrainConfig,
    TrainingOptions,
)
from neuroscale_coupling.training.evaluate import compute_metrics
from neuroscale_coupling.training.train import train

VARIANTS = {
    "sano": {},
    "no-attention": {"attention": False},
    "cnn": {"encoder": "cnn"},
    "descriptors": {"encoder": "descriptors"},
}
SPLIT = (0.7, 0.15, 0.15)
# the [model] table of the shipped thermal model: every variant differs from it only in
# its encoder (decoder terms, width, dropout and samples as shipped)
SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "train" / "thermal.toml"


def generate_config(n: int, cells: int, states: int, seed: int) -> GenerateConfig:
    """The thermal family of examples/train/thermal.toml at n² voxels."""
    vf = {"volume_fraction": [0.05, 0.6]}
    return GenerateConfig(
        physics="thermal",
        n=n,
        phases=(
            {"k0": 1.0, "alpha": 0.5, "beta": 0.2},
            {"k0": 10.0, "alpha": 0.2, "beta": 0.05},
        ),
        members=(
            {"generator": "circular_inclusion", "ranges": vf},
            {
                "generator": "random_inclusions",
                "fixed": {"n_inclusions": 4, "min_gap": 0.01},
                "ranges": {"volume_fraction": [0.05, 0.45]},
            },
            {"generator": "centre_and_corner_fibres", "ranges": vf},
        ),
        lower=(-2.0, -2.0, 0.0),
        upper=(2.0, 2.0, 1.0),
        n_cells=cells,
        states_per_cell=states,
        solver="fem",
        seed=seed,
    )


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=120, help="cells in the dataset")
    parser.add_argument("--states", type=int, default=16, help="macro states per cell")
    parser.add_argument("--n", type=int, default=16, help="voxels per side")
    parser.add_argument("--levels", type=int, default=3, help="wavelet levels")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0, help="training seed (all variants)")
    parser.add_argument("--data-seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="V"
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    gen = generate_config(args.n, args.cells, args.states, args.data_seed)
    t0 = time.perf_counter()
    data = generate(gen.spec(), progress=False)
    print(
        f"dataset: {data.n_cells} cells × {args.states} states, {args.n}², "
        f"generated in {time.perf_counter() - t0:.1f} s"
    )
    _, _, test = split(data, SPLIT, seed=0)
    print(
        f"test split: {test.n_cells} cells, {len(test)} samples; budget: {args.epochs} "
        f"epochs, batch {args.batch}, lr {args.lr}, seed {args.seed} (no early stopping)"
    )
    with open(SHIPPED_CONFIG, "rb") as f:
        model = {**tomllib.load(f)["model"], "levels": args.levels}
    options = TrainingOptions(
        epochs=args.epochs,
        batch_size=args.batch,
        lr=args.lr,
        patience=0,
        seed=args.seed,
        device="cpu",
        progress=False,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            path = str(Path(tmp) / f"{name}.pt")
            cfg = TrainConfig(
                data=DataConfig(generate=gen, split=SPLIT, split_seed=0),
                model={**model, **VARIANTS[name]},
                training=options,
                output=OutputConfig(model=path),
            )
            t0 = time.perf_counter()
            res = train(cfg, dataset=data)
            seconds = time.perf_counter() - t0
            params = sum(p.numel() for p in res.model.parameters())
            metrics, _ = compute_metrics(Surrogate.load(path), test)
            rows.append((name, params, seconds, metrics))
            print(f"  {name}: done in {seconds:.1f} s", flush=True)
    head = (
        f"{'variant':<14}{'params':>9}{'train s':>9}{'rel L2 Q':>11}{'rel L2 dQ':>11}{'calib':>9}"
    )
    print(head)
    print("-" * len(head))
    for name, params, seconds, m in rows:
        print(
            f"{name:<14}{params:>9d}{seconds:>9.1f}{fmt(m['rel_l2_response'], '.4f'):>11}"
            f"{fmt(m['rel_l2_tangent'], '.4f'):>11}{fmt(m['calibration_error'], '.4f'):>9}"
        )


if __name__ == "__main__":
    main()
