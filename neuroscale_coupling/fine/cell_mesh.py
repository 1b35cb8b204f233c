"""Conforming meshes of the periodic unit cell Y = [0, 1]² (numpy only).

A :class:`CellMesh` is a plain triangle or quadrilateral mesh whose nodes on opposite
sides of the cell match (x1 = 0 ↔ x1 = 1, x2 = 0 ↔ x2 = 1, the four corners alike), so
that a solver can identify them for periodicity; every element carries a phase id.
``FESolver.solve`` accepts one in place of a phase image.

``circular_inclusion_mesh`` builds an O-grid around a centred disk: a square core block,
a ring from the core to the circle and a ring from the circle to the cell boundary. All
element edges of the rings run along rays from the centre or along the layer curves, so
the circle is followed by element edges (a polygon whose nodes lie on it), and the cell
boundary carries ``m`` equal elements per side.
"""

from dataclasses import dataclass

import numpy as np

__all__ = ["CellMesh", "circular_inclusion_mesh", "image_mesh"]


@dataclass(frozen=True, eq=False)
class CellMesh:
    """A mesh of the unit cell with a phase per element.

    points: (M, 2) float64 node coordinates in [0, 1]².
    cells: (C, 3) triangles or (C, 4) quadrilaterals, int64 node indices; vertices are
    listed counter-clockwise (for quadrilaterals: around the element, not in tensor
    order).
    phase: (C,) int64 phase id of each element.

    Instances compare by identity and are hashable, so a solver can cache its compiled
    problem per mesh; the arrays are stored read-only.
    """

    points: np.ndarray
    cells: np.ndarray
    phase: np.ndarray

    def __post_init__(self) -> None:
        pts = np.array(self.points, dtype=np.float64)
        cells = np.asarray(self.cells)
        phase = np.asarray(self.phase)
        if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 3:
            raise ValueError(f"points must have shape (M, 2) with M >= 3; got {pts.shape}")
        if not np.all(np.isfinite(pts)):
            raise ValueError("points hold NaN or Inf: give finite node coordinates")
        if pts.min() < -1e-12 or pts.max() > 1 + 1e-12:
            raise ValueError(
                f"points lie in [{pts.min():.6g}, {pts.max():.6g}]: a cell mesh covers the "
                "unit square [0, 1]²; rescale the coordinates"
            )
        if cells.ndim != 2 or cells.shape[1] not in (3, 4) or cells.shape[0] == 0:
            raise ValueError(
                f"cells must have shape (C, 3) (triangles) or (C, 4) (quadrilaterals); "
                f"got {cells.shape}"
            )
        if cells.dtype.kind not in "iu":
            raise TypeError(f"cells hold integer node indices; got dtype {cells.dtype}")
        cells = np.array(cells, dtype=np.int64)
        if cells.min() < 0 or cells.max() >= pts.shape[0]:
            raise ValueError(
                f"cells index nodes {cells.min()}..{cells.max()} but there are "
                f"{pts.shape[0]} points"
            )
        if phase.shape != (cells.shape[0],):
            raise ValueError(
                f"phase must have shape ({cells.shape[0]},) (one id per cell); got {phase.shape}"
            )
        if phase.dtype.kind not in "iu":
            raise TypeError(f"phase holds integer phase ids; got dtype {phase.dtype}")
        phase = np.array(phase, dtype=np.int64)
        if phase.min() < 0:
            raise ValueError(f"phase ids must be >= 0; got {phase.min()}")
        area = _signed_areas(pts, cells)
        if np.any(area <= 0):
            bad = int(np.flatnonzero(area <= 0)[0])
            raise ValueError(
                f"cell {bad} (nodes {cells[bad].tolist()}) has signed area {area[bad]:.3g}: "
                "list the vertices of every cell counter-clockwise"
            )
        if abs(area.sum() - 1.0) > 1e-9:
            raise ValueError(
                f"the cells cover an area of {area.sum():.12g}, not 1: a cell mesh must tile "
                "the unit square exactly once"
            )
        for name, arr in (("points", pts), ("cells", cells), ("phase", phase)):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @property
    def n_cells(self) -> int:
        return int(self.cells.shape[0])

    @property
    def area_fractions(self) -> np.ndarray:
        """Area of each phase id 0..max(phase), shape (max(phase) + 1,)."""
        return np.bincount(self.phase, weights=_signed_areas(self.points, self.cells))


