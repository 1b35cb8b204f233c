"""Files that must never be left half written: run summaries, datasets, model files.

Every writer here writes into a temporary file in the destination folder, flushes it to
disk and renames it over the destination (``os.replace``), so a crash or a full disk
leaves either the old file or the new one, never a partial file. None is collective:
call them on one rank.
"""

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["atomic_write", "torch_save_atomic", "write_json_atomic"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace ``path`` with what ``write(file)`` writes, atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json_atomic(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Write ``record`` as indented JSON (numpy scalars and arrays converted)."""
    text = json.dumps(record, indent=2, default=_jsonable).encode()
    atomic_write(path, lambda fh: fh.write(text))


def torch_save_atomic(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """``torch.save(payload)`` atomically; keep the payload to tensors and plain types so
    that it loads with ``torch.load(weights_only=True)``."""
    import torch

    atomic_write(path, lambda fh: torch.save(payload, fh))


def plain_values(value: Any) -> Any:
    """Convert to types ``torch.load(weights_only=True)`` and JSON accept."""
    if isinstance(value, Mapping):
        return {str(k): plain_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_values(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain_values(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(
        f"value {value!r} of type {type(value).__name__} cannot be stored in dataset "
        "metadata: use numbers, strings, lists or dicts of them (e.g. dtype='float32')"
    )
