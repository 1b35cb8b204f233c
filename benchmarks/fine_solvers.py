"""Seconds per cell solve (response + consistent tangent): FE (DOLFINx) vs spectral (torch).

Measured in one run, on the same cells and states, at 32², 64² and 128² voxels, for both
physics; CPU always, CUDA as well when a GPU is present. Prints a table and the ratio
FE / spectral. Usage::

    .venv/bin/python benchmarks/fine_solvers.py [--sizes 32 64 128] [--batch 8]
"""

import argparse
import time

import numpy as np
import torch

from neuroscale_coupling.cell.laws import ThermalPhase
from neuroscale_coupling.cell.materials import ThermalMaterial, equino_material
from neuroscale_coupling.cell.microstructure import random_inclusions
from neuroscale_coupling.fine.fem import FESolver
from neuroscale_coupling.fine.spectral import SpectralSolver

CASES = {
    "thermal": (
        ThermalMaterial(phases=(ThermalPhase(1.0, 0.2, 0.5), ThermalPhase(10.0, 0.1, 0.1))),
        np.array([1.0, -0.5, 0.3]),
    ),
    "mechanical": (equino_material(), np.array([0.02, -0.01, 0.01])),
}


def seconds_per_cell(solver, cells, states, repeats=1):
    solver.solve(cells[:1], states[:1])  # warm-up: form compilation, caches, CUDA init
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        solver.solve(cells, states)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best / len(states)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--batch", type=int, default=8, help="cells per spectral batch")
    parser.add_argument("--fe-points", type=int, default=2, help="FE solves timed per size")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch threads {torch.get_num_threads()}, devices {devices}")
    header = f"{'physics':>10} {'n':>5} {'FE s/cell':>11}"
    header += "".join(f" {'spec-' + d + ' s/cell':>18} {'FE/spec-' + d:>13}" for d in devices)
    print(header)
    rng = np.random.default_rng(0)
    for physics, (material, state) in CASES.items():
        for n in args.sizes:
            cells = np.stack(
                [random_inclusions(n, 0.35, n_inclusions=4, seed=s) for s in range(args.batch)]
            )
            states = state * (1 + 0.2 * rng.standard_normal((args.batch, 3)))
            k = min(args.fe_points, args.batch)
            fe = seconds_per_cell(FESolver(material), cells[:k], states[:k])
            row = f"{physics:>10} {n:>5} {fe:11.4f}"
            for device in devices:
                sp = seconds_per_cell(SpectralSolver(material, device=device), cells, states)
                row += f" {sp:18.5f} {fe / sp:13.1f}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
