"""Closure vs host cost on the hosts beyond DOLFINx, measured in one run.

1. The PETSc finite-volume host (``examples/fv_thermal.py``): the main job's graded plate
   at ``--macro N`` ((2N) × N cells) with the shipped thermal surrogate and fallback, then
   the same run with the exact-micro closure. Per Newton iteration and per closure point
   (face): the seconds in the closure and in the host (residual and Jacobian assembly,
   linear solve); the end-to-end speed-up (set-up + steps) and how far the surrogate run's
   temperature lies from the exact-micro run's.
2. The preCICE Micro Manager adapter: the per-point cost of its ``solve`` against one point
   of the batched closure (``benchmarks/micro_manager_cost.py``, run on rank 0).

Targets: FV surrogate within 1 % of exact-micro and at least 50× faster end to end;
adapter at most 0.2 ms a point. Run::

    .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/hosts.py [--macro 12] [--points 2000]
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpi4py import MPI

ROOT = Path(__file__).resolve().parents[1]
#: Environment variables by which an MPI process manager makes a process a rank of a job.
_MPI_JOB_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "MPI_LOCAL", "OMPI_", "PRTE_")


def _load(path: Path, name: str):
    if str(path.parent) not in sys.path:  # the examples import run_options as a sibling
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_iteration(summary):
    """Closure and host seconds per Newton iteration and per point of one run."""
    its = max(summary["closure_calls"], 1)
    n = max(summary["points"], 1)
    return summary["seconds_closure"] / its / n, summary["seconds_host"] / its / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--macro", type=int, default=12, help="FV plate: (2N) x N cells")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--points", type=int, default=2000, help="Micro Manager points")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    fv = _load(ROOT / "examples" / "fv_thermal.py", "fv_thermal")
    folder = comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None)
    summary = fv.main(
        ["--macro", str(args.macro), "--steps", str(args.steps), "--output", folder, "--quiet"]
    )
    ref = summary["reference"]
    if comm.rank == 0:
        with open(Path(folder) / "reference" / "summary.json") as fh:
            exact = json.load(fh)
        c_s, h_s = per_iteration(summary)
        c_x, h_x = per_iteration(exact)
        print(
            f"PETSc FV host, graded plate {2 * args.macro} x {args.macro} cells, "
            f"{summary['points']} faces, {comm.size} rank(s), {args.steps} steps"
        )
        print(f"{'closure':>12} {'Newton it.':>10} {'closure us/it/pt':>17} "
              f"{'host us/it/pt':>14} {'closure/host':>12} {'fallback':>9}")  # fmt: skip
        for name, s, c, h in (("surrogate", summary, c_s, h_s), ("exact", exact, c_x, h_x)):
            print(
                f"{name:>12} {s['newton_iterations']:>10} {1e6 * c:17.1f} {1e6 * h:14.2f} "
                f"{c / h:12.1f} {s['fallback_fraction']:9.4f}"
            )
        cost_x = ref["seconds_setup"] + ref["seconds_total"]
        cost_s = summary.get("seconds_setup", 0.0) + summary["seconds_total"]
        print(
            f"  end to end (set-up + steps): exact-micro {cost_x:.2f} s, surrogate "
            f"{cost_s:.2f} s, speed-up {ref['speedup']:.1f}x; relative L2 difference of T "
            f"at the last step {ref['field_relative_l2'][-1]:.2e}, of the face fluxes "
            f"{ref['response_relative_l2']:.2e}"
        )
    comm.barrier()
    done = None if comm.rank == 0 else comm.Ibarrier()
    while done is not None and not done.Test():  # the other ranks wait without spinning
        time.sleep(0.05)
    if comm.rank == 0:
        # The Micro Manager's loop uses MPI.COMM_WORLD: run it in a process of its own,
        # outside this MPI job (the process manager's variables removed).
        env = {k: v for k, v in os.environ.items() if not k.startswith(_MPI_JOB_PREFIXES)}
        script = ROOT / "benchmarks" / "micro_manager_cost.py"
        try:
            subprocess.run(
                [sys.executable, str(script), "--points", str(args.points)], env=env, check=True
            )
        finally:
            comm.Ibarrier().Wait()


if __name__ == "__main__":
    main()
