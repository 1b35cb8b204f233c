"""Logging with the MPI rank in every record.

``get_logger(__name__)`` returns a standard :mod:`logging` logger whose records carry
``rank`` (the rank in ``MPI.COMM_WORLD``, or 0 when mpi4py is not initialised).
"""

import logging

_FORMAT = "[rank %(rank)s] %(levelname)s %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._rank: int | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self._rank is None:
            try:
                from mpi4py import MPI

                self._rank = MPI.COMM_WORLD.rank
            except ImportError:
                self._rank = 0
        record.rank = self._rank
        return True


_rank_filter = _RankFilter()


def get_logger(name: str) -> logging.Logger:
    """The package logger ``name`` with the MPI rank attached to its records."""
    logger = logging.getLogger(name)
    if _rank_filter not in logger.filters:
        logger.addFilter(_rank_filter)
    return logger


def configure(level: int | str = logging.INFO) -> None:
    """Send package log records to stderr with the rank prefix (used by the CLI)."""
    root = logging.getLogger("neuroscale_coupling")
    if not any(getattr(h, "_neuroscale", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.addFilter(_rank_filter)
        handler._neuroscale = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
