"""Training of the NeuroScale surrogate (SANO): data, loss, loop, early stopping and
calibration, ending with the model file.

Pipeline step 5 (docs/design.md)::

    cfg = load_config("train.toml")            # surrogate.config
    result = train(cfg)                         # data, fit, early stopping, calibration, file

The model file and :class:`~neuroscale_coupling.surrogate.model_file.Surrogate` live in
:mod:`~neuroscale_coupling.surrogate.model_file`, the std-scale fit in
:mod:`~neuroscale_coupling.surrogate.calibration`. The per-component
:class:`Normalization` (domain box → [-1, 1], response / per-component RMS) defines the
loss: normalized response and tangent errors, so components of different size count alike.

**Loss** = data + λ·physics + γ·KL:

* data = MSE(normalized response) + w_t·MSE(normalized tangent) at the (optionally D4
  augmented) samples: with ``augment`` each sample is seen under a random symmetry R of
  the square (image R·image, state S_R s, target Q_R y, tangent Q_R T S_R⁻¹), exact for
  isotropic phases.
* physics = **D4 equivariance at states the data never shows**: for a fraction of the
  batch, a fresh uniform state s in the domain box and a random R ≠ identity; residual
  Q_R f(image, s) − f(R image, S_R s) on the response and Q_R f'(image, s) S_R⁻¹ −
  f'(R image, S_R s) on the tangent (normalized MSE). Symmetry and positive definiteness
  of the thermal tangent, Q(0) = 0 and response–tangent consistency are exact by
  construction of the decoder, so penalizing them would be void; equivariance is not built
  into the encoder (it sees wavelet coefficients) and is what a finite data set pins down
  only at its own samples.
* KL = :meth:`SANO.kl` (concrete-dropout term, its own regularization weights).

**Adaptive balancing** (``adaptive = true``): the two data terms (response MSE, tangent
MSE) are each divided by an exponential running mean of their own detached magnitude
(momentum ``adaptive_momentum``, started at the first batch's value), so that each enters
with weight ≈ its nominal weight (1, w_t) whatever its scale, and the balance follows the
terms as they shrink at different rates. The physics term is divided by the sum of the two
data running means (an equivariance residual measured relative to the data error: dividing
a near-zero residual by its own size would amplify it to O(1) and pull the model towards
the trivially equivariant zero output, which we observed). The KL term is not rescaled: it
is a prior term with its own scale and can be negative (entropy part).

**Reproducibility.** ``seed`` fixes the initial weights; epoch e reseeds torch and the
numpy shuffling generator from (seed, e), so a run resumed from a checkpoint (written
atomically after every epoch with the optimizer, running means, best state and history)
retraces the uninterrupted run exactly on the same device.

**Family and calibration.** The latent family statistics (:meth:`SANO.fit_family`) are
fitted on the training cells' latents. On the validation split (eval mode, the fixed MC
masks): the cell error head τ(z) is fitted on the normalized response errors
(:func:`~neuroscale_coupling.surrogate.calibration.cross_fit_cell_error`, 5 folds over
distinct images; none, τ = 1, when the split holds one distinct image), and
:func:`~neuroscale_coupling.surrogate.calibration.fit_calibration`
gives the scale s, the floor c and the interval multipliers k_p from the errors, the raw
spread and the out-of-fold τ: ``set_std_scale(s)``, ``set_std_floor(c × per-component
response RMS)``. Per symmetry class of the validation cells
(:func:`~neuroscale_coupling.surrogate.calibration.fit_symmetry_classes`) std factors per
orbit of response components under the square's symmetries
(:func:`~neuroscale_coupling.cell.symmetry.response_orbits`) and multipliers follow:
``set_interval_multipliers(k, class factors, class table)``.
Calibration needs no dropout: without spread, τ carries the std alone.

**MPI.** :func:`train` with a communicator: dataset generation is collective; every rank
trains the same (deterministic) copy; rank 0 alone writes the checkpoint and model file,
followed by a barrier. Data-parallel training is not implemented.
"""

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from neuroscale_coupling.cell.state_layout import layout_of
from neuroscale_coupling.cell.symmetry import (
    D4,
    response_matrix,
    response_orbits,
    state_matrix,
    symmetry_order,
    transform_image,
)
from neuroscale_coupling.data.dataset import Dataset
from neuroscale_coupling.data.domain import StateDomain
from neuroscale_coupling.data.generate import generate
from neuroscale_coupling.data.split import split, translation_groups
from neuroscale_coupling.io import plain_values, torch_save_atomic
from neuroscale_coupling.log import get_logger
from neuroscale_coupling.surrogate.calibration import (
    LEVELS_P,
    calibration_error,
    coverage,
    cross_fit_cell_error,
    fit_calibration,
    fit_symmetry_classes,
)
from neuroscale_coupling.surrogate.config import SANOConfig
from neuroscale_coupling.surrogate.inputs import WaveletNormalizer, wavelet_inputs
from neuroscale_coupling.surrogate.loss import DataLoss
from neuroscale_coupling.surrogate.model import SANO
from neuroscale_coupling.surrogate.model_file import save_model
from neuroscale_coupling.surrogate.normalization import Normalization
from neuroscale_coupling.training.config import TrainConfig

