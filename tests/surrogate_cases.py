"""A tiny thermal dataset description shared by the surrogate training and evaluation
tests (FE cells of 8×8 voxels: seconds to generate)."""

GENERATE = {
    "physics": "thermal",
    "n": 8,
    "phases": [{"k0": 1.0, "alpha": 0.3, "beta": 0.5}, {"k0": 10.0, "alpha": -0.2, "beta": 1.0}],
    "members": [{"generator": "circular_inclusion", "ranges": {"volume_fraction": [0.05, 0.6]}}],
    "lower": [-2.0, -2.0, 0.0],
    "upper": [2.0, 2.0, 1.0],
    "n_cells": 16,
    "states_per_cell": 8,
    "seed": 1,
}
