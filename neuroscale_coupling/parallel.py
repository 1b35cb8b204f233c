"""MPI helpers: balanced redistribution of point work and collective failure decisions.

Points are numbered globally by concatenating the ranks' local points in rank order.
``BlockPlan`` assigns the global range [N r / P, N (r + 1) / P) to rank r, so each rank
works on about N / P points whatever the ranks own; ``scatter`` sends per-point rows to
their workers and ``gather`` brings results back to the owners. All calls here are
collective over ``comm``, also on ranks that own no points.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

__all__ = ["BlockPlan", "collective_call", "gather", "scatter"]


@dataclass(frozen=True)
class BlockPlan:
    """Send/receive counts (in points) between this rank and every rank.

    send_counts[r]: how many of my points rank r works on; recv_counts[r]: how many of
    rank r's points I work on. Both (comm.size,) int64. first_work: global index of the
    first point I work on.
    """

    send_counts: np.ndarray
    recv_counts: np.ndarray
    first_work: int = 0

    @classmethod
    def balanced(cls, comm: MPI.Comm, n_local: int) -> "BlockPlan":
        """Plan for the block distribution of all points (collective)."""
        counts = np.array(comm.allgather(int(n_local)), dtype=np.int64)
        size, total = comm.size, int(counts.sum())
        starts = np.concatenate([[0], np.cumsum(counts)])
        bounds = np.array([total * r // size for r in range(size + 1)], dtype=np.int64)

        def overlap(a0: int, a1: int, b0: int, b1: int) -> int:
            return max(0, min(a1, b1) - max(a0, b0))

        me = comm.rank
        send = [overlap(starts[me], starts[me + 1], bounds[r], bounds[r + 1]) for r in range(size)]
        recv = [overlap(starts[r], starts[r + 1], bounds[me], bounds[me + 1]) for r in range(size)]
        return cls(np.array(send, dtype=np.int64), np.array(recv, dtype=np.int64), int(bounds[me]))

    @property
    def n_work(self) -> int:
        """Points this rank works on."""
        return int(self.recv_counts.sum())


def _alltoallv(comm: MPI.Comm, data: np.ndarray, send: np.ndarray, recv: np.ndarray) -> np.ndarray:
    row_shape = data.shape[1:]
    width = int(np.prod(row_shape, dtype=np.int64))
    sendbuf = np.ascontiguousarray(data).reshape(-1)
    out = np.empty((int(recv.sum()), *row_shape), dtype=data.dtype)
    comm.Alltoallv(
        [sendbuf, (send * width).tolist(), MPI._typedict[data.dtype.char]],
        [out.reshape(-1), (recv * width).tolist(), MPI._typedict[data.dtype.char]],
    )
    return out


def scatter(comm: MPI.Comm, plan: BlockPlan, rows: np.ndarray) -> np.ndarray:
    """Send my points' rows (n_local, …) to their workers; returns (plan.n_work, …)."""
    return _alltoallv(comm, rows, plan.send_counts, plan.recv_counts)


def gather(comm: MPI.Comm, plan: BlockPlan, rows: np.ndarray) -> np.ndarray:
    """Return worked rows (plan.n_work, …) to their owners; returns (n_local, …)."""
    return _alltoallv(comm, rows, plan.recv_counts, plan.send_counts)


def collective_call[T](comm: MPI.Comm, fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on every rank; if it raises on any rank, raise on all ranks.

    The rank that failed re-raises its own exception; the others raise RuntimeError
    naming the failing ranks and their messages, so no rank waits forever.
    """
    error: BaseException | None = None
    result: Any = None
    try:
        result = fn()
    except Exception as exc:  # decided collectively below
        error = exc
    messages = comm.allgather(None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        if error is not None:
            raise error
        detail = "; ".join(f"rank {r}: {m}" for r, m in failed)
        raise RuntimeError(f"{what} failed on another rank ({detail})")
    return result