__all__ = ["CALIBRATION_SAMPLES", "REPLAY_SAMPLES", "TrainResult", "train"]

_log = get_logger(__name__)
_CKPT_FORMAT = "neuroscale-sano-checkpoint"
REPLAY_SAMPLES = 2048  # training rows kept in the model file for replay
CALIBRATION_SAMPLES = 1024  # validation rows kept for recalibration


@dataclass
class TrainResult:
    """model (eval, calibrated, best validation state), metadata as stored in the model
    file, history per epoch (train/val losses, seconds), metrics (final validation)."""

    model: SANO
    metadata: dict[str, Any]
    history: dict[str, list[float]]
    metrics: dict[str, float]


class _Split:
    """Tensors of one split on the device, with the 8 D4-transformed coefficient sets."""

    def __init__(
        self,
        ds: Dataset,
        wav: WaveletNormalizer,
        physics: str,
        dtype: torch.dtype,
        device: torch.device,
        augment: bool,
        canonical: bool,
    ) -> None:
        self.n_cells = ds.n_cells
        self.images = ds.images
        rots = D4 if augment else D4[:1]
        ims = np.concatenate([transform_image(ds.images, r) for r in rots])  # (8C, n, n)
        self.coeffs = wavelet_inputs(wav, ims, dtype, device, canonical=canonical)
        self.cell = torch.as_tensor(ds.cell_index, device=device)
        self.states = torch.as_tensor(ds.states, dtype=dtype, device=device)
        self.response = torch.as_tensor(ds.response, dtype=dtype, device=device)
        self.tangent = torch.as_tensor(ds.tangent, dtype=dtype, device=device)
        self.n = len(ds)


def _group_tensors(physics: str, dtype: torch.dtype, device: torch.device) -> tuple:
    s = np.stack([state_matrix(r, physics) for r in D4])
    q = np.stack([response_matrix(r, physics) for r in D4])
    s_inv = np.linalg.inv(s)
    return tuple(torch.as_tensor(a, dtype=dtype, device=device) for a in (s, q, s_inv))


