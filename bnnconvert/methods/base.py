"""The common protocol of the comparison methods.

Every method is built from the user's own model (trained or not; it is deep-copied, never
modified) and follows one protocol:

    method = SomeMethod(model, task="multiclass", samples=5)
    method.fit(train_loader, epochs=E, seed=0)       # the training budget: E epochs
    pred = method.predict(test_loader)               # the same Prediction as bnnconvert.predict
    method.num_parameters(); method.flops(batch)     # {"train_step", "inference", ...}

``fit`` always starts again from the model given at construction, so calling it twice
does not train twice as long. The training itself is :func:`bnnconvert.train.train`
(plain NLL for deterministic models, the ELBO for converted ones) and the Monte Carlo
forward passes are :func:`bnnconvert.hoist.mc_outputs`, so every method shares one
training loop and one prediction path.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..flops import count_flops, training_cost
from ..hoist import mc_outputs
from ..layers import is_convertible
from ..predict import Prediction, eval_mode, split_batch, summarise_outputs, tensor_batches
from ..saliency import LossFn
from ..train import TASKS, TrainResult, data_task, loader_generators, task_loss, train

__all__ = [
    "Method",
    "StackedBatch",
    "last_convertible_layers",
    "model_outputs",
    "reseed_data",
    "stacked_loss",
]


class Method(ABC):
    """A method of the comparison: build from a model, fit with a budget, predict.

    Args:
        model: the user's model (trained or untrained); deep-copied.
        task: "multiclass", "multilabel" or "segmentation"; None: ``data.dataset.task`` of
            the training data at :meth:`fit`, else "multiclass". It picks the loss
            (:func:`bnnconvert.train.task_loss`) and the activation of :meth:`predict`
            (sigmoid for "multilabel", softmax otherwise).
        samples: S, the default number of posterior samples of :meth:`predict` (and of
            each training step of the variational methods). Deterministic methods and
            ensembles ignore it (one forward, or one per member).
        name: the label of the method in tables (default: the class's ``name``).

    Attributes:
        model: the working model (after :meth:`fit`, the trained one).
        train_steps: optimiser steps run by the last :meth:`fit`, over every member.
        train_samples: forwards per training step (S for the ELBO, else 1).
        saliency_batches: batches of the saliency pass of the last fit (0 if none).
    """

    name = "method"
    stochastic = False
    """True when repeated forwards of the model differ (sampled weights, MC dropout)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        task: str | None = None,
        samples: int = 5,
        name: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if task is not None and task not in TASKS:
            raise ValueError(f"task must be one of {TASKS} or None, got {task!r}")
        _check_samples(samples)
        self.initial = copy.deepcopy(model)
        self.model = copy.deepcopy(model)
        self.task = task
        self.samples = samples
        self.train_steps = 0
        self.train_samples = 1
        self.saliency_batches = 0
        if name is not None:
            self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, task={self.task!r})"

    # ------------------------------------------------------------------ protocol
    @abstractmethod
    def fit(
        self,
        train_data: Iterable,
        *,
        epochs: int,
        seed: int | None = None,
        val_data: Iterable | None = None,
        **train_kwargs: Any,
    ) -> Method:
        """Train for ``epochs`` epochs of ``train_data`` (per member for ensembles).

        ``seed`` seeds torch's, numpy's and Python's RNGs and the order of a DataLoader
        with its own generator (:func:`reseed_data`): a fit is reproducible on its own.

        ``train_kwargs`` go to :func:`bnnconvert.train.train` (lr, momentum,
        weight_decay, class_weights, device, progress, ...). Returns ``self``.
        """

    def outputs(self, x: Tensor, samples: int) -> Tensor:
        """Raw outputs (S', N, C, *spatial) on one input batch x (N, ...), in eval mode.

        S' is ``samples`` for stochastic models, 1 for a deterministic one, the number
        of members or heads for ensembles. Called under ``torch.no_grad()`` by
        :meth:`predict`. Default: :func:`bnnconvert.hoist.mc_outputs` of ``self.model``.
        """
        return model_outputs(self.model, x, samples if self.stochastic else 1)

    def predict(
        self,
        data: Tensor | Iterable,
        samples: int | None = None,
        *,
        batch_size: int | None = None,
        keep_samples: bool = True,
    ) -> Prediction:
        """The :class:`~bnnconvert.Prediction` of the method on ``data``.

        Args:
            data: an input tensor (N, ...) or (input, target) batches (a DataLoader);
                targets are collected in ``Prediction.targets``.
            samples: S (default ``self.samples``); see :meth:`outputs`.
            batch_size: split a tensor ``data`` into batches of this size.
            keep_samples: keep the per-sample probabilities (S', N, C, ...).

        Same summaries as :func:`bnnconvert.predict` (mean, variance, entropy, expected
        entropy, mutual information over the S' outputs), so one evaluation compares them.
        """
        samples = self.samples if samples is None else samples
        _check_samples(samples)
        device = self.device
        parts = []
        for batch in tensor_batches(data, batch_size):
            x, target = split_batch(batch)
            with torch.no_grad():
                summary = summarise_outputs(self.outputs(x.to(device), samples), self.activation)
            if not keep_samples:
                summary["samples"] = None
            if target is not None:
                target = target.to(summary["probs"].device)
            parts.append(Prediction(activation=self.activation, targets=target, **summary))
        return Prediction.cat(parts)

    def num_parameters(self) -> int:
        """Parameters held for prediction (every member of an ensemble)."""
        return sum(p.numel() for p in self.model.parameters())

    def flops(self, inputs: Tensor | Sequence[Tensor]) -> dict[str, int]:
        """FLOPs on one batch ``inputs`` (N, ...) at the training batch size, via
        :func:`bnnconvert.count_flops` and :func:`bnnconvert.training_cost`.

        Returns {"forward": one eval-mode forward of the working model, "inference": a
        prediction (S forwards, or one per member/checkpoint), "train_step": one
        optimiser step, "train_run": what the last :meth:`fit` ran (steps x step plus
        any extra pass such as the saliency pass)}.
        """
        return model_flops(
            self.model,
            inputs,
            inference_samples=self.samples if self.stochastic else 1,
            train_samples=self.train_samples,
            steps=self.train_steps,
            saliency_batches=self.saliency_batches,
        )

    # ------------------------------------------------------------------ helpers
    @property
    def activation(self) -> str:
        return "sigmoid" if self.task == "multilabel" else "softmax"

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return torch.device("cpu") if p is None else p.device

    def _begin(self, train_data: Iterable, epochs: int, seed: int | None) -> None:
        """At the start of :meth:`fit`: check the budget, resolve the task, reset the step
        count and, with a seed, reseed the data order (:func:`reseed_data`)."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
        if seed is not None:
            reseed_data(train_data, seed)
        self.task = self.task or data_task(train_data) or "multiclass"
        self.train_steps = 0
        self.saliency_batches = 0

    def _fresh(self) -> nn.Module:
        """A copy of the model given at construction: every fit starts from it."""
        return copy.deepcopy(self.initial)

    def _train(
        self,
        model: nn.Module,
        data: Iterable,
        epochs: int,
        seed: int | None,
        **train_kwargs: Any,
    ) -> TrainResult | None:
        """:func:`bnnconvert.train.train` (no progress bars by default); counts the steps."""
        if epochs == 0:
            return None
        train_kwargs.setdefault("progress", False)
        result = train(model, data, epochs, task=self.task, seed=seed, **train_kwargs)
        self.train_steps += sum(int(h["steps"]) for h in result.history)
        return result

    def _loss(self, class_weights: Tensor | None = None) -> LossFn:
        return task_loss(self.task, class_weights)


# ---------------------------------------------------------------------- shared functions
def _check_samples(samples: int) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")


def model_outputs(model: nn.Module, x: Tensor, samples: int) -> Tensor:
    """``samples`` forward passes of ``model`` in eval mode: (S, N, C, ...), through
    :func:`bnnconvert.hoist.mc_outputs` (modes restored afterwards)."""
    with eval_mode(model):
        return mc_outputs(model, x, samples)


def model_flops(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    *,
    inference_samples: int,
    train_samples: int,
    steps: int,
    saliency_batches: int = 0,
) -> dict[str, int]:
    """The FLOP dict of :meth:`Method.flops` for one model."""
    forward = count_flops(model, inputs)
    inference = forward.total * inference_samples
    cost = training_cost(model, inputs, samples=train_samples, saliency_batches=saliency_batches)
    return {
        "forward": forward.total,
        "inference": inference,
        "train_step": cost.per_step,
        "train_run": steps * cost.per_step + cost.saliency,
    }


def reseed_data(data: Iterable, seed: int) -> None:
    """Reseed the generators that decide a DataLoader's order (e.g. from
    :func:`bnnconvert.data.make_loader`), so that a run sees the order of ``seed``.
    Loaders without a generator follow torch's global RNG (seeded by ``train(seed=)``)."""
    for g in loader_generators(data):
        g.manual_seed(seed)


