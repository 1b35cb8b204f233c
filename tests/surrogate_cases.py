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

TINY_MODEL = {
    "levels": 2,
    "tokens_side": 2,
    "d_model": 16,
    "heads": 2,
    "layers": 1,
    "pos_freqs": 2,
    "latent": 8,
    "hidden": 16,
    "decoder_layers": 2,
    "dropout": 0.1,
    "samples": 8,
}


def tiny_surrogate(folder):
    """(Surrogate, Dataset): a tiny thermal SANO trained for 10 epochs on GENERATE, on
    COMM_SELF (bitwise the same model on every rank); its file goes to ``folder``."""
    from mpi4py import MPI

    from neuroscale_coupling.data.generate import generate
    from neuroscale_coupling.surrogate.model_file import Surrogate
    from neuroscale_coupling.training.config import TrainConfig
    from neuroscale_coupling.training.train import train

    cfg = TrainConfig.from_dict(
        {
            "data": {"generate": GENERATE},
            "model": TINY_MODEL,
            "training": {
                "batch_size": 32, "lr": 2e-2, "progress": False, "patience": 0, "seed": 3,
                "epochs": 10, "augment": False,
            },
            "output": {"model": str(folder / f"tiny_{MPI.COMM_WORLD.rank}.pt")},
        }
    )  # fmt: skip
    data = generate(cfg.data.generate.spec(), comm=MPI.COMM_SELF, progress=False)
    result = train(cfg, comm=MPI.COMM_SELF, dataset=data)
    return Surrogate(result.model, result.metadata), data
