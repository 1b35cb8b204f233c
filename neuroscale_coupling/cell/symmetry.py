"""The symmetry group of the square (D4) acting on cells, macro states and responses.

For isotropic phases the cell problem is equivariant: if g is one of the 8 orthogonal
maps R of the square, then solving on the transformed cell ``transform_image(image, R)``
at the transformed state ``S_R state`` gives ``Q_R response`` and the tangent
``Q_R tangent S_R⁻¹``. Thermal: S_R = diag(R, 1) acting on (G, θ), Q_R = R. Mechanical
(tensor-shear Voigt): S_R = Q_R = the matrix of ε ↦ R ε Rᵀ in (ε11, ε22, ε12).
:func:`d4_average` makes any predictor exactly equivariant by averaging over the group.
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from neuroscale_coupling.cell.translation import canonical_translation

__all__ = [
    "D4",
    "SYMMETRY_ORDERS",
    "response_matrix",
    "response_orbits",
    "state_matrix",
    "symmetry_order",
    "transform_image",
    "transform_result",
    "voigt_rotation",
]

_ROT90 = np.array([[0, -1], [1, 0]])
_REFLECT = np.array([[1, 0], [0, -1]])
#: The 8 orthogonal 2×2 integer matrices of the square's symmetry group.
D4: tuple[np.ndarray, ...] = tuple(
    np.linalg.matrix_power(_ROT90, k) @ m
    for m in (np.eye(2, dtype=int), _REFLECT)
    for k in range(4)
)


def transform_image(image: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Image (…, n, n) of the cell mapped by x ↦ R (x − c) + c (c the cell centre)."""
    r = np.asarray(rotation)
    n = image.shape[-1]
    u = 2 * np.arange(n) - (n - 1)  # voxel centres relative to c, in units of h/2
    ui, uj = np.meshgrid(u, u, indexing="ij")
    # new(x) = old(Rᵀ x): source offsets, then back to indices.
    si = r[0, 0] * ui + r[1, 0] * uj
    sj = r[0, 1] * ui + r[1, 1] * uj
    return image[..., (si + n - 1) // 2, (sj + n - 1) // 2]


#: The possible values of :func:`symmetry_order` (orders of the subgroups of D4).
SYMMETRY_ORDERS = (1, 2, 4, 8)


def symmetry_order(images: np.ndarray) -> np.ndarray:
    """Number (B,) of the 8 maps of D4 that carry each periodic cell image (B, n, n) onto
    itself up to a periodic translation: 1 (no symmetry, e.g. random inclusions), 2, 4 or
    8 (the square's full symmetry: a centred disk, centre + corner fibres).

    The order fixes the form of the effective response: with order 8 the effective
    conductivity is isotropic and the effective stiffness has cubic symmetry."""
    im = np.asarray(images)
    if im.ndim != 3 or im.shape[1] != im.shape[2]:
        raise ValueError(f"images must have shape (B, n, n); got {im.shape}")
    b, size = im.shape[0], im.shape[1] * im.shape[2]
    ref = canonical_translation(im).reshape(b, size)
    same = [
        np.all(canonical_translation(transform_image(im, r)).reshape(b, size) == ref, axis=1)
        for r in D4
    ]
    return np.sum(same, axis=0).astype(np.int64)


def voigt_rotation(rotation: np.ndarray) -> np.ndarray:
    """Matrix (3, 3) of ε ↦ R ε Rᵀ in tensor-shear Voigt order (ε11, ε22, ε12)."""
    r = np.asarray(rotation, dtype=float)
    basis = (
        np.array([[1.0, 0.0], [0.0, 0.0]]),
        np.array([[0.0, 0.0], [0.0, 1.0]]),
        np.array([[0.0, 1.0], [1.0, 0.0]]),
    )
    cols = [r @ b @ r.T for b in basis]
    return np.array([[c[0, 0], c[1, 1], c[0, 1]] for c in cols]).T


def state_matrix(rotation: np.ndarray, physics: str) -> np.ndarray:
    """Matrix (d, d) acting on a macro state of ``physics`` ("thermal" or "mechanical")."""
    if physics == "thermal":
        s = np.eye(3)
        s[:2, :2] = rotation
        return s
    if physics == "mechanical":
        return voigt_rotation(rotation)
    raise ValueError(f"unknown physics {physics!r}: choose 'thermal' or 'mechanical'")


def response_matrix(rotation: np.ndarray, physics: str) -> np.ndarray:
    """Matrix (r, r) acting on a homogenized response of ``physics``."""
    if physics == "thermal":
        return np.asarray(rotation, dtype=float)
    if physics == "mechanical":
        return voigt_rotation(rotation)
    raise ValueError(f"unknown physics {physics!r}: choose 'thermal' or 'mechanical'")


def response_orbits(physics: str) -> tuple[tuple[int, ...], ...]:
    """The response components that the square's symmetries map onto one another (up to
    sign), as index tuples: thermal ((0, 1),) (Q1 ↔ Q2), mechanical ((0, 1), (2,))
    (Σ11 ↔ Σ22; Σ12 onto ±itself). A std that stays equivariant under these maps gives
    the components of one orbit the same calibration."""
    support = np.zeros(response_matrix(D4[0], physics).shape, dtype=bool)
    for rotation in D4:
        support |= np.abs(response_matrix(rotation, physics)) > 1e-12
    return tuple(sorted({tuple(np.flatnonzero(row).tolist()) for row in support}))


def transform_result(
    response: np.ndarray, tangent: np.ndarray, rotation: np.ndarray, physics: str
) -> tuple[np.ndarray, np.ndarray]:
    """Map a response (N, r) and tangent (N, r, d) to those of the transformed problem."""
    q = response_matrix(rotation, physics)
    s_inv = np.linalg.inv(state_matrix(rotation, physics))
    return response @ q.T, q @ tangent @ s_inv


def _np(x: Any) -> np.ndarray:
    """A numpy array of x (numpy, or a torch tensor without importing torch here)."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def d4_average(
    predict_fn: Callable[[np.ndarray, np.ndarray], Sequence[Any]],
    images: np.ndarray,
    states: np.ndarray,
    physics: str,
) -> tuple[np.ndarray, ...]:
    """Average a predictor over the 8 symmetries of the square; the result is D4-equivariant.

    predict_fn(images (N, n, n), states (N, d)) returns (response (N, r), tangent (N, r, d))
    or (response, tangent, std (N, r)) (numpy or torch). For each R in D4 the predictor runs
    on (transform_image(image, R), S_R state) and its output is mapped back:
    response Q_R⁻¹ f, tangent Q_R⁻¹ F' S_R (the exact derivative of the averaged response),
    variance (Q_R⁻¹)∘² std² (Q_R is a signed permutation). Returns the averaged tuple of the
    same length; std = sqrt of the mean mapped variance.
    """
    images = np.asarray(images)
    states = np.asarray(states, dtype=float)
    acc: list[np.ndarray] | None = None
    for rot in D4:
        s_r = state_matrix(rot, physics)
        q_inv = np.linalg.inv(response_matrix(rot, physics))
        out = [_np(o) for o in predict_fn(transform_image(images, rot), states @ s_r.T)]
        if len(out) not in (2, 3):
            raise ValueError(f"predict_fn must return 2 or 3 arrays; got {len(out)}")
        mapped = [out[0] @ q_inv.T, q_inv @ out[1] @ s_r]
        if len(out) == 3:
            mapped.append(out[2] ** 2 @ (q_inv**2).T)
        acc = mapped if acc is None else [a + b for a, b in zip(acc, mapped, strict=True)]
    res = [a / len(D4) for a in acc]
    if len(res) == 3:
        res[2] = np.sqrt(res[2])
    return tuple(res)
