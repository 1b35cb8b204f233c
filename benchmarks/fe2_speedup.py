"""End-to-end FE² speed-up of the surrogate closure over the exact-micro closure.

The same FE² problem solved twice in one run — with the exact-micro closure (every
quadrature point a fine FE cell solve) and with the shipped SANO model plus fallback —
for the thermal plate (``examples/fe2_thermal.py``) and Cook's membrane
(``examples/fe2_mechanical.py``). Prints both wall times, their ratio, the fallback
fraction and the relative L2 differences of the macro field (last step, and the worst
step) and of the homogenized response at the quadrature points (last step). Each time is
the set-up of the problem (closure: cell latents and family ratios, or the fine solvers)
plus the run of its steps, fields and summaries written; the point maps drawn after the
run are not counted (the exact-micro run has none)::

    .venv/bin/python benchmarks/fe2_speedup.py [--thermal-macro 8] [--mechanical-macro 8]
    .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/fe2_speedup.py

Targets: ratio ≥ 50, macro field within 1 %, response within 2 %.
"""

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

from mpi4py import MPI


def _example(name):
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    # the examples import their shared harness, examples/run_options.py, as a sibling
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thermal-macro", type=int, default=8)
    parser.add_argument("--thermal-steps", type=int, default=4)
    parser.add_argument("--mechanical-macro", type=int, default=8)
    parser.add_argument("--mechanical-steps", type=int, default=3)
    parser.add_argument("--enrich", action="store_true", help="online enrichment between steps")
    parser.add_argument("--output", help="folder for the runs' fields and summaries")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    folder = args.output or comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None)
    common = ["--closure", "surrogate", "--reference", "--quiet"]
    if args.enrich:
        common.append("--enrich")
    runs = {
        "thermal": _example("fe2_thermal").main(
            [*common, "--macro", str(args.thermal_macro), "--steps", str(args.thermal_steps),
             "--output", f"{folder}/thermal"]
        ),
        "mechanical": _example("fe2_mechanical").main(
            [*common, "--macro", str(args.mechanical_macro), "--steps",
             str(args.mechanical_steps), "--output", f"{folder}/mechanical"]
        ),
    }  # fmt: skip
    if comm.rank != 0:
        return
    print(f"ranks {comm.size}; enrichment {'on' if args.enrich else 'off'}; runs in {folder}")
    print(f"{'problem':>11} {'points':>7} {'exact s':>9} {'surrogate s':>12} {'ratio':>7} "
          f"{'fallback':>9} {'field L2':>9} {'worst step':>10} {'resp. L2':>9}")  # fmt: skip
    for name, s in runs.items():
        ref = s["reference"]
        field = ref["field_relative_l2"]
        print(f"{name:>11} {s['points']:>7} {ref['seconds_setup'] + ref['seconds_total']:>9.2f} "
              f"{s['seconds_setup'] + s['seconds_total']:>12.2f} {ref['speedup']:>7.1f} "
              f"{s['fallback_fraction']:>9.4f} {field[-1]:>9.2e} {max(field):>10.2e} "
              f"{ref['response_relative_l2']:>9.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
