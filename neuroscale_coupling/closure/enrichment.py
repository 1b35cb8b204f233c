"""Online enrichment of a SANO surrogate from exact fine solves between the steps of a run.

During an FE² run the surrogate closure hands uncertain or out-of-domain points to the fine
solver. Their exact answers (cell image, state, response, tangent) go into a buffer on the
rank that holds them (those whose state lies inside the model's training box: beyond it the
surrogate answers by its expansion from the box, not by the network), and between steps
the model is fine-tuned in place on that buffer and a replay of its training data, then
its std is recalibrated::

    enrich = OnlineEnrichment(surrogate, comm=comm)
    enrich.add(images, states, response, tangent)     # local rows; not collective
    stats = enrich.update()                            # collective, between steps

**Loss.** The normalized data loss of training (:mod:`~neuroscale_coupling.surrogate.loss`)
with the model's :class:`~neuroscale_coupling.surrogate.normalization.Normalization`:
per row, the mean squared normalized response error (response / response_scale) plus
``tangent_weight`` × the mean squared normalized tangent error (tangent × state_half_width
/ response_scale). One Adam step minimizes

    (1 − f) · mean over the global buffer batch + f · mean over the global replay batch,

f = ``replay_fraction``. With B = ``batch_size``, each rank draws b = min(its buffer rows,
B − round(f·B)) rows of its own buffer (all of them when it has fewer) and round(f·B) rows
of the model file's reference "train" set. The replay rows come from a generator seeded
alike on all ranks from (seed, update number) and split by rank, so ranks replay different
rows. Each rank scales its buffer term by size / (global b), so that the rank average of
the gradients is the gradient of the loss above: the gradients of all parameters, in one
flattened buffer, are summed with ``Allreduce`` and divided by the number of ranks, then
clipped to ``grad_clip`` (global norm) and applied by Adam, whose moments are kept across
updates. A rank with an empty buffer takes part with its replay term alone.

**Dropout masks.** The steps run in training mode as in training (concrete relaxation of
the dropout masks, fresh noise from torch's generator seeded from (seed, update number,
rank) inside :func:`torch.random.fork_rng`, so the caller's torch RNG is untouched). The
dropout rate is not fine-tuned (this loss has no KL term to hold it), so the fixed
inference masks, noise buffer and rate, stay exactly as they were; the model returns to
eval mode.

**Same weights on every rank.** The ranks start from the same weights and apply the same
averaged gradient, so they stay bitwise equal when the MPI sum rounds alike on all ranks.
This is verified after the steps: a SHA-256 of the parameters and Adam moments is compared
over the ranks and, where it differs, rank 0's parameters and moments are broadcast to all
ranks (a warning is logged and the stats say ``broadcast = 1``).

**Recalibration** (``recalibrate``): as :func:`~neuroscale_coupling.training.train.
train` does, :func:`~neuroscale_coupling.surrogate.calibration.fit_calibration` on the
normalized response errors, the raw spread (eval mode, fixed masks) and the cell error
scale τ over the model file's reference "val" set, then ``set_std_scale``,
``set_std_floor`` and ``set_interval_multipliers`` with the symmetry classes'
factors and multipliers (:func:`~neuroscale_coupling.surrogate.calibration.
fit_symmetry_classes`; the cell error head, fitted at training, is kept). Each rank
evaluates a block of the rows; the blocks are gathered in rank order, so every rank fits
the same calibration.

**Failures.** Local work is wrapped in :func:`~neuroscale_coupling.parallel.
collective_call`, so an exception on one rank raises on all; the weights and Adam state
from before the update are then restored on every rank. Latents a caller cached from
``surrogate.model.encode`` are stale after an update.
"""

import copy
import hashlib
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from mpi4py import MPI

