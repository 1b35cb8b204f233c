"""The shipped models answer as they did before the package was rearranged: predictions,
family ratios, interval multipliers and the surrogate closure's answers equal reference
outputs recorded with the earlier layout (tests/data/shipped_reference.npz: recorded on
commit 4c94995, one torch thread, 4 cells × 6 states per physics: Surrogate.predict, the
same with the model in float64, family_ratio, the 95 % interval multipliers and a
SurrogateClosure with every fallback test off) to 1e-12.

The shipped files hold float32 models, whose sums round differently with the number of
torch threads: their predictions are compared on one thread, as recorded; the float64
predictions and the closure (which decodes in float64) are compared as they are."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI

from neuroscale_coupling.cell.symmetry import symmetry_order
from neuroscale_coupling.closure.fallback import FallbackPolicy
from neuroscale_coupling.closure.surrogate_closure import SurrogateClosure
from neuroscale_coupling.models import shipped_model_path
from neuroscale_coupling.surrogate.model_file import Surrogate

REFERENCE = Path(__file__).with_name("data") / "shipped_reference.npz"
OFF = FallbackPolicy(std_rel=math.inf, family_threshold=math.inf, domain_tol=math.inf)


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(REFERENCE))


def _close(actual, expected, what):
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-300)
    err = float(np.max(np.abs(actual - expected), initial=0.0)) / scale
    assert err <= 1e-12, f"{what}: relative difference {err:.3g}"


class _NoFallbackSolver:
    """Stands in for the fine solver: with every test off no point falls back."""

    def __init__(self, material):
        self.material = material

    def solve(self, cells, states):  # pragma: no cover - never called
        raise AssertionError("no point should fall back")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("physics", ["thermal", "mechanical"])
def test_shipped_model_predictions_unchanged(reference, physics, one_thread):
    sur = Surrogate.load(shipped_model_path(physics))
    images, states = reference[f"{physics}/images"], reference[f"{physics}/states"]
    pred = sur.predict(images, states, level=0.95)
    for name in ("response", "tangent", "std"):
        _close(getattr(pred, name), reference[f"{physics}/{name}"], f"{physics} {name}")
    k95 = sur.interval_multipliers(0.95, symmetry_order(images))
    _close(k95, reference[f"{physics}/k95"], f"{physics} k_0.95")
    _close(pred.half_width, k95[0][:, None] * pred.std, f"{physics} interval")
    cells = images[:: images.shape[0] // 4]
    _close(sur.family_ratio(cells), reference[f"{physics}/family_ratio"], f"{physics} family")


@pytest.mark.parametrize("physics", ["thermal", "mechanical"])
def test_shipped_model_float64_predictions_unchanged(reference, physics):
    sur = Surrogate.load(shipped_model_path(physics)).to(dtype=torch.float64)
    images, states = reference[f"{physics}/images"], reference[f"{physics}/states"]
    pred = sur.predict(images, states)
    for name in ("response", "tangent", "std"):
        _close(getattr(pred, name), reference[f"{physics}/{name}64"], f"{physics} {name}")


@pytest.mark.parametrize("physics", ["thermal", "mechanical"])
def test_shipped_model_closure_unchanged(reference, physics):
    sur = Surrogate.load(shipped_model_path(physics))
    images, states = reference[f"{physics}/images"], reference[f"{physics}/states"]
    closure = SurrogateClosure(
        sur, _NoFallbackSolver(sur.material), images, comm=MPI.COMM_SELF, policy=OFF
    )
    closure.begin_step(0)
    res = closure.evaluate(states)
    closure.end_step()
    assert not res.exact.any()
    for name in ("response", "tangent", "std"):
        _close(getattr(res, name), reference[f"{physics}/closure_{name}"], f"{physics} {name}")
