"""Image family distance: the two-point-correlation descriptor is exact (S2(0) = volume
fraction, a brute-force correlation agrees), invariant under translations and the
symmetries of the square; training cells sit at ratio 0, cells between them near or below
1, foreign microstructures far above; bad input is refused."""

import numpy as np
import pytest

from neuroscale_coupling.cell.microstructure import (
    checkerboard,
    circular_inclusion,
    laminate,
    random_inclusions,
)
from neuroscale_coupling.cell.symmetry import D4, transform_image
from neuroscale_coupling.surrogate.image_family import ImageFamily, correlation_descriptors

N = 32


def _brute_s2(image: np.ndarray, phase: int, lag: tuple[int, int]) -> float:
    chi = (image == phase).astype(float)
    return float(np.mean(chi * np.roll(chi, (-lag[0], -lag[1]), axis=(0, 1))))


def test_descriptor_is_the_normalized_autocovariance():
    im = random_inclusions(N, 0.3, n_inclusions=3, seed=1)
    d = correlation_descriptors(im[None], 2, radius=3)[0]
    vf = im.mean()
    assert d[0] == pytest.approx(vf, abs=1e-12)
    # lags of the fundamental domain 0 <= r2 <= r1 <= 3 after r = 0, D4-averaged by hand
    rows, cols = np.tril_indices(4)
    for k, (a, b) in enumerate(zip(rows[1:], cols[1:], strict=True)):
        images = [transform_image(im, g) for g in D4]
        s2 = np.mean([_brute_s2(x, 1, (a, b)) for x in images])
        assert d[1 + k] == pytest.approx((s2 - vf**2) / (vf * (1 - vf)), abs=1e-12)


def test_descriptor_invariant_under_translation_and_symmetry():
    im = random_inclusions(N, 0.35, n_inclusions=4, seed=7)
    variants = [np.roll(im, (5, -11), axis=(0, 1))] + [transform_image(im, g) for g in D4]
    d = correlation_descriptors(np.stack([im, *variants]), 2)
    np.testing.assert_allclose(d[1:], np.broadcast_to(d[0], d[1:].shape), atol=1e-12)


def test_three_phases_give_one_block_per_inclusion_phase():
    im = laminate(N, 0.5).copy()
    im[:4] = 2
    d = correlation_descriptors(im[None], 3, radius=2)
    assert d.shape == (1, 2 * 6)
    assert d[0, 0] == pytest.approx(np.mean(im == 1)) and d[0, 6] == pytest.approx(0.125)


def test_ratio_separates_foreign_cells_from_the_family():
    train = np.stack([circular_inclusion(N, v) for v in np.linspace(0.2, 0.5, 25)])
    fam = ImageFamily(train, 2)
    assert fam.ratio(train).max() == 0.0
    between = np.stack([circular_inclusion(N, v) for v in (0.27, 0.33, 0.41, 0.47)])
    shifted = np.roll(circular_inclusion(N, 0.3), (7, 3), axis=(0, 1))
    inside = fam.ratio(np.concatenate([between, shifted[None]]))
    assert inside.max() <= 1.0, inside
    foreign = np.stack([laminate(N, 0.3), checkerboard(N, 2), circular_inclusion(N, 0.7)])
    assert fam.ratio(foreign).min() > 2.0, fam.ratio(foreign)


def test_single_microstructure_family():
    cell = circular_inclusion(N, 0.3)
    fam = ImageFamily(np.stack([cell, cell]), 2)
    np.testing.assert_array_equal(
        fam.ratio(np.stack([cell, np.roll(cell, 4, axis=0), laminate(N, 0.3)])),
        [0.0, 0.0, np.inf],
    )


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="square cells"):
        correlation_descriptors(np.zeros((2, 4, 6)), 2)
    with pytest.raises(ValueError, match="two phases"):
        correlation_descriptors(np.zeros((2, 4, 4)), 1)
    with pytest.raises(ValueError, match="radius"):
        correlation_descriptors(np.zeros((2, 4, 4)), 2, radius=3)
    with pytest.raises(ValueError, match="no image"):
        ImageFamily(np.zeros((0, 4, 4)), 2)
    fam = ImageFamily(np.stack([laminate(8, 0.25), laminate(8, 0.5)]), 2)
    with pytest.raises(ValueError, match=r"\(N, 8, 8\)"):
        fam.ratio(np.zeros((1, 16, 16)))