from neuroscale_coupling.cell.symmetry import response_orbits, symmetry_order
from neuroscale_coupling.data.dataset import Dataset
from neuroscale_coupling.data.split import translation_groups
from neuroscale_coupling.log import get_logger
from neuroscale_coupling.parallel import collective_call
from neuroscale_coupling.surrogate.calibration import fit_calibration, fit_symmetry_classes
from neuroscale_coupling.surrogate.loss import DataLoss
from neuroscale_coupling.surrogate.model import SANOPrediction
from neuroscale_coupling.surrogate.model_file import Surrogate

__all__ = ["EnrichmentOptions", "OnlineEnrichment"]

_log = get_logger(__name__)
_CHUNK = 2048  # rows per forward pass when measuring losses


@dataclass(frozen=True)
class EnrichmentOptions:
    """Options of :class:`OnlineEnrichment`.

    steps: Adam steps per update; batch_size: rows per rank and step, a share
    ``replay_fraction`` of them replay rows, the rest buffer rows (all of them when the
    buffer has fewer); lr: Adam step size; grad_clip: max global gradient norm (0 = off);
    max_buffer: buffer rows kept per rank (the oldest are dropped beyond); tangent_weight:
    weight of the tangent term of the loss; seed: seeds the batch draws and the training
    dropout noise; recalibrate: refit the std scale on the reference validation rows;
    val_tolerance: an update is kept only when the buffer loss falls and the validation
    loss rises by at most this fraction — otherwise the weights, calibration and Adam state
    from before it are restored (a model that already fits the buffer is not disturbed).
    """

    steps: int = 30
    batch_size: int = 128
    lr: float = 1e-4
    replay_fraction: float = 0.5
    grad_clip: float = 1.0
    max_buffer: int = 20000
    tangent_weight: float = 1.0
    seed: int = 0
    recalibrate: bool = True
    val_tolerance: float = 0.05

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_buffer"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"enrichment {name}={getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"enrichment lr={self.lr} must be > 0")
        if not 0 <= self.replay_fraction < 1:
            raise ValueError(
                f"enrichment replay_fraction={self.replay_fraction} must lie in [0, 1)"
            )
        if not self.grad_clip >= 0:
            raise ValueError(f"enrichment grad_clip={self.grad_clip} must be >= 0 (0 = off)")
        if not self.val_tolerance >= 0:
            raise ValueError(f"enrichment val_tolerance={self.val_tolerance} must be >= 0")
        if not self.tangent_weight >= 0:
            raise ValueError(f"enrichment tangent_weight={self.tangent_weight} must be >= 0")


