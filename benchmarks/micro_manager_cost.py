"""Per-point cost of the preCICE Micro Manager surrogate model against the batched closure.

The Micro Manager 0.12 calls ``solve`` once per point (no batched path, not even for a
stateless model), so the adapter decodes one point at a time with a numpy copy of the
decoder (:mod:`neuroscale_coupling.surrogate.numpy_decoder`). This script measures,
for N points of the shipped thermal model (cells: circular inclusions of a few volume
fractions, states sampled in the training domain; every fallback test off so that only
the surrogate is timed):

* the batched closure (``SurrogateClosure.evaluate`` of all N points, float64) per point;
* the adapter's ``solve`` per point (numpy decoder; fresh states, so nothing is reused),
  and with the switching function called before and after it, as the Micro Manager's
  model switching does;
* the adapter with ``decoder = "torch"`` (``Surrogate.decode`` per point) and a naive
  per-point torch wrapper (``Surrogate.predict`` of one point: encode + decode);
* with ``--micro-manager`` (default when micro-manager-precice is installed): one time
  window of the real Micro Manager loop over the N points on the test-only stand-in
  preCICE (tests/precice_stub), per point.

It checks that the adapter's answers equal the closure's to 1e-12 and prints wall and
process CPU time per point (the CPU time is robust to other load on the machine) and the
ratios. Usage::

    .venv/bin/python benchmarks/micro_manager_cost.py [--points 2000] [--json out.json]
"""

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from neuroscale_coupling.cell.microstructure import circular_inclusion
from neuroscale_coupling.closure.fallback import FallbackPolicy
from neuroscale_coupling.closure.surrogate_closure import SurrogateClosure
from neuroscale_coupling.hosts import micro_manager as nmm
from neuroscale_coupling.hosts.micro_manager import engine as mm_engine
from neuroscale_coupling.hosts.micro_manager.switching import switching_function
from neuroscale_coupling.models import shipped_model_path
from neuroscale_coupling.surrogate.model_file import Surrogate

OFF = FallbackPolicy(std_rel=math.inf, domain_tol=math.inf, family_threshold=math.inf)
NAMES = nmm.DataNames()


def timed(fn, repeats):
    """(best wall s, best CPU s) of ``fn()`` over ``repeats`` runs."""
    wall, cpu = math.inf, math.inf
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu


class _NoFineSolver:
    """The closure's fine solver when DOLFINx is missing (never called: tests are off)."""

    def __init__(self, material):
        self.material = material

    def solve(self, cells, states):  # pragma: no cover - fallback off
        raise RuntimeError("no fine solves in this benchmark")


def fine_solver(material):
    if importlib.util.find_spec("dolfinx_solver") is None:
        return _NoFineSolver(material)
    from neuroscale_coupling.fine.fem import FESolver

    return FESolver(material)


def tangent_of(out):
    """The tangent (2, 3) of one answer dict."""
    k00, k01, k10, k11 = (out[c] for c in NAMES.conductivity)
    d0, d1 = (out[c] for c in NAMES.flux_temperature_derivative)
    return np.array([[k00, k01, d0], [k10, k11, d1]])


def inputs_of(fractions, states):
    return [
        {NAMES.temperature_gradient: s[:2].copy(), NAMES.temperature: s[2], "Volume-Fraction": f}
        for f, s in zip(fractions, states, strict=True)
    ]


