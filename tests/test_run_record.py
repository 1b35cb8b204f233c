"""The host-independent run record: per-step records, totals, summary.json, point maps and
a rank-0 write failure that every rank reports (no rank waits)."""

import json

import numpy as np
import pytest
from mpi4py import MPI

from neuroscale_coupling.cell.laws import ThermalPhase
from neuroscale_coupling.cell.materials import ThermalMaterial
from neuroscale_coupling.closure.contract import Closure, ClosureResult
from neuroscale_coupling.closure.run_record import RunRecorder

MAT = ThermalMaterial(phases=(ThermalPhase(2.0),))


class LinearClosure(Closure):
    """Q = 2 G at every point; points with x1 > 0.5 are reported as fallbacks (reason 1)."""

    def __init__(self, coordinates, *, comm):
        super().__init__(MAT, coordinates.shape[0], comm=comm)
        self.reason = (coordinates[:, 0] > 0.5).astype(np.int8)

    def _start_step(self):
        stats = self._current()
        stats.fallbacks = {"domain": self.comm.allreduce(int(self.reason.sum()))}

    def _evaluate(self, states):
        n = states.shape[0]
        tangent = np.zeros((n, 2, 3))
        tangent[:, [0, 1], [0, 1]] = 2.0
        return ClosureResult(2.0 * states[:, :2], tangent, np.zeros((n, 2)), self.reason > 0)

    def point_maps(self):
        return {"fallback": self.reason.copy(), "predicted_std": np.zeros(self.n_local)}


def _points(comm, n=12):
    rng = np.random.default_rng(comm.rank)
    return rng.random((n if comm.rank == 0 else 3, 2))


def test_records_steps_totals_summary_and_maps(comm, tmp_path):
    folder = comm.bcast(str(tmp_path / "run") if comm.rank == 0 else None)
    xy = _points(comm)
    closure = LinearClosure(xy, comm=comm)
    recorder = RunRecorder(closure, xy, comm=comm, output_dir=folder, progress=False,
                           total_steps=3, metadata={"host": "plain arrays"})  # fmt: skip
    for k in range(3):
        closure.begin_step(k)
        for _ in range(k + 1):  # k + 1 Newton iterates
            closure.evaluate(np.ones((closure.n_local, 3)))
        stats = closure.end_step()
        recorder.record(stats, {"value": 0.1 * k, "iterations": k + 1, "seconds_host": 0.5})
    summary = recorder.close()
    n_fb = comm.allreduce(int(closure.reason.sum()))
    assert summary["host"] == "plain arrays" and summary["points"] == closure.n_global
    assert summary["newton_iterations"] == 6 and summary["seconds_host"] == pytest.approx(1.5)
    assert summary["fallbacks"] == {"domain": 3 * n_fb}
    assert summary["fallback_fraction"] == pytest.approx(n_fb / closure.n_global)
    assert [s["closure_stats"]["evaluations"] for s in summary["steps"]] == [1, 2, 3]
    assert [s["value"] for s in summary["steps"]] == pytest.approx([0.0, 0.1, 0.2])
    comm.barrier()
    written = json.loads((tmp_path.parent / folder / "summary.json").read_text())
    assert written["newton_iterations"] == 6 and len(written["steps"]) == 3
    for name in ("fallback", "fallback_steps", "predicted_std"):
        assert (tmp_path.parent / folder / f"{name}.png").stat().st_size > 1000
        assert name in written["maps"]


@pytest.mark.timeout(60)
def test_coordinates_must_match_the_points(comm):
    """Wrong coordinates on the last rank only: every rank raises (none waits)."""
    xy = _points(comm)
    closure = LinearClosure(xy, comm=comm)
    bad = xy[:, :1] if comm.rank == comm.size - 1 else xy
    with pytest.raises((ValueError, RuntimeError), match=r"local points|another rank"):
        RunRecorder(closure, bad, comm=comm, progress=False)


@pytest.mark.timeout(60)
def test_a_write_that_fails_on_rank_0_raises_on_every_rank(comm, tmp_path):
    """The output folder cannot be made on rank 0 (a file is in its way): every rank raises,
    rank 0 its own error, the others one naming it."""
    blocker = comm.bcast(str(tmp_path / "file") if comm.rank == 0 else None)
    if comm.rank == 0:
        with open(blocker, "w") as fh:
            fh.write("not a folder")
    comm.barrier()
    xy = _points(comm)
    closure = LinearClosure(xy, comm=comm)
    with pytest.raises((FileExistsError, NotADirectoryError, OSError, RuntimeError)) as err:
        RunRecorder(closure, xy, comm=comm, output_dir=f"{blocker}/run", progress=False)
    if comm.rank != 0:
        assert "failed on another rank" in str(err.value)
    assert MPI.COMM_WORLD.allreduce(1) == comm.size  # every rank got here
