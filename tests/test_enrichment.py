"""Online enrichment: after an update every rank holds bitwise the same weights although the
ranks buffered different rows, the error on the buffered exact rows falls while replay
keeps the validation loss in check, an empty global buffer changes nothing, a failure on
one rank raises on all and undoes the update, and bad rows are refused naming the shape.
Rows whose state lies outside the training box are not kept. Tiny thermal model
(surrogate_cases.tiny_surrogate) enriched with exact FE rows of cells from another
generator."""

import hashlib

import numpy as np
import pytest
import torch
from conftest import assert_same_on_all_ranks
from mpi4py import MPI

pytest.importorskip("dolfinx_solver")

from surrogate_cases import GENERATE, tiny_surrogate

from neuroscale_coupling.closure.enrichment import EnrichmentOptions, OnlineEnrichment
from neuroscale_coupling.data.generate import generate
from neuroscale_coupling.surrogate.model_file import Surrogate
from neuroscale_coupling.training.config import GenerateConfig

COMM = MPI.COMM_WORLD
RANK = COMM.rank
# outside the training family (another generator), inside the training box
FRESH = {
    **GENERATE,
    "members": [
        {
            "generator": "random_inclusions",
            "fixed": {"n_inclusions": 3},
            "ranges": {"volume_fraction": [0.2, 0.4]},
        }
    ],
    "lower": [-2.0, -2.0, 0.0],
    "upper": [2.0, 2.0, 1.0],
    "n_cells": 4,
    "states_per_cell": 8,
    "seed": 11,
}
FAST = EnrichmentOptions(lr=3e-3, steps=30)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Surrogate:
    return tiny_surrogate(tmp_path_factory.mktemp(f"enrich{RANK}"))[0]


@pytest.fixture(scope="module")
def fresh():
    return generate(GenerateConfig(**FRESH).spec(), comm=MPI.COMM_SELF, progress=False)


def surrogate(trained: Surrogate, dtype: torch.dtype = torch.float32) -> Surrogate:
    """A fresh copy of the trained surrogate (bitwise the same on every rank)."""
    return trained.to(dtype=dtype)


def digest(model: torch.nn.Module) -> np.ndarray:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)


def weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def add_rows(enrich: OnlineEnrichment, data, rows: np.ndarray) -> None:
    enrich.add(
        data.sample_images()[rows], data.states[rows], data.response[rows], data.tangent[rows]
    )


@pytest.mark.parametrize(
    ("who", "dtype"), [("every rank its own rows", torch.float32), ("rank 0 only", torch.float64)]
)
def test_update_leaves_identical_weights_on_every_rank(trained, fresh, who, dtype):
    sur = surrogate(trained, dtype)
    assert_same_on_all_ranks(COMM, digest(sur.model))
    before = weights(sur.model)
    enrich = OnlineEnrichment(sur, comm=COMM, options=FAST)
    if who == "rank 0 only":
        rows = np.arange(len(fresh)) if RANK == 0 else np.arange(0)
    else:  # disjoint rows: rank r holds every size-th row from r
        rows = np.arange(RANK, len(fresh), COMM.size)
    add_rows(enrich, fresh, rows)
    assert enrich.n_buffer == rows.size
    stats = enrich.update()
    assert stats["rows"] == len(fresh)
    assert_same_on_all_ranks(COMM, digest(sur.model))
    assert_same_on_all_ranks(COMM, np.array([stats[k] for k in sorted(stats) if k != "seconds"]))
    after = weights(sur.model)
    assert after["std_scale"].dtype == np.dtype(str(dtype).removeprefix("torch."))
    assert not np.array_equal(before["decoder.out_raw"], after["decoder.out_raw"])
    # the fixed inference masks are untouched: same noise, same dropout rate
    np.testing.assert_array_equal(before["masks.noise"], after["masks.noise"])
    np.testing.assert_array_equal(before["masks.p_logit"], after["masks.p_logit"])
    assert not sur.model.training
    assert_same_on_all_ranks(COMM, sur.predict(fresh.sample_images(), fresh.states).response)


def test_enrichment_fits_buffered_rows_and_replay_keeps_validation(trained, fresh):
    sur = surrogate(trained)
    enrich = OnlineEnrichment(sur, comm=COMM, options=FAST)
    add_rows(enrich, fresh, np.arange(RANK, len(fresh), COMM.size))
    stats = enrich.update()
    # the exact rows from outside the family: the error falls several-fold
    assert stats["loss_after"] < stats["loss_before"] / 4, stats
    # replay of the training rows: the validation loss does not blow up
    assert stats["val_loss_after"] < 1.25 * stats["val_loss_before"], stats
    assert stats["std_scale"] > 0 and stats["std_scale"] == float(sur.model.std_scale)
    assert stats["broadcast"] == 0.0 and stats["accepted"] == 1.0
    # a second update starts where the first ended (Adam state kept, same buffer)
    before = weights(sur.model)
    again = enrich.update()
    assert again["loss_before"] == pytest.approx(stats["loss_after"], rel=1e-6)
    # kept only when the buffer loss fell within the validation tolerance, else undone
    helped = (
        again["loss_after"] < again["loss_before"]
        and again["val_loss_after"] <= (1 + FAST.val_tolerance) * again["val_loss_before"]
    )
    assert again["accepted"] == float(helped)
    changed = not np.array_equal(weights(sur.model)["decoder.out_raw"], before["decoder.out_raw"])
    assert changed == helped


