"""Dataset generation: the fine solves of a :class:`~neuroscale_coupling.data.spec.
DatasetSpec`, MPI-parallel (pipeline step 4)::

    spec = DatasetSpec(material, family, domain, n_cells=64, states_per_cell=16)
    data = generate(spec, comm=MPI.COMM_WORLD)       # collective; every rank gets it all
    train, val, test = split(data, seed=0)           # by microstructure (data.split)
    data.save("thermal.pt"); Dataset.load("thermal.pt")

* **States** come from :meth:`~neuroscale_coupling.data.spec.DatasetSpec.sample_states`
  (scrambled Sobol sequences, ``scipy.stats.qmc``, over the
  :class:`~neuroscale_coupling.data.domain.StateDomain` and, for a share, over its inner
  box, in random order), seeded by the spec's seed; cell ``c`` gets the rows
  ``[c k, (c + 1) k)`` (``k = states_per_cell``).
* **Cells** come from the spec's :class:`~neuroscale_coupling.cell.family.CellFamily`,
  drawn from a second scrambled Sobol sequence.
* The cells are block-distributed over the ranks, every rank gets the whole dataset
  (:func:`generate`); the record and its file are :mod:`~neuroscale_coupling.data.dataset`.
"""

import time
from collections.abc import Callable

import numpy as np
from mpi4py import MPI

from neuroscale_coupling.data.dataset import Dataset
from neuroscale_coupling.data.spec import DatasetSpec
from neuroscale_coupling.fine.protocol import FineSolveError
from neuroscale_coupling.log import get_logger
from neuroscale_coupling.parallel import collective_call

__all__ = ["DatasetSpec", "generate"]


_log = get_logger(__name__)


def _allgather_rows(comm: MPI.Comm, rows: np.ndarray) -> np.ndarray:
    """Concatenate every rank's rows (n_r, …) in rank order on every rank (collective)."""
    rows = np.ascontiguousarray(rows)
    counts = np.array(comm.allgather(rows.shape[0]), dtype=np.int64)
    width = int(np.prod(rows.shape[1:], dtype=np.int64))
    out = np.empty((int(counts.sum()), *rows.shape[1:]), dtype=rows.dtype)
    mpi_type = MPI._typedict[rows.dtype.char]
    comm.Allgatherv(
        [rows.reshape(-1), mpi_type], [out.reshape(-1), (counts * width).tolist(), mpi_type]
    )
    return out


def generate(
    spec: DatasetSpec,
    *,
    comm: MPI.Comm | None = None,
    progress: bool = True,
    skip: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Dataset:
    """Solve the spec's (cell, state) samples with its fine solver (collective over comm).

    Cells are drawn from ``spec.family`` and states from a scrambled Sobol sequence over
    ``spec.domain``, both from ``spec.seed`` (identical on every rank and for any number
    of ranks). Cells are block-distributed over the ranks (rank r solves cells
    [C r / P, C (r + 1) / P) with all their states); results are gathered on every rank,
    so the returned Dataset is the same on all ranks and the same as on one rank.
    A tqdm progress bar (rank 0's share) shows when ``progress``. A failed fine solve
    raises on every rank: FineSolveError naming the sample, its cell and its state on the
    failing rank, RuntimeError quoting it on the others. comm: default MPI.COMM_WORLD.
    skip: images (C, n, n) of the drawn cells → bool (C,), True for cells not to solve
    (e.g. known cells); the others keep their draw index as cell id and their states.
    """
    from tqdm.auto import tqdm

    import neuroscale_coupling

    comm = MPI.COMM_WORLD if comm is None else comm
    t0 = time.perf_counter()
    cell_seed, state_seed = np.random.SeedSequence(spec.seed).spawn(2)
    images, records = spec.family.draw(spec.n_cells, cell_seed)
    states = spec.sample_states(state_seed)
    k = spec.states_per_cell
    r, d = spec.material.response_dim, spec.material.state_dim
    solved = np.arange(spec.n_cells, dtype=np.int64)
    if skip is not None:
        solved = np.flatnonzero(~np.asarray(skip(images), dtype=bool).reshape(-1))
        images, records = images[solved], [records[int(i)] for i in solved]
        states = states.reshape(spec.n_cells, k, d)[solved].reshape(-1, d)
    n_cells = solved.size
    first = n_cells * comm.rank // comm.size
    last = n_cells * (comm.rank + 1) // comm.size
    n_local = (last - first) * k

    def work() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        response = np.zeros((n_local, r))
        tangent = np.zeros((n_local, r, d))
        iterations = np.zeros(n_local, dtype=np.int64)
        if n_local == 0:
            return response, tangent, iterations
        solver = spec.make_solver()
        bar = tqdm(
            total=n_local,
            desc=f"fine solves ({spec.solver}, rank 0 of {comm.size})",
            unit="sample",
            disable=not progress or comm.rank != 0,
        )
        with bar:
            for c in range(first, last):
                lo = (c - first) * k
                sl = slice(c * k, (c + 1) * k)
                try:
                    res = solver.solve(images[c].astype(np.int64), states[sl])
                except FineSolveError as exc:
                    g = c * k + exc.index
                    raise FineSolveError(
                        g,
                        states[g],
                        f"sample {g} (cell {solved[c]}: {records[c]}): {exc.reason}",
                    ) from exc
                response[lo : lo + k] = res.response
                tangent[lo : lo + k] = res.tangent
                iterations[lo : lo + k] = res.newton_iterations
                bar.update(k)
        return response, tangent, iterations

    t_solve = time.perf_counter()
    response, tangent, iterations = collective_call(comm, work, "dataset generation")
    t_solve = time.perf_counter() - t_solve
    response = _allgather_rows(comm, response)
    tangent = _allgather_rows(comm, tangent)
    iterations = _allgather_rows(comm, iterations)
    seconds = time.perf_counter() - t0
    max_solve = comm.allreduce(t_solve, op=MPI.MAX)
    n_samples = n_cells * k
    _log.info(
        "generated %d samples (%d cells) in %.2f s on %d ranks (%.3g s per sample per rank)",
        n_samples,
        n_cells,
        seconds,
        comm.size,
        max_solve * comm.size / max(n_samples, 1),
    )
    metadata = {
        "spec": spec.to_dict(),
        "version": neuroscale_coupling.__version__,
        "physics": spec.material.physics,
        "state_names": list(spec.material.state_names),
        "response_names": list(spec.material.response_names),
        "generation": {
            "ranks": comm.size,
            "seconds": seconds,
            "solve_seconds_max_rank": max_solve,
            "seconds_per_sample_per_rank": max_solve * comm.size / max(n_samples, 1),
        },
    }
    return Dataset(
        images=images,
        cell_ids=solved,
        cell_index=np.repeat(np.arange(n_cells, dtype=np.int64), k),
        states=states,
        response=response,
        tangent=tangent,
        newton_iterations=iterations,
        cells=records,
        metadata=metadata,
    )
