"""The structured grid of the finite-volume host: a 2D PETSc DMDA of cells on a rectangle,
its faces (the closure's points), the ghost cells of the boundary conditions and gathers.

Cells: ``nx × ny`` equal rectangles of size ``hx × hy`` on ``[x0, x1] × [y0, y1]``; the DMDA
has one unknown per cell (T at the cell centre), stencil width 1 with a BOX stencil and
GHOSTED boundaries, so every local (ghosted) array holds this rank's cells, one layer of
the neighbour ranks' cells and, at the domain edge, one layer of *physical ghost cells*
outside the domain. Cell ``(i, j)`` has centre ``(x0 + (i + ½) hx, y0 + (j + ½) hy)``.

Faces. x-face ``(i, j)``, ``0 <= i <= nx``, lies at ``x = x0 + i hx`` between cells
``L = (i − 1, j)`` and ``R = (i, j)``; y-face ``(i, j)``, ``0 <= j <= ny``, at
``y = y0 + j hy`` between ``L = (i, j − 1)`` and ``R = (i, j)``; the face normal ``e_a``
points from L to R. A face belongs to the rank that owns cell R (the last face of a row,
``i = nx`` or ``j = ny``, to the owner of L), so each face is owned once globally. The
closure's points are the owned *closure faces*: interior faces and faces on a Dirichlet
side; faces on the other sides carry a prescribed normal flux and no closure point.

Boundary ghost cells (affine in the interior cells, so the Jacobian's chain rule goes
through them): across a Dirichlet side ``T_ghost = 2 g(face centre) − T_P`` (the value
``g`` is met at the face: half-cell treatment); across a flux side ``T_ghost = T_P``
(mirror, used only by the tangential differences next to it); a corner ghost is the
bilinear extrapolation ``T_A + T_B − T_P`` of its two edge ghosts A, B and the diagonal
interior cell P.

Nothing here imports DOLFINx; ``mpi4py.MPI`` is imported before ``petsc4py`` (the
DOLFINx wheel's vendored petsc4py needs the MPI library that mpi4py loads).
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mpi4py import MPI

# isort: split
import numpy as np
from petsc4py import PETSc

from neuroscale_coupling.parallel import collective_call

__all__ = ["SIDES", "FVGrid"]

#: The four sides of the rectangle: x = x0, x = x1, y = y0, y = y1.
SIDES = ("left", "right", "bottom", "top")

#: Cell offsets of the 6-point face stencil (L, R, L−, L+, R−, R+): for an x-face the
#: ± neighbours are in y, for a y-face in x.
_STENCIL_X = ((-1, 0), (0, 0), (-1, -1), (-1, 1), (0, -1), (0, 1))
_STENCIL_Y = ((0, -1), (0, 0), (-1, -1), (1, -1), (-1, 0), (1, 0))


def values_at(value: float | Callable[[np.ndarray], np.ndarray], points: np.ndarray) -> np.ndarray:
    """A boundary or source value at points (k, 2): a number or ``value(points) -> (k,)``."""
    if callable(value):
        out = np.asarray(value(points), dtype=np.float64).reshape(-1)
        if out.shape != (points.shape[0],):
            raise ValueError(
                f"a value callback returned {out.shape} values for {points.shape[0]} points: "
                "return one value per point, shape (k,)"
            )
        return out
    return np.full(points.shape[0], float(value))


class FVGrid:
    """A DMDA of ``nx × ny`` cells on the rectangle ``lower``–``upper`` and its face tables.

    comm: the communicator (collective construction). dirichlet_sides: the sides (of
    :data:`SIDES`) with a Dirichlet value; the others carry a prescribed flux.
    proc_sizes: optional ranks per direction (PETSc chooses by default).

    Attributes (this rank):

    - ``da`` the DMDA; ``n_owned`` cells, their ``cell_centres`` (n_owned, 2) in the order
      of the global vector's local entries (i fastest);
    - ``n_faces`` closure faces and, per face (point order: owned x-faces, then owned
      y-faces, each row by row): ``face_coordinates`` (n_faces, 2), ``face_axis``
      (n_faces,) 0/1 (normal e1/e2), ``face_area`` (n_faces,), ``stencil`` (n_faces, 6)
      local ghosted indices of (L, R, L−, L+, R−, R+), ``weights`` (n_faces, 3, 6): the
      state (G1, G2, θ) = weights @ T[stencil] (normal component by the two-point
      difference, tangential by the average of L's and R's central differences, θ the
      average of T_L and T_R);
    - ``flux_cells`` (k,) local index of the interior cell of each owned flux-side face,
      ``flux_area`` (k,), ``flux_side`` (k,) index into :data:`SIDES`;
    - the physical ghosts ``ghost_index`` (g,), their source cell ``ghost_source`` (g,)
      and coefficient ``ghost_coef`` (g,): ``T[ghost] = coef · T[source] + constant``.
    """

    def __init__(
        self,
        comm: MPI.Comm,
        nx: int,
        ny: int,
        *,
        lower: Sequence[float] = (0.0, 0.0),
        upper: Sequence[float] = (1.0, 1.0),
        dirichlet_sides: Sequence[str] = ("left", "right"),
        proc_sizes: tuple[int, int] | None = None,
    ) -> None:
        if not (int(nx) >= 2 and int(ny) >= 2):
            raise ValueError(f"the grid needs at least 2 × 2 cells; got {nx} × {ny}")
        unknown = set(dirichlet_sides) - set(SIDES)
        if unknown:
            raise ValueError(f"unknown sides {sorted(unknown)}: choose from {SIDES}")
        self.comm = comm
        self.nx, self.ny = int(nx), int(ny)
        self.lower = np.array(lower, dtype=np.float64)
        self.upper = np.array(upper, dtype=np.float64)
        if np.any(self.upper <= self.lower):
            raise ValueError(f"upper {upper} must exceed lower {lower} in both directions")
        self.hx, self.hy = (self.upper - self.lower) / (self.nx, self.ny)
        self.cell_volume = float(self.hx * self.hy)
        self.dirichlet_sides = tuple(s for s in SIDES if s in set(dirichlet_sides))
        ghosted = PETSc.DM.BoundaryType.GHOSTED
        self.da = PETSc.DMDA().create(
            dim=2, sizes=(self.nx, self.ny), proc_sizes=proc_sizes, dof=1, stencil_width=1,
            boundary_type=(ghosted, ghosted), stencil_type=PETSc.DMDA.StencilType.BOX,
            comm=comm,
        )  # fmt: skip
        self.da.setUp()
        self._set_coordinates(self.da)
        (self.xs, self.ys), (self.mx, self.my) = self.da.getCorners()
        (self.gxs, self.gys), (self.gmx, self.gmy) = self.da.getGhostCorners()
        self.n_owned = self.mx * self.my
        self.n_ghosted = self.gmx * self.gmy
        self.local_to_global = np.asarray(self.da.getLGMap().getIndices(), dtype=np.int64)
        i, j = self.owned_ij()
        self.owned_local = self.local_index(i, j)
        self.cell_centres = self._centres(i, j)
        self._build_ghosts()
        self._build_faces()

    # ------------------------------------------------------------------ geometry
    def _set_coordinates(self, da: Any) -> None:
        (x0, y0), (x1, y1) = self.lower, self.upper
        da.setUniformCoordinates(
            x0 + self.hx / 2, x1 - self.hx / 2, y0 + self.hy / 2, y1 - self.hy / 2
        )

    def _centres(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return np.stack(
            [self.lower[0] + (i + 0.5) * self.hx, self.lower[1] + (j + 0.5) * self.hy], axis=1
        )

    def owned_ij(self) -> tuple[np.ndarray, np.ndarray]:
        """Cell indices (i, j) of the owned cells, each (n_owned,), in global-vector order."""
        j, i = np.meshgrid(
            np.arange(self.ys, self.ys + self.my), np.arange(self.xs, self.xs + self.mx),
            indexing="ij",
        )  # fmt: skip
        return i.reshape(-1), j.reshape(-1)

    def local_index(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Index into this rank's ghosted local array of cells (i, j) (any shape)."""
        return (np.asarray(j) - self.gys) * self.gmx + (np.asarray(i) - self.gxs)

    def cell_dm(self, dof: int, names: Sequence[str] | None = None) -> Any:
        """A DMDA with this grid's layout and ``dof`` values per cell, components named
        ``names`` (output fields; collective)."""
        da = self.da.duplicate(dof=dof)
        self._set_coordinates(da)
        for k, name in enumerate(names or ()):
            da.setFieldName(k, name)
        return da

    # ------------------------------------------------------------------ boundary ghosts
    def _build_ghosts(self) -> None:
        j, i = np.meshgrid(
            np.arange(self.gys, self.gys + self.gmy), np.arange(self.gxs, self.gxs + self.gmx),
            indexing="ij",
        )  # fmt: skip
        i, j = i.reshape(-1), j.reshape(-1)
        out_x = (i < 0) | (i >= self.nx)
        out_y = (j < 0) | (j >= self.ny)
        ghost = out_x | out_y
        i, j, out_x, out_y = i[ghost], j[ghost], out_x[ghost], out_y[ghost]
        i_in, j_in = np.clip(i, 0, self.nx - 1), np.clip(j, 0, self.ny - 1)
        side_x = np.where(i < 0, 0, 1)  # index into SIDES: left / right
        side_y = np.where(j < 0, 2, 3)  # bottom / top
        dirichlet = np.array([s in self.dirichlet_sides for s in SIDES])
        s_x = np.where(dirichlet[side_x], -1.0, 1.0)
        s_y = np.where(dirichlet[side_y], -1.0, 1.0)
        coef = np.where(out_x & out_y, s_x + s_y - 1.0, np.where(out_x, s_x, s_y))
        self.ghost_index = self.local_index(i, j)
        self.ghost_source = self.local_index(i_in, j_in)
        self.ghost_coef = coef
        # Dirichlet terms 2 g(face centre) of each ghost, by side: (ghost positions, points).
        x_face = np.where(i < 0, self.lower[0], self.upper[0])
        y_face = np.where(j < 0, self.lower[1], self.upper[1])
        x_mid = self.lower[0] + (i_in + 0.5) * self.hx
        y_mid = self.lower[1] + (j_in + 0.5) * self.hy
        self._dirichlet_terms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for side in self.dirichlet_sides:
            k = SIDES.index(side)
            if k < 2:
                where = np.flatnonzero(out_x & (side_x == k))
                pts = np.stack([x_face[where], y_mid[where]], axis=1)
            else:
                where = np.flatnonzero(out_y & (side_y == k))
                pts = np.stack([x_mid[where], y_face[where]], axis=1)
            self._dirichlet_terms[side] = (where, pts)

    def ghost_constants(
        self, values: Mapping[str, float | Callable[[np.ndarray], np.ndarray]]
    ) -> np.ndarray:
        """The constant part (g,) of the physical ghosts for the Dirichlet ``values`` (side ->
        number or ``g(points (k, 2)) -> (k,)``). Not collective."""
        const = np.zeros(self.ghost_index.size)
        for side, (where, pts) in self._dirichlet_terms.items():
            np.add.at(const, where, 2.0 * values_at(values[side], pts))
        return const

    def fill_ghosts(self, local: np.ndarray, constants: np.ndarray) -> None:
        """Set the physical ghost entries of a ghosted local array (n_ghosted,) in place."""
        local[self.ghost_index] = self.ghost_coef * local[self.ghost_source] + constants

    # ------------------------------------------------------------------ faces
    def _faces(self, axis: int) -> dict[str, np.ndarray]:
        """Owned faces normal to e_(axis+1): index arrays and classification."""
        n = (self.nx, self.ny)[axis]
        start, count = (self.xs, self.ys)[axis], (self.mx, self.my)[axis]
        along = np.arange(start, start + count + (1 if start + count == n else 0))
        o_start, o_count = (self.ys, self.my) if axis == 0 else (self.xs, self.mx)
        other = np.arange(o_start, o_start + o_count)
        if axis == 0:
            j, i = np.meshgrid(other, along, indexing="ij")
        else:
            j, i = np.meshgrid(along, other, indexing="ij")
        i, j = i.reshape(-1), j.reshape(-1)
        k = i if axis == 0 else j
        first, last = SIDES[2 * axis], SIDES[2 * axis + 1]
        lo = k == 0
        hi = k == n
        closure = ~(lo | hi)
        closure |= lo & (first in self.dirichlet_sides)
        closure |= hi & (last in self.dirichlet_sides)
        return {"i": i, "j": j, "lo": lo, "hi": hi, "closure": closure}

    def _build_faces(self) -> None:
        coords, axes, areas, stencils = [], [], [], []
        flux_cells, flux_area, flux_side = [], [], []
        h = (self.hx, self.hy)
        for axis, offsets in ((0, _STENCIL_X), (1, _STENCIL_Y)):
            f = self._faces(axis)
            c = f["closure"]
            i, j = f["i"][c], f["j"][c]
            stencils.append(
                np.stack([self.local_index(i + di, j + dj) for di, dj in offsets], axis=1)
            )
            x = self.lower[0] + (i + (0.0 if axis == 0 else 0.5)) * self.hx
            y = self.lower[1] + (j + (0.5 if axis == 0 else 0.0)) * self.hy
            coords.append(np.stack([x, y], axis=1))
            axes.append(np.full(i.size, axis, dtype=np.int64))
            areas.append(np.full(i.size, h[1 - axis]))
            for end, side in ((f["lo"], 2 * axis), (f["hi"], 2 * axis + 1)):
                sel = end & ~c
                if not np.any(sel):
                    continue
                fi, fj = f["i"][sel], f["j"][sel]
                fi = np.minimum(fi, self.nx - 1) if axis == 0 else fi
                fj = np.minimum(fj, self.ny - 1) if axis == 1 else fj
                flux_cells.append(self.local_index(fi, fj))
                flux_area.append(np.full(fi.size, h[1 - axis]))
                flux_side.append(np.full(fi.size, side, dtype=np.int64))
        self.face_coordinates = np.concatenate(coords).reshape(-1, 2)
        self.face_axis = np.concatenate(axes)
        self.face_area = np.concatenate(areas)
        self.stencil = np.concatenate(stencils).reshape(-1, 6).astype(np.int64)
        self.n_faces = int(self.face_axis.size)
        self.flux_cells = np.concatenate(flux_cells) if flux_cells else np.zeros(0, np.int64)
        self.flux_area = np.concatenate(flux_area) if flux_area else np.zeros(0)
        self.flux_side = np.concatenate(flux_side) if flux_side else np.zeros(0, np.int64)
        hx, hy = self.hx, self.hy
        tang = np.array([0.0, 0.0, -1.0, 1.0, -1.0, 1.0]) / 4
        normal = np.array([-1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
        mean = np.array([0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
        w_x = np.stack([normal / hx, tang / hy, mean])
        w_y = np.stack([tang / hx, normal / hy, mean])
        self.weights = np.where((self.face_axis == 0)[:, None, None], w_x, w_y)
        # The stencil through the ghost map: the real cell and coefficient of each entry.
        source = np.arange(self.n_ghosted)
        coef = np.ones(self.n_ghosted)
        source[self.ghost_index] = self.ghost_source
        coef[self.ghost_index] = self.ghost_coef
        self.stencil_source = source[self.stencil]
        self.stencil_coef = coef[self.stencil]
        self.n_faces_global = self.comm.allreduce(self.n_faces)

    def face_states(self, local: np.ndarray) -> np.ndarray:
        """Macro states (n_faces, 3) rows (G1, G2, θ) from a ghosted local array of T whose
        physical ghosts are filled (:meth:`fill_ghosts`). Not collective."""
        return np.einsum("mks,ms->mk", self.weights, local[self.stencil])

    # ------------------------------------------------------------------ cells and gathers
    def cells_at_faces(self, cell_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """The phase images (n_faces, n, n) of this rank's closure faces from
        ``cell_of(face_coordinates (n_faces, 2)) -> (n_faces, n, n)`` (collective: a
        failure of the callback on any rank raises on every rank). ``cell_of`` is also
        called on a rank without faces, with a (0, 2) array."""

        def run() -> np.ndarray:
            cells = np.asarray(cell_of(self.face_coordinates.copy()))
            if cells.ndim != 3 or cells.shape[0] != self.n_faces:
                raise ValueError(
                    f"cell_of returned shape {cells.shape} for {self.n_faces} faces: return "
                    "one image per face, (n_faces, n, n)"
                )
            return cells

        return collective_call(self.comm, run, "cell_of at the grid faces")

    def gather(self, vec: Any, root: int = 0) -> np.ndarray | None:
        """The whole field of a global vector of this grid's DMDA (or of ``cell_dm``) on
        ``root`` only, as (nx, ny) (or (nx, ny, dof)) indexed [i, j]; None elsewhere
        (collective). For tests and post-processing, not the solve."""
        da = vec.getDM() or self.da
        dof = da.getDof()
        natural = da.createNaturalVec()
        da.globalToNatural(vec, natural)
        if root != 0:
            raise ValueError("gather collects on rank 0 (PETSc.Scatter.toZero)")
        scatter, seq = PETSc.Scatter.toZero(natural)
        scatter.scatter(natural, seq, addv=PETSc.InsertMode.INSERT, mode=PETSc.ScatterMode.FORWARD)
        out = None
        if self.comm.rank == root:
            a = np.array(seq.getArray(readonly=True)).reshape(self.ny, self.nx, dof)
            a = a.transpose(1, 0, 2)
            out = a[..., 0] if dof == 1 else a
        scatter.destroy()
        seq.destroy()
        natural.destroy()
        return out
