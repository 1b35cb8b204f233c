"""The examples run as tests at small size (serial and mpiexec -n 2)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    # the examples import their shared harness, examples/run_options.py, as a sibling
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shared_dir(comm, tmp_path, name):
    return comm.bcast(str(tmp_path / name) if comm.rank == 0 else None)


def test_fe2_thermal_example(comm, tmp_path):
    out = _shared_dir(comm, tmp_path, "thermal")
    summary = _load("fe2_thermal").main(
        ["--closure", "exact", "--macro", "3", "--cell-n", "8", "--steps", "2", "--output", out,
         "--quiet", "--dns", "2", "4"]
    )  # fmt: skip
    assert summary["points"] == 6 * 3 * 4  # 6 × 3 quadrilaterals, 2×2 Gauss points
    # Against the DNS of the graded plate: the difference shrinks with the period
    # (measured 0.058 at ε = 1/2, 0.038 at ε = 1/4 in the last step).
    far, near = (np.array(d["relative_l2"]) for d in summary["dns_comparison"])
    assert np.all(near < 0.8 * far) and near[-1] < 0.05, (far, near)
    assert len(summary["steps"]) == 2
    for step in summary["steps"]:
        assert step["converged_reason"] > 0
        assert step["closure_calls"] == step["iterations"] + 1
        assert step["closure_stats"]["exact_solves"] == step["closure_calls"] * summary["points"]
    if comm.rank == 0:
        on_disk = json.loads((Path(out) / "summary.json").read_text())
        assert on_disk["newton_iterations"] == summary["newton_iterations"]
        assert (Path(out) / "fields.xdmf").exists() and (Path(out) / "fields.h5").exists()


def test_fe2_thermal_main_job_with_the_shipped_model(comm, tmp_path):
    """The main job at small size: shipped SANO + fallback, and the exact-micro reference."""
    out = _shared_dir(comm, tmp_path, "main")
    summary = _load("fe2_thermal").main(
        ["--macro", "2", "--steps", "2", "--output", out, "--quiet"]
    )
    assert summary["closure"] == "surrogate" and summary["points"] == 32
    ref = summary["reference"]
    # the closure's answers follow the exact-micro run closely (measured 0.5-1 %)
    assert max(ref["field_relative_l2"]) < 0.03, ref
    assert set(summary["fallbacks"]) == {"domain", "family", "uncertainty"}
    assert summary["fallbacks"]["family"] == 0  # the plate's cells are in the family
    for step in summary["steps"]:
        stats = step["closure_stats"]
        assert stats["points"] == 32 and stats["evaluations"] == step["closure_calls"]
        assert stats["exact_solves"] == sum(stats["fallbacks"].values()) * step["closure_calls"]
    if comm.rank == 0:
        for name in ("summary.json", "fallback.png", "predicted_std.png", "reference/summary.json"):
            assert (Path(out) / name).exists(), name


def test_fe2_mechanical_example(comm, tmp_path):
    out = _shared_dir(comm, tmp_path, "mechanical")
    summary = _load("fe2_mechanical").main(
        ["--macro", "2", "--cell-n", "8", "--steps", "2", "--output", out, "--quiet"]
    )
    deflection = np.array([s["corner_deflection"] for s in summary["steps"]])
    # Upward traction lifts the tip; the composite softens a little under load.
    assert np.all(deflection > 0) and 1.9 < deflection[1] / deflection[0] < 2.2
    assert all(s["converged_reason"] > 0 for s in summary["steps"])


def test_fe2_mechanical_example_dns_option(comm, tmp_path):
    """--dns runs the DNS of the membrane and records the comparison (its ε-convergence
    is shown on a square in tests/test_fe2.py; Cook's membrane needs fine meshes)."""
    out = _shared_dir(comm, tmp_path, "mechanical_dns")
    summary = _load("fe2_mechanical").main(
        ["--macro", "4", "--cell-n", "8", "--steps", "2", "--output", out, "--quiet",
         "--dns", "4"]
    )  # fmt: skip
    (record,) = summary["dns_comparison"]
    fe2 = np.array([s["corner_deflection"] for s in summary["steps"]])
    np.testing.assert_allclose(record["tip_deflection_fe2"], fe2, rtol=1e-12)
    dns = np.array(record["tip_deflection_dns"])
    assert np.all(dns > 0) and np.all(np.isfinite(record["relative_l2"]))
    assert dns[1] / dns[0] > 1.9  # the DNS carries the full load (no collapse)
    if comm.rank == 0:
        on_disk = json.loads((Path(out) / "summary.json").read_text())
        assert on_disk["dns_comparison"][0]["relative_l2"] == record["relative_l2"]
