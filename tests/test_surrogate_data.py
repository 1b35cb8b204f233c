"""Surrogate datasets: deterministic generation (1 rank = P ranks), responses equal direct
fine solves, Sobol states fill the domain, split by microstructure, atomic save/load,
per-scale wavelet normalization and exact inverse state/response normalization."""

import os

import numpy as np
import pytest
from mpi4py import MPI

pytest.importorskip("dolfinx_solver")

from conftest import assert_same_on_all_ranks

from neuroscale_coupling.cell.family import CellFamily, CellMember
from neuroscale_coupling.cell.laws import ThermalPhase
from neuroscale_coupling.cell.materials import ThermalMaterial, equino_material, phase_values
from neuroscale_coupling.data.dataset import Dataset, pack_images, unpack_images
from neuroscale_coupling.data.domain import StateDomain
from neuroscale_coupling.data.generate import generate
from neuroscale_coupling.data.spec import DatasetSpec
from neuroscale_coupling.data.split import split
from neuroscale_coupling.fine.fem import FESolver
from neuroscale_coupling.fine.protocol import FineSolveError
from neuroscale_coupling.surrogate.inputs import WaveletNormalizer
from neuroscale_coupling.surrogate.normalization import Normalization

THERMAL = ThermalMaterial(
    phases=(ThermalPhase(k0=1.0, alpha=0.3, beta=0.5), ThermalPhase(k0=10.0, alpha=-0.2, beta=1.0))
)
FAMILY = CellFamily(
    (
        CellMember("circular_inclusion", ranges={"volume_fraction": (0.05, 0.6)}),
        CellMember(
            "random_inclusions",
            fixed={"n_inclusions": 3},
            ranges={"volume_fraction": (0.05, 0.4)},
        ),
    ),
    n=16,
)
DOMAIN = StateDomain.for_material(THERMAL, (-2.0, -2.0, 0.0), (2.0, 2.0, 1.0))
SPEC = DatasetSpec(THERMAL, FAMILY, DOMAIN, n_cells=10, states_per_cell=4, seed=7)


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return generate(SPEC, comm=MPI.COMM_WORLD, progress=False)


def test_generation_deterministic_and_rank_independent(dataset, comm):
    serial = generate(SPEC, comm=MPI.COMM_SELF, progress=False)
    for name in ("images", "cell_index", "states", "response", "tangent", "newton_iterations"):
        np.testing.assert_array_equal(getattr(serial, name), getattr(dataset, name), err_msg=name)
    assert serial.cells == dataset.cells
    assert_same_on_all_ranks(comm, dataset.response)
    assert_same_on_all_ranks(comm, dataset.tangent)
    other = generate(
        DatasetSpec(THERMAL, FAMILY, DOMAIN, n_cells=10, states_per_cell=4, seed=8),
        comm=MPI.COMM_SELF,
        progress=False,
    )
    assert not np.array_equal(other.states, dataset.states)
    assert dataset.metadata["generation"]["ranks"] == comm.size


def test_skipped_cells_are_not_solved(dataset, comm):
    """generate(skip=…): the other cells keep their draw index, states and responses."""
    skip = np.zeros(SPEC.n_cells, dtype=bool)
    skip[[0, 3, 4, 9]] = True
    seen = []

    def mask(images):
        seen.append(images.shape[0])
        return skip

    part = generate(SPEC, comm=comm, progress=False, skip=mask)
    keep = np.flatnonzero(~skip)
    np.testing.assert_array_equal(part.cell_ids, keep)
    full = dataset.select_cells(keep)
    for name in ("images", "cell_index", "states", "response", "tangent"):
        np.testing.assert_array_equal(getattr(part, name), getattr(full, name), err_msg=name)
    assert part.cells == full.cells and seen == [SPEC.n_cells]
    none = generate(SPEC, comm=comm, progress=False, skip=lambda ims: np.ones(len(ims), bool))
    assert none.n_cells == 0 and len(none) == 0


def test_shapes_and_metadata(dataset):
    n = SPEC.n_samples
    assert dataset.images.shape == (10, 16, 16) and dataset.images.dtype == np.int8
    assert dataset.states.shape == (n, 3)
    assert dataset.response.shape == (n, 2) and dataset.tangent.shape == (n, 2, 3)
    np.testing.assert_array_equal(np.bincount(dataset.cell_index), np.full(10, 4))
    assert dataset.spec == SPEC
    assert {c["generator"] for c in dataset.cells} <= {"circular_inclusion", "random_inclusions"}
    vf = [c["params"]["volume_fraction"] for c in dataset.cells]
    assert all(0.05 <= v <= 0.6 for v in vf)
    assert np.all(dataset.newton_iterations >= 1)


