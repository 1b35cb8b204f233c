"""Cost of one FE² macro Newton iteration: host assembly + linear solve vs the closure.

The exact-micro closure (every quadrature point a fine solve) on the graded thermal
plate of ``examples/fe2_thermal.py``, for a few macro sizes, measured in one run. Prints
per Newton iteration the host seconds (residual/Jacobian assembly and the LU solve), the
closure seconds, their ratio, and the closure seconds per quadrature point::

    .venv/bin/python benchmarks/fe2_cost.py [--sizes 4 8 16] [--cell-n 16] [--solver fem]
    .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/fe2_cost.py
"""

import argparse
import importlib.util
import sys
from pathlib import Path

from mpi4py import MPI


def _example():
    path = Path(__file__).resolve().parents[1] / "examples" / "fe2_thermal.py"
    # the examples import their shared harness, examples/run_options.py, as a sibling
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("fe2_thermal", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--cell-n", type=int, default=16)
    parser.add_argument("--solver", choices=("fem", "spectral"), default="fem")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    example = _example()
    if comm.rank == 0:
        print(f"ranks {comm.size}, cells {args.cell_n}², fine solver {args.solver}")
        print(f"{'macro':>7} {'points':>7} {'newton':>7} {'host s/it':>10} {'closure s/it':>13} "
              f"{'closure/host':>13} {'closure s/point':>16}")  # fmt: skip
    for size in args.sizes:
        problem = example.build(comm, macro=size, cell_n=args.cell_n, solver=args.solver)
        problem.dt.value = 0.05
        report = problem.solve_step()
        its = max(report.iterations, 1)
        host, closure = report.seconds_host / its, report.seconds_closure / its
        per_point = report.seconds_closure / (report.closure_calls * problem.closure.n_global)
        row = f"{2 * size}x{size:<4} {problem.closure.n_global:>7} {report.iterations:>7} "
        row += f"{host:>10.4f} {closure:>13.3f} {closure / host:>13.0f} {per_point:>16.5f}"
        if comm.rank == 0:
            print(row)


if __name__ == "__main__":
    main()
