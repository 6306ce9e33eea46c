"""The training loop of the method: step 1 (deterministic) and step 3 (ELBO), one mechanism.

:func:`train` minimises, for every batch,

    loss = mean over S posterior samples of NLL + beta(epoch, batch) * KL

with :func:`~bnnconvert.elbo.elbo_loss`. A model without Bayesian layers (step 1) uses
S = 1 and beta = 0, i.e. the plain NLL; a converted model (step 3) the ELBO with the
paper's S = 5 samples and beta schedule. How it trains is a
:class:`~bnnconvert.training.TrainSettings` (the paper's SGD, lr 0.01, weight decay 1e-5
not applied to rho, by default); the loss is the class-weighted NLL of the task
(:func:`bnnconvert.losses.task_loss`).

Resumption: with ``checkpoint=PATH`` the run state is written at the end of every epoch
and every ``checkpoint_every`` steps, and ``resume=True`` continues from it, reproducing
the uninterrupted run exactly (see :mod:`bnnconvert.training.checkpoint`). The checkpoint
is removed once the final ``output`` is written.

Several processes: under an initialised torch.distributed process group of two or more
processes, :func:`train` trains with DistributedDataParallel (the data sharded, each rank
with its own posterior noise, rank 0 writing the files); see
:mod:`bnnconvert.training.distributed` for what changes and how to launch it. Mixed
precision: ``amp="bf16"`` or ``"fp16"`` runs the forward passes under ``torch.autocast``
(sigma, the samples' noise and the KL stay in float32); "fp16" scales the loss with a
``torch.amp.GradScaler`` (its state is in the checkpoint).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._utils import (
    BatchFormat,
    Inputs,
    as_batch_format,
    check_output_path,
    check_positive_int,
    inputs_device,
    is_main_process,
    model_device,
)
from ..elbo import BetaSchedule, elbo_loss
from ..layers import bayesian_layers
from ..losses import LossFn, data_task, task_loss
from ..metrics import evaluate
from ..predict import Prediction, amp_autocast, predict, prediction_samples
from ..serialization import save
from . import distributed
from .checkpoint import (
    RunState,
    checkpoint_exists,
    epoch_batches,
    restore_checkpoint,
    seed_everything,
    write_checkpoint,
)
from .checks import check_fit
from .settings import TrainSettings

__all__ = ["StepInfo", "TrainResult", "evaluate_model", "train"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------- evaluation
def evaluate_model(
    model: nn.Module,
    data: Iterable,
    task: str | None = None,
    *,
    samples: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    amp: str | None = None,
    batch_format: BatchFormat | None = None,
) -> tuple[Prediction, dict[str, float]]:
    """Monte Carlo prediction on ``data`` and every metric of the task.

    Args:
        model: a converted model (``samples`` posterior samples; None: the S it was
            calibrated with, else 5) or a deterministic one (one forward: its samples would
            be identical).
        data: (input, target) batches (mappings: ``batch_format``).
        task: "multiclass", "multilabel" or "segmentation"; default ``data.dataset.task``,
            else "multiclass".
        samples, device, progress, amp, batch_format: see :func:`~bnnconvert.predict`.

    Returns (the :class:`~bnnconvert.predict.Prediction` without per-sample probabilities,
    {metric: value} as :func:`bnnconvert.metrics.evaluate` gives it).
    """
    task = task or data_task(data) or "multiclass"
    activation = "sigmoid" if task == "multilabel" else "softmax"
    prediction = predict(
        model,
        data,
        prediction_samples(model, samples),
        activation=activation,
        keep_samples=False,
        device=device,
        output_device="cpu",
        progress=progress,
        amp=amp,
        batch_format=batch_format,
    )
    return prediction, evaluate(prediction, task=task)


@dataclass
class StepInfo:
    """What :func:`train` passes to ``on_step`` after each optimiser step."""

    epoch: int  # 0-based
    step: int  # steps done in this epoch
    global_step: int  # steps done in the run
    loss: float
    nll: float
    kl: float
    beta: float


@dataclass
class TrainResult:
    """The trained model (trained in place), one dict of metrics per epoch, and the
    (epoch, step) the run resumed from (None for a fresh run)."""

    model: nn.Module
    history: list[dict[str, float]]
    resumed_from: tuple[int, int] | None = None


# ----------------------------------------------------------------------- the run
class _Objective(nn.Module):
    """One training step's loss as a module: ``forward(x, y, beta)`` returns (loss, nll, kl)
    of :func:`~bnnconvert.elbo.elbo_loss` (S posterior samples and the KL; x the inputs
    as ``fmt`` reads them, a tensor or keyword tensors).

    Under torch.distributed it is what DistributedDataParallel wraps: the S forwards and
    the KL of a step run in one DDP forward, so the backward averages the gradients of mu
    and rho over the ranks once per step.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        samples: int,
        kl_reduction: str,
        fmt: BatchFormat | None = None,
    ):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.samples = samples
        self.kl_reduction = kl_reduction
        self.fmt = as_batch_format(fmt)

    def forward(self, x: Inputs, y: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
        terms = elbo_loss(
            self.model,
            x,
            y,
            self.loss_fn,
            beta=beta,
            samples=self.samples,
            kl_reduction=self.kl_reduction,
            batch_format=self.fmt,
        )
        return terms.loss, terms.nll.detach(), terms.kl.detach()


def _optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    """SGD or Adam over the parameters that require grad; rho gets no weight decay (the KL
    term regularises it) and the learning rate ``rho_lr``: ours ``{name}_rho`` and
    bayesian-torch's ``rho_weight``/``rho_kernel``/``rho_bias``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            leaf = name.rsplit(".", 1)[-1]
            is_rho = leaf.endswith("_rho") or leaf.startswith("rho_")
            (no_decay if is_rho else decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}] if decay else []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr": s.rho_lr or s.lr})
    if not groups:
        raise ValueError("no parameter requires grad: nothing to train")
    if s.optimizer == "adam":
        return torch.optim.Adam(groups, lr=s.lr)
    return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum)


def _scheduler(optimizer: torch.optim.Optimizer, name: str, epochs: int):
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return None


def _beta(beta: BetaSchedule | str | float, epochs: int, num_batches: int | None):
    if isinstance(beta, BetaSchedule):
        return beta
    if isinstance(beta, str):
        if beta.startswith("blundell") and num_batches is None:
            raise ValueError("the blundell beta schedule needs data with a length")
        return BetaSchedule.parse(beta, epochs, num_batches or 1)
    return BetaSchedule.constant(float(beta))


def _warn_if_not_joined() -> None:
    """A launcher started several processes but torch.distributed was not initialised."""
    env = distributed.launch_env()
    if env is not None and env[1] > 1 and not distributed.is_distributed():
        log.warning(
            "started as rank %d of %d but torch.distributed is not initialised: this process "
            "trains alone on all the data; call "
            "bnnconvert.training.distributed.init_from_env() first",
            env[0],
            env[1],
        )


def train(
    model: nn.Module,
    data: Iterable,
    epochs: int,
    settings: TrainSettings | None = None,
    *,
    task: str | None = None,
    loss_fn: LossFn | None = None,
    class_weights: Tensor | None = None,
    validate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    output: str | os.PathLike | None = None,
    progress: bool = True,
    on_step: Callable[[StepInfo], None] | None = None,
    batch_format: BatchFormat | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train ``model`` in place: plain NLL if it has no Bayesian layer, else the ELBO.

    Args:
        model: a deterministic model (step 1) or a converted one (step 3).
        data: (input, target) batches, e.g. :func:`~bnnconvert.data.make_loader`; a
            DataLoader with a seeded generator makes the run reproducible and resumable
            to the batch.
        epochs: E, passes over ``data``.
        settings: how to train (:class:`~bnnconvert.training.TrainSettings`: beta, S
            samples, KL reduction, SGD, learning-rate schedule, precision); default the
            paper's.
        task, class_weights: pick the loss (:func:`~bnnconvert.losses.task_loss`);
            ``loss_fn`` overrides both. task None: ``data.dataset.task`` if it has one,
            else inferred per batch.
        validate: called with the model after every epoch; its metrics join the history.
        device: where to train (default: where the model is); under a launcher a bare
            "cuda" is this process's GPU, ``cuda:LOCAL_RANK``.
        seed: seeds torch, numpy and Python's RNGs when the run starts (not on resume);
            rank r of a process group is seeded with
            :func:`~bnnconvert.training.distributed.rank_seed` (seed, r), and the data
            order of a sharded DataLoader follows ``seed`` on every rank.
        checkpoint: file of the resumable run state
            (:mod:`bnnconvert.training.checkpoint`).
        checkpoint_every: also write it every this many optimiser steps.
        resume: continue from ``checkpoint`` if it exists (its settings must match).
        output: write the trained model there with :func:`bnnconvert.save` (atomically),
            then delete ``checkpoint``.
        progress: tqdm bars over batches; per-epoch summaries go to ``logging`` (INFO).
        on_step: called with a :class:`StepInfo` after every optimiser step.
        batch_format: how to read mapping batches (``input_key``, ``target_key``) and
            structured outputs (``output_fn``); see :class:`bnnconvert.BatchFormat`.
        **overrides: fields of ``settings`` to change for this run (``beta=``,
            ``samples=``, ``kl_reduction=``, ``lr=``, ``momentum=``, ``weight_decay=``,
            ``lr_schedule=``, ``amp=``, ``optimizer=``, ``rho_lr=``, ``train_mode=``); a
            name that is not a field raises TypeError.

    Under an initialised torch.distributed process group of two or more processes, every
    rank calls :func:`train` with the same arguments; see
    :mod:`bnnconvert.training.distributed`. The metrics of ``on_step`` and the history are
    then means over the ranks.

    Returns a :class:`TrainResult`.
    """
    settings, unknown = TrainSettings.combine(settings, overrides)
    if unknown:
        raise TypeError(f"train() got an unexpected keyword argument {next(iter(unknown))!r}")
    check_positive_int(epochs=epochs)
    fmt = as_batch_format(batch_format)
    if checkpoint_every is not None:
        check_positive_int(checkpoint_every=checkpoint_every)
    for path in (output, checkpoint):
        if path is not None:
            check_output_path(path)
    _warn_if_not_joined()
    device = distributed.rank_device(device)
    if device is not None:
        model.to(device)
    task = task or data_task(data)
    loss_fn = loss_fn or task_loss(task, class_weights)
    data = distributed.shard(data, seed)
    check_fit(model, data, loss_fn, task, batch_format=fmt)
    run, schedule = _new_run(model, data, epochs, settings, loss_fn, seed, task, fmt)
    resumed = _start(run, data, checkpoint if resume else None, seed)
    run.objective = distributed.wrap(run.objective, model_device(model))
    step_fn = partial(_step, schedule=schedule, amp=settings.amp, fmt=fmt)
    progress = progress and is_main_process()
    while run.epoch < epochs:
        _run_epoch(run, data, step_fn, checkpoint, checkpoint_every, progress, on_step)
        _end_epoch(run, validate)
        if checkpoint is not None:
            write_checkpoint(run, Path(checkpoint), data)
    distributed.broadcast_buffers(model)  # every rank returns rank 0's model
    if output is not None:
        save(model, output)  # rank 0 only
        if checkpoint is not None and is_main_process():
            Path(checkpoint).unlink(missing_ok=True)
    distributed.barrier()  # every rank returns once the output is written
    return TrainResult(model, run.history, resumed)


def _new_run(
    model: nn.Module,
    data: Iterable,
    epochs: int,
    settings: TrainSettings,
    loss_fn: LossFn,
    seed: int | None,
    task: str | None,
    fmt: BatchFormat,
) -> tuple[RunState, BetaSchedule]:
    """The fresh state of a run (optimiser, scheduler, scaler, fingerprint) and its beta."""
    num_batches = len(data) if hasattr(data, "__len__") else None
    if num_batches == 0:
        raise ValueError("the data yields no batch (fewer samples than one batch?)")
    bayesian = any(True for _ in bayesian_layers(model))
    s = settings
    schedule = _beta(s.beta, epochs, num_batches) if bayesian else BetaSchedule.constant(0.0)
    samples = s.samples if bayesian else 1
    optimizer = _optimizer(model, s)
    fingerprint = {
        "mode": "elbo" if bayesian else "nll", "epochs": epochs, "lr": s.lr,
        "momentum": s.momentum, "weight_decay": s.weight_decay, "lr_schedule": s.lr_schedule,
        "beta": schedule.description, "samples": samples, "kl_reduction": s.kl_reduction,
        "num_batches": num_batches, "seed": seed, "task": task,
        "world_size": distributed.world()[1], "amp": s.amp,
    }  # fmt: skip
    changed = {"optimizer": "sgd", "rho_lr": None, "train_mode": True}  # older checkpoints
    fingerprint.update({k: getattr(s, k) for k, v in changed.items() if getattr(s, k) != v})
    run = RunState(
        model,
        _Objective(model, loss_fn, samples, s.kl_reduction, fmt),
        optimizer,
        _scheduler(optimizer, s.lr_schedule, epochs),
        torch.amp.GradScaler(model_device(model).type, enabled=s.amp == "fp16"),
        fingerprint,
    )
    return run, schedule


def _start(run: RunState, data: Iterable, checkpoint, seed: int | None) -> tuple[int, int] | None:
    """Restore the run from ``checkpoint`` if it exists (returns where it was), else seed
    (each rank of a process group with its own seed)."""
    if checkpoint is not None and checkpoint_exists(Path(checkpoint)):
        restore_checkpoint(run, Path(checkpoint))
        if is_main_process():
            log.info("resuming from %s at epoch %d, step %d (to start afresh: resume=False)",
                     checkpoint, run.epoch + 1, run.step)  # fmt: skip
        return run.epoch, run.step
    rank, size = distributed.world()
    if size > 1:  # without a seed, every process would start from torch's default seed
        seed_everything(distributed.rank_seed(torch.initial_seed() if seed is None else seed, rank))
    elif seed is not None:
        seed_everything(seed)
    f = run.fingerprint
    loss = f"ELBO, {f['samples']} samples, beta {f['beta']}" if f["mode"] == "elbo" else "NLL"
    if is_main_process():
        on = f" on each of {size} processes" if size > 1 else ""
        log.info("training for %d epochs of %s batches%s: %s", f["epochs"], f["num_batches"],
                 on, loss)  # fmt: skip
    return None


def _step(run: RunState, batch: Any, *, schedule: BetaSchedule, amp: str | None, fmt: BatchFormat):
    """One optimiser step on ``batch``; returns its metrics (means over the ranks)."""
    x, y = fmt.split(batch, model_device(run.model), need_target=True)
    beta = schedule(run.epoch, run.step)
    with amp_autocast(inputs_device(x), amp):
        loss, nll, kl = run.objective(x, y, beta)
    values = distributed.mean_over_ranks({"loss": loss.item(), "nll": nll.item(), "kl": kl.item()})
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(
            f"the training loss became {values['loss']} at epoch {run.epoch + 1}, batch "
            f"{run.step + 1}; lower the learning rate (lr=...) or beta, or check the data for NaN"
            + ("; with fp16, try bf16" if amp == "fp16" else "")
        )
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return {**values, "beta": beta}


def _run_epoch(run, data, step_fn, checkpoint, checkpoint_every, progress, on_step) -> None:
    run.objective.train(run.fingerprint.get("train_mode", True))
    total = len(data) if hasattr(data, "__len__") else None
    it = epoch_batches(run, data)
    bar = tqdm(
        it,
        total=total,
        initial=run.step,
        disable=not progress,
        unit="batch",
        desc=f"epoch {run.epoch + 1}/{run.fingerprint['epochs']}",
        leave=False,
    )
    for batch in bar:
        values = step_fn(run, batch)
        run.step += 1
        run.global_step += 1
        for k, v in values.items():
            run.sums[k] = run.sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
        if on_step is not None:
            on_step(StepInfo(run.epoch, run.step, run.global_step, **values))
        if checkpoint is not None and checkpoint_every and run.step % checkpoint_every == 0:
            write_checkpoint(run, Path(checkpoint), data)
    bar.close()
    if run.step == 0:
        raise ValueError("the data yielded no batch; pass a non-empty loader")


def _end_epoch(run: RunState, validate) -> None:
    summary = {"epoch": run.epoch + 1, "steps": run.step}
    summary.update({k: v / run.step for k, v in run.sums.items()})
    summary["lr"] = run.optimizer.param_groups[0]["lr"]
    if run.scheduler is not None:
        run.scheduler.step()
    if validate is not None:  # every rank validates, with its own noise: report the mean
        metrics = {f"val_{k}": float(v) for k, v in validate(run.model).items()}
        summary.update(distributed.mean_over_ranks(metrics))
    run.history.append(summary)
    if is_main_process():
        log.info(
            "epoch %d/%d: %s",
            run.epoch + 1,
            run.fingerprint["epochs"],
            ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if k != "epoch"),
        )
    run.epoch += 1
    run.step = 0
    run.sums = {}