def test_responses_equal_direct_solves(dataset):
    solver = FESolver(THERMAL)
    for p in (0, 5, 17, len(dataset) - 1):
        image = dataset.images[dataset.cell_index[p]].astype(np.int64)
        direct = solver.solve(image, dataset.states[p])
        np.testing.assert_allclose(direct.response[0], dataset.response[p], rtol=0, atol=1e-12)
        np.testing.assert_allclose(direct.tangent[0], dataset.tangent[p], rtol=0, atol=1e-11)


def test_states_fill_domain():
    states = DOMAIN.sample(256, 3)
    assert np.all(DOMAIN.contains(states))
    lo, hi = np.asarray(DOMAIN.lower), np.asarray(DOMAIN.upper)
    width = hi - lo
    np.testing.assert_array_less(states.min(0) - lo, 0.01 * width)
    np.testing.assert_array_less(hi - states.max(0), 0.01 * width)
    # Sobol: each of 16 equal bins per component holds 16 ± 2 of the 256 points.
    for j in range(3):
        counts = np.histogram(states[:, j], bins=16, range=(lo[j], hi[j]))[0]
        assert counts.min() >= 14 and counts.max() <= 18, counts
    np.testing.assert_array_equal(states, DOMAIN.sample(256, 3))


def test_inner_states_concentrate_small_loads_only():
    """inner_fraction: that share of the states lies in the shrunk box (G only, θ keeps its
    range); all lie in the domain; inner_fraction = 0 is the plain Sobol sample."""
    import dataclasses

    def seed():
        return np.random.SeedSequence(5)

    plain = dataclasses.replace(SPEC, n_cells=64, states_per_cell=8)
    np.testing.assert_array_equal(plain.sample_states(seed()), DOMAIN.sample(512, seed()))
    spec = dataclasses.replace(plain, inner_fraction=0.5, inner_scale=0.25)
    states = spec.sample_states(seed())
    assert states.shape == (512, 3) and np.all(DOMAIN.contains(states))
    inner = np.all(np.abs(states[:, :2]) <= 0.5, axis=1)
    # the outer Sobol half also puts 1/16 of its points in the inner box
    assert 256 + 10 <= inner.sum() <= 256 + 26, inner.sum()
    assert states[inner, 2].min() < 0.05 and states[inner, 2].max() > 0.95
    assert DatasetSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="inner_fraction"):
        dataclasses.replace(SPEC, inner_fraction=1.5)


def test_domain_distance_outside():
    d = DOMAIN.distance_outside([[0.0, 0.0, 0.5], [3.0, 0.0, 0.5], [0.0, -2.0, -1.0], [0, 0, 1]])
    np.testing.assert_allclose(d, [0.0, 0.5, 2.0, 0.0])
    np.testing.assert_array_equal(DOMAIN.contains([[3.0, 0, 0.5]], tol=0.5), [True])
    with pytest.raises(ValueError, match="shape"):
        DOMAIN.contains(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="lower < upper"):
        StateDomain((0.0,), (0.0,), ("a",))


def test_family_draw_reproducible():
    a, ra = FAMILY.draw(16, 5)
    b, rb = FAMILY.draw(16, 5)
    np.testing.assert_array_equal(a, b)
    assert ra == rb
    assert {r["generator"] for r in ra} == {"circular_inclusion", "random_inclusions"}
    mech = CellFamily(
        (
            CellMember("centre_and_corner_fibres", ranges={"volume_fraction": (0.3, 0.6)}),
            CellMember("circular_inclusion", ranges={"volume_fraction": (0.3, 0.6)}),
        ),
        n=16,
    )
    images, _ = mech.draw(8, 0)
    fractions = images.reshape(8, -1).mean(1)
    assert np.all((fractions > 0.2) & (fractions < 0.7))
    with pytest.raises(ValueError, match="no parameter"):
        CellMember("laminate", ranges={"radius": (0.1, 0.2)})
    with pytest.raises(ValueError, match="unknown cell generator"):
        CellMember("nope")