def micro_manager_window(fractions, states, repeats):
    """Wall and CPU time of one time window of the Micro Manager's loop over the points
    (the stand-in preCICE of tests/precice_stub), and its written flux (N, 2)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "precice_stub"))
    import micro_manager
    import precice

    n = states.shape[0]
    coords = np.column_stack([np.linspace(0.0, 1.0, n), np.zeros(n)])

    def macro(name, ids, window, iteration):
        if name == NAMES.temperature_gradient:
            return states[ids, :2]
        if name == NAMES.temperature:
            return states[ids, 2]
        return fractions[ids]

    folder = Path(tempfile.mkdtemp(prefix="mm-bench-"))
    cfg = {
        "participant_name": "Micro-Manager",
        "precice_config_file_path": "precice-config.xml",
        "interfaces": [
            {
                "mesh_name": "Macro-Mesh",
                "read_data": [{"name": x} for x in (*NAMES.read, "Volume-Fraction")],
                "write_data": [{"name": x} for x in NAMES.write],
            }
        ],
        "micro_manager": {
            "micro_file_names": ["neuroscale_coupling.hosts.micro_manager.surrogate_model"],
            "micro_stateless_flags": [True],
            "output_directory": str(folder / "out"),
            "simulation_params": {
                "micro_dt": 1.0,
                "macro_domain_bounds": [0.0, 1.0, -1.0, 1.0],
                "decomposition": [1, 1],  # the default [1, 1, 1] is 3D
            },
        },
    }
    (folder / "mm.json").write_text(json.dumps(cfg))
    import logging

    logging.getLogger("micro_manager").setLevel(logging.WARNING)
    best = (math.inf, math.inf)
    flux = None
    for _ in range(repeats):
        nmm.configure(nmm.MicroSettings(policy=OFF))  # fresh engine: nothing reused
        scenario = precice.Scenario(
            coords=coords, macro=macro, windows=1, iterations=1,
            dims={NAMES.temperature_gradient: 2, NAMES.flux: 2, NAMES.flux_std: 2},
        )  # fmt: skip
        precice.Participant.scenario = scenario
        manager = micro_manager.MicroManagerCoupling(str(folder / "mm.json"))
        manager.initialize()
        engine = mm_engine.shared()
        for x in inputs_of(fractions, states):  # the cells are encoded before timing
            engine.point(x)
        engine._memo.clear()
        w0, c0 = time.perf_counter(), time.process_time()
        manager.solve()
        w, c = time.perf_counter() - w0, time.process_time() - c0
        best = (min(best[0], w), min(best[1], c))
        rows = [r for r in scenario.written if r["name"] == NAMES.flux]
        flux = np.empty((n, 2))
        flux[rows[0]["ids"]] = rows[0]["data"]
    return best, flux


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=2000, help="N macro points")
    ap.add_argument("--fractions", type=int, default=8, help="distinct cells")
    ap.add_argument("--naive", type=int, default=100, help="points for the torch wrappers")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--micro-manager", action=argparse.BooleanOptionalAction,
        default=importlib.util.find_spec("micro_manager") is not None,
        help="also time the Micro Manager's own loop on the stand-in preCICE",
    )  # fmt: skip
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    sur = Surrogate.load(shipped_model_path("thermal")).to(dtype=torch.float64)
    n, rng = args.points, np.random.default_rng(0)
    vf = np.linspace(0.1, 0.6, args.fractions)
    fractions = vf[rng.integers(0, args.fractions, n)]
    states = sur.domain.sample(n, seed=1)
    cells = np.stack([circular_inclusion(sur.image_size, f) for f in fractions])
    inputs = inputs_of(fractions, states)

    # the batched closure
    closure = SurrogateClosure(
        sur, fine_solver(sur.material), cells, comm=MPI.COMM_SELF, policy=OFF
    )

    def batched():
        closure.begin_step(0)
        out = closure.evaluate(states)
        closure.end_step()
        return out

    ref = batched()
    t_closure = timed(batched, args.repeats)

    # the adapter, numpy decoder: one shared instance, as the Micro Manager builds it
    nmm.configure(nmm.MicroSettings(policy=OFF))
    sim = nmm.SurrogateMicroSimulation(0)
    for x in inputs:  # encode the cells (once per distinct cell, not timed)
        sim.engine.point(x)
    memo = sim.engine._memo

    def adapter():
        memo.clear()
        return [sim.solve(x, 1.0) for x in inputs]

    out = adapter()
    t_adapter = timed(adapter, args.repeats)

    def adapter_switching():  # switching, solve, switching: the model-switching loop
        memo.clear()
        for x in inputs:
            switching_function(1, None, 0.0, x, None)
            sim.solve(x, 1.0)
            switching_function(1, None, 0.0, x, None)

    t_switching = timed(adapter_switching, args.repeats)

    got = {
        "response": np.stack([o[NAMES.flux] for o in out]),
        "std": np.stack([o[NAMES.flux_std] for o in out]),
        "tangent": np.stack([tangent_of(o) for o in out]),
    }
    diff = max(
        float(np.max(np.abs(got[k] - getattr(ref, k)) / np.maximum(1.0, np.abs(getattr(ref, k)))))
        for k in got
    )

    # torch per point: the adapter's torch decoder, and a naive wrapper
    m = min(args.naive, n)
    nmm.configure(nmm.MicroSettings(policy=OFF, decoder="torch"))
    sim_t = nmm.SurrogateMicroSimulation(0)
    for x in inputs[:m]:
        sim_t.engine.point(x)

    def adapter_torch():
        sim_t.engine._memo.clear()
        for x in inputs[:m]:
            sim_t.solve(x, 1.0)

    t_torch = timed(adapter_torch, max(1, args.repeats // 2))

    def naive():
        for i in range(m):
            sur.predict(cells[i : i + 1], states[i : i + 1])

    t_naive = timed(naive, max(1, args.repeats // 2))

    rows = [
        ("batched closure (SurrogateClosure.evaluate, N points)", t_closure, n),
        ("adapter solve, numpy decoder", t_adapter, n),
        ("adapter switching + solve + switching", t_switching, n),
        ("adapter solve, torch decoder", t_torch, m),
        ("naive per-point torch wrapper (predict of 1 point)", t_naive, m),
    ]
    if args.micro_manager:
        t_mm, flux_mm = micro_manager_window(fractions, states, args.repeats)
        diff = max(
            diff,
            float(np.max(np.abs(flux_mm - ref.response) / np.maximum(1.0, np.abs(ref.response)))),
        )
        rows.insert(3, ("Micro Manager loop, one time window (stand-in preCICE)", t_mm, n))

    per = {label: (w / k * 1e6, c / k * 1e6) for label, (w, c), k in rows}
    base = per[rows[0][0]]
    print(
        f"thermal model {sur.image_size}x{sur.image_size}, N = {n} points, {args.fractions} cells"
    )
    print(f"{'per point':58s} {'wall us':>9s} {'CPU us':>9s} {'x closure (CPU)':>16s}")
    for label, (w, c) in per.items():
        print(f"{label:58s} {w:9.1f} {c:9.1f} {c / base[1]:16.1f}")
    print(f"adapter vs closure: max relative difference {diff:.2e} (must be <= 1e-12)")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"points": n, "per_point_us": per, "max_rel_diff": diff}, indent=2)
        )
    if not diff <= 1e-12:
        raise SystemExit(f"the adapter's answers differ from the closure's by {diff:.2e}")


if __name__ == "__main__":
    main()
