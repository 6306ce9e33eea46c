"""Checkpoint ensembles and SWA (Zhao et al., 2022, "Efficient Bayesian uncertainty
estimation for nnU-Net").

The learning rate of each cycle decays polynomially, then stays constant after a fraction
gamma of the cycle; the weights of the constant phase are samples of a (single-modal)
posterior. With M > 1 cycles, a high restart rate for the first epoch of each later cycle
drives the weights to another mode: the checkpoints of all cycles form a multi-modal
ensemble. SWA averages the same checkpoints in weight space instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import AveragedModel, update_bn

from .._utils import (
    Inputs,
    as_batch_format,
    call_arguments,
    call_model,
    check_positive_int,
    move_inputs,
)
from ..flops import count_flops
from ..predict import eval_mode
from ..training import seed_everything
from .base import FitRun, Method, model_outputs

__all__ = ["SWA", "CheckpointEnsemble", "checkpoint_epochs", "lr_at"]

log = logging.getLogger(__name__)


def lr_at(
    epoch: int,
    *,
    epochs: int,
    cycles: int = 1,
    lr: float = 0.01,
    gamma: float = 0.8,
    exponent: float = 0.9,
    restart_lr: float = 0.1,
) -> float:
    """The learning rate of (0-based) ``epoch``, Eq. (4) of Zhao et al. (2022):

        alpha(t) = alpha_r                                         if t_c = 0 and t >= T_c
                   alpha_0 [1 - min(t_c, gamma T_c) / T] ** eps    otherwise

    with T = ``epochs`` (the whole budget, as printed in Eq. 4), M = ``cycles``,
    T_c = T / M epochs per cycle and t_c = t mod T_c. The restart rate alpha_r is used
    for the first epoch of every cycle but the first (the paper's text: "a high restart
    learning rate is set only for the first epoch in each training cycle"; the first
    cycle starts at alpha_0, as nnU-Net does). With one cycle this is nnU-Net's
    polynomial decay alpha_0 (1 - t / T) ** 0.9, held constant from t = gamma T on.

    Args:
        epoch: t in [0, epochs).
        epochs: T, divisible by ``cycles``.
        cycles: M. lr: alpha_0 (the paper: 0.01). gamma: the decayed fraction of each
            cycle (0.8). exponent: eps (0.9). restart_lr: alpha_r (0.1).
    """
    period = _period(epochs, cycles, gamma)
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch must be in [0, {epochs}), got {epoch}")
    in_cycle = epoch % period
    if in_cycle == 0 and epoch >= period:
        return restart_lr
    return lr * (1.0 - min(in_cycle, gamma * period) / epochs) ** exponent


def checkpoint_epochs(
    epochs: int, cycles: int = 1, gamma: float = 0.8, keep: int | None = None
) -> list[int]:
    """The 0-based epochs after which a checkpoint is kept: those of the constant phase,
    gamma T_c <= t_c <= T_c - 1 in every cycle (the paper's W_c), the last ``keep`` of
    each cycle if given (the paper: 10 of each of 3 cycles, or 30 of one).

    When a cycle is too short to have a constant phase (gamma T_c > T_c - 1), its last
    epoch is kept so that every cycle contributes a checkpoint.
    """
    period = _period(epochs, cycles, gamma)
    start = min(math.ceil(gamma * period - 1e-9), period - 1)
    if start > gamma * period + 1e-9:
        log.info("cycles of %d epochs have no constant phase: keeping their last epoch", period)
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be None or >= 1, got {keep}")
    first = start if keep is None else max(start, period - keep)
    return [c * period + t for c in range(cycles) for t in range(first, period)]


def _period(epochs: int, cycles: int, gamma: float) -> int:
    check_positive_int(cycles=cycles)
    if not isinstance(epochs, int) or epochs < cycles or epochs % cycles:
        raise ValueError(
            f"epochs ({epochs}) must be a positive multiple of cycles ({cycles}): each cycle "
            "has T / M epochs"
        )
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    return epochs // cycles


class CheckpointEnsemble(Method):
    """The checkpoints of the constant-rate phases, averaged in prediction space.

    Args:
        model, task, samples, name: see :class:`~bnnconvert.methods.Method`.
        cycles: M; 1 is the single-modal ensemble, M > 1 the multi-modal one.
        gamma, exponent, restart_lr: the schedule of :func:`lr_at` (alpha_0 is ``fit``'s
            ``lr``).
        keep: checkpoints kept per cycle (the last ones); None: one per epoch of the
            constant phase (:func:`checkpoint_epochs`).

    ``fit(epochs=T)`` trains T epochs in all (M cycles of T / M), one
    :func:`bnnconvert.training.train` call per epoch at that epoch's rate (alpha_0 is the
    settings' ``lr``). SGD momentum, if
    given, restarts every epoch (the default momentum is 0, the paper's nnU-Net uses 0.99).
    ``Prediction.samples`` holds one output per checkpoint.

    Attributes:
        checkpoints: the kept state dicts; kept_epochs: their 0-based epochs;
        lrs: the learning rate the optimiser used in every epoch of the last fit.
    """

    name = "checkpoint_ensemble"

    def __init__(
        self,
        model: nn.Module,
        *,
        cycles: int = 1,
        gamma: float = 0.8,
        exponent: float = 0.9,
        restart_lr: float = 0.1,
        keep: int | None = None,
        task: str | None = None,
        samples: int = 5,
        name: str | None = None,
    ) -> None:
        super().__init__(model, task=task, samples=samples, name=name)
        self.schedule = {"cycles": cycles, "gamma": gamma, "exponent": exponent}
        self.restart_lr = restart_lr
        self.keep = keep
        self.checkpoints: list[dict[str, Tensor]] = []
        self.kept_epochs: list[int] = []
        self.lrs: list[float] = []

    def validate_fit(self, run: FitRun) -> None:
        if run.settings.lr_schedule != "constant":
            raise ValueError(
                "the checkpoint ensemble sets its own learning-rate schedule; leave "
                "lr_schedule='constant'"
            )

    def train_model(self, run: FitRun) -> None:
        """Train ``run.epochs`` epochs on the schedule, keeping the constant-phase
        checkpoints."""
        epochs, cycles, gamma = run.epochs, self.schedule["cycles"], self.schedule["gamma"]
        kept = set(checkpoint_epochs(epochs, cycles, gamma, self.keep))
        self.model = self._fresh()
        self.checkpoints, self.kept_epochs, self.lrs = [], [], []
        if run.seed is not None:
            seed_everything(run.seed)
        for epoch in range(epochs):
            rate = lr_at(
                epoch,
                epochs=epochs,
                lr=run.settings.lr,
                restart_lr=self.restart_lr,
                **self.schedule,
            )
            settings = run.settings.replace(lr=rate)
            result = self._train(self.model, run, epochs=1, seed=None, settings=settings)
            self.lrs.append(result.history[0]["lr"])
            if epoch in kept:
                self._keep(epoch)
        self._finish(run.train_data)

    def _keep(self, epoch: int) -> None:
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.checkpoints.append(state)
        self.kept_epochs.append(epoch)

    def _finish(self, train_data: Iterable) -> None:
        log.info("checkpoint ensemble: kept epochs %s", self.kept_epochs)

    def outputs(self, x: Inputs, samples: int) -> Tensor:
        if not self.checkpoints:
            raise RuntimeError("no checkpoint yet: call fit() first")
        fmt = as_batch_format(self.batch_format)
        args, kwargs = call_arguments(x)
        with eval_mode(self.model):
            outs = [functional_call(self.model, c, args, kwargs) for c in self.checkpoints]
        return torch.stack([fmt.output(out) for out in outs])

    def num_parameters(self) -> int:
        return max(1, len(self.checkpoints)) * super().num_parameters()

    def flops(self, inputs: Tensor | Sequence[Tensor]) -> dict[str, int]:
        """inference: one forward per checkpoint; training: deterministic steps."""
        cost = super().flops(inputs)
        cost["inference"] *= max(1, len(self.checkpoints))
        return cost


class SWA(CheckpointEnsemble):
    """Stochastic weight averaging of the same checkpoints (the paper's SWA baseline):
    :class:`torch.optim.swa_utils.AveragedModel` over the kept checkpoints, then one pass
    over the training data in train mode to recompute the BatchNorm statistics
    (``update_bn``, counted in the training FLOPs). One forward per prediction.

    Same arguments as :class:`CheckpointEnsemble`; no checkpoint is stored.

    Attributes:
        averaged: the AveragedModel; ``averaged.module`` is the SWA model.
    """

    name = "swa"

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.averaged: AveragedModel | None = None
        self.bn_batches = 0

    def _keep(self, epoch: int) -> None:
        if not self.kept_epochs:
            self.averaged = AveragedModel(self.model)
        self.averaged.update_parameters(self.model)
        self.kept_epochs.append(epoch)

    def _finish(self, train_data: Iterable) -> None:
        module = self.averaged.module
        self.bn_batches = 0
        if any(isinstance(m, _BatchNorm) for m in module.modules()):
            caller = _Caller(module).train(module.training)  # update_bn restores its mode
            update_bn(self._bn_inputs(train_data), caller)
            self.bn_batches = len(train_data) if hasattr(train_data, "__len__") else 0
        log.info("SWA: averaged the weights of epochs %s", self.kept_epochs)

    def _bn_inputs(self, data: Iterable) -> Iterator[list[Inputs]]:
        """The inputs of every batch on the model's device, each in a list (update_bn
        calls the model on the first item of a list)."""
        fmt = as_batch_format(self.batch_format)
        for batch in data:
            yield [move_inputs(fmt.split(batch)[0], self.device)]

    def outputs(self, x: Inputs, samples: int) -> Tensor:
        if self.averaged is None:
            raise RuntimeError("no averaged model yet: call fit() first")
        return model_outputs(self.averaged.module, x, 1, batch_format=self.batch_format)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def flops(self, inputs: Tensor | Sequence[Tensor]) -> dict[str, int]:
        """One forward per prediction; training adds the BatchNorm update pass."""
        cost = super().flops(inputs)  # no checkpoint stored: one forward
        bn_pass = count_flops(self.model, inputs, train=True, batch_format=self.batch_format)
        cost["train_run"] += bn_pass.total * self.bn_batches
        return cost


class _Caller(nn.Module):
    """Calls ``module`` on positional or keyword inputs (:func:`call_model`)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Inputs) -> object:
        return call_model(self.module, x)