def test_split_by_microstructure(dataset):
    spec = DatasetSpec(THERMAL, FAMILY, DOMAIN, n_cells=40, states_per_cell=2, seed=1)
    images, records = spec.family.draw(40, 0)
    n = 80
    big = Dataset(
        images=images,
        cell_ids=np.arange(40),
        cell_index=np.repeat(np.arange(40), 2),
        states=np.zeros((n, 3)),
        response=np.zeros((n, 2)),
        tangent=np.zeros((n, 2, 3)),
        newton_iterations=np.zeros(n, dtype=np.int64),
        cells=records,
        metadata={"spec": spec.to_dict()},
    )
    # tolerance: one cell's share of the samples (the split deals whole cells)
    for data, tol in ((big, 0.05), (dataset, 0.1)):
        train, val, test = split(data, seed=3)
        assert len(train) + len(val) + len(test) == len(data)
        train_images = {im.tobytes() for im in train.images}
        for part in (val, test):
            assert len(part) > 0
            assert not train_images & {im.tobytes() for im in part.images}
            assert not set(train.cell_ids) & set(part.cell_ids)
        assert not set(val.cell_ids) & set(test.cell_ids)
        for part, f in zip((train, val, test), (0.7, 0.15, 0.15), strict=True):
            assert abs(len(part) / len(data) - f) <= tol + 1e-12, (len(part), len(data))
            assert part.metadata["split"]["name"] in ("train", "val", "test")
        # samples keep their data: a test sample's image and state match the original
        k = test.cell_ids[test.cell_index[0]]
        np.testing.assert_array_equal(test.images[test.cell_index[0]], data.images[k])
    a = split(dataset, seed=3)[2]
    b = split(dataset, seed=3)[2]
    np.testing.assert_array_equal(a.cell_ids, b.cell_ids)