def test_an_update_that_cannot_help_is_undone(trained, fresh):
    """Buffer targets = the model's own predictions: the buffer loss is 0 before and cannot
    fall, so the update is rejected and the weights and calibration are restored bitwise."""
    sur = surrogate(trained, torch.float64)
    before = weights(sur.model)
    images, states = fresh.sample_images(), fresh.states
    pred = sur.predict(images, states)
    q, t = pred.response, pred.tangent
    enrich = OnlineEnrichment(sur, comm=COMM, options=FAST)
    enrich.add(images, states, q, t)
    stats = enrich.update()
    assert stats["accepted"] == 0.0 and stats["loss_before"] < 1e-20, stats
    for k, v in weights(sur.model).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_empty_global_buffer_changes_nothing(trained, fresh):
    sur = surrogate(trained)
    before = weights(sur.model)
    enrich = OnlineEnrichment(sur, comm=COMM, options=FAST)
    add_rows(enrich, fresh, np.arange(0))
    stats = enrich.update()
    assert stats["rows"] == 0 and stats["steps"] == 0
    for k, v in weights(sur.model).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_failure_on_one_rank_raises_on_all_and_undoes_the_update(trained, fresh):
    sur = surrogate(trained)
    before = weights(sur.model)
    enrich = OnlineEnrichment(sur, comm=COMM, options=FAST)
    add_rows(enrich, fresh, np.arange(len(fresh)))
    if RANK == 0:

        def boom(*args):
            raise ValueError("injected failure")

        enrich._local_gradient = boom
    with pytest.raises((ValueError, RuntimeError), match="injected failure"):
        enrich.update()
    for k, v in weights(sur.model).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert not sur.model.training


def test_weights_that_differ_are_replaced_by_rank_0s(trained):
    sur = surrogate(trained)
    enrich = OnlineEnrichment(sur, comm=COMM, options=FAST)
    if RANK > 0:
        with torch.no_grad():
            sur.model.decoder.out_raw.add_(1e-7)
    assert enrich._agree() == (COMM.size > 1)
    assert_same_on_all_ranks(COMM, digest(sur.model))


def test_buffer_keeps_the_newest_rows(trained, fresh):
    sur = surrogate(trained)
    enrich = OnlineEnrichment(sur, comm=COMM, options=EnrichmentOptions(max_buffer=10))
    add_rows(enrich, fresh, np.arange(8))
    add_rows(enrich, fresh, np.arange(8, 16))
    assert enrich.n_buffer == 10
    np.testing.assert_array_equal(enrich._states, fresh.states[6:16])
    np.testing.assert_array_equal(enrich._images[enrich._cell], fresh.sample_images()[6:16])


def test_rows_outside_the_training_box_are_not_kept(trained, fresh):
    """The surrogate answers beyond the box by its expansion from the box, not by the
    network: rows there would train the network where it is not used."""
    enrich = OnlineEnrichment(surrogate(trained), comm=COMM)
    states = fresh.states[:6].copy()
    states[[1, 4], 0] = 2.5  # G1 beyond the box's 2
    states[5, 2] = -1e-9  # theta just below 0
    enrich.add(fresh.sample_images()[:6], states, fresh.response[:6], fresh.tangent[:6])
    assert enrich.n_buffer == 3 and enrich.rows_outside == 3
    np.testing.assert_array_equal(enrich._states, states[[0, 2, 3]])


def test_bad_rows_are_refused_naming_the_shape(trained, fresh):
    enrich = OnlineEnrichment(surrogate(trained), comm=COMM)
    im, s, q, t = fresh.sample_images()[:4], fresh.states[:4], fresh.response[:4], fresh.tangent[:4]
    with pytest.raises(ValueError, match=r"\(m, 8, 8\).*\(4, 7, 7\)"):
        enrich.add(im[:, :7, :7], s, q, t)
    with pytest.raises(ValueError, match=r"states must have shape \(4, 3\).*\(4, 2\)"):
        enrich.add(im, s[:, :2], q, t)
    with pytest.raises(ValueError, match=r"response must have shape \(4, 2\).*\(3, 2\)"):
        enrich.add(im, s, q[:3], t)
    with pytest.raises(ValueError, match=r"tangent must have shape \(4, 2, 3\).*\(4, 3, 2\)"):
        enrich.add(im, s, q, t.transpose(0, 2, 1))
    with pytest.raises(ValueError, match="NaN"):
        enrich.add(im, s, q * np.nan, t)
    with pytest.raises(ValueError, match=r"phase ids 0\.\.1"):
        enrich.add(im + 2, s, q, t)
    assert enrich.n_buffer == 0
    with pytest.raises(ValueError, match="replay_fraction"):
        EnrichmentOptions(replay_fraction=1.0)
