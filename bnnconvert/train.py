"""The training loops of the method: step 1 (deterministic) and step 3 (ELBO), one mechanism.

:func:`train` minimises, for every batch,

    loss = mean over S posterior samples of NLL + beta(epoch, batch) * KL

with :func:`~bnnconvert.elbo.elbo_loss`. A model without Bayesian layers (step 1) uses
S = 1 and beta = 0, i.e. the plain NLL; a converted model (step 3) the ELBO with the
paper's S = 5 samples and beta schedule. The paper's optimiser is the default: SGD,
lr 0.01, weight decay 1e-5 (not applied to rho: the KL term is its regulariser), with the
class-weighted loss of the task:

- ``"multiclass"``: cross-entropy over (N, C) logits, targets (N,) class indices;
- ``"multilabel"``: binary cross-entropy with logits, targets (N, L) of 0/1;
- ``"segmentation"``: cross-entropy per pixel, logits (N, C, H, W), targets (N, H, W).

Resumption: with ``checkpoint=PATH`` the full run state is written atomically to PATH at
the end of every epoch and every ``checkpoint_every`` optimiser steps: model, optimiser,
learning-rate scheduler, position (epoch, step within the epoch), the running sums of the
epoch, the history, and the RNG states of torch (CPU and CUDA), numpy, Python and the
DataLoader's generators, both as they were when the epoch began and as they are now. A
resumed run (``resume=True``) restores the epoch-start states, re-creates the epoch's
batch order, skips the batches already trained on (they are loaded, not trained on),
restores the current RNG states and continues: on the same machine and thread count it
reproduces the uninterrupted run exactly. The checkpoint is removed once the final
``output`` is written.

Several processes: under an initialised torch.distributed process group of two or more
processes, :func:`train` trains with DistributedDataParallel (the data sharded, each rank
with its own posterior noise, rank 0 writing the files); see :mod:`bnnconvert.distributed`
for what changes and how to launch it. Mixed precision: ``amp="bf16"`` or ``"fp16"`` runs
the forward passes under ``torch.autocast`` (sigma, the samples' noise and the KL stay in
float32); "fp16" scales the loss with a ``torch.amp.GradScaler`` (its state is in the
checkpoint).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from .elbo import BetaSchedule, elbo_loss
from .io import check_output_path, save
from .layers import bayesian_layers
from .predict import Prediction, amp_autocast, eval_mode, mean_weights, predict
from .saliency import LossFn, atomic_torch_save, default_loss, is_main_process, unpack_batch

__all__ = [
    "TASKS",
    "StepInfo",
    "TrainResult",
    "check_fit",
    "checkpoint_path_for",
    "data_class_weights",
    "data_task",
    "evaluate_model",
    "seed_everything",
    "task_loss",
    "train",
]

log = logging.getLogger(__name__)

TASKS = ("multiclass", "multilabel", "segmentation")
CHECKPOINT_FORMAT = "bnnconvert.train-checkpoint"
CHECKPOINT_VERSION = 1
LR_SCHEDULES = ("constant", "cosine")


# ----------------------------------------------------------------------- losses
def task_loss(task: str | None = None, weight: Tensor | None = None) -> LossFn:
    """The NLL of a task as a function (output, target) -> scalar.

    Args:
        task: "multiclass", "multilabel", "segmentation", or None to infer the loss from
            each batch (:func:`~bnnconvert.saliency.default_loss`).
        weight: class weights (C,) for the cross-entropies, or the BCE ``pos_weight`` (L,)
            for "multilabel" (e.g. ``dataset.class_weights()``); None: unweighted.
    """
    if task is None:
        if weight is not None:
            raise ValueError("class weights need a task; pass task='multiclass' or another")
        return default_loss
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "multilabel":
        return partial(_bce, pos_weight=weight)
    return partial(_cross_entropy, weight=weight)


def _cross_entropy(output: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy of logits (N, C, ...) and class indices (N, ...) or (N, 1, ...)."""
    if target.dim() == output.dim() and target.shape[1] == 1:
        target = target[:, 0]
    w = None if weight is None else weight.to(output.device, output.dtype)
    return F.cross_entropy(output, target.long(), weight=w)