def test_split_groups_identical_images():
    images = np.zeros((12, 8, 8), dtype=np.int8)
    for c in range(12):  # 6 distinct images, each twice (cells 2g, 2g + 1)
        images[c, 0, : c // 2 + 1] = 1
    data = Dataset(
        images=images,
        cell_ids=np.arange(12),
        cell_index=np.arange(12),
        states=np.zeros((12, 3)),
        response=np.zeros((12, 2)),
        tangent=np.zeros((12, 2, 3)),
        newton_iterations=np.zeros(12, dtype=np.int64),
    )
    train, val, test = split(data, seed=0)
    for part in (val, test):
        assert not {im.tobytes() for im in train.images} & {im.tobytes() for im in part.images}
        assert len(part) >= 2


def test_save_load_roundtrip_and_atomic(dataset, tmp_path, monkeypatch):
    import torch

    path = tmp_path / f"data_{MPI.COMM_WORLD.rank}.pt"
    dataset.save(path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "neuroscale-dataset"
    back = Dataset.load(path)
    for name in ("images", "cell_ids", "cell_index", "states", "response", "tangent"):
        np.testing.assert_array_equal(getattr(back, name), getattr(dataset, name))
    assert back.images.dtype == np.int8
    assert back.cells == dataset.cells and back.spec == SPEC
    good = path.read_bytes()

    real_save = torch.save

    def crashing_save(obj, fh):
        real_save(obj, fh)
        fh.seek(0)
        fh.write(b"garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        dataset.save(path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("n_phases, bits", [(1, 1), (2, 1), (3, 2), (5, 3), (128, 7)])
def test_images_are_packed_to_the_bits_of_their_phase_ids(n_phases, bits):
    rng = np.random.default_rng(n_phases)
    images = rng.integers(0, n_phases, size=(7, 5, 5)).astype(np.int8)
    images[0, 0, 0] = n_phases - 1
    packed, b = pack_images(images)
    assert b == bits and packed.dtype == np.uint8 and packed.size == -(-bits * images.size // 8)
    back = unpack_images(packed, b, images.shape)
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, images)
    with pytest.raises(ValueError, match=r"0\.\.127"):
        pack_images(np.array([[[-1, 0]]]))


def test_dataset_files_hold_one_bit_a_voxel_and_version_1_still_loads(dataset):
    import torch

    payload = dataset.to_payload()
    assert payload["format_version"] == 2 and payload["image_bits"] == 1
    assert payload["images"].numel() == -(-dataset.images.size // 8)
    old = {**payload, "format_version": 1, "images": torch.from_numpy(dataset.images.copy())}
    for p in (payload, old):
        np.testing.assert_array_equal(Dataset.from_payload(p).images, dataset.images)
    with pytest.raises(ValueError, match=r"format version 3.*regenerate"):
        Dataset.from_payload({**payload, "format_version": 3})


def test_failed_solve_is_collective_and_named(comm):
    spec = DatasetSpec(
        THERMAL,
        FAMILY,
        DOMAIN,
        n_cells=2 * comm.size,
        states_per_cell=2,
        solver_options={"max_newton": 1},
    )
    with pytest.raises((FineSolveError, RuntimeError), match=r"sample \d+ \(cell \d+"):
        generate(spec, comm=comm, progress=False)


def test_spec_checks():
    with pytest.raises(ValueError, match="components"):
        DatasetSpec(equino_material(), FAMILY, DOMAIN, n_cells=2, states_per_cell=1)
    short = StateDomain((0.0, 0.0), (1.0, 1.0), ("G1", "G2"))
    with pytest.raises(ValueError, match="components"):
        DatasetSpec(THERMAL, FAMILY, short, n_cells=2, states_per_cell=1)
    with pytest.raises(ValueError, match="solver"):
        DatasetSpec(THERMAL, FAMILY, DOMAIN, n_cells=2, states_per_cell=1, solver="x")
    with pytest.raises(TypeError, match="cannot be stored"):
        DatasetSpec(
            THERMAL, FAMILY, DOMAIN, n_cells=2, states_per_cell=1, solver_options={"a": object()}
        )


def test_wavelet_normalizer_unit_variance(dataset):
    images, _ = FAMILY.draw(24, 11)
    for wavelet in ("haar", "db2"):
        wav = WaveletNormalizer.fit(images, THERMAL, levels=3, wavelet=wavelet)
        coeffs = wav.transform(images)
        assert [c.shape for c in coeffs] == [
            (24, 2, 2),
            (24, 3, 2, 2),
            (24, 3, 4, 4),
            (24, 3, 8, 8),
        ]
        np.testing.assert_allclose(coeffs[0].mean(), 0.0, atol=1e-12)
        np.testing.assert_allclose(coeffs[0].std(), 1.0, rtol=1e-12)
        for c in coeffs[1:]:
            np.testing.assert_allclose(c.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)
            np.testing.assert_allclose(c.std(axis=(0, 2, 3)), 1.0, rtol=1e-12)
        field = phase_values(THERMAL)[images]
        np.testing.assert_allclose(wav.inverse(coeffs), field, atol=1e-12)
        # batched transform equals one image at a time
        one = wav.transform(images[3])
        for c, c1 in zip(coeffs, one, strict=True):
            np.testing.assert_allclose(c[3], c1, atol=1e-14)
        assert WaveletNormalizer.from_dict(wav.to_dict()) == wav
    with pytest.raises(ValueError, match="multiple of"):
        WaveletNormalizer.fit(images, THERMAL, levels=5)


def test_state_response_normalization_inverse(dataset):
    train = split(dataset, seed=0)[0]
    norm = Normalization.fit(train, DOMAIN)
    u = norm.states_to(dataset.states)
    assert np.all(np.abs(u) <= 1.0)
    np.testing.assert_allclose(norm.states_from(u), dataset.states, rtol=0, atol=1e-15)
    np.testing.assert_allclose(DOMAIN.to_unit(dataset.states), u, atol=1e-15)
    y = norm.response_to(train.response)
    np.testing.assert_allclose(np.sqrt(np.mean(y**2, axis=0)), 1.0, rtol=1e-12)
    np.testing.assert_allclose(norm.response_from(y), train.response, rtol=1e-15, atol=0)
    tn = norm.tangent_to(dataset.tangent)
    np.testing.assert_allclose(norm.tangent_from(tn), dataset.tangent, rtol=1e-15, atol=0)
    # the normalized tangent is the derivative of the normalized response: chain rule
    j = 1
    hw = norm.state_half_width[j]
    expect = dataset.tangent[:, :, j] * hw / np.asarray(norm.response_scale)
    np.testing.assert_allclose(tn[:, :, j], expect, rtol=1e-14)
    assert Normalization.from_dict(norm.to_dict()) == norm


def test_inner_states_log_uniform_down_to_the_smallest_scale():
    """inner_scale_min spreads the inner states over every order of magnitude between the
    two scales; without it the inner box has the single scale (older specs load as such)."""
    spec = DatasetSpec(THERMAL, FAMILY, DOMAIN, n_cells=50, states_per_cell=40, inner_fraction=0.5)
    assert spec.inner_scale_min == spec.inner_scale
    old = {k: v for k, v in spec.to_dict().items() if k != "inner_scale_min"}
    assert DatasetSpec.from_dict(old) == spec
    wide = DatasetSpec.from_dict({**spec.to_dict(), "inner_scale_min": 0.001})
    assert DatasetSpec.from_dict(wide.to_dict()) == wide
    # largest |G_i| of each state over the box half-width 2
    load = np.abs(wide.sample_states(np.random.SeedSequence(3))[:, :2]).max(1) / 2.0
    assert load.min() < 0.003 and np.mean(load < 0.01) > 0.1
    narrow = np.abs(spec.sample_states(np.random.SeedSequence(3))[:, :2]).max(1) / 2.0
    assert np.mean(narrow < 0.01) < 0.02
    with pytest.raises(ValueError, match="inner_scale_min"):
        DatasetSpec(THERMAL, FAMILY, DOMAIN, n_cells=2, states_per_cell=1, inner_scale_min=0.5)
