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

from neuroscale_coupling.cell.symmetry import response_orbits
from neuroscale_coupling.cli import main
from neuroscale_coupling.data.generate import generate
from neuroscale_coupling.data.split import split
from neuroscale_coupling.fine.fem import FESolver
from neuroscale_coupling.surrogate.calibration import (
    LEVELS_P,
    calibration_error,
    coverage,
    fit_calibration,
    fit_cell_error_head,
    fit_symmetry_classes,
    gaussian_multipliers,
    interval_multipliers,
)
from neuroscale_coupling.surrogate.model_file import Surrogate, load_model
from neuroscale_coupling.training.config import TrainConfig
from neuroscale_coupling.training.train import train

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
    # the device may change on resume (a CUDA run finished on the CPU)
    assert part_cfg.training.device == "auto"
    resumed_cfg = dataclasses.replace(
        part_cfg, training=dataclasses.replace(part_cfg.training, epochs=3, device="cpu")
    )
    resumed = train(resumed_cfg, comm=MPI.COMM_SELF, dataset=dataset, resume=True)
    assert len(resumed.history["val_loss"]) == 3
    for k, v in _weights(full.model).items():
        calibration = ("std_scale", "std_floor", "interval_table", "error_weight", "error_bias")
        if k not in (*calibration, "class_std_factor", "class_interval_table"):
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
    pred = sur.predict(images, states)
    q, t, s = pred.response, pred.tangent, pred.std
    pred = Surrogate(res.model, res.metadata).predict(images, states)
    q2, t2, s2 = pred.response, pred.tangent, pred.std
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
    pred_q = sur.predict(dataset.sample_images()[rows], dataset.states[rows]).response
    rel = np.linalg.norm(pred_q - ref_q) / np.linalg.norm(ref_q)
    # measured ≈0.2 for this 10-epoch tiny model; a unit mistake would give O(1) or more
    assert rel < 0.4, rel


def test_calibration_improves_coverage(trained):
    _, res = trained
    m = res.metrics
    assert m["calibration_error_after"] < m["calibration_error_before"]
    assert abs(m["coverage95_after"] - 0.95) <= abs(m["coverage95_before"] - 0.95)
    assert abs(m["coverage68_after"] - 0.68) <= abs(m["coverage68_before"] - 0.68) + 0.02


def test_fit_calibration_heavy_tailed_errors():
    """Errors = τ × Student-t(3) noise (heavy tails) with an uninformative spread: the
    calibration puts the std on τ, makes it RMS-consistent, and its fitted multipliers
    cover fresh errors at every level, where Gaussian multipliers cannot."""
    rng = np.random.default_rng(1)

    def draw(n):
        tau = np.exp(rng.normal(0.0, 0.7, size=(n, 2)))
        return tau * rng.standard_t(3, size=(n, 2)), rng.uniform(0.5, 1.5, size=(n, 2)), tau

    err, spread, tau = draw(20000)
    cal = fit_calibration(err, spread, tau)
    assert cal.mix == pytest.approx(np.pi / 2, abs=0.2)  # τ carries the std
    std = np.hypot(cal.scale * spread, cal.floor * tau)
    assert np.mean((err / std) ** 2) == pytest.approx(1.0, rel=1e-9)
    assert calibration_error(err, std, multipliers=cal.multipliers) < 0.002
    # Student-t(3) scaled to unit variance: a narrower centre and wider tails than N(0, 1)
    gauss = gaussian_multipliers(LEVELS_P)
    assert cal.multipliers[9] < gauss[9] and cal.multipliers[-1] < gauss[-1] * 1.1
    e2, s2, t2 = draw(20000)
    std2 = np.hypot(cal.scale * s2, cal.floor * t2)
    fresh = calibration_error(e2, std2, multipliers=cal.multipliers)
    assert fresh < 0.01 < calibration_error(e2, std2), fresh
    np.testing.assert_allclose(
        coverage(e2, std2, (0.68, 0.95), interval_multipliers((0.68, 0.95), cal.multipliers)),
        (0.68, 0.95),
        atol=0.01,
    )
    # a spread that does carry the error is kept
    cal = fit_calibration(spread * rng.normal(size=spread.shape), spread, tau)
    assert cal.mix < 0.3 and cal.scale == pytest.approx(1.0, rel=0.05)
    with pytest.raises(ValueError, match="same non-zero size"):
        fit_calibration(err, spread[:10], tau)