def last_convertible_layers(model: nn.Module, n: int) -> list[str]:
    """Names of the last ``n`` convertible layers (Linear/Conv/ConvTranspose) of ``model``
    in registration order (``named_modules()``), which is the forward order of
    sequential networks, torchvision's ResNets and :class:`bnnconvert.models.UNet`."""
    names = [name for name, m in model.named_modules() if is_convertible(m)]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(names):
        raise ValueError(
            f"n must be an integer in 1..{len(names)} (the model's convertible layers), got {n!r}"
        )
    return names[-n:]


class StackedBatch(nn.Module):
    """Runs ``fn(x)`` -> K outputs (K, N, C, ...) and returns them folded into the batch
    dimension, (K * N, C, ...), so that :func:`bnnconvert.train.train` and its checks see
    an ordinary model output; pair it with :func:`stacked_loss`.

    Used for several posterior samples per step (bayesian-torch) and several heads
    (layer ensembles).
    """

    def __init__(self, module: nn.Module, fn: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        out = self.module(x) if self.fn is None else self.fn(x)
        return out.flatten(0, 1)


def stacked_loss(
    loss_fn: LossFn,
    k: int,
    reduce: str = "mean",
    extra: Callable[[], Tensor] | None = None,
) -> LossFn:
    """The loss of :class:`StackedBatch` outputs (K * N, C, ...): ``loss_fn`` on each of the
    K chunks, averaged (``reduce="mean"``) or summed ("sum"), plus ``extra()`` if given
    (e.g. beta x KL)."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")

    def loss(output: Tensor, target: Tensor) -> Tensor:
        total = sum(loss_fn(o, target) for o in output.chunk(k))
        total = total / k if reduce == "mean" else total
        return total if extra is None else total + extra()

    return loss
