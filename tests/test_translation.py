"""Canonical translation of periodic cells: translated copies of a cell become the same
image, centred cells stay as they are, and a model with ``canonical_translation`` gives a
translated cell exactly the response, tangent and std of the original. The symmetry order
of a cell (its symmetries of the square up to translation) follows from it."""

import numpy as np
import pytest

from neuroscale_coupling.cell import microstructure as ms
from neuroscale_coupling.cell.symmetry import D4, SYMMETRY_ORDERS, symmetry_order, transform_image
from neuroscale_coupling.cell.translation import canonical_translation

N = 32
SHIFTS = [(a, b) for a in range(0, N, 3) for b in range(0, N, 7)]


@pytest.mark.parametrize(
    "image",
    [
        ms.circular_inclusion(N, 0.37),
        ms.centre_and_corner_fibres(N, 0.45),
        ms.random_inclusions(N, 0.3, n_inclusions=4, seed=3),
        ms.laminate(N, 0.3),
        ms.checkerboard(N, 2),
    ],
    ids=["inclusion", "centre+corner", "random", "laminate", "checkerboard"],
)
def test_translated_copies_become_one_image(image):
    canon = canonical_translation(image)
    assert canon.dtype == image.dtype and np.array_equal(np.sort(canon, None), np.sort(image, None))
    moved = np.stack([np.roll(image, s, axis=(0, 1)) for s in SHIFTS])
    out = canonical_translation(moved)
    assert out.shape == moved.shape
    for k in range(len(SHIFTS)):
        np.testing.assert_array_equal(out[k], canon, err_msg=str(SHIFTS[k]))


def test_centred_cells_and_uniform_images_stay():
    for vf in np.linspace(0.05, 0.6, 12):
        for im in (ms.circular_inclusion(N, vf), ms.centre_and_corner_fibres(N, vf)):
            np.testing.assert_array_equal(canonical_translation(im), im)
    flat = np.ones((N, N), dtype=np.int64)
    np.testing.assert_array_equal(canonical_translation(flat), flat)
    with pytest.raises(ValueError, match=r"\(B, n, n\)"):
        canonical_translation(np.zeros(N))


def test_shipped_mechanical_model_is_translation_invariant():
    from neuroscale_coupling.models import shipped_model_path
    from neuroscale_coupling.surrogate.model_file import Surrogate

    sur = Surrogate.load(shipped_model_path("mechanical"))
    assert sur.model.config.canonical_translation
    n = sur.model.config.image_size
    cell = ms.circular_inclusion(n, 0.37)
    states = sur.domain.sample(16, seed=1)
    base = sur.predict(np.broadcast_to(cell, (16, n, n)), states)
    moved = sur.predict(np.broadcast_to(np.roll(cell, (5, 9), axis=(0, 1)), (16, n, n)), states)
    for k in ("response", "tangent", "std"):
        np.testing.assert_array_equal(getattr(base, k), getattr(moved, k))
    assert sur.family_ratio(cell[None])[0] == sur.family_ratio(np.roll(cell, 7, axis=1)[None])[0]


def _l_shape(n: int) -> np.ndarray:
    """Two bars meeting at a corner: symmetric under the diagonal reflection only."""
    im = np.zeros((n, n), dtype=np.int8)
    im[2:5, 2 : n // 2] = 1
    im[2 : n // 2, 2:5] = 1
    return im


@pytest.mark.parametrize(
    ("image", "order"),
    [
        (ms.circular_inclusion(N, 0.37), 8),
        (ms.centre_and_corner_fibres(N, 0.45), 8),
        (ms.checkerboard(N, 2), 8),
        (ms.laminate(N, 0.3), 4),
        (_l_shape(N), 2),
        (ms.random_inclusions(N, 0.3, n_inclusions=4, seed=3), 1),
    ],
    ids=["inclusion", "centre+corner", "checkerboard", "laminate", "L", "random"],
)
def test_symmetry_order_up_to_translation(image, order):
    """The order is the size of the image's symmetry subgroup of D4; translated and
    transformed copies have the same order."""
    copies = np.stack(
        [np.roll(image, s, axis=(0, 1)) for s in SHIFTS[:5]]
        + [transform_image(image, r) for r in D4]
    )
    np.testing.assert_array_equal(symmetry_order(copies), order)
    assert order in SYMMETRY_ORDERS
    with pytest.raises(ValueError, match=r"\(B, n, n\)"):
        symmetry_order(image)
    assert symmetry_order(np.zeros((0, N, N), dtype=np.int8)).shape == (0,)