def test_fit_symmetry_classes_calibrates_each_class():
    """Two symmetry classes whose errors differ in size and shape: the pooled calibration
    covers neither at its levels; the per-class factors and multipliers cover fresh
    errors of each; classes with few microstructures get the calibration of all classes."""
    rng = np.random.default_rng(5)

    def draw(n_micro, rows, order, size, heavy):
        group = np.repeat(np.arange(n_micro), rows)
        noise = rng.standard_t(3, (group.size, 2)) if heavy else rng.normal(size=(group.size, 2))
        return size * noise, np.full(group.size, order), group

    def both(n_micro):
        e1, o1, g1 = draw(n_micro, 20, 1, 2.0, True)
        e8, o8, g8 = draw(n_micro, 20, 8, 0.5, False)
        return np.vstack([e1, e8]), np.r_[o1, o8], np.r_[g1, g8 + n_micro]

    err, order, group = both(400)
    std = np.ones_like(err)
    pooled = fit_calibration(err, np.zeros_like(err), std).multipliers
    factor, table = fit_symmetry_classes(err, std, order, group)
    assert factor.shape == (4, 2) and table.shape == (4, 19)
    # orders 2 and 4 have no rows: the calibration of all classes together
    every_factor, every_table = fit_symmetry_classes(err, std, np.ones_like(order), group)
    np.testing.assert_array_equal(factor[1:3], every_factor[1:3])
    np.testing.assert_array_equal(table[1:3], every_table[1:3])
    # the size of each class shows in κ·k_p (a Gaussian of std 0.5: κ·k_0.7 = 0.5 z_0.7)
    p70 = LEVELS_P.index(0.7)
    assert factor[3, 0] * table[3, p70] == pytest.approx(0.5 * 1.0364, rel=0.05)
    fresh, fresh_order, _ = both(400)
    for row, value in ((0, 1), (3, 8)):
        rows = fresh_order == value
        e, s = fresh[rows], factor[row] * np.ones_like(fresh[rows])
        assert calibration_error(e, s, multipliers=table[row]) < 0.015
        assert calibration_error(fresh[rows], np.ones_like(e), multipliers=pooled) > 0.05
    # 5 microstructures per class: too few for their own quantiles
    err, order, group = both(5)
    factor, table = fit_symmetry_classes(err, std[: err.shape[0]], order, group)
    assert np.all(factor == factor[0]) and np.all(table == table[0])
    with pytest.raises(ValueError, match="symmetry orders"):
        fit_symmetry_classes(err, std[: err.shape[0]], order + 2, group)
    with pytest.raises(ValueError, match="whole orbit"):
        fit_symmetry_classes(err * [1.0, 0.0], std[: err.shape[0]], order, group)


def test_fit_symmetry_classes_calibrates_each_component():
    """Components whose errors differ in shape as well as size (a Gaussian, and a
    Student-t(3) a tenth as large, as the mechanical Σ11 and Σ12): one factor for both
    leaves one component over- and the other under-covered; the factors per component
    cover fresh errors of each. The components of an orbit share one factor."""
    rng = np.random.default_rng(7)

    def draw(n):
        g = rng.normal(size=(n, 2))
        return np.column_stack([g, 0.1 * rng.standard_t(3, size=n)])

    err = draw(20000)
    group = np.arange(err.shape[0]) // 20
    order = np.full(err.shape[0], 8)
    ones = np.ones_like(err)
    factor, table = fit_symmetry_classes(err, ones, order, group)
    fresh = draw(20000)
    shared = fit_calibration(err, np.zeros_like(err), ones).multipliers
    for j in range(3):
        e = fresh[:, j]
        assert calibration_error(e, np.full(e.size, factor[3, j]), multipliers=table[3]) < 0.02
        assert calibration_error(e, np.ones(e.size), multipliers=shared) > 0.08
    assert factor[3, 0] != factor[3, 1]  # fitted apart: sampling noise
    tied, tied_table = fit_symmetry_classes(err, ones, order, group, ((0, 1), (2,)))
    assert tied[3, 0] == tied[3, 1] and tied[3, 0] == pytest.approx(factor[3, 0], rel=0.05)
    e = fresh[:, 2]
    assert calibration_error(e, np.full(e.size, tied[3, 2]), multipliers=tied_table[3]) < 0.02
    with pytest.raises(ValueError, match="partition"):
        fit_symmetry_classes(err, ones, order, group, ((0, 1),))


