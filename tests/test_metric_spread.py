"""Spread of the held-out figures over microstructures (surrogate.metric_spread)."""

import numpy as np
import pytest

from neuroscale_coupling.surrogate.calibration import LEVELS_P, calibration_error
from neuroscale_coupling.training.metric_spread import HeldOutErrors, by_generator, group_bootstrap


def _case(seed=0, groups=12, per=(3, 9), r=2, d=3, spread=1.0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(*per, size=groups)
    group = np.repeat(np.arange(groups), sizes)
    n = group.size
    scale = np.exp(spread * rng.normal(size=groups))[group]  # per-microstructure error level
    eq = rng.normal(size=(n, r)) * scale[:, None]
    yq = rng.normal(size=(n, r)) + 3
    et = rng.normal(size=(n, r, d)) * scale[:, None, None]
    yt = rng.normal(size=(n, r, d)) + 5
    std = np.abs(rng.normal(size=(n, r))) + 0.5
    k = np.linspace(0.1, 2.5, len(LEVELS_P))
    hits = np.abs(eq)[None] <= k[:, None, None] * std[None]
    return eq, yq, et, yt, hits, std, k, group


def _rel(e, y):
    return np.sqrt(np.sum(e**2) / np.sum(y**2))


def test_bootstrap_equals_explicit_resampling():
    eq, yq, et, yt, hits, std, k, group = _case()
    n_groups = group.max() + 1
    draws, seed = 50, 3
    got = group_bootstrap(
        HeldOutErrors(eq, yq, et, yt, hits, LEVELS_P, group), draws=draws, seed=seed
    )
    # the same draws, resampled sample by sample
    w = np.random.default_rng(seed).multinomial(
        n_groups, np.full(n_groups, 1 / n_groups), size=draws
    )
    figs = {"rel_l2_response": [], "rel_l2_tangent": [], "calibration_error": []}
    for row in w:
        rows = np.concatenate(
            [np.flatnonzero(group == g) for g in np.repeat(np.arange(n_groups), row)]
        )
        figs["rel_l2_response"].append(_rel(eq[rows], yq[rows]))
        figs["rel_l2_tangent"].append(_rel(et[rows], yt[rows]))
        figs["calibration_error"].append(
            calibration_error(eq[rows], std[rows], LEVELS_P, multipliers=k)
        )
    for key, v in figs.items():
        np.testing.assert_allclose(got[key], np.quantile(v, (0.05, 0.95)), rtol=1e-10)
    lo, hi = got["rel_l2_response"]
    assert lo < _rel(eq, yq) < hi


def test_bootstrap_collapses_for_identical_microstructures():
    eq, yq, et, yt, hits, _, _, _ = _case(groups=1)
    reps = 6
    tile = lambda a: np.concatenate([a] * reps, axis=1 if a is hits else 0)  # noqa: E731
    group = np.repeat(np.arange(reps), eq.shape[0])
    errors = HeldOutErrors(tile(eq), tile(yq), tile(et), tile(yt), tile(hits), LEVELS_P, group)
    got = group_bootstrap(errors, draws=200)
    assert got["rel_l2_response"] == pytest.approx([_rel(eq, yq)] * 2, rel=1e-12)
    assert got["rel_l2_tangent"] == pytest.approx([_rel(et, yt)] * 2, rel=1e-12)
    assert got["calibration_error"][0] == pytest.approx(got["calibration_error"][1], rel=1e-12)


def test_bootstrap_widens_with_fewer_microstructures():
    def relative_width(groups):
        eq, yq, et, yt, hits, _, _, group = _case(groups=groups, spread=0.3)
        errors = HeldOutErrors(eq, yq, et, yt, hits, LEVELS_P, group)
        lo, hi = group_bootstrap(errors)["rel_l2_response"]
        return (hi - lo) / _rel(eq, yq)

    # the width shrinks about as 1/sqrt(G): sqrt(400 / 8) ~ 7
    assert relative_width(8) > 3 * relative_width(400)


def test_bootstrap_without_spread_and_bad_groups():
    eq, yq, et, yt, _, _, _, group = _case()
    got = group_bootstrap(HeldOutErrors(eq, yq, et, yt, None, LEVELS_P, group))
    assert got["calibration_error"] == [None, None]
    with pytest.raises(ValueError, match="group id"):
        group_bootstrap(HeldOutErrors(eq, yq, et, yt, None, LEVELS_P, group[:-1]))


def test_by_generator_matches_numpy():
    eq, yq, et, yt, hits, std, k, group = _case(groups=10)
    gen = np.where(group % 3 == 0, "disk", "fibres")
    got = by_generator(HeldOutErrors(eq, yq, et, yt, hits, LEVELS_P, group), gen)
    assert set(got) == {"disk", "fibres"}
    for name, entry in got.items():
        rows = gen == name
        assert entry["n_samples"] == rows.sum()
        assert entry["n_microstructures"] == np.unique(group[rows]).size
        assert entry["rel_l2_response"] == pytest.approx(_rel(eq[rows], yq[rows]), rel=1e-12)
        assert entry["rel_l2_tangent"] == pytest.approx(_rel(et[rows], yt[rows]), rel=1e-12)
        assert entry["calibration_error"] == pytest.approx(
            calibration_error(eq[rows], std[rows], LEVELS_P, multipliers=k), abs=1e-12
        )
