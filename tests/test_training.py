"""SANO training pipeline: the loss falls, runs are reproducible from the seed, a resumed run
equals an uninterrupted one, the model file loads with weights_only and predicts physical
responses, calibration brings the interval coverage towards nominal, and ``neuroscale
train`` runs end to end. Tiny thermal dataset (8×8 cells, FE solver), tiny model."""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI

pytest.importorskip("dolfinx_solver")

from surrogate_cases import GENERATE, TINY_MODEL

from neuroscale_coupling.cli import main
from neuroscale_coupling.fine.fem import FESolver
from neuroscale_coupling.surrogate.calibration import (
    calibration_error,
    coverage,
    fit_std_calibration,
    fit_std_scale,
)
from neuroscale_coupling.surrogate.config import TrainConfig
from neuroscale_coupling.surrogate.data import generate
from neuroscale_coupling.surrogate.model_file import Surrogate, load_model
from neuroscale_coupling.surrogate.training import train

RANK = MPI.COMM_WORLD.rank
TRAINING = {"batch_size": 32, "lr": 1e-2, "progress": False, "patience": 0, "seed": 3}


def config(folder, name: str, **training) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "data": {"generate": GENERATE},
            "model": TINY_MODEL,
            "training": {**TRAINING, **training},
            "output": {"model": str(folder / f"{name}_{RANK}.pt")},
        }
    )


@pytest.fixture(scope="module")
def dataset():
    cfg = config(Path("."), "x")
    return generate(cfg.data.generate.spec(), comm=MPI.COMM_SELF, progress=False)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"train{RANK}")
    # augmentation off here (it slows a tiny model's fit); the resume test runs with it on
    cfg = config(folder, "base", epochs=10, lr=2e-2, augment=False)
    return cfg, train(cfg, comm=MPI.COMM_SELF, dataset=dataset)


def _weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def test_training_reduces_loss(trained):
    _, res = trained
    h = res.history
    assert len(h["train_data"]) == 10
    # validation loss (normalized response + tangent MSE) before training vs best epoch
    assert min(h["val_loss"]) < h["initial_val_loss"][0] / 3, (h["initial_val_loss"], h["val_loss"])
    assert h["train_data"][-1] < h["train_data"][0] / 2, h["train_data"]
    assert res.metrics["val_loss"] == pytest.approx(min(h["val_loss"]), rel=1e-5)


def test_seed_reproducible_and_resume_equals_uninterrupted(dataset, tmp_path):
    full = train(
        config(tmp_path, "a", epochs=3, batch_size=64), comm=MPI.COMM_SELF, dataset=dataset
    )
    again = train(
        config(tmp_path, "b", epochs=3, batch_size=64), comm=MPI.COMM_SELF, dataset=dataset
    )
    for k, v in _weights(full.model).items():
        np.testing.assert_array_equal(v, _weights(again.model)[k], err_msg=k)
    assert full.history["train_loss"] == again.history["train_loss"]
    # interrupted after 2 epochs, then resumed to 3 from the checkpoint
    part_cfg = config(tmp_path, "c", epochs=2, batch_size=64, calibrate=False)
    train(part_cfg, comm=MPI.COMM_SELF, dataset=dataset)
    assert os.path.exists(part_cfg.output.checkpoint_path)
    resumed_cfg = dataclasses.replace(
        part_cfg, training=dataclasses.replace(part_cfg.training, epochs=3)
    )
    resumed = train(resumed_cfg, comm=MPI.COMM_SELF, dataset=dataset, resume=True)
    assert len(resumed.history["val_loss"]) == 3
    for k, v in _weights(full.model).items():
        if k not in ("std_scale", "std_floor"):
            np.testing.assert_array_equal(v, _weights(resumed.model)[k], err_msg=k)
    assert full.history["val_loss"] == resumed.history["val_loss"]
    # a checkpoint of another configuration is refused
    other = dataclasses.replace(part_cfg, training=dataclasses.replace(part_cfg.training, lr=0.5))
    with pytest.raises(ValueError, match="different configuration"):
        train(other, comm=MPI.COMM_SELF, dataset=dataset, resume=True)


def test_model_file_weights_only_and_physical_predictions(trained, dataset):
    cfg, res = trained
    payload = torch.load(cfg.output.model, weights_only=True)
    assert payload["config"] == res.model.config.to_dict()
    assert payload["domain"] == dataset.spec.domain.to_dict()
    assert payload["std_scale"] == pytest.approx(res.metrics["std_scale"])
    model, meta = load_model(cfg.output.model)
    for k, v in _weights(res.model).items():
        np.testing.assert_array_equal(v, _weights(model)[k], err_msg=k)
    sur = Surrogate(model, meta)
    idx = np.arange(0, len(dataset), 5)
    images, states = dataset.sample_images()[idx], dataset.states[idx]
    q, t, s = sur.predict(images, states)
    q2, t2, s2 = Surrogate(res.model, res.metadata).predict(images, states)
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(t, t2)
    np.testing.assert_array_equal(s, s2)
    assert q.shape == (idx.size, 2) and t.shape == (idx.size, 2, 3) and s.shape == q.shape
    # physical units: compare with a fresh fine solve of training cells
    train_cells = set(meta["extra"]["split_cells"]["train"])
    rows = [i for i in idx if int(dataset.cell_ids[dataset.cell_index[i]]) in train_cells][:6]
    solver = FESolver(dataset.spec.material)
    ref_q = np.concatenate(
        [solver.solve(dataset.sample_images()[i], dataset.states[i : i + 1]).response for i in rows]
    )
    pred_q = sur.predict(dataset.sample_images()[rows], dataset.states[rows])[0]
    rel = np.linalg.norm(pred_q - ref_q) / np.linalg.norm(ref_q)
    # measured ≈0.2 for this 10-epoch tiny model; a unit mistake would give O(1) or more
    assert rel < 0.4, rel


