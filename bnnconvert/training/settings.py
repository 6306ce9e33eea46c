"""How to train: one settings object for the loop, the comparison methods, the demo and the CLI.

:class:`TrainSettings` holds the objective (beta, S samples, KL reduction), the optimiser
(SGD's lr, momentum, weight decay, learning-rate schedule) and the precision of a run.
Everything else :func:`~bnnconvert.training.train` takes belongs to one run rather than to
how it trains: the data's loss (task, class weights), where (device), the seed, the files
(checkpoint, output) and the callbacks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._utils import check_positive_int
from ..elbo import BetaSchedule
from ..predict import amp_autocast

__all__ = ["KL_REDUCTIONS", "LR_SCHEDULES", "OPTIMIZERS", "TrainSettings"]

LR_SCHEDULES = ("constant", "cosine")
KL_REDUCTIONS = ("mean", "sum")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainSettings:
    """The hyperparameters of a training run; the defaults are the paper's.

    Attributes:
        beta: the KL weight: a :class:`~bnnconvert.BetaSchedule`, a string for
            :meth:`BetaSchedule.parse` ("0.01", "linear:0.2:0.01", "blundell"), or a
            number. Ignored (0) for a deterministic model.
        samples: S posterior samples per step (the paper: 5); 1 for a deterministic model.
        kl_reduction: "mean" (bayesian-torch's, the paper's beta values) or "sum".
        lr, momentum, weight_decay: SGD (the paper: lr 0.01, no momentum, weight decay
            1e-5; rho gets no weight decay, the KL term regularises it).
        lr_schedule: "constant" (the paper) or "cosine" (annealed per epoch to 0).
        optimizer: "sgd" (the paper) or "adam" (``momentum`` unused). SGD's step on rho is
            scaled by sigma itself (d softplus(rho) / d rho ~ sigma for small sigma) and
            barely moves a small sigma; Adam's is not.
        rho_lr: the learning rate of rho (default: ``lr``).
        train_mode: False keeps every module in eval mode while training (BatchNorm
            running statistics frozen, no dropout): for a posterior fitted around a fixed
            network (:func:`bnnconvert.fit_posterior`'s "vi").
        amp: "bf16" or "fp16": the forward passes under ``torch.autocast`` (sigma, the
            noise and the KL stay in float32; "fp16" scales the loss); None: float32.

    Raises ValueError (TypeError for a wrong type) when built with a bad value.
    """

    beta: BetaSchedule | str | float = 0.01
    samples: int = 5
    kl_reduction: str = "mean"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 1e-5
    lr_schedule: str = "constant"
    amp: str | None = None
    optimizer: str = "sgd"
    rho_lr: float | None = None
    train_mode: bool = True

    def __post_init__(self) -> None:
        check_positive_int(samples=self.samples)
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be 'mean' or 'sum', got {self.kl_reduction!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (self.momentum >= 0 and self.weight_decay >= 0):
            raise ValueError("momentum and weight_decay must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.rho_lr is not None and not (
            isinstance(self.rho_lr, (int, float)) and math.isfinite(self.rho_lr) and self.rho_lr > 0
        ):
            raise ValueError(f"rho_lr must be a positive number or None, got {self.rho_lr!r}")
        amp_autocast(None, self.amp)  # raises for an unknown precision
        if self.amp == "none":
            object.__setattr__(self, "amp", None)

    def replace(self, **changes: Any) -> TrainSettings:
        """A copy with the given fields changed (TypeError for a name that is not one)."""
        _check_names(changes, "TrainSettings.replace()")
        return dataclasses.replace(self, **changes)

    @classmethod
    def combine(
        cls, settings: TrainSettings | None, options: Mapping[str, Any]
    ) -> tuple[TrainSettings, dict[str, Any]]:
        """(``settings`` (default: the defaults) with the fields named in ``options``
        changed, the other options): how a function that takes ``settings=`` keeps the
        single keyword arguments (``lr=0.1``) working."""
        fields = {k: v for k, v in options.items() if k in _FIELDS}
        rest = {k: v for k, v in options.items() if k not in _FIELDS}
        base = settings if settings is not None else cls()
        if not isinstance(base, TrainSettings):
            raise TypeError(f"settings must be a TrainSettings, got {type(base).__name__}")
        return (base.replace(**fields) if fields else base), rest

    def description(self) -> dict[str, Any]:
        """The settings as plain values (the beta schedule as its string), for reports."""
        beta = self.beta.description if isinstance(self.beta, BetaSchedule) else self.beta
        return {**dataclasses.asdict(self), "beta": beta}


_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainSettings))


def _check_names(changes: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(changes) - _FIELDS)
    if unknown:
        raise TypeError(
            f"{where} got an unexpected keyword argument {unknown[0]!r}; TrainSettings has "
            f"{', '.join(sorted(_FIELDS))}"
        )