def test_fit_cell_error_head_recovers_log_linear_scale():
    """Per-cell errors of RMS exp(b + w·z) are recovered from 8 states per cell."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(400, 5))
    w, b = (
        np.array([[0.5, -0.3, 0.0, 0.2, 0.0], [0.0, 0.4, 0.1, 0.0, -0.2]]),
        np.array([-3.0, -2.0]),
    )
    cells = np.repeat(np.arange(400), 8)
    err = np.exp(b + z @ w.T)[cells] * rng.choice([-1.0, 1.0], size=(cells.size, 2))
    weight, bias = fit_cell_error_head(z, err, cells, ridge=1e-6)
    # exact up to the 1e-3 × RMS offset inside the log
    np.testing.assert_allclose(weight, w, atol=3e-3)
    np.testing.assert_allclose(bias, b, atol=3e-3)
    with pytest.raises(ValueError, match="without rows"):
        fit_cell_error_head(z, err[:8], cells[:8])


def test_interval_multipliers():
    gauss = gaussian_multipliers((0.5, 0.95))
    np.testing.assert_allclose(interval_multipliers((0.5, 0.95)), gauss)
    table = 2.0 * gaussian_multipliers(LEVELS_P)
    np.testing.assert_allclose(
        interval_multipliers((0.5, 0.68, 0.99), table), 2 * gaussian_multipliers((0.5, 0.68, 0.99))
    )
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        interval_multipliers(1.0)
    with pytest.raises(ValueError, match="19 values > 0"):
        interval_multipliers(0.5, table[:5])


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
    """The example configs parse and describe the shipped models' families and domains."""
    from neuroscale_coupling.training.config import load_config

    path = Path(__file__).resolve().parents[1] / "examples" / "train" / f"{name}.toml"
    cfg = load_config(path)
    spec = cfg.data.generate.spec()
    bound = 2.0 if name == "thermal" else 0.04
    assert spec.domain.upper[0] == bound and spec.domain.lower[0] == -bound
    assert spec.material.physics == name and spec.n_samples >= 5000


@pytest.mark.parametrize("name", ["thermal", "mechanical"])
def test_shipped_models_are_small_and_were_trained_by_their_configs(name):
    """A shipped model file stays a few MB (its training images are bit-packed) and
    records the training config of examples/train, all its training cells among them."""
    from neuroscale_coupling.models import shipped_model_path
    from neuroscale_coupling.training.config import GenerateConfig, load_config

    path = shipped_model_path(name)
    assert os.path.getsize(path) < 4e6
    model, meta = load_model(path)
    # the std factors of components that the square's symmetries exchange are equal
    factor = model.class_std_factor.double().numpy()  # (4 classes, r)
    for orbit in response_orbits(name):
        np.testing.assert_array_equal(factor[:, list(orbit)], factor[:, [orbit[0]] * len(orbit)])
    recorded = GenerateConfig(**meta["extra"]["train_config"]["data"]["generate"]).spec()
    example = Path(__file__).resolve().parents[1] / "examples" / "train" / f"{name}.toml"
    assert recorded == load_config(example).data.generate.spec()
    train_ids = meta["extra"]["split_cells"]["train"]
    assert meta["reference_obj"]["train"].n_cells == len(train_ids)


def test_canonical_translation_in_training_and_split(dataset, tmp_path):
    """With ``canonical_translation`` the model's inputs are the canonical images in
    training and at inference: the trained model gives a translated cell bitwise the
    response, tangent and std of the original. The split keeps translated copies of a cell
    together (they are one microstructure)."""
    cfg = config(tmp_path, "canon", epochs=2, batch_size=64)
    cfg = dataclasses.replace(cfg, model={**dict(cfg.model), "canonical_translation": True})
    res = train(cfg, comm=MPI.COMM_SELF, dataset=dataset)
    _, meta = load_model(cfg.output.model)
    assert meta["extra"]["train_config"]["model"]["canonical_translation"] is True
    sur = Surrogate(res.model, res.metadata)
    images, states = dataset.sample_images()[:8], dataset.states[:8]
    a = sur.predict(images, states)
    b = sur.predict(np.roll(images, (3, 5), axis=(1, 2)), states)
    for k in ("response", "tangent", "std"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    # cell 1 made a translated copy of cell 0: both land in the same split
    imgs = dataset.images.copy()
    imgs[1] = np.roll(imgs[0], (2, 1), axis=(0, 1))
    parts = split(dataclasses.replace(dataset, images=imgs))
    where = [[k for k, p in enumerate(parts) if c in p.cell_ids] for c in dataset.cell_ids[:2]]
    assert where[0] == where[1] and len(where[0]) == 1
