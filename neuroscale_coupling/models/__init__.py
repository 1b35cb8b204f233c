"""Trained SANO models shipped with the package (one per physics, 2.2 MB thermal, 1.2 MB
mechanical).

Each is reproduced from scratch by one command from a checkout (DOLFINx needed for the
data generation), then copied here::

    neuroscale train --config examples/train/thermal.toml      # -> examples/train/models/
    cp examples/train/models/thermal_sano.pt neuroscale_coupling/models/

(the same with ``mechanical``; ``make models`` runs both). The model files record their
training configuration, domain, normalization and reference data (training cells,
replay and calibration samples) and load with ``torch.load(weights_only=True)``.
"""

from pathlib import Path

from neuroscale_coupling.cell.state_layout import PHYSICS

__all__ = ["shipped_model_path"]


def shipped_model_path(physics: str) -> Path:
    """Path of the shipped model file for ``physics`` ("thermal" or "mechanical")."""
    if physics not in PHYSICS:
        raise ValueError(f"no shipped model for physics={physics!r}: choose one of {PHYSICS}")
    path = Path(__file__).with_name(f"{physics}_sano.pt")
    if not path.exists():
        raise FileNotFoundError(
            f"the shipped {physics} model {path} is missing from this installation: "
            f"reproduce it with `neuroscale train --config examples/train/{physics}.toml` "
            "and copy the model file there"
        )
    return path
