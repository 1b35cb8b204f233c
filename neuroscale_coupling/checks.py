"""Argument checks shared by the pipeline stages."""

from typing import Any

import numpy as np

__all__ = ["check_count"]


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int after checking that it is an integer >= ``minimum`` (bools are
    refused); ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}={value!r}: give an integer >= {minimum}")
    return int(value)
