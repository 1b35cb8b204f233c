"""Per-point cost of the SANO surrogate (response + tangent + std) vs one fine FE solve.

For both physics, in one run: the decode cost per point at N macro states with the latent
cached (one cell), the encode cost per cell, and the seconds of one fine FE solve
(FESolver, Q1, response + consistent tangent) of the same cell at n² voxels; prints the
ratio FE / surrogate. The shipped models' architectures (their recorded configurations,
at the benchmark's image size; fresh weights, since only the timing matters). Usage::

    .venv/bin/python benchmarks/surrogate_speed.py [--points 10000] [--n 64] [--threads 1]
"""

import argparse
import time

import dolfinx_solver  # noqa: F401  (must precede dolfinx/petsc4py)
import numpy as np
import pywt
import torch

from neuroscale_coupling.cell.laws import ThermalPhase
from neuroscale_coupling.cell.materials import ThermalMaterial, equino_material
from neuroscale_coupling.cell.microstructure import random_inclusions
from neuroscale_coupling.fine.fem import FESolver
from neuroscale_coupling.models import shipped_model_path
from neuroscale_coupling.surrogate.config import SANOConfig
from neuroscale_coupling.surrogate.model import SANO
from neuroscale_coupling.surrogate.model_file import Surrogate

CASES = {
    "thermal": (
        ThermalMaterial(phases=(ThermalPhase(1.0, 0.2, 0.5), ThermalPhase(10.0, 0.1, 0.1))),
        np.array([1.0, -0.5, 0.3]),
    ),
    "mechanical": (equino_material(), np.array([0.02, -0.01, 0.01])),
}


def best_of(repeats: int, fn, *args) -> float:
    fn(*args)  # warm-up
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def coefficients(image: np.ndarray, levels: int) -> list[torch.Tensor]:
    out = pywt.wavedec2(image[None].astype(float), "db2", mode="periodization", level=levels)
    return [torch.tensor(out[0][:, None], dtype=torch.float32)] + [
        torch.tensor(np.stack(d, 1), dtype=torch.float32) for d in out[1:]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=10_000, help="macro states decoded")
    parser.add_argument("--n", type=int, default=64, help="voxels per side of the cell")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, N = {args.points} points, cell {args.n}²")
    print(
        f"{'physics':>10} {'decode µs/pt':>13} {'encode ms/cell':>15} "
        f"{'FE s/cell':>10} {'FE/decode':>10}"
    )
    rng = np.random.default_rng(0)
    cell = random_inclusions(args.n, 0.35, n_inclusions=4, seed=0)
    for physics, (material, state) in CASES.items():
        torch.manual_seed(0)
        shipped = Surrogate.load(shipped_model_path(physics)).config.to_dict()
        cfg = SANOConfig.from_dict({**shipped, "image_size": args.n})
        model = SANO(cfg).eval()
        states = state * (1 + 0.2 * rng.standard_normal((args.points, 3)))
        s = torch.tensor(states, dtype=torch.float32)
        coeffs = coefficients(cell, cfg.levels)
        with torch.no_grad():
            latent = model.encode(coeffs)
            t_dec = best_of(args.repeats, model.decode, latent, s) / args.points
            t_enc = best_of(args.repeats, model.encode, coeffs)
        solver = FESolver(material)
        t_fe = best_of(args.repeats, solver.solve, cell, states[:1])
        print(
            f"{physics:>10} {t_dec * 1e6:13.2f} {t_enc * 1e3:15.3f} "
            f"{t_fe:10.4f} {t_fe / t_dec:10.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
