"""What the micro models share in a process (:class:`MicroEngine`): the model, its cells,
the fallback decision and the fine solver.

One engine per process and settings (:func:`shared`): the Micro Manager builds one shared
instance of a stateless model, one instance per point of a stateful one, and imports the
switching function separately; all of them reach the same engine, so a cell is encoded
once however many points and models use it, and a prediction the switching function made
is not repeated by the surrogate's ``solve`` at the same point and state (a bounded memo
keyed by cell and state: the Micro Manager asks the switching function, then solves, then
asks again, at each point of each time window).

Per point (:meth:`MicroEngine.surrogate_answer`, :meth:`MicroEngine.fine_answer`): the
cell from its read datum (:class:`~neuroscale_coupling.hosts.micro_manager.cells.
CellSource`; a new one is encoded with the model's float64 copy, its latent, family ratio
and symmetry order kept), the state (G1, G2, θ), the surrogate's answer (the numpy copy of
the decoder, or torch), the fallback reason from :func:`~neuroscale_coupling.closure.
fallback.fallback_reasons` on the point's row, and where it falls back (or for the fine model) a
fine solve with :class:`~neuroscale_coupling.fine.fem.FESolver` on the model's material.
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from neuroscale_coupling.closure.fallback import fallback_reasons
from neuroscale_coupling.hosts.micro_manager.settings import MicroSettings, current_settings
from neuroscale_coupling.log import get_logger
from neuroscale_coupling.surrogate.numpy_decoder import CellConstants, ThermalNumpyDecoder

__all__ = ["MicroEngine", "reset", "shared"]

log = get_logger(__name__)

#: Predictions kept for reuse (cell, state) → answer; the memo is emptied when full.
MEMO_SIZE = 1 << 16


class MicroEngine:
    """The model, cells, decisions and fine solver of the micro models (module doc).

    settings: the :class:`MicroSettings`. The model file is read on first use.
    """

    def __init__(self, settings: MicroSettings) -> None:
        self.settings = settings
        self.names = settings.names
        self.policy = settings.policy
        self._ready = False
        self._fine_solver: Any = None
        self._rows: dict[Any, int] = {}  # cell key → row
        self._image_rows: dict[bytes, int] = {}  # image bytes → row
        self.images: list[np.ndarray] = []  # (n, n) per row
        self.family_ratio: list[float] = []
        self._consts: list[CellConstants] = []
        self._encoded: list[Any] = []  # EncodedCells of one cell per row (torch decoder)
        self._memo: dict[tuple[int, float, float, float], tuple[tuple[float, ...], int]] = {}
        self.counts = {"surrogate": 0, "fine": 0, "memo_hits": 0, "cells": 0}

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        from neuroscale_coupling.models import shipped_model_path
        from neuroscale_coupling.surrogate.model_file import Surrogate

        s = self.settings
        path = s.model if s.model is not None else shipped_model_path("thermal")
        try:
            model = Surrogate.load(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"the model file {path} (settings from {s.source}) does not exist: set model "
                "to a model file, relative to the settings file's folder"
            ) from None
        if model.physics != "thermal":
            raise ValueError(
                f"the Micro Manager adapter answers thermal models (heat conduction); {path} "
                f"is a {model.physics} model"
            )
        if not model.has_family_statistics and math.isfinite(self.policy.family_threshold):
            raise ValueError(
                f"the model {path} holds no training-family statistics: retrain it, or set "
                "fallback.family_threshold = inf"
            )
        self.surrogate = model.to(dtype=torch.float64, device="cpu")
        self.material = model.material
        self.n = model.image_size
        self.cells = s.cells.source(self.n)
        self.decoder = ThermalNumpyDecoder(self.surrogate.model) if s.decoder == "numpy" else None
        self._response_rms = self.surrogate.response_scale
        n = self.names
        self._g_name, self._t_name = n.temperature_gradient, n.temperature
        self._ready = True
        log.info(
            "micro models: %s (%s decoder), cells %s, settings from %s",
            path, s.decoder, s.cells, s.source,
        )  # fmt: skip

    def ensure_ready(self) -> None:
        """Read the model file now (it is read on first use otherwise)."""
        if not self._ready:
            self._setup()

    @property
    def fine_solver(self) -> Any:
        """The FESolver of the fine solves (DOLFINx imported on first use)."""
        if self._fine_solver is None:
            self.ensure_ready()
            from neuroscale_coupling.fine.fem import FESolver

            self._fine_solver = FESolver(self.material, **self.settings.fine)
        return self._fine_solver

    # ------------------------------------------------------------------ points
    def point(self, micro_input: Mapping[str, Any]) -> tuple[int, float, float, float]:
        """(cell row, G1, G2, θ) of a point's read data; a new cell is encoded here."""
        if not self._ready:
            self._setup()
        try:
            grad = micro_input[self._g_name]
            theta = float(micro_input[self._t_name])
        except KeyError as exc:
            raise KeyError(
                f"the micro input holds no datum {exc.args[0]!r} (it holds "
                f"{sorted(micro_input)}): add it to read_data of the Micro Manager "
                "configuration, or set its name in the settings' [names]"
            ) from None
        g = grad.tolist() if isinstance(grad, np.ndarray) else list(grad)
        if len(g) != 2:
            raise ValueError(
                f"{self._g_name} has {len(g)} components ({g}); the thermal cell model is 2D: "
                "use a 2D macro mesh (vector data of dimension 2)"
            )
        g1, g2 = float(g[0]), float(g[1])
        if not (math.isfinite(g1) and math.isfinite(g2) and math.isfinite(theta)):
            raise ValueError(
                f"the macro state (G1, G2, θ) = ({g1}, {g2}, {theta}) is not finite: the macro "
                "iterate diverged"
            )
        key = self.cells.key(micro_input)
        row = self._rows.get(key)
        if row is None:
            row = self._add_cell(key)
        return row, g1, g2, theta

    def _add_cell(self, key: Any) -> int:
        image = self.cells.image(key)
        raw = image.tobytes()
        row = self._image_rows.get(raw)
        if row is None:
            enc = self.surrogate.encode(image[None])
            row = len(self.images)
            self.images.append(image)
            self.family_ratio.append(float(enc.family_ratio[0]))
            self._encoded.append(enc)
            if self.decoder is not None:
                latent = enc.latent[0].detach().cpu().numpy()
                self._consts.append(
                    self.decoder.cell(latent, enc.family_ratio[0], int(enc.symmetry[0]))
                )
            self._image_rows[raw] = row
            self.counts["cells"] += 1
        self._rows[key] = row
        return row

    def predict(
        self, row: int, g1: float, g2: float, theta: float
    ) -> tuple[tuple[float, ...], int]:
        """The surrogate at one point: (Q1, Q2, ∂Q/∂G row-major ×4, ∂Q/∂θ ×2, std ×2) and
        the fallback reason (0 surrogate, k + 1 = FALLBACK_REASONS[k]); memoized."""
        key = (row, g1, g2, theta)
        hit = self._memo.get(key)
        if hit is not None:
            self.counts["memo_hits"] += 1
            return hit
        # the numpy decoder holds the network only: beyond the training box the expansion
        # of Surrogate.decode answers
        inside = self.surrogate.domain.distance_outside([[g1, g2, theta]])[0] == 0
        if self.decoder is not None and inside:
            values = self.decoder.decode_floats(self._consts[row], g1, g2, theta)
        else:
            r, t, s = self.surrogate.decode(
                self._encoded[row], np.array([[g1, g2, theta]]), np.zeros(1, dtype=np.int64)
            )
            values = (
                *r[0].tolist(),
                *t[0, :, :2].reshape(-1).tolist(),
                *t[0, :, 2].tolist(),
                *s[0].tolist(),
            )
        self.counts["surrogate"] += 1
        result = (values, self.reason(row, g1, g2, theta, values))
        if len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
        self._memo[key] = result
        return result

    def reason(
        self, row: int, g1: float, g2: float, theta: float, values: tuple[float, ...]
    ) -> int:
        """The fallback reason of one point: :func:`fallback_reasons` on one row."""
        code = fallback_reasons(
            self.policy,
            domain_distance=self.surrogate.domain.distance_outside([[g1, g2, theta]]),
            family_ratio=np.array([self.family_ratio[row]]),
            response=np.array([values[:2]]),
            std=np.array([values[8:10]]),
            response_rms=self._response_rms,
        )
        return int(code[0])

    def needs_fine(self, micro_input: Mapping[str, Any]) -> bool:
        """True where the surrogate must not answer this point (a fallback test fires)."""
        row, g1, g2, theta = self.point(micro_input)
        return self.predict(row, g1, g2, theta)[1] > 0

    def fine_values(self, row: int, g1: float, g2: float, theta: float) -> tuple[float, ...]:
        """A fine solve at one point: (Q1, Q2, ∂Q/∂G ×4, ∂Q/∂θ ×2, 0, 0)."""
        h = self.fine_solver.solve(self.images[row][None], np.array([[g1, g2, theta]]))
        self.counts["fine"] += 1
        t = h.tangent[0]
        return (
            *h.response[0].tolist(),
            *t[:, :2].reshape(-1).tolist(),
            *t[:, 2].tolist(),
            0.0,
            0.0,
        )

    # ------------------------------------------------------------------ answers
    def answer(self, values: tuple[float, ...], exact: bool, reason: int) -> dict[str, Any]:
        """The output dict of one point from the ten values."""
        n = self.names
        q1, q2, k00, k01, k10, k11, k0t, k1t, s1, s2 = values
        c, d = n.conductivity, n.flux_temperature_derivative
        out = {
            n.flux: np.array([q1, q2]),
            c[0]: k00, c[1]: k01, c[2]: k10, c[3]: k11,
            d[0]: k0t, d[1]: k1t,
            n.flux_std: np.array([s1, s2]),
            n.exact: 1.0 if exact else 0.0,
        }  # fmt: skip
        if n.fallback_reason is not None:
            out[n.fallback_reason] = float(reason)
        return out

    def surrogate_answer(self, micro_input: Mapping[str, Any]) -> dict[str, Any]:
        """The surrogate model's answer at one point: the surrogate, or a fine solve where
        a fallback test fires and ``fine_solve`` is on."""
        row, g1, g2, theta = self.point(micro_input)
        values, reason = self.predict(row, g1, g2, theta)
        if reason and self.settings.fine_solve:
            return self.answer(self.fine_values(row, g1, g2, theta), True, reason)
        return self.answer(values, False, reason)

    def fine_answer(self, micro_input: Mapping[str, Any]) -> dict[str, Any]:
        """The fine model's answer at one point (exact = 1, std = 0)."""
        row, g1, g2, theta = self.point(micro_input)
        reason = 0
        if self.names.fallback_reason is not None:
            reason = self.predict(row, g1, g2, theta)[1]
        return self.answer(self.fine_values(row, g1, g2, theta), True, reason)

    def switch(self, resolution: int, micro_input: Mapping[str, Any]) -> int:
        """The switching function's answer: −1, 0 or +1 toward the fine model where a
        fallback test fires, toward the surrogate elsewhere."""
        target = (
            self.settings.fine_index
            if self.needs_fine(micro_input)
            else self.settings.surrogate_index
        )
        return int(np.sign(target - int(resolution)))


_engine: MicroEngine | None = None


def shared() -> MicroEngine:
    """The process's engine for the current settings (built on first use)."""
    global _engine
    if _engine is None:
        _engine = MicroEngine(current_settings())
    return _engine


def reset() -> None:
    """Forget the shared engine (after :func:`~neuroscale_coupling.hosts.micro_manager.
    settings.configure`)."""
    global _engine
    _engine = None
