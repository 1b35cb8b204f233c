"""Maps of per-quadrature-point closure data over the macro domain (PNG).

The surrogate closure reports, per point, why it fell back to the fine solver (0 = it did
not) and its predicted standard deviation; :func:`write_point_maps` gathers those with the
point coordinates to rank 0 and draws one scatter map each.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from mpi4py import MPI

from neuroscale_coupling.io import atomic_write

__all__ = ["write_point_maps"]


def write_point_maps(
    comm: MPI.Comm,
    coordinates: np.ndarray,
    maps: Mapping[str, np.ndarray],
    folder: Path | str,
    *,
    title: str,
    categories: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, str]:
    """Draw ``{name}.png`` in ``folder`` for every map (collective; rank 0 writes).

    coordinates: (n_local, ≥2) point coordinates; maps: name -> (n_local,) values.
    categories: for categorical maps, name -> labels of codes 1, 2, … (code 0 is drawn as
    "surrogate"). Returns {name: path} on rank 0, {} elsewhere.
    """
    xy = np.asarray(coordinates, dtype=float)[:, :2]
    all_xy = comm.gather(xy, root=0)
    gathered = {k: comm.gather(np.asarray(v), root=0) for k, v in maps.items()}
    if comm.rank != 0:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = np.concatenate(all_xy)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    categories = dict(categories or {})
    span = np.ptp(xy, axis=0) if xy.size else np.ones(2)
    size = (7.0, max(2.5, 7.0 * span[1] / max(span[0], 1e-12)))
    for name, parts in gathered.items():
        values = np.concatenate(parts)
        fig, ax = plt.subplots(figsize=size)
        if name in categories:
            labels = ["surrogate", *categories[name]]
            for code, label in enumerate(labels):
                sel = values == code
                if code == 0 or np.any(sel):
                    ax.scatter(*xy[sel].T, s=6, color=f"C{code}" if code else "0.8", label=label)
            n_fb = int(np.count_nonzero(values))
            ax.set_title(f"{title}: {name} ({n_fb} of {values.size} points)")
            ax.legend(loc="upper right", fontsize=8, markerscale=2)
        else:
            sc = ax.scatter(*xy.T, c=values, s=6, cmap="viridis")
            fig.colorbar(sc, ax=ax, label=name)
            ax.set_title(f"{title}: {name} (max {np.max(values, initial=0.0):.3g})")
        ax.set_aspect("equal")
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
        fig.tight_layout()
        path = out / f"{name}.png"
        atomic_write(path, lambda fh, fig=fig: fig.savefig(fh, format="png", dpi=110))
        plt.close(fig)
        paths[name] = str(path)
    return paths
