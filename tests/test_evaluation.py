"""``neuroscale evaluate``: metrics against a direct numpy computation on the held-out test
split, calibration error range, attention weights summing to 1, the JSON/PNG report, fresh
held-out data via --dataset, and refusal (or flagging) of training cells passed as test
data. Tiny thermal dataset (8×8 cells, FE solver), tiny model trained once per module."""

import json
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

pytest.importorskip("dolfinx_solver")
pytest.importorskip("matplotlib")

from surrogate_cases import GENERATE, TINY_MODEL

from neuroscale_coupling.cell.symmetry import symmetry_order
from neuroscale_coupling.cell.translation import canonical_translation
from neuroscale_coupling.cli import main
from neuroscale_coupling.data.generate import generate
from neuroscale_coupling.data.split import split, translation_groups
from neuroscale_coupling.surrogate.calibration import gaussian_multipliers
from neuroscale_coupling.surrogate.model_file import Surrogate, load_model
from neuroscale_coupling.training.config import GenerateConfig, TrainConfig
from neuroscale_coupling.training.evaluate import (
    evaluate_model,
)
from neuroscale_coupling.training.held_out import fresh_data, training_images
from neuroscale_coupling.training.train import train

RANK = MPI.COMM_WORLD.rank
# fresh held-out cells: another generator and seed, same material, resolution and domain
FRESH = {
    **GENERATE,
    "members": [
        {
            "generator": "random_inclusions",
            "fixed": {"n_inclusions": 3},
            "ranges": {"volume_fraction": [0.2, 0.4]},
        }
    ],
    "n_cells": 3,
    "states_per_cell": 4,
    "seed": 11,
}
SPLIT = (0.6, 0.2, 0.2)
TRAINING = {
    "batch_size": 32,
    "lr": 2e-2,
    "progress": False,
    "patience": 0,
    "seed": 3,
    "epochs": 6,
    "augment": False,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model path, full training dataset, its file) — each rank trains its own copy."""
    folder = tmp_path_factory.mktemp(f"evaluate{RANK}")
    data_cfg = GenerateConfig(**GENERATE)
    dataset = generate(data_cfg.spec(), comm=MPI.COMM_SELF, progress=False)
    data_file = folder / "data.pt"
    dataset.save(data_file)
    cfg = TrainConfig.from_dict(
        {
            "data": {"dataset": str(data_file), "split": list(SPLIT), "split_seed": 4},
            "model": {**TINY_MODEL, "layers": 2},
            "training": TRAINING,
            "output": {"model": str(folder / "model.pt")},
        }
    )
    train(cfg, comm=MPI.COMM_SELF, dataset=dataset)
    return folder / "model.pt", dataset, data_file


def _rel(e: np.ndarray, y: np.ndarray, axis=None) -> np.ndarray:
    return np.sqrt((e**2).sum(axis=axis)) / np.sqrt((y**2).sum(axis=axis))


def test_metrics_on_test_split_match_numpy(trained, tmp_path):
    model_path, dataset, _ = trained
    res = evaluate_model(model_path, output=tmp_path / "ev", comm=MPI.COMM_SELF)
    m = res.metrics
    # the test split of the training data, disjoint from the recorded train/val cells
    _, meta = load_model(model_path)
    _, _, test = split(dataset, SPLIT, seed=4)
    np.testing.assert_array_equal(res.data.cell_ids, test.cell_ids)
    used = set(meta["extra"]["split_cells"]["train"]) | set(meta["extra"]["split_cells"]["val"])
    assert used.isdisjoint(m["cell_ids"]) and m["n_cells"] >= 2
    assert m["held_out"] is True and m["leak_check"] == "images"
    assert m["source"] == "test split of the training dataset"
    # direct numpy computation
    sur = Surrogate.load(model_path)
    pred = sur.predict(test.sample_images(), test.states)
    q, t, s = pred.response, pred.tangent, pred.std
    eq, et = q - test.response, t - test.tangent
    assert m["mse_response"] == pytest.approx(np.mean(eq**2), rel=1e-12)
    assert m["mse_tangent"] == pytest.approx(np.mean(et**2), rel=1e-12)
    rs = np.asarray(meta["normalization"]["response_scale"])
    hw = np.asarray(meta["normalization"]["state_half_width"])
    assert m["mse_response_normalized"] == pytest.approx(np.mean((eq / rs) ** 2), rel=1e-12)
    assert m["mse_tangent_normalized"] == pytest.approx(
        np.mean((et * hw / rs[:, None]) ** 2), rel=1e-12
    )
    assert m["rel_l2_response"] == pytest.approx(_rel(eq, test.response), rel=1e-12)
    assert m["rel_l2_tangent"] == pytest.approx(_rel(et, test.tangent), rel=1e-12)
    np.testing.assert_allclose(
        [m["rel_l2_response_components"][k] for k in ("Q1", "Q2")],
        _rel(eq, test.response, axis=0),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        m["rel_l2_tangent_components"], _rel(et, test.tangent, axis=0), rtol=1e-12
    )
    # calibration: |err| <= k_p std with the model's fitted multipliers at p = 0.05 … 0.95,
    # pooled components; the table is not the Gaussian one
    levels = np.arange(1, 20) * 0.05
    table = sur.model.interval_table.double().numpy()
    assert table.shape == (19,) and np.all(np.diff(table) >= 0)
    assert not np.allclose(table, gaussian_multipliers(levels))
    # each row's multipliers from its cell's symmetry class
    order = symmetry_order(test.images)[test.cell_index]
    k_rows = sur.model.interval_multipliers(levels, order)  # (19, N)
    rows = sur.model.class_interval_table.double().numpy()[np.searchsorted((1, 2, 4, 8), order)]
    np.testing.assert_allclose(k_rows, rows.T, rtol=1e-12)
    cov = np.array([np.mean(np.abs(eq) <= k[:, None] * s) for k in k_rows])
    assert m["calibration_error"] == pytest.approx(np.mean(np.abs(cov - levels)), abs=1e-12)
    assert 0 <= m["calibration_error"] <= 0.5
    for j, name in enumerate(m["response_names"]):
        cov_j = np.array([np.mean(np.abs(eq[:, j]) <= k * s[:, j]) for k in k_rows])
        assert m["calibration_error_components"][name] == pytest.approx(
            np.mean(np.abs(cov_j - levels)), abs=1e-12
        )
    assert m["coverage95"] == pytest.approx(np.mean(np.abs(eq) <= k_rows[-1][:, None] * s))
    assert m["std_scale"] == pytest.approx(meta["std_scale"])
    # spread over the distinct test microstructures, and the per-generator figures
    group = translation_groups(test.images)[test.cell_index]
    assert m["n_microstructures"] == np.unique(group).size
    for key in ("rel_l2_response", "rel_l2_tangent", "calibration_error"):
        lo, hi = m["interval_5_95"][key]
        assert lo <= hi
    lo, hi = m["interval_5_95"]["rel_l2_response"]
    assert lo <= m["rel_l2_response"] * (1 + 1e-12) and hi >= m["rel_l2_response"] * (1 - 1e-12)
    gens = np.array([c["generator"] for c in test.cells])[test.cell_index]
    assert sum(g["n_samples"] for g in m["by_generator"].values()) == len(test)
    for name, g in m["by_generator"].items():
        rows = gens == name
        assert g["rel_l2_response"] == pytest.approx(_rel(eq[rows], test.response[rows]), rel=1e-12)
        cov_g = np.array([np.mean(np.abs(eq[rows]) <= k[rows, None] * s[rows]) for k in k_rows])
        assert g["calibration_error"] == pytest.approx(np.mean(np.abs(cov_g - levels)), abs=1e-12)
    # attention per scale: a distribution over approx + 2 detail levels, per layer too
    att = np.asarray(m["attention_per_scale"])
    assert att.shape == (3,) and np.all(att >= 0)
    assert att.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(np.sum(m["attention_per_scale_per_layer"], axis=1), 1.0, atol=1e-6)
    assert m["scale_names"] == ["approx 2x2", "detail 2x2", "detail 4x4"]
    # files: JSON round-trips, PNGs are PNGs
    for key in ("json", "parity", "calibration", "attention"):
        assert Path(res.paths[key]).is_file(), key
    for key in ("parity", "calibration", "attention"):
        assert Path(res.paths[key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(Path(res.paths["json"]).read_text()) == m
    assert not list((tmp_path / "ev").glob(".tmp-*"))


def test_fresh_held_out_dataset(trained, tmp_path):
    model_path, _, _ = trained
    fresh = generate(GenerateConfig(**FRESH).spec(), comm=MPI.COMM_SELF, progress=False)
    path = tmp_path / "fresh.pt"
    fresh.save(path)
    res = evaluate_model(model_path, dataset=path, comm=MPI.COMM_SELF)
    m = res.metrics
    assert m["n_samples"] == 12 and m["n_cells"] == 3 and m["held_out"] is True
    assert m["source"] == f"file {path}" and res.paths == {}
    sur = Surrogate.load(model_path)
    q = sur.predict(fresh.sample_images(), fresh.states).response
    assert m["mse_response"] == pytest.approx(np.mean((q - fresh.response) ** 2), rel=1e-12)
    # a fresh dataset of another resolution is refused
    other = generate(
        GenerateConfig(**{**FRESH, "n": 16}).spec(), comm=MPI.COMM_SELF, progress=False
    )
    with pytest.raises(ValueError, match="model takes 8x8"):
        evaluate_model(model_path, dataset=other, comm=MPI.COMM_SELF)


def test_training_cells_refused_or_flagged(trained, tmp_path):
    model_path, dataset, _ = trained
    _, meta = load_model(model_path)
    train_ids = meta["extra"]["split_cells"]["train"][:2]
    rows = [int(np.flatnonzero(dataset.cell_ids == c)[0]) for c in train_ids]
    leaked = dataset.select_cells(rows)
    path = tmp_path / "leaked.pt"
    leaked.save(path)
    with pytest.raises(ValueError, match="training/validation cell"):
        evaluate_model(model_path, dataset=path, comm=MPI.COMM_SELF)
    res = evaluate_model(model_path, dataset=path, comm=MPI.COMM_SELF, allow_overlap=True)
    assert res.metrics["held_out"] is False
    assert res.metrics["overlap_cell_ids"] == sorted(train_ids)


def test_training_images_redrawn_from_generate_table(trained):
    """Without a dataset file the train/val images are redrawn from the generate table."""
    model_path, dataset, _ = trained
    model, meta = load_model(model_path)
    meta["extra"]["train_config"]["data"] = {"generate": GENERATE, "dataset": None}
    ids, images = training_images(Surrogate(model, meta))
    np.testing.assert_array_equal(images, dataset.images[ids])
    rec = meta["extra"]["split_cells"]
    assert sorted(ids.tolist()) == sorted(rec["train"] + rec["val"])


def test_cli_evaluate(trained, capsys):
    comm = MPI.COMM_WORLD
    model_path, dataset, _ = trained
    model = Path(comm.bcast(str(model_path)))  # rank 0's model: one output folder for all
    assert main(["evaluate", str(model)]) == 0
    out = capsys.readouterr().out
    folder = model.with_name("model_evaluation")
    if comm.rank == 0:
        assert "rel_l2_response" in out and "calibration_error" in out
        assert "attention per scale: approx 2x2" in out and "metrics.json" in out
    for name in ("metrics.json", "parity.png", "calibration.png", "attention.png"):
        assert (folder / name).is_file(), name
    m = json.loads((folder / "metrics.json").read_text())
    assert m["held_out"] is True and m["model"] == str(model)
    # every rank computed the same metrics
    assert comm.allgather(m["mse_response"]) == [m["mse_response"]] * comm.size
    assert main(["evaluate", str(model.with_name("missing.pt"))]) == 2
    assert "does not exist" in capsys.readouterr().err
    leaked = model.with_name("leaked_cli.pt")
    _, meta = load_model(model)
    if comm.rank == 0:
        dataset.select_cells([int(meta["extra"]["split_cells"]["val"][0])]).save(leaked)
    comm.barrier()
    args = ["evaluate", str(model), "--dataset", str(leaked), "--output", str(folder / "x")]
    assert main(args) == 2
    assert "--allow-overlap" in capsys.readouterr().err
    assert main([*args, "--allow-overlap"]) == 0
    if comm.rank == 0:
        assert "WARNING: cells" in capsys.readouterr().out
    comm.barrier()


def test_recorded_relative_paths_resolve_against_config_folder(trained, tmp_path):
    """A model file recording paths relative to its training config (models/m.pt,
    data/d.pt) finds its dataset from any working directory; a missing file stays as
    recorded (then regenerated from the generate table)."""
    model_path, _, _ = trained
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.pt").write_bytes(b"")
    model, meta = load_model(model_path)
    meta["extra"]["train_config"] = {
        "data": {"generate": {"save": "data/d.pt"}, "dataset": None},
        "output": {"model": "models/m.pt"},
    }
    out = Surrogate(model, meta, path=tmp_path / "models" / "m.pt").training_config
    assert out["data"]["generate"]["save"] == str(tmp_path / "data" / "d.pt")
    assert meta["extra"]["train_config"]["data"]["generate"]["save"] == "data/d.pt"  # untouched
    gone = Surrogate(model, meta, path=tmp_path / "elsewhere" / "models" / "m.pt")
    assert gone.training_config["data"]["generate"]["save"] == "data/d.pt"
    assert Surrogate(model, meta).training_config["data"]["generate"]["save"] == "data/d.pt"


def test_fresh_cells_drawn_from_the_recorded_family(trained):
    """--fresh: cells drawn from the recorded generate table with another seed, solved,
    minus those whose image is a training/validation image up to translation."""
    model_path, dataset, _ = trained
    model, meta = load_model(model_path)
    with pytest.raises(ValueError, match=r"no data\.generate table"):
        fresh_data(Surrogate(model, meta), 4, 5, comm=MPI.COMM_SELF)
    data_cfg = {"generate": dict(GENERATE), "split": list(SPLIT), "split_seed": 4}
    meta["extra"]["train_config"] = {**meta["extra"]["train_config"], "data": data_cfg}
    data, dropped = fresh_data(Surrogate(model, meta), 12, 5, comm=MPI.COMM_SELF)
    # the same draw, and the leak rule applied independently
    full = generate(
        GenerateConfig(**{**GENERATE, "n_cells": 12, "seed": 5}).spec(),
        comm=MPI.COMM_SELF,
        progress=False,
    )
    used = set(meta["extra"]["split_cells"]["train"]) | set(meta["extra"]["split_cells"]["val"])
    known = {
        im.tobytes()
        for c, im in zip(dataset.cell_ids, canonical_translation(dataset.images), strict=True)
        if int(c) in used
    }
    keep = [
        i for i, im in enumerate(canonical_translation(full.images)) if im.tobytes() not in known
    ]
    assert 0 < len(keep) < 12 and dropped == 12 - len(keep)
    np.testing.assert_array_equal(data.cell_ids, full.cell_ids[keep])
    np.testing.assert_array_equal(data.response, full.select_cells(keep).response)
    res = evaluate_model(Surrogate(model, meta), fresh=(12, 5), comm=MPI.COMM_SELF)
    assert res.metrics["source"] == (
        f"12 fresh cells (seed 5), {dropped} of them training/validation cells, dropped"
    )
    assert res.metrics["held_out"] is True and res.metrics["n_cells"] == len(keep)
    with pytest.raises(ValueError, match="n_cells=0"):
        fresh_data(Surrogate(model, meta), 0, 5, comm=MPI.COMM_SELF)