def _bce(output: Tensor, target: Tensor, pos_weight: Tensor | None = None) -> Tensor:
    """Binary cross-entropy with logits; output and target (N, L)."""
    pw = None if pos_weight is None else pos_weight.to(output.device, output.dtype)
    return F.binary_cross_entropy_with_logits(output, target.to(output.dtype), pos_weight=pw)


def data_task(data: Iterable) -> str | None:
    """The task of a loader's dataset (``loader.dataset.task``), or None."""
    task = getattr(getattr(data, "dataset", None), "task", None)
    return task if task in TASKS else None


def data_class_weights(data: Iterable) -> Tensor | None:
    """``loader.dataset.class_weights()`` (the paper's weighted loss), or None."""
    fn = getattr(getattr(data, "dataset", None), "class_weights", None)
    return fn() if callable(fn) else None


# ----------------------------------------------------------------------- fit check
def check_fit(
    model: nn.Module, data: Iterable, loss_fn: LossFn | None = None, task: str | None = None
) -> None:
    """Raise ValueError if the data does not fit the model: one forward (at mu, eval mode,
    no gradient) and one loss on the first two samples (or the first batch)."""
    device = next(model.parameters()).device
    x, y = unpack_batch(first_batch(data), device)
    with eval_mode(model), torch.no_grad(), mean_weights(model):
        try:
            out = model(x)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise ValueError(
                f"the data does not fit the model: inputs of shape {tuple(x.shape[1:])} fail in "
                f"its forward ({_first_line(exc)}); check the model's input channels "
                "(--arch-kwargs in_channels=...) and the image size (--size, --as-rgb)"
            ) from None
        _check_classes(out, data, task)
        try:
            (loss_fn or default_loss)(out, y)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ValueError(
                f"the model's outputs {tuple(out.shape[1:])} do not fit the targets "
                f"{tuple(y.shape[1:])} ({_first_line(exc)}); check num_classes "
                "(--arch-kwargs num_classes=...) and --task"
            ) from None


def first_batch(data: Iterable) -> Any:
    """A small batch without advancing a DataLoader's sampler (no RNG is drawn)."""
    dataset = getattr(data, "dataset", None)
    collate = getattr(data, "collate_fn", None)
    if collate is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        if len(dataset) == 0:
            raise ValueError("the data is empty; pass a dataset with at least one sample")
        return collate([dataset[i] for i in range(min(2, len(dataset)))])
    for batch in data:
        return batch
    raise ValueError("the data yielded no batch; pass a non-empty iterable of (input, target)")


