"""The deterministic baseline, with optional temperature scaling (Guo et al., 2017)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .._utils import Inputs, as_batch_format, move_inputs
from ..calibration import fit_temperature
from .base import FitRun, Method, model_outputs

__all__ = ["Deterministic", "fit_temperature"]


class Deterministic(Method):
    """The user's model trained on with the plain NLL (one forward per prediction).

    Args:
        model, task, name: see :class:`~bnnconvert.methods.Method` (``samples`` is
            accepted and ignored: one forward).
        temperature_scaling: after training, fit one temperature T > 0 on ``val_data``
            (required then) by minimising the validation NLL of logits / T
            (:func:`bnnconvert.calibration.fit_temperature`, the function that also
            calibrates the Bayesian models); predictions use logits / T.
            Classification: T scales the (N, C) logits of softmax or the (N, L) logits
            of sigmoid outputs. Segmentation: one T for
            every pixel, fitted on the per-pixel cross-entropy of all pixels of
            ``val_data`` (their logits are held in memory: keep the set small).

    Attributes:
        temperature: T (1.0 until calibrated).
    """

    name = "deterministic"

    def __init__(
        self,
        model: nn.Module,
        *,
        task: str | None = None,
        samples: int = 1,
        temperature_scaling: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(model, task=task, samples=samples, name=name)
        self.temperature_scaling = temperature_scaling
        self.temperature = 1.0

    def validate_fit(self, run: FitRun) -> None:
        if self.temperature_scaling and run.val_data is None:
            raise ValueError("temperature scaling needs val_data: pass fit(..., val_data=...)")

    def train_model(self, run: FitRun) -> None:
        """NLL training for ``run.epochs`` epochs, then temperature scaling if enabled."""
        self.model = self._fresh()
        self.temperature = 1.0
        self._train(self.model, run)
        if self.temperature_scaling:
            self.calibrate(run.val_data)

    def calibrate(self, val_data: Iterable) -> float:
        """Fit the temperature on (input, target) batches (read by :attr:`batch_format`);
        returns T."""
        self.task = self.task or "multiclass"
        logits, targets = self._logits(val_data)
        activation = "sigmoid" if self.task == "multilabel" else "softmax"
        self.temperature = fit_temperature(logits[None], targets, activation=activation)
        return self.temperature

    def outputs(self, x: Inputs, samples: int) -> Tensor:
        return model_outputs(self.model, x, 1, batch_format=self.batch_format) / self.temperature

    def _logits(self, data: Iterable) -> tuple[Tensor, Tensor]:
        """Logits (N, C, ...) at T = 1 and targets of every batch, on the CPU."""
        outs, targets = [], []
        for batch in data:
            x, y = as_batch_format(self.batch_format).split(batch, need_target=True)
            with torch.no_grad():
                out = model_outputs(
                    self.model, move_inputs(x, self.device), 1, batch_format=self.batch_format
                )
            outs.append(out[0].cpu())
            targets.append(y.cpu())
        return torch.cat(outs), torch.cat(targets)
