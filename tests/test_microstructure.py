"""Cell generators: volume fractions, periodicity, validation."""

import numpy as np
import pytest

from neuroscale_coupling.cell import microstructure as ms
from neuroscale_coupling.cell.symmetry import D4, transform_image


def test_laminate_is_voxel_aligned_with_exact_fraction():
    im = ms.laminate(16, 0.25, normal=1)
    assert ms.phase_fractions(im).tolist() == [0.75, 0.25]
    assert np.all(im == im[:, :1])  # constant along x2: layers normal to e1
    im2 = ms.laminate(16, 0.25, normal=2)
    np.testing.assert_array_equal(im2, im.T)


@pytest.mark.parametrize("n", [64, 256])
def test_circular_inclusion_fraction_converges(n):
    vf = 0.3
    im = ms.circular_inclusion(n, vf)
    # Staircase error of the voxelised disk: O(1/n) at most.
    assert abs(ms.phase_fractions(im)[1] - vf) < 2.0 / n


def test_inclusion_is_periodic_across_the_boundary():
    im = ms.circular_inclusion(32, 0.2, centre=(0.0, 0.0))
    shifted = ms.circular_inclusion(32, 0.2, centre=(0.5, 0.5))
    np.testing.assert_array_equal(np.roll(shifted, (16, 16), axis=(0, 1)), im)


def test_centre_and_corner_fibres_fraction_and_symmetry():
    im = ms.centre_and_corner_fibres(128, 0.5)
    assert abs(ms.phase_fractions(im)[1] - 0.5) < 0.01
    for r in D4:  # the cell is invariant under the square's symmetries
        np.testing.assert_array_equal(transform_image(im, r), im)


def test_random_inclusions_reproducible_non_overlapping():
    a = ms.random_inclusions(64, 0.3, n_inclusions=5, seed=7)
    b = ms.random_inclusions(64, 0.3, n_inclusions=5, seed=7)
    c = ms.random_inclusions(64, 0.3, n_inclusions=5, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs(ms.phase_fractions(a)[1] - 0.3) < 0.03  # disjoint disks: fractions add up


def test_random_inclusions_too_dense_is_a_clear_error():
    with pytest.raises(ValueError, match="could not place"):
        ms.random_inclusions(32, 0.69, n_inclusions=40, min_gap=0.05, max_attempts=200)


def test_checkerboard():
    im = ms.checkerboard(8, 2)
    assert ms.phase_fractions(im).tolist() == [0.5, 0.5]
    assert im[0, 0] == 0 and im[4, 0] == 1 and im[4, 4] == 0
    with pytest.raises(ValueError, match="multiple of tiles"):
        ms.checkerboard(9, 2)


def test_from_array_validation():
    assert ms.from_array(np.array([[True, False], [False, True]])).dtype == np.int64
    with pytest.raises(ValueError, match="square 2D"):
        ms.from_array(np.zeros((3, 4)))
    with pytest.raises(TypeError, match="integer phase ids"):
        ms.from_array(np.full((4, 4), 0.5))
    with pytest.raises(ValueError, match=">= 0"):
        ms.from_array(-np.ones((4, 4), dtype=int))
    with pytest.raises(ValueError, match="material has 2 phases"):
        ms.from_array(np.full((4, 4), 2), n_phases=2)


def test_make_cell_names_the_choices():
    np.testing.assert_array_equal(
        ms.make_cell("laminate", 8, volume_fraction=0.5), ms.laminate(8, 0.5)
    )
    with pytest.raises(ValueError, match="unknown cell generator"):
        ms.make_cell("honeycomb", 8)
    with pytest.raises(ValueError, match="volume_fraction"):
        ms.make_cell("circular_inclusion", 8, volume_fraction=0.9)


def test_d4_image_action_is_a_group_action():
    im = ms.random_inclusions(16, 0.3, n_inclusions=3, seed=1)
    for r in D4:
        for s in D4:
            np.testing.assert_array_equal(
                transform_image(transform_image(im, s), r), transform_image(im, r @ s)
            )


@pytest.mark.parametrize("dtype", [np.int8, np.int64])
def test_distinct_images_match_numpy_unique(dtype):
    rng = np.random.default_rng(4)
    base = rng.integers(0, 3, size=(7, 6, 6)).astype(dtype)
    images = base[rng.integers(0, 7, size=40)]
    uniq, row = ms.distinct_images(images)
    assert uniq.dtype == images.dtype and row.shape == (40,)
    np.testing.assert_array_equal(uniq[row], images)
    expected = np.unique(images.reshape(40, -1), axis=0)
    assert {u.tobytes() for u in uniq} == {e.tobytes() for e in expected.astype(dtype)}
    assert len(uniq) == len(expected)
    empty, rows = ms.distinct_images(images[:0])
    assert empty.shape == (0, 6, 6) and rows.shape == (0,)
    with pytest.raises(ValueError, match=r"\(B, n, n\)"):
        ms.distinct_images(images[0])