def _check_classes(out: Tensor, data: Iterable, task: str | None) -> None:
    classes = getattr(getattr(data, "dataset", None), "num_classes", None)
    if not isinstance(classes, int) or out.dim() < 2 or task not in TASKS:
        return
    width = out.shape[1]
    if (task == "multilabel" and width != classes) or width < classes:
        raise ValueError(
            f"the model outputs {width} {'labels' if task == 'multilabel' else 'classes'} but "
            f"the data has {classes}; build the model with num_classes={classes} "
            "(--arch-kwargs num_classes=...)"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------- evaluation
def evaluate_model(
    model: nn.Module,
    data: Iterable,
    task: str | None = None,
    *,
    samples: int = 5,
    device: str | torch.device | None = None,
    progress: bool = False,
    amp: str | None = None,
) -> tuple[Prediction, dict[str, float]]:
    """Monte Carlo prediction on ``data`` and every metric of the task.

    Args:
        model: a converted model (``samples`` posterior samples) or a deterministic one
            (one forward: its samples would be identical).
        data: (input, target) batches.
        task: "multiclass", "multilabel" or "segmentation"; default ``data.dataset.task``,
            else "multiclass".
        samples, device, progress, amp: see :func:`~bnnconvert.predict`.

    Returns (the :class:`~bnnconvert.predict.Prediction` without per-sample probabilities,
    {metric: value} as :func:`bnnconvert.metrics.evaluate` gives it).
    """
    from .metrics import evaluate

    task = task or data_task(data) or "multiclass"
    if not any(True for _ in bayesian_layers(model)):
        samples = 1
    activation = "sigmoid" if task == "multilabel" else "softmax"
    prediction = predict(
        model,
        data,
        samples,
        activation=activation,
        keep_samples=False,
        device=device,
        output_device="cpu",
        progress=progress,
        amp=amp,
    )
    return prediction, evaluate(prediction, task=task)


# ----------------------------------------------------------------------- results
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


# ----------------------------------------------------------------------- RNG
def loader_generators(data: Iterable) -> list[torch.Generator]:
    """The torch.Generators that decide a DataLoader's order and worker seeds."""
    sampler = getattr(data, "sampler", None)
    batch_sampler = getattr(data, "batch_sampler", None)
    found = [
        getattr(data, "generator", None),
        getattr(sampler, "generator", None),
        getattr(getattr(batch_sampler, "sampler", None), "generator", None),
    ]
    out: list[torch.Generator] = []
    for g in found:
        if isinstance(g, torch.Generator) and all(g is not h for h in out):
            out.append(g)
    return out


def _rng_state(data: Iterable) -> dict[str, Any]:
    """Every RNG state that training draws from, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (global RNG)
    version, internal, gauss_next = random.getstate()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
        "generators": [g.get_state() for g in loader_generators(data)],
    }


def _set_rng_state(state: Mapping[str, Any], data: Iterable, generators: bool = True) -> None:
    """Restore :func:`_rng_state`; ``generators=False`` leaves the data's generators be."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if not generators:
        return
    gens = loader_generators(data)
    if len(gens) != len(state["generators"]):
        raise ValueError("the data's generators differ from the checkpoint's; pass --restart")
    for g, s in zip(gens, state["generators"]):
        g.set_state(s)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's global and torch's RNGs (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global RNG user code draws from)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------- the run
class _Objective(nn.Module):
    """One training step's loss as a module: ``forward(x, y, beta)`` returns (loss, nll, kl)
    of :func:`~bnnconvert.elbo.elbo_loss` (S posterior samples and the KL).

    Under torch.distributed it is what DistributedDataParallel wraps: the S forwards and
    the KL of a step run in one DDP forward, so the backward averages the gradients of mu
    and rho over the ranks once per step.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, samples: int, kl_reduction: str):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.samples = samples
        self.kl_reduction = kl_reduction

    def forward(self, x: Tensor, y: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
        terms = elbo_loss(
            self.model,
            x,
            y,
            self.loss_fn,
            beta=beta,
            samples=self.samples,
            kl_reduction=self.kl_reduction,
        )
        return terms.loss, terms.nll.detach(), terms.kl.detach()


@dataclass
class _Run:
    """The state of one training run, everything a checkpoint must hold."""

    model: nn.Module  # the user's model, unwrapped: what checkpoints and output hold
    objective: nn.Module  # _Objective(model), in DDP under torch.distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler  # enabled for amp="fp16" only
    fingerprint: dict[str, Any]
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    epoch_rng: dict[str, Any] | None = None  # RNG states when the current epoch began
    rng: dict[str, Any] | None = None  # RNG states at the checkpoint (resume only)


def _optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float):
    """SGD; rho gets no weight decay (the KL term regularises it): ours ``{name}_rho`` and
    bayesian-torch's ``rho_weight``/``rho_kernel``/``rho_bias``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            leaf = name.rsplit(".", 1)[-1]
            is_rho = leaf.endswith("_rho") or leaf.startswith("rho_")
            (no_decay if is_rho else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def _scheduler(optimizer: torch.optim.Optimizer, name: str, epochs: int):
    if name not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {name!r}")
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


def _check_args(epochs, samples, lr, checkpoint_every, kl_reduction, amp) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1 steps, got {checkpoint_every}")
    if kl_reduction not in ("mean", "sum"):
        raise ValueError(f"kl_reduction must be 'mean' or 'sum', got {kl_reduction!r}")
    amp_autocast(None, amp)  # raises for an unknown precision


def _warn_if_not_joined() -> None:
    """A launcher started several processes but torch.distributed was not initialised."""
    env = distributed.launch_env()
    if env is not None and env[1] > 1 and not distributed.is_distributed():
        log.warning(
            "started as rank %d of %d but torch.distributed is not initialised: this process "
            "trains alone on all the data; call bnnconvert.distributed.init_from_env() first",
            env[0],
            env[1],
        )


def checkpoint_path_for(output: str | os.PathLike) -> Path:
    """Where the CLI keeps the resumable checkpoint of a run writing ``output``:
    ``<output>.ckpt`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".ckpt")


def train(
    model: nn.Module,
    data: Iterable,
    epochs: int,
    *,
    task: str | None = None,
    loss_fn: LossFn | None = None,
    class_weights: Tensor | None = None,
    beta: BetaSchedule | str | float = 0.01,
    samples: int = 5,
    kl_reduction: str = "mean",
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 1e-5,
    lr_schedule: str = "constant",
    validate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    output: str | os.PathLike | None = None,
    progress: bool = True,
    on_step: Callable[[StepInfo], None] | None = None,
    amp: str | None = None,
) -> TrainResult:
    """Train ``model`` in place: plain NLL if it has no Bayesian layer, else the ELBO.

    Args:
        model: a deterministic model (step 1) or a converted one (step 3).
        data: (input, target) batches, e.g. :func:`~bnnconvert.data.make_loader`; a
            DataLoader with a seeded generator makes the run reproducible and resumable
            to the batch.
        epochs: E, passes over ``data``.
        task, class_weights: pick the loss (:func:`task_loss`); ``loss_fn`` overrides both.
            task None: ``data.dataset.task`` if it has one, else inferred per batch.
        beta: the KL weight: a :class:`~bnnconvert.BetaSchedule`, a string for
            :meth:`BetaSchedule.parse` ("0.01", "linear:0.2:0.01", "blundell"), or a number.
            Ignored (0) for a deterministic model.
        samples: S posterior samples per step (the paper: 5); 1 for a deterministic model.
        kl_reduction: "mean" (bayesian-torch's, the paper's beta values) or "sum".
        lr, momentum, weight_decay: SGD (the paper: lr 0.01, weight decay 1e-5).
        lr_schedule: "constant" (the paper) or "cosine" (annealed per epoch to 0).
        validate: called with the model after every epoch; its metrics join the history.
        device: where to train (default: where the model is); under a launcher a bare
            "cuda" is this process's GPU, ``cuda:LOCAL_RANK``.
        seed: seeds torch, numpy and Python's RNGs when the run starts (not on resume);
            rank r of a process group is seeded with
            :func:`~bnnconvert.distributed.rank_seed` (seed, r), and the data order of a
            sharded DataLoader follows ``seed`` on every rank.
        checkpoint: file of the resumable run state (see the module docstring).
        checkpoint_every: also write it every this many optimiser steps.
        resume: continue from ``checkpoint`` if it exists (its settings must match).
        output: write the trained model there with :func:`bnnconvert.save` (atomically),
            then delete ``checkpoint``.
        progress: tqdm bars over batches; per-epoch summaries go to ``logging`` (INFO).
        on_step: called with a :class:`StepInfo` after every optimiser step.
        amp: "bf16" or "fp16": mixed precision (see the module docstring); None: float32.

    Under an initialised torch.distributed process group of two or more processes, every
    rank calls :func:`train` with the same arguments; see :mod:`bnnconvert.distributed`.
    The metrics of ``on_step`` and the history are then means over the ranks.

    Returns a :class:`TrainResult`.
    """
    _check_args(epochs, samples, lr, checkpoint_every, kl_reduction, amp)
    for path in (output, checkpoint):
        if path is not None:
            check_output_path(path)
    _warn_if_not_joined()
    device = distributed.rank_device(device)
    if device is not None:
        model.to(device)
    bayesian = any(True for _ in bayesian_layers(model))
    task = task or data_task(data)
    loss_fn = loss_fn or task_loss(task, class_weights)
    data = distributed.shard(data, seed)
    check_fit(model, data, loss_fn, task)
    num_batches = len(data) if hasattr(data, "__len__") else None
    if num_batches == 0:
        raise ValueError("the data yields no batch (fewer samples than one batch?)")
    schedule = _beta(beta, epochs, num_batches) if bayesian else BetaSchedule.constant(0.0)
    samples = samples if bayesian else 1
    optimizer = _optimizer(model, lr, momentum, weight_decay)
    fingerprint = {
        "mode": "elbo" if bayesian else "nll", "epochs": epochs, "lr": lr,
        "momentum": momentum, "weight_decay": weight_decay, "lr_schedule": lr_schedule,
        "beta": schedule.description, "samples": samples, "kl_reduction": kl_reduction,
        "num_batches": num_batches, "seed": seed, "task": task,
        "world_size": distributed.world()[1], "amp": None if amp == "none" else amp,
    }  # fmt: skip
    where = next(model.parameters()).device
    run = _Run(
        model,
        _Objective(model, loss_fn, samples, kl_reduction),
        optimizer,
        _scheduler(optimizer, lr_schedule, epochs),
        torch.amp.GradScaler(where.type, enabled=amp == "fp16"),
        fingerprint,
    )
    resumed = _start(run, data, checkpoint if resume else None, seed)
    run.objective = distributed.wrap(run.objective, where)
    step_fn = partial(_step, schedule=schedule, amp=amp)
    progress = progress and is_main_process()
    while run.epoch < epochs:
        _run_epoch(run, data, step_fn, checkpoint, checkpoint_every, progress, on_step)
        _end_epoch(run, validate)
        if checkpoint is not None:
            _write_checkpoint(run, Path(checkpoint), data)
    distributed.broadcast_buffers(model)  # every rank returns rank 0's model
    if output is not None:
        save(model, output)  # rank 0 only
        if checkpoint is not None and is_main_process():
            Path(checkpoint).unlink(missing_ok=True)
    distributed.barrier()  # every rank returns once the output is written
    return TrainResult(model, run.history, resumed)


def _start(run: _Run, data: Iterable, checkpoint, seed: int | None) -> tuple[int, int] | None:
    """Restore the run from ``checkpoint`` if it exists (returns where it was), else seed
    (each rank of a process group with its own seed)."""
    if checkpoint is not None and _checkpoint_exists(Path(checkpoint)):
        _restore(run, Path(checkpoint), data)
        if is_main_process():
            log.info("resuming from %s at epoch %d, step %d (to start afresh: --restart, "
                     "resume=False)", checkpoint, run.epoch + 1, run.step)  # fmt: skip
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


def _checkpoint_exists(path: Path) -> bool:
    """Whether ``path`` exists; under torch.distributed, the same answer on every rank."""
    seen = distributed.gather(path.exists())
    if len(set(seen)) > 1:
        raise ValueError(
            f"the checkpoint {path} exists for ranks {[r for r, s in enumerate(seen) if s]} "
            "only; put it on a file system that every rank reads, or delete it (--restart)"
        )
    return seen[0]


def _step(run: _Run, x: Tensor, y: Tensor, *, schedule: BetaSchedule, amp: str | None):
    """One optimiser step; returns its metrics (means over the ranks)."""
    beta = schedule(run.epoch, run.step)
    with amp_autocast(x.device, amp):
        loss, nll, kl = run.objective(x, y, beta)
    values = distributed.mean_over_ranks({"loss": loss.item(), "nll": nll.item(), "kl": kl.item()})
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(
            f"the training loss became {values['loss']} at epoch {run.epoch + 1}, batch "
            f"{run.step + 1}; lower the learning rate (--lr) or beta, or check the data for NaN"
            + ("; with fp16, try bf16" if amp == "fp16" else "")
        )
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return {**values, "beta": beta}


def _epoch_batches(run: _Run, data: Iterable) -> Iterator:
    """The epoch's batches from ``run.step`` on.

    On resume: the epoch-start RNG states re-create the epoch's order (the data's
    generators are drawn from only by the iterator, a DistributedSampler's order follows
    its seed and the epoch), the batches already trained on are skipped, then the other
    RNGs are set to their states at the checkpoint."""
    distributed.set_epoch(data, run.epoch)
    if run.rng is None:
        run.epoch_rng = _rng_state(data)
        return iter(data)
    _set_rng_state(run.epoch_rng, data)
    it = iter(data)
    for _ in range(run.step):
        next(it)
    _set_rng_state(run.rng, data, generators=False)
    run.rng = None
    return it


def _run_epoch(run, data, step_fn, checkpoint, checkpoint_every, progress, on_step) -> None:
    run.objective.train()
    device = next(run.model.parameters()).device
    total = len(data) if hasattr(data, "__len__") else None
    it = _epoch_batches(run, data)
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
        x, y = unpack_batch(batch, device)
        values = step_fn(run, x, y)
        run.step += 1
        run.global_step += 1
        for k, v in values.items():
            run.sums[k] = run.sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
        if on_step is not None:
            on_step(StepInfo(run.epoch, run.step, run.global_step, **values))
        if checkpoint is not None and checkpoint_every and run.step % checkpoint_every == 0:
            _write_checkpoint(run, Path(checkpoint), data)
    bar.close()
    if run.step == 0:
        raise ValueError("the data yielded no batch; pass a non-empty loader")


def _end_epoch(run: _Run, validate) -> None:
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


# ----------------------------------------------------------------------- checkpoints
def _write_checkpoint(run: _Run, path: Path, data: Iterable) -> None:
    """Write the run state (rank 0; every rank takes part: the RNG states are gathered,
    one entry per rank under torch.distributed)."""
    start = time.perf_counter()
    rng, epoch_rng = _rng_state(data), run.epoch_rng if run.step else None
    if distributed.is_distributed():
        per_rank = distributed.gather((rng, epoch_rng))
        rng, epoch_rng = [r for r, _ in per_rank], [e for _, e in per_rank]
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "fingerprint": run.fingerprint,
        "epoch": run.epoch,
        "step": run.step,
        "global_step": run.global_step,
        "sums": dict(run.sums),
        "history": list(run.history),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": None if run.scheduler is None else run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch_rng": epoch_rng,
        "rng": rng,
    }
    atomic_torch_save(payload, path)
    log.debug("checkpoint %s written in %.2fs", path, time.perf_counter() - start)


def _restore(run: _Run, path: Path, data: Iterable) -> None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"cannot read the training checkpoint {path} ({type(exc).__name__}); delete it or "
            "pass --restart (resume=False)"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a bnnconvert training checkpoint; pass --restart")
    saved = payload["fingerprint"]
    for key, value in run.fingerprint.items():
        old = saved.get(key, 1 if key == "world_size" else None)
        if old != value:
            raise ValueError(
                f"the checkpoint {path} belongs to a run with other settings ({key}: {old!r} "
                f"there, {value!r} now); rerun with its settings to resume, or pass --restart "
                "(resume=False) to discard it"
            )
    try:
        run.model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise ValueError(
            f"the checkpoint {path} does not fit this model ({_first_line(exc)}); pass --restart"
        ) from None
    run.optimizer.load_state_dict(payload["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(payload["scheduler"])
    if payload.get("scaler"):
        run.scaler.load_state_dict(payload["scaler"])
    run.epoch, run.step, run.global_step = payload["epoch"], payload["step"], payload["global_step"]
    run.sums, run.history = dict(payload["sums"]), list(payload["history"])
    rng, epoch_rng = payload["rng"], payload["epoch_rng"]
    if run.fingerprint["world_size"] > 1:  # one entry per rank
        rank = distributed.world()[0]
        rng, epoch_rng = rng[rank], epoch_rng[rank]
    run.rng = rng
    run.epoch_rng = epoch_rng if run.step else rng