class OnlineEnrichment:
    """Buffer of exact fine-solve rows and collective fine-tuning of a surrogate.

    surrogate: fine-tuned in place (``surrogate.model``, whatever its dtype and device;
    converting it in place with ``.double()``/``.to()`` between updates is fine). It
    must hold the reference training and validation samples (``replay_data``,
    ``calibration_data``), as model files written by training do. comm: the ranks that
    update together; every rank must hold the same weights at construction. Construction
    is collective. See the module doc.
    """

    def __init__(
        self,
        surrogate: Surrogate,
        *,
        comm: MPI.Comm,
        options: EnrichmentOptions = EnrichmentOptions(),
    ) -> None:
        self.surrogate = surrogate
        self.model = surrogate.model
        self.comm = comm
        self.options = options
        self._updates = 0
        collective_call(comm, self._setup, "online enrichment setup")

    def _setup(self) -> None:
        sur = self.surrogate
        missing = [
            name
            for name, data in (("train", sur.replay_data), ("val", sur.calibration_data))
            if data is None or len(data) == 0
        ]
        if missing:
            raise ValueError(
                f"the surrogate holds no reference {missing} rows: online enrichment replays "
                "and recalibrates on them; load a model file written by neuroscale train"
            )
        self._replay: Dataset = sur.replay_data  # type: ignore[assignment]
        self._val: Dataset = sur.calibration_data  # type: ignore[assignment]
        self._rscale = sur.response_scale
        self._loss = DataLoss(sur.normalization, tangent_weight=self.options.tangent_weight)
        cfg = self.model.config
        self._d, self._r = cfg.state_dim, cfg.response_dim
        self._n = cfg.image_size
        self._n_phases = int(self.surrogate.material.n_phases)
        mask_params = {id(p) for p in self.model.masks.parameters()}
        self._params = [
            p for p in self.model.parameters() if p.requires_grad and id(p) not in mask_params
        ]
        self._optim = torch.optim.Adam(self._params, lr=self.options.lr)
        n, d, r = self._n, self._d, self._r
        self._images = np.empty((0, n, n), dtype=np.int8)  # distinct buffered images
        self._image_row: dict[bytes, int] = {}
        self._cell = np.empty(0, dtype=np.int64)
        self._states = np.empty((0, d))
        self._response = np.empty((0, r))
        self._tangent = np.empty((0, r, d))
        #: rows offered to :meth:`add` on this rank and not kept: states outside the box
        self.rows_outside = 0

    # ------------------------------------------------------------------ buffer
    @property
    def n_buffer(self) -> int:
        """Buffered rows on this rank."""
        return int(self._cell.size)

    def add(
        self, images: np.ndarray, states: np.ndarray, response: np.ndarray, tangent: np.ndarray
    ) -> None:
        """Buffer m exact rows of this rank (not collective; raises on this rank only).

        images (m, n, n) integer phase ids, states (m, d), response (m, r), tangent
        (m, r, d), physical units, finite. Rows whose state lies outside the model's
        training box are not kept (counted in :attr:`rows_outside`): the surrogate never
        evaluates its network there (:meth:`Surrogate.decode` answers by its expansion from
        the box), so they would train the network where it is not used. Beyond
        ``max_buffer`` rows the oldest are dropped.
        """
        n, d, r = self._n, self._d, self._r
        im = np.asarray(images)
        if im.ndim != 3 or im.shape[1:] != (n, n):
            raise ValueError(
                f"enrichment images must have shape (m, {n}, {n}) (the model's cell size); "
                f"got {im.shape}"
            )
        m = im.shape[0]
        arrays = {}
        for name, value, shape in (
            ("states", states, (m, d)),
            ("response", response, (m, r)),
            ("tangent", tangent, (m, r, d)),
        ):
            a = np.asarray(value)
            if a.shape != shape:
                raise ValueError(
                    f"enrichment {name} must have shape {shape} for {m} images; got {a.shape}"
                )
            if a.dtype.kind not in "fiu":
                raise TypeError(f"enrichment {name} must be real numbers; got dtype {a.dtype}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"enrichment {name} holds NaN or Inf: pass converged solves only")
            arrays[name] = a.astype(float)
        if im.dtype.kind not in "iu" or (m and (im.min() < 0 or im.max() >= self._n_phases)):
            raise ValueError(
                f"enrichment images must hold integer phase ids 0..{self._n_phases - 1}; got "
                f"dtype {im.dtype}" + (f", values {im.min()}..{im.max()}" if m else "")
            )
        inside = self.surrogate.domain.contains(arrays["states"])
        self.rows_outside += int(m - inside.sum())
        im, m = im[inside], int(inside.sum())
        arrays = {k: a[inside] for k, a in arrays.items()}
        if m == 0:
            return
        flat = im.reshape(m, -1).astype(np.int8)
        distinct, inverse = np.unique(flat, axis=0, return_inverse=True)
        rows = np.empty(len(distinct), dtype=np.int64)
        fresh = []
        for j, image in enumerate(distinct):  # one lookup per distinct image
            key = image.tobytes()
            if key not in self._image_row:
                self._image_row[key] = len(self._image_row)
                fresh.append(image)
            rows[j] = self._image_row[key]
        if fresh:
            self._images = np.concatenate([self._images, np.stack(fresh).reshape(-1, n, n)])
        self._cell = np.concatenate([self._cell, rows[inverse.reshape(-1)]])
        self._states = np.concatenate([self._states, arrays["states"]])
        self._response = np.concatenate([self._response, arrays["response"]])
        self._tangent = np.concatenate([self._tangent, arrays["tangent"]])
        excess = self.n_buffer - self.options.max_buffer
        if excess > 0:
            self._drop_oldest(excess)

    def _drop_oldest(self, k: int) -> None:
        used, cell = np.unique(self._cell[k:], return_inverse=True)
        self._images = self._images[used]
        self._image_row = {
            im.tobytes(): i for i, im in enumerate(self._images.reshape(len(used), -1))
        }
        self._cell = cell.reshape(-1).astype(np.int64)
        self._states = self._states[k:]
        self._response = self._response[k:]
        self._tangent = self._tangent[k:]

    # ------------------------------------------------------------------ pieces
    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        p = self.model.state_scale
        return torch.as_tensor(a, dtype=p.dtype, device=p.device)

    def _predict(self, images: np.ndarray, cells: np.ndarray, states: np.ndarray) -> SANOPrediction:
        """Prediction at rows (N,) with images (k, n, n), cells (N,) into them, states (N, d)."""
        p = self.model.state_scale
        latent = self.model.encode(self.surrogate.model_inputs(images))
        return self.model.decode(
            latent, self._tensor(states), cells=torch.as_tensor(cells, device=p.device)
        )

    def _loss_sum(
        self,
        images: np.ndarray,
        cell: np.ndarray,
        states: np.ndarray,
        response: np.ndarray,
        tangent: np.ndarray,
    ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """Eval-mode sum of the row losses, normalized response errors (N, r), unscaled
        spread (N, r) and cell error scale τ (N, r) over rows with images (k, n, n), cell
        (N,), states, response, tangent."""
        model = self.model.eval()
        total, errs, stds, taus = 0.0, [], [], []
        with torch.no_grad(), model.raw_std():
            for lo in range(0, cell.size, _CHUNK):
                sl = slice(lo, lo + _CHUNK)
                used, inv = np.unique(cell[sl], return_inverse=True)
                inv = inv.reshape(-1)
                latent = model.encode(self.surrogate.model_inputs(images[used]))
                rows = torch.as_tensor(inv, device=latent.device)
                pred = model.decode(latent, self._tensor(states[sl]), cells=rows)
                total += float(
                    self._loss.rows(
                        pred.response,
                        pred.tangent,
                        self._tensor(response[sl]),
                        self._tensor(tangent[sl]),
                    ).sum()
                )
                rs = self._tensor(self._rscale)
                errs.append(((pred.response - self._tensor(response[sl])) / rs).double().cpu())
                stds.append((pred.std / rs).double().cpu())
                taus.append(model.cell_error_scale(latent)[rows].double().cpu())
        r = self._r
        err, std, tau = (
            torch.cat(x).numpy() if x else np.empty((0, r)) for x in (errs, stds, taus)
        )
        return total, err, std, tau

    def _buffer_loss(self, rows: int) -> float:
        """Global mean row loss over all buffers (collective)."""
        local = collective_call(
            self.comm,
            lambda: self._loss_sum(
                self._images, self._cell, self._states, self._response, self._tangent
            )[0],
            "online enrichment: buffer loss",
        )
        return sum(self.comm.allgather(local)) / rows

    def _val_pass(self) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """Mean row loss, normalized errors, unscaled spread and cell error scale τ over the
        reference "val" rows, each rank evaluating one block, gathered in rank order
        (collective)."""
        v = self._val
        block = np.array_split(np.arange(len(v)), self.comm.size)[self.comm.rank]
        local = collective_call(
            self.comm,
            lambda: self._loss_sum(
                v.images, v.cell_index[block], v.states[block], v.response[block], v.tangent[block]
            ),
            "online enrichment: validation loss",
        )
        parts = self.comm.allgather(local)
        loss = sum(p[0] for p in parts) / len(v)
        return loss, *(np.concatenate([p[k] for p in parts]) for k in (1, 2, 3))

    def _local_gradient(
        self, buf_rows: np.ndarray, rep_rows: np.ndarray, w_buf: float, w_rep: float
    ) -> np.ndarray:
        """Flattened gradient of w_buf·Σ buffer row losses + w_rep·Σ replay row losses."""
        self.model.zero_grad(set_to_none=True)
        if buf_rows.size + rep_rows.size:
            rp = self._replay
            used_b, inv_b = np.unique(self._cell[buf_rows], return_inverse=True)
            used_r, inv_r = np.unique(rp.cell_index[rep_rows], return_inverse=True)
            pred = self._predict(
                np.concatenate([self._images[used_b], rp.images[used_r]]),
                np.concatenate([inv_b.reshape(-1), inv_r.reshape(-1) + used_b.size]),
                np.concatenate([self._states[buf_rows], rp.states[rep_rows]]),
            )
            row = self._loss.rows(
                pred.response,
                pred.tangent,
                self._tensor(np.concatenate([self._response[buf_rows], rp.response[rep_rows]])),
                self._tensor(np.concatenate([self._tangent[buf_rows], rp.tangent[rep_rows]])),
            )
            nb = buf_rows.size
            (w_buf * row[:nb].sum() + w_rep * row[nb:].sum()).backward()
        grads = [
            torch.zeros_like(p).reshape(-1) if p.grad is None else p.grad.reshape(-1)
            for p in self._params
        ]
        return torch.cat(grads).detach().cpu().numpy().copy()

    def _apply(self, grad: np.ndarray, step: int) -> None:
        """Set the (rank-averaged) flattened gradient, clip, and take one Adam step."""
        if not np.all(np.isfinite(grad)):
            raise RuntimeError(
                f"online enrichment: non-finite gradient at step {step}: the update is undone; "
                "check the buffered rows or lower options.lr"
            )
        g = torch.from_numpy(grad)
        offset = 0
        for p in self._params:
            p.grad = g[offset : offset + p.numel()].view_as(p).to(p.device)
            offset += p.numel()
        if self.options.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.options.grad_clip)
        self._optim.step()

    def _moments(self) -> list[torch.Tensor]:
        """Parameters and Adam moments (the training state that must agree over ranks)."""
        out = [p.data for p in self._params]
        for p in self._params:
            st = self._optim.state.get(p, {})
            out += [st[k] for k in ("exp_avg", "exp_avg_sq") if k in st]
        return out

    def _agree(self) -> bool:
        """Compare a checksum over the ranks; broadcast rank 0's state where it differs.
        Returns whether it was broadcast (collective)."""
        tensors = self._moments()
        flat = torch.cat([t.detach().reshape(-1).cpu() for t in tensors]).numpy().copy()
        digest = hashlib.sha256(flat.tobytes()).hexdigest()
        if len(set(self.comm.allgather(digest))) == 1:
            return False
        self.comm.Bcast(flat, root=0)
        g = torch.from_numpy(flat)
        offset = 0
        for t in tensors:
            t.copy_(g[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        _log.warning(
            "online enrichment: the ranks' weights differed after the update (MPI sum "
            "rounding); rank 0's weights and Adam moments were broadcast"
        )
        return True

    def _match_dtype(self) -> None:
        """Adam moments follow the parameters when the model was converted in place."""
        for p in self._params:
            st = self._optim.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st and (st[k].dtype != p.dtype or st[k].device != p.device):
                    st[k] = st[k].to(p)

    # ------------------------------------------------------------------ update
    def update(self) -> dict[str, float]:
        """Fine-tune on the buffers and replay, then recalibrate (collective).

        Returns rows (global buffer rows), steps, loss_before / loss_after (global mean
        normalized row loss over all buffers, eval mode), val_loss_before / val_loss_after
        (the same over the reference "val" rows), std_scale, broadcast (1 when rank 0's
        weights had to be broadcast), accepted (0 when the update was undone, see
        ``EnrichmentOptions.val_tolerance``) and seconds. With no buffered row on any rank it
        changes nothing and returns rows = 0, steps = 0, std_scale and seconds only.
        """
        t0 = time.perf_counter()
        rows = sum(self.comm.allgather(self.n_buffer))
        if rows == 0:
            return {
                "rows": 0.0,
                "steps": 0.0,
                "std_scale": float(self.model.std_scale),
                "seconds": time.perf_counter() - t0,
            }
        self._match_dtype()
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        adam = copy.deepcopy(self._optim.state_dict())
        try:
            stats = self._update(rows)
        except BaseException:
            self.model.load_state_dict(weights)
            self._optim.load_state_dict(adam)
            raise
        finally:
            self.model.eval()
        better = stats["loss_after"] < stats["loss_before"]
        kept = (
            stats["val_loss_after"] <= (1 + self.options.val_tolerance) * stats["val_loss_before"]
        )
        stats["accepted"] = float(better and kept)
        if not stats["accepted"]:  # the losses are global: every rank decides alike
            self.model.load_state_dict(weights)
            self._optim.load_state_dict(adam)
            stats["std_scale"] = float(self.model.std_scale)
        stats["seconds"] = time.perf_counter() - t0
        if self.comm.rank == 0:
            _log.info(
                "online enrichment %d: %d rows, buffer loss %.3g -> %.3g, val loss %.3g -> "
                "%.3g, std scale %.3g, %s, %.2f s",
                self._updates,
                rows,
                stats["loss_before"],
                stats["loss_after"],
                stats["val_loss_before"],
                stats["val_loss_after"],
                stats["std_scale"],
                "kept" if stats["accepted"] else "rejected (restored)",
                stats["seconds"],
            )
        return stats

    def _update(self, rows: int) -> dict[str, float]:
        opt, comm = self.options, self.comm
        size, rank = comm.size, comm.rank
        loss_before = self._buffer_loss(rows)
        val_before = self._val_pass()[0]
        n_rep = min(round(opt.replay_fraction * opt.batch_size), opt.batch_size - 1)
        quota = opt.batch_size - n_rep
        n_buf = [min(c, quota) for c in comm.allgather(self.n_buffer)]
        w_buf = (1 - opt.replay_fraction) * size / sum(n_buf)
        w_rep = opt.replay_fraction / n_rep if n_rep else 0.0
        shared = np.random.default_rng([opt.seed, self._updates])
        local = np.random.default_rng([opt.seed, self._updates, rank])
        n_train = len(self._replay)
        device = self.model.state_scale.device
        self.model.train()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(
                int(np.random.SeedSequence([opt.seed, self._updates, rank]).generate_state(1)[0])
            )
            for step in range(opt.steps):
                draw = shared.choice(n_train, size=size * n_rep, replace=size * n_rep > n_train)
                rep_rows = draw[rank * n_rep : (rank + 1) * n_rep]
                buf_rows = local.choice(self.n_buffer, size=n_buf[rank], replace=False)
                grad = collective_call(
                    comm,
                    partial(self._local_gradient, buf_rows, rep_rows, w_buf, w_rep),
                    "online enrichment: gradient",
                )
                comm.Allreduce(MPI.IN_PLACE, grad, op=MPI.SUM)
                grad /= size
                self._apply(grad, step)
        self.model.zero_grad(set_to_none=True)
        self.model.eval()
        broadcast = self._agree()
        self._updates += 1
        loss_after = self._buffer_loss(rows)
        val_after, err, std, tau = self._val_pass()
        if opt.recalibrate:
            cal = fit_calibration(err, std, tau)
            v = self._val
            factor, table = fit_symmetry_classes(
                err,
                np.hypot(cal.scale * std, cal.floor * tau),
                symmetry_order(v.images)[v.cell_index],
                translation_groups(v.images)[v.cell_index],
                response_orbits(self.model.config.physics),
            )
            self.model.set_std_scale(cal.scale)
            self.model.set_std_floor(cal.floor * np.asarray(self._rscale, dtype=float))
            self.model.set_interval_multipliers(cal.multipliers, factor, table)
        return {
            "rows": float(rows),
            "steps": float(opt.steps),
            "loss_before": loss_before,
            "loss_after": loss_after,
            "val_loss_before": val_before,
            "val_loss_after": val_after,
            "std_scale": float(self.model.std_scale),
            "broadcast": float(broadcast),
        }