def _signed_areas(points: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Shoelace area of each polygon cell, shape (C,); positive when counter-clockwise."""
    x = points[cells]  # (C, k, 2)
    xn = np.roll(x, -1, axis=1)
    return 0.5 * np.sum(x[..., 0] * xn[..., 1] - xn[..., 0] * x[..., 1], axis=1)


def image_mesh(image: np.ndarray) -> CellMesh:
    """The voxel mesh of a phase image as a CellMesh: one quadrilateral per voxel.

    image: (n, n) integer phase ids, ``image[i, j]`` = voxel with centre
    ((i + 0.5)/n, (j + 0.5)/n). Nodes (i/n, j/n), i, j = 0..n, shape ((n+1)², 2).
    """
    img = np.asarray(image)
    if img.ndim != 2 or img.shape[0] != img.shape[1] or img.shape[0] < 1:
        raise ValueError(f"image must be a square 2D array; got shape {img.shape}")
    n = img.shape[0]
    c = np.arange(n + 1) / n
    x1, x2 = np.meshgrid(c, c, indexing="ij")
    points = np.stack([x1.ravel(), x2.ravel()], axis=1)
    node = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    corners = [node[:-1, :-1], node[1:, :-1], node[1:, 1:], node[:-1, 1:]]
    cells = np.stack(corners, axis=-1).reshape(-1, 4)
    return CellMesh(points=points, cells=cells, phase=img.reshape(-1))


def _square_ring(m: int) -> np.ndarray:
    """Integer points on the boundary of [0, m]², counter-clockwise from (0, 0): (4m, 2)."""
    k = np.arange(m)
    zero = np.zeros(m, dtype=np.int64)
    full = np.full(m, m, dtype=np.int64)
    return np.concatenate(
        [
            np.stack([k, zero], 1),  # bottom, x1 increasing
            np.stack([full, k], 1),  # right, x2 increasing
            np.stack([m - k, full], 1),  # top, x1 decreasing
            np.stack([zero, m - k], 1),  # left, x2 decreasing
        ]
    )


def circular_inclusion_mesh(
    volume_fraction: float,
    m: int,
    *,
    inner_layers: int | None = None,
    outer_layers: int | None = None,
    core: float = 0.5,
) -> CellMesh:
    """Periodic O-grid quadrilateral mesh of a centred disk (phase 1) in a matrix (phase 0).

    volume_fraction: nominal disk area π R² (0 < vf < π/4, so R < 1/2).
    m: elements along each side of the cell (and of the square core block).
    inner_layers / outer_layers: element layers of the ring between the core and the
    circle / the circle and the cell boundary (default ``max(1, round(m / 4))`` each, so
    that doubling m doubles every count: a uniformly refined family).
    core: half-width of the core block over R (0 < core < 1/√2).

    The mesh has m² + 4m (inner_layers + outer_layers) quadrilaterals; the disk is
    approximated by the inscribed 4m-gon whose nodes lie on the circle, so the phase-1
    area falls short of vf by O(1/m²). The cell boundary carries the nodes j/m on every
    side, so opposite sides match exactly.
    """
    vf = float(volume_fraction)
    if not 0.0 < vf < np.pi / 4:
        raise ValueError(
            f"volume_fraction={volume_fraction!r} must lie in (0, π/4) so that the disk "
            "fits inside the cell"
        )
    if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 1:
        raise ValueError(f"m={m!r}: give the number of elements per cell side, an integer >= 1")
    m = int(m)
    default = max(1, round(m / 4))
    l_in = default if inner_layers is None else int(inner_layers)
    l_out = default if outer_layers is None else int(outer_layers)
    if l_in < 1 or l_out < 1:
        raise ValueError(
            f"inner_layers={inner_layers!r}, outer_layers={outer_layers!r}: give at least 1"
        )
    if not 0.0 < core < 1 / np.sqrt(2):
        raise ValueError(f"core={core!r} must lie in (0, 1/√2) so the core stays inside the disk")
    radius = np.sqrt(vf / np.pi)
    a = core * radius
    centre = np.array([0.5, 0.5])

    # Core block: (m+1)² nodes c + a (2 P/m - 1), P on the integer grid.
    grid = np.stack(np.meshgrid(np.arange(m + 1), np.arange(m + 1), indexing="ij"), -1)
    core_pts = centre + a * (2.0 * grid.reshape(-1, 2) / m - 1.0)
    gid = np.arange((m + 1) ** 2).reshape(m + 1, m + 1)
    core_cells = np.stack([gid[:-1, :-1], gid[1:, :-1], gid[1:, 1:], gid[:-1, 1:]], -1)

    # Ring layers ℓ = 0 .. l_in + l_out along the rays through the core boundary nodes.
    ring = _square_ring(m)  # (4m, 2)
    s = 2.0 * ring / m - 1.0  # on the boundary of [-1, 1]²
    on_circle = s / np.linalg.norm(s, axis=1, keepdims=True)
    t_in = np.arange(1, l_in + 1)[:, None, None] / l_in
    t_out = np.arange(1, l_out + 1)[:, None, None] / l_out
    inner = (1 - t_in) * (a * s) + t_in * (radius * on_circle)
    outer = (1 - t_out) * (radius * on_circle) + t_out * (0.5 * s)
    ring_pts = centre + np.concatenate([inner, outer])  # (l_in + l_out, 4m, 2)
    ring_pts[-1] = ring / m  # the cell boundary exactly at j/m: opposite sides match bitwise
    n_ring = 4 * m
    n_core = core_pts.shape[0]
    layer_ids = np.empty((l_in + l_out + 1, n_ring), dtype=np.int64)
    layer_ids[0] = gid[ring[:, 0], ring[:, 1]]
    layer_ids[1:] = n_core + np.arange((l_in + l_out) * n_ring).reshape(l_in + l_out, n_ring)
    k = np.arange(n_ring)
    kp = (k + 1) % n_ring
    lo, hi = layer_ids[:-1], layer_ids[1:]
    # ring index runs counter-clockwise, layers outward: (ℓ,k) → (ℓ+1,k) → (ℓ+1,k+1) → (ℓ,k+1)
    ring_cells = np.stack([lo[:, k], hi[:, k], hi[:, kp], lo[:, kp]], -1)

    points = np.concatenate([core_pts, ring_pts.reshape(-1, 2)])
    cells = np.concatenate([core_cells.reshape(-1, 4), ring_cells.reshape(-1, 4)])
    phase = np.concatenate(
        [
            np.ones(m * m, dtype=np.int64),
            np.ones(l_in * n_ring, dtype=np.int64),
            np.zeros(l_out * n_ring, dtype=np.int64),
        ]
    )
    return CellMesh(points=np.clip(points, 0.0, 1.0), cells=cells, phase=phase)