class _Trainer:
    def __init__(
        self, cfg: TrainConfig, train: Dataset, val: Dataset, material: Any, domain: StateDomain
    ) -> None:
        opt = cfg.training
        self.cfg, self.opt = cfg, opt
        self.device = opt.torch_device()
        self.dtype = getattr(torch, opt.dtype)
        self.domain = domain
        self.material = material
        mcfg = dict(cfg.model)
        mcfg.setdefault("physics", material.physics)
        mcfg.setdefault("image_size", int(train.images.shape[-1]))
        if mcfg["physics"] != material.physics:
            raise ValueError(
                f"model.physics={mcfg['physics']!r} but the data are {material.physics!r}"
            )
        self.model_config = SANOConfig(**mcfg)
        self.physics = material.physics
        self.wav = WaveletNormalizer.fit(
            train.images, material, levels=self.model_config.levels, wavelet=cfg.data.wavelet
        )
        self.norm = Normalization.fit(train, domain)
        torch.manual_seed(opt.seed)
        model = SANO(self.model_config).to(self.dtype)
        hw, c = domain.half_width, domain.center
        lo, hi = np.abs(domain.lower), np.abs(domain.upper)
        layout = layout_of(self.physics)
        nmac = layout.driving
        rms = float(np.sqrt(np.mean(train.response**2))) or 1.0
        kw: dict[str, float] = {
            "state_scale": float(max(lo[:nmac].max(), hi[:nmac].max())),
            "response_scale": rms,
        }
        if layout.theta_index is not None:
            kw.update(
                theta_ref=float(c[layout.theta_index]), theta_scale=float(hw[layout.theta_index])
            )
        model.set_scaling(**kw)
        self.model = model.to(self.device)
        self.optim = torch.optim.Adam(self.model.parameters(), lr=opt.lr)
        d, t = self.dtype, self.device
        self.loss = DataLoss(self.norm, tangent_weight=opt.tangent_weight)
        self.lo = torch.as_tensor(domain.lower, dtype=d, device=t)
        self.hi = torch.as_tensor(domain.upper, dtype=d, device=t)
        self.S, self.Q, self.Sinv = _group_tensors(self.physics, d, t)
        canonical = self.model_config.canonical_translation
        augment = opt.augment or opt.physics_weight > 0
        self.train = _Split(train, self.wav, self.physics, d, t, augment, canonical)
        self.val = _Split(val, self.wav, self.physics, d, t, False, canonical)
        self.ema: dict[str, float] = {}
        self.history: dict[str, list[float]] = {
            k: []
            for k in (
                "train_loss",
                "train_data",
                "train_physics",
                "kl",
                "val_loss",
                "val_response_mse",
                "val_tangent_mse",
                "seconds",
            )
        }
        self.epoch = 0
        self.best_val = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0

    # -- pieces
    def _predict(self, split: _Split, keys: torch.Tensor, states: torch.Tensor) -> Any:
        uniq, inv = torch.unique(keys, return_inverse=True)
        latent = self.model.encode([c[uniq] for c in split.coeffs])
        return self.model.decode(latent, states, cells=inv)

    def _batch_loss(self, idx: torch.Tensor, gen: np.random.Generator) -> dict[str, torch.Tensor]:
        """Loss terms of one batch; the data samples and the physics pairs share one
        encode (distinct (image, symmetry) keys) and one decode call."""
        sp = self.train
        b = idx.numel()
        dev = self.device
        cell = sp.cell[idx]
        if self.opt.augment:
            rot = torch.as_tensor(gen.integers(0, 8, size=b), device=dev)
        else:
            rot = torch.zeros(b, dtype=torch.long, device=dev)
        S, Q, Si = self.S[rot], self.Q[rot], self.Sinv[rot]
        states = torch.einsum("nij,nj->ni", S, sp.states[idx])
        y = torch.einsum("nij,nj->ni", Q, sp.response[idx])
        t = Q @ sp.tangent[idx] @ Si
        keys = [rot * sp.n_cells + cell]
        all_states = [states]
        m = math.ceil(self.opt.physics_fraction * b) if self.opt.physics_weight > 0 else 0
        if m:
            c2 = cell[:m]
            r2 = torch.as_tensor(gen.integers(1, 8, size=m), device=dev)
            u = torch.as_tensor(gen.random((m, self.lo.numel())), dtype=self.dtype, device=dev)
            s = self.lo + (self.hi - self.lo) * u
            keys += [c2, r2 * sp.n_cells + c2]
            all_states += [s, torch.einsum("nij,nj->ni", self.S[r2], s)]
        pred = self._predict(sp, torch.cat(keys), torch.cat(all_states))
        response, tangent = self.loss.terms(pred.response[:b], pred.tangent[:b], y, t)
        out = {"response": response, "tangent": tangent}
        if m:
            qa, qb = pred.response[b : b + m], pred.response[b + m :]
            ta, tb = pred.tangent[b : b + m], pred.tangent[b + m :]
            q2 = self.Q[r2]
            res_q = torch.einsum("nij,nj->ni", q2, qa) - qb
            res_t = q2 @ ta @ self.Sinv[r2] - tb
            out["physics"] = (self.loss.response(res_q) ** 2).mean() + (
                self.loss.tangent(res_t) ** 2
            ).mean()
        else:
            out["physics"] = torch.zeros((), dtype=self.dtype, device=dev)
        out["kl"] = self.model.kl()
        return out

    def _combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        opt = self.opt
        weights = {"response": 1.0, "tangent": opt.tangent_weight}
        total = opt.kl_weight * terms["kl"]
        if not opt.adaptive:
            total = total + opt.physics_weight * terms["physics"]
            return total + sum(w * terms[k] for k, w in weights.items())
        mom = opt.adaptive_momentum
        for k, w in weights.items():
            if w == 0:
                continue
            mag = float(terms[k].detach())
            self.ema[k] = mom * self.ema[k] + (1 - mom) * mag if k in self.ema else mag
            total = total + w * terms[k] / max(self.ema[k], 1e-30)
        if opt.physics_weight > 0:
            # Relative to the data error, not to itself: a near-zero residual divided by
            # its own size would be amplified to O(1) and drive the model to zero output.
            scale = self.ema.get("response", 1.0) + self.ema.get("tangent", 0.0)
            total = total + opt.physics_weight * terms["physics"] / max(scale, 1e-30)
        return total

    def validate(self, split: _Split | None = None) -> dict[str, float]:
        sp = self.val if split is None else split
        self.model.eval()
        with torch.no_grad():
            pred = self._predict(sp, sp.cell, sp.states)
        terms = self.loss.terms(pred.response, pred.tangent, sp.response, sp.tangent)
        r, t = (float(x) for x in terms)
        return {"loss": r + self.loss.tangent_weight * t, "response_mse": r, "tangent_mse": t}

    def learning_rate(self, epoch: int) -> float:
        """The Adam step size of ``epoch`` (0-based): a function of the epoch alone, so a
        resumed run continues the same schedule."""
        opt = self.opt
        if opt.lr_schedule == "constant":
            return opt.lr
        frac = min(epoch / max(opt.epochs - 1, 1), 1.0)
        return opt.lr_min + 0.5 * (opt.lr - opt.lr_min) * (1.0 + math.cos(math.pi * frac))

    def run_epoch(self) -> None:
        opt = self.opt
        e = self.epoch
        for group in self.optim.param_groups:
            group["lr"] = self.learning_rate(e)
        if e == 0:
            self.history["initial_val_loss"] = [self.validate()["loss"]]
        torch.manual_seed(opt.seed * 1_000_003 + e + 1)
        gen = np.random.default_rng([opt.seed, e])
        t0 = time.perf_counter()
        self.model.train()
        order = torch.as_tensor(gen.permutation(self.train.n), device=self.device)
        sums = {"loss": 0.0, "data": 0.0, "physics": 0.0, "kl": 0.0}
        nb = 0
        for lo in range(0, self.train.n, opt.batch_size):
            idx = order[lo : lo + opt.batch_size]
            terms = self._batch_loss(idx, gen)
            loss = self._combine(terms)
            self.optim.zero_grad(set_to_none=True)
            loss.backward()
            if opt.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), opt.grad_clip)
            self.optim.step()
            sums["loss"] += float(loss.detach())
            sums["data"] += float(
                terms["response"].detach() + opt.tangent_weight * terms["tangent"].detach()
            )
            sums["physics"] += float(terms["physics"].detach())
            sums["kl"] += float(terms["kl"].detach())
            nb += 1
        v = self.validate()
        h = self.history
        h["train_loss"].append(sums["loss"] / nb)
        h["train_data"].append(sums["data"] / nb)
        h["train_physics"].append(sums["physics"] / nb)
        h["kl"].append(sums["kl"] / nb)
        h["val_loss"].append(v["loss"])
        h["val_response_mse"].append(v["response_mse"])
        h["val_tangent_mse"].append(v["tangent_mse"])
        h["seconds"].append(time.perf_counter() - t0)
        if v["loss"] < self.best_val:
            self.best_val = v["loss"]
            self.best_state = {k: x.detach().clone() for k, x in self.model.state_dict().items()}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        self.epoch += 1

    @property
    def stopped(self) -> bool:
        p = self.opt.patience
        return self.epoch >= self.opt.epochs or (p > 0 and self.bad_epochs >= p)

    # -- checkpoint
    def checkpoint(self) -> dict[str, Any]:
        return {
            "format": _CKPT_FORMAT,
            "config": _plain_config(self.cfg),
            "epoch": self.epoch,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optim.state_dict(),
            "ema": dict(self.ema),
            "best_val": self.best_val,
            "best_state": None
            if self.best_state is None
            else {k: v.cpu() for k, v in self.best_state.items()},
            "bad_epochs": self.bad_epochs,
            "history": {k: list(v) for k, v in self.history.items()},
        }

    def restore(self, ck: Mapping[str, Any], path: str) -> None:
        if ck.get("format") != _CKPT_FORMAT:
            raise ValueError(f"{path} is not a NeuroScale training checkpoint")
        mine = _plain_config(self.cfg)
        theirs = dict(ck["config"])
        # epochs/patience/progress/device may change on resume (a run trained on CUDA can
        # be finished on the CPU); the rest must match.
        for d in (mine, theirs):
            for k in ("epochs", "patience", "progress", "device"):
                d["training"].pop(k, None)
        if mine != theirs:
            raise ValueError(
                f"checkpoint {path} was written by a different configuration: resume with "
                "the same config (only training.epochs/patience/progress/device may change) "
                "or start afresh without --resume"
            )
        self.model.load_state_dict(ck["model"])
        self.optim.load_state_dict(ck["optimizer"])
        self.ema = dict(ck["ema"])
        self.epoch = int(ck["epoch"])
        self.best_val = float(ck["best_val"])
        bs = ck["best_state"]
        self.best_state = None if bs is None else {k: v.to(self.device) for k, v in bs.items()}
        self.bad_epochs = int(ck["bad_epochs"])
        self.history = {k: list(v) for k, v in ck["history"].items()}

    # -- calibration
    def fit_family(self) -> None:
        """Fit the model's latent family statistics on the training cells (with their
        symmetric images when the split holds them)."""
        self.model.eval()
        coeffs = self.train.coeffs
        rows = coeffs[0].shape[0]
        with torch.no_grad():
            latents = torch.cat(
                [
                    self.model.encode([c[lo : lo + 512] for c in coeffs])
                    for lo in range(0, rows, 512)
                ]
            )
        self.model.fit_family(latents)

    def errors(self, split: _Split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalized response errors (N, r), raw (unscaled) spread (N, r) and the latents
        (C, latent) of the split's cells (untransformed), eval mode, in chunks."""
        self.model.eval()
        rows, chunk = split.n_cells, 512
        with torch.no_grad(), self.model.raw_std():
            latent = torch.cat(
                [
                    self.model.encode([c[lo : min(lo + chunk, rows)] for c in split.coeffs])
                    for lo in range(0, rows, chunk)
                ]
            )
            err, spread = [], []
            for lo in range(0, split.n, 4096):
                sl = slice(lo, lo + 4096)
                pred = self.model.decode(latent, split.states[sl], cells=split.cell[sl])
                err.append(self.loss.response(pred.response - split.response[sl]))
                spread.append(self.loss.response(pred.std))
        e, sp = (torch.cat(x).double().cpu().numpy() for x in (err, spread))
        return e, sp, latent.double().cpu().numpy()

    def calibrate(self) -> dict[str, float]:
        """Fit the cell error head and the calibration (scale, floor, interval multipliers)
        on the validation split, the head cross-fitted over distinct images; returns the
        metrics."""
        model = self.model
        err, spread, latent = self.errors(self.val)
        cells = self.val.cell.cpu().numpy()
        groups = translation_groups(self.val.images)
        folds = min(5, int(groups.max()) + 1)
        if folds >= 2:
            weight, bias, tau = cross_fit_cell_error(latent, err, cells, groups, folds=folds)
            model.set_cell_error_head(weight, bias)
            tau = tau[cells]
        else:
            _log.warning(
                "the validation split holds one distinct microstructure: no cell error head "
                "(τ = 1); generate more cells for a cell-level uncertainty"
            )
            tau = np.ones_like(err)
        before = np.where(spread > 0, spread, np.finfo(float).tiny)
        cal = fit_calibration(err, spread, tau)
        pooled = np.hypot(cal.scale * spread, cal.floor * tau)
        order = symmetry_order(self.val.images)
        factor, table = fit_symmetry_classes(
            err, pooled, order[cells], groups[cells], response_orbits(model.config.physics)
        )
        model.set_std_scale(cal.scale)
        model.set_std_floor(cal.floor * np.asarray(self.norm.response_scale, dtype=float))
        model.set_interval_multipliers(cal.multipliers, factor, table)
        calibrated = pooled * model.class_factor(order[cells])
        k_rows = model.interval_multipliers(LEVELS_P, order[cells])
        k_68_95 = model.interval_multipliers((0.68, 0.95), order[cells])
        cov_b = coverage(err, before, (0.68, 0.95))
        cov_a = coverage(err, calibrated, (0.68, 0.95), k_68_95)
        return {
            "std_scale": cal.scale,
            "std_floor": cal.floor,
            "std_mix": cal.mix,
            "calibration_error_before": calibration_error(err, before),
            "calibration_error_after": calibration_error(err, calibrated, multipliers=k_rows),
            "coverage68_before": float(cov_b[0]),
            "coverage95_before": float(cov_b[1]),
            "coverage68_after": float(cov_a[0]),
            "coverage95_after": float(cov_a[1]),
        }


def _plain_config(cfg: TrainConfig) -> dict[str, Any]:
    return plain_values(cfg.to_dict())


def _load_data(cfg: TrainConfig, comm: MPI.Comm, progress: bool) -> Dataset:
    if cfg.data.dataset is not None:
        return Dataset.load(cfg.data.dataset)
    gen = cfg.data.generate
    if gen is None:  # pragma: no cover - DataConfig guarantees one of the two
        raise ValueError("[data] needs dataset or generate")
    spec = gen.spec()
    if gen.save is not None and os.path.exists(gen.save):
        saved = Dataset.load(gen.save)
        if plain_values(saved.spec.to_dict()) == plain_values(spec.to_dict()):
            _log.info("reusing %s: it holds the dataset that [data.generate] describes", gen.save)
            return saved
        _log.info("%s holds a different dataset: regenerating and replacing it", gen.save)
    data = generate(spec, comm=comm, progress=progress)
    if gen.save is not None:
        if comm.rank == 0:
            data.save(gen.save)
        comm.barrier()
    return data


def train(
    cfg: TrainConfig,
    *,
    comm: MPI.Comm | None = None,
    resume: bool = False,
    dataset: Dataset | None = None,
) -> TrainResult:
    """Train, calibrate and save a SANO model as ``cfg`` says (collective over comm).

    dataset: use this Dataset instead of cfg.data (e.g. already generated). resume: continue
    from cfg.output.checkpoint_path when it exists (it must come from the same config). The
    returned model holds the best-validation weights, calibrated; the model file is written
    to cfg.output.model by rank 0.
    """
    from tqdm.auto import tqdm

    comm = MPI.COMM_WORLD if comm is None else comm
    opt = cfg.training
    show = opt.progress and comm.rank == 0
    data = dataset if dataset is not None else _load_data(cfg, comm, show)
    spec = data.spec
    material, domain = spec.material, spec.domain
    tr, va, _ = split(data, cfg.data.split, seed=cfg.data.split_seed)
    if len(va) == 0:
        raise ValueError("the validation split is empty: generate more cells or raise split[1]")
    t = _Trainer(cfg, tr, va, material, domain)
    ckpt = cfg.output.checkpoint_path
    if resume and os.path.exists(ckpt):
        t.restore(torch.load(ckpt, weights_only=True, map_location=t.device), ckpt)
        _log.info("resumed from %s at epoch %d", ckpt, t.epoch)
    bar = tqdm(
        total=opt.epochs,
        initial=min(t.epoch, opt.epochs),
        desc="training SANO",
        unit="epoch",
        disable=not show,
    )
    with bar:
        while not t.stopped:
            t.run_epoch()
            if comm.rank == 0:
                torch_save_atomic(ckpt, t.checkpoint())
            h = t.history
            bar.set_postfix(train=f"{h['train_data'][-1]:.3g}", val=f"{h['val_loss'][-1]:.3g}")
            bar.update(1)
    if t.best_state is not None:
        t.model.load_state_dict(t.best_state)
    t.fit_family()
    final = t.validate()
    metrics: dict[str, float] = {
        "val_loss": final["loss"],
        "val_response_mse": final["response_mse"],
        "val_tangent_mse": final["tangent_mse"],
        "epochs": float(t.epoch),
    }
    if opt.calibrate:
        metrics.update(t.calibrate())
    t.model.eval()
    hist = {k: list(v) for k, v in t.history.items()}
    extra = {
        "metrics": metrics,
        "train_config": _plain_config(cfg),
        "split_cells": {"train": tr.cell_ids.tolist(), "val": va.cell_ids.tolist()},
    }
    reference = {
        "train": tr.sample_rows(REPLAY_SAMPLES, seed=opt.seed),
        "val": va.sample_rows(CALIBRATION_SAMPLES, seed=opt.seed),
    }
    if comm.rank == 0:
        save_model(
            cfg.output.model,
            t.model,
            domain=domain,
            wavelet=t.wav,
            normalization=t.norm,
            material=material,
            family=spec.family.to_dict(),
            history=hist,
            extra=extra,
            reference=reference,
        )
    comm.barrier()
    meta = {
        "domain_obj": domain,
        "wavelet_obj": t.wav,
        "normalization_obj": t.norm,
        "material_obj": material,
        "family": spec.family.to_dict(),
        "std_scale": float(t.model.std_scale),
        "extra": extra,
        "reference_obj": reference,
    }
    return TrainResult(model=t.model, metadata=meta, history=hist, metrics=metrics)