def test_calibration_improves_coverage(trained):
    _, res = trained
    m = res.metrics
    assert m["calibration_error_after"] < m["calibration_error_before"]
    assert abs(m["coverage95_after"] - 0.95) <= abs(m["coverage95_before"] - 0.95)
    assert abs(m["coverage68_after"] - 0.68) <= abs(m["coverage68_before"] - 0.68) + 0.02


def test_fit_std_scale_recovers_known_scale():
    rng = np.random.default_rng(0)
    std = rng.uniform(0.5, 2.0, size=20000)
    err = 3.0 * std * rng.normal(size=std.size)
    s = fit_std_scale(err, std)
    assert s == pytest.approx(3.0, rel=0.03)
    assert calibration_error(err, s * std) < 0.01
    np.testing.assert_allclose(coverage(err, s * std, (0.68, 0.95)), (0.68, 0.95), atol=0.01)
    with pytest.raises(ValueError, match="no spread"):
        fit_std_scale(err, np.zeros_like(std))


def test_fit_std_calibration_recovers_scale_and_floor():
    """Errors with a spread-proportional part and a constant part: the pair is recovered
    and the calibration error drops well below what a scale alone reaches."""
    rng = np.random.default_rng(1)
    std = rng.uniform(0.05, 2.0, size=20000)
    err = np.hypot(2.0 * std, 0.5) * rng.normal(size=std.size)
    s, c = fit_std_calibration(err, std)
    assert s == pytest.approx(2.0, rel=0.1) and c == pytest.approx(0.5, rel=0.2)
    alone = calibration_error(err, fit_std_scale(err, std) * std)
    assert calibration_error(err, np.hypot(s * std, c)) < min(0.01, alone / 2), alone


def test_cli_train_end_to_end(tmp_path, capsys):
    comm = MPI.COMM_WORLD
    folder = Path(comm.bcast(str(tmp_path)))
    toml = folder / "train.toml"
    if comm.rank == 0:
        toml.write_text(
            """
[data.generate]
physics = "thermal"
n = 8
members = [{generator = "circular_inclusion", ranges = {volume_fraction = [0.1, 0.5]}}]
lower = [-1.0, -1.0, 0.0]
upper = [1.0, 1.0, 1.0]
n_cells = 8
states_per_cell = 4
save = "data.pt"

[model]
levels = 2
tokens_side = 2
d_model = 8
heads = 2
layers = 1
latent = 4
hidden = 8
dropout = 0.2
samples = 8

[training]
epochs = 2
batch_size = 32
progress = false

[output]
model = "out/model.pt"
"""
        )
    comm.barrier()
    assert main(["train", "--config", str(toml)]) == 0
    out = capsys.readouterr().out
    if comm.rank == 0:
        assert "final validation metrics" in out and "epoch    2" in out
    assert (folder / "out" / "model.pt").exists()
    assert (folder / "data.pt").exists()
    _, meta = load_model(folder / "out" / "model.pt")
    assert meta["config"]["hidden"] == 8 and len(meta["history"]["val_loss"]) == 2
    assert main(["train", "--config", str(folder / "missing.toml")]) == 2
    # the saved dataset as input; a config error is reported as such
    again = folder / "again.toml"
    bad = folder / "bad.toml"
    if comm.rank == 0:
        again.write_text(
            '[data]\ndataset = "data.pt"\n[model]\nlevels = 2\nd_model = 8\nheads = 2\n'
            "latent = 4\nhidden = 8\n[training]\nepochs = 1\nprogress = false\n"
            '[output]\nmodel = "again.pt"\n'
        )
        bad.write_text('[data]\ndataset = "data.pt"\n[training]\nepoch = 1\n')
    comm.barrier()
    assert main(["train", "--config", str(again)]) == 0
    assert (folder / "again.pt").exists()
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown keys ['epoch'] in [training]" in capsys.readouterr().err
    comm.barrier()


@pytest.mark.parametrize("name", ["thermal", "mechanical"])
def test_shipped_training_configs_are_valid(name):
    """The example configs parse and describe the issue-4 families and domains."""
    from neuroscale_coupling.surrogate.config import load_config

    path = Path(__file__).resolve().parents[1] / "examples" / "train" / f"{name}.toml"
    cfg = load_config(path)
    spec = cfg.data.generate.spec()
    bound = 2.0 if name == "thermal" else 0.04
    assert spec.domain.upper[0] == bound and spec.domain.lower[0] == -bound
    assert spec.material.physics == name and spec.n_samples >= 5000
