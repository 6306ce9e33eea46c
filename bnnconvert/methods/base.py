"""The common protocol of the comparison methods.

Every method is built from the user's own model (trained or not; it is deep-copied, never
modified) and follows one protocol:

    method = SomeMethod(model, task="multiclass", samples=5)
    method.fit(train_loader, epochs=E, seed=0)       # the training budget: E epochs
    pred = method.predict(test_loader)               # the same Prediction as bnnconvert.predict
    method.num_parameters(); method.flops(batch)     # {"train_step", "inference", ...}

``fit`` always starts again from the model given at construction, so calling it twice
does not train twice as long. ``fit`` is one template (:meth:`Method.fit`): a method
implements the hook :meth:`Method.train_model` (and, if it must refuse a fit before
anything trains, :meth:`Method.validate_fit`, or :meth:`Method.check_available` for a task
it does not handle or a missing optional package), never the signature. The training itself
is :func:`bnnconvert.training.train` (plain NLL for deterministic models, the ELBO for
converted ones) with one :class:`~bnnconvert.training.TrainSettings`, and prediction is
:func:`bnnconvert.predict.stream_predictions` over the Monte Carlo forwards of
:func:`bnnconvert.sampling.mc_outputs`, so every method shares one training loop and one
prediction path.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import (
    BatchFormat,
    Inputs,
    as_batch_format,
    check_positive_int,
    model_device,
)
from ..convert import last_convertible_layers
from ..flops import count_flops, count_prediction_flops, training_cost
from ..losses import LossFn, check_task, data_task, task_loss
from ..predict import Prediction, eval_mode, stream_predictions
from ..sampling import mc_outputs
from ..training import TrainResult, TrainSettings, loader_generators, train

__all__ = [
    "FitRun",
    "Method",
    "StackedBatch",
    "last_convertible_layers",
    "model_outputs",
    "reseed_data",
    "stacked_format",
    "stacked_forward",
    "stacked_loss",
]

RUN_OPTIONS = frozenset(
    {"loss_fn", "class_weights", "validate", "device", "checkpoint", "checkpoint_every",
     "resume", "output", "progress", "on_step", "batch_format"}
)  # fmt: skip
"""The keyword arguments of :func:`bnnconvert.training.train` that a fit passes through
(``task`` and ``seed`` are the method's own)."""

RUN_SEED = object()
"""``Method._train``'s default seed: the seed of the fit."""


@dataclass
class FitRun:
    """One call of :meth:`Method.fit`: the data, the budget and how to train.

    Attributes:
        train_data, epochs, seed, val_data: as given to :meth:`Method.fit`.
        settings: the :class:`~bnnconvert.training.TrainSettings` of every
            :func:`~bnnconvert.training.train` call of the fit.
        options: the other keyword arguments of those calls (``class_weights``,
            ``device``, ``progress`` (False unless given), ...).
    """

    train_data: Iterable
    epochs: int
    seed: int | None
    val_data: Iterable | None
    settings: TrainSettings
    options: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    """A method of the comparison: build from a model, fit with a budget, predict.

    Args:
        model: the user's model (trained or untrained); deep-copied.
        task: "multiclass", "multilabel" or "segmentation"; None: ``data.dataset.task`` of
            the training data at :meth:`fit`, else "multiclass". It picks the loss
            (:func:`bnnconvert.losses.task_loss`) and the activation of :meth:`predict`
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
        batch_format: how batches and outputs are read
            (:class:`~bnnconvert.BatchFormat`): ``fit(..., batch_format=...)`` sets it
            for the fit and every later :meth:`predict` and :meth:`flops`; None: tensor
            and (input, target) batches.
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
        check_task(task)
        check_positive_int(samples=samples)
        self.check_available(task)
        self.initial = copy.deepcopy(model)
        self.model = copy.deepcopy(model)
        self.task = task
        self.samples = samples
        self.train_steps = 0
        self.train_samples = 1
        self.saliency_batches = 0
        self.batch_format: BatchFormat | None = None
        if name is not None:
            self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, task={self.task!r})"

    # ------------------------------------------------------------------ protocol
    def fit(
        self,
        train_data: Iterable,
        *,
        epochs: int,
        seed: int | None = None,
        val_data: Iterable | None = None,
        settings: TrainSettings | None = None,
        **train_kwargs: Any,
    ) -> Method:
        """Train for ``epochs`` epochs of ``train_data`` (per member for ensembles).

        Args:
            train_data: (input, target) batches, e.g. :func:`bnnconvert.data.make_loader`.
            epochs: the budget, >= 0 (0: no training).
            seed: seeds torch's, numpy's and Python's RNGs and the order of a DataLoader
                with its own generator (:func:`reseed_data`): a fit is reproducible on
                its own.
            val_data: validation batches, for the methods that use them (temperature
                scaling).
            settings: how to train (:class:`~bnnconvert.training.TrainSettings`);
                variational methods train with their own ``beta`` and ``samples``.
            **train_kwargs: fields of ``settings`` to change (``lr=``, ``beta=``, ...) and
                the other keyword arguments of :func:`bnnconvert.training.train`
                (``class_weights``, ``device``, ``progress`` (default False),
                ``batch_format`` (kept in :attr:`batch_format`), ...).

        Returns ``self``. The template every method shares: it checks the arguments, asks
        :meth:`check_available` (with the task) and :meth:`validate_fit` whether the
        method can fit, resets the step counts and calls :meth:`train_model`.
        """
        run = self._fit_run(train_data, epochs, seed, val_data, settings, train_kwargs)
        task = self.task or data_task(train_data) or "multiclass"
        self.check_available(task)
        self.batch_format = as_batch_format(run.options.get("batch_format"))
        self.validate_fit(run)
        if seed is not None:
            reseed_data(train_data, seed)
        self.task = task
        self.train_steps = 0
        self.saliency_batches = 0
        self.train_model(run)
        return self

    @classmethod  # noqa: B027 (a hook, empty by default)
    def check_available(cls, task: str | None = None) -> None:
        """Hook: raise if the method cannot run here, before anything is built or trained:
        ValueError for a ``task`` it does not handle (None: not known yet), ImportError
        for a missing optional package. Called by the constructor, :meth:`fit` and
        :func:`~bnnconvert.methods.registry.check_method_names`. Default: nothing."""

    def validate_fit(self, run: FitRun) -> None:  # noqa: B027 (a hook, empty by default)
        """Hook: raise (ValueError) before anything trains if the method cannot fit ``run``
        (e.g. temperature scaling without validation data). Default: nothing."""

    @abstractmethod
    def train_model(self, run: FitRun) -> None:
        """Hook: build ``self.model`` from the model given at construction
        (:meth:`_fresh`) and train it for ``run.epochs`` epochs with :meth:`_train`."""

    def train_settings(self, settings: TrainSettings) -> TrainSettings:
        """Hook: the settings of this method's fits, from the caller's ``settings``
        (before the keyword overrides of :meth:`fit` apply). Default: unchanged."""
        return settings

    def outputs(self, x: Inputs, samples: int) -> Tensor:
        """Raw outputs (S', N, C, *spatial) on one input batch x (N, ...) (or keyword
        inputs, see :attr:`batch_format`), in eval mode.

        S' is ``samples`` for stochastic models, 1 for a deterministic one, the number
        of members or heads for ensembles. Called under ``torch.no_grad()`` by
        :meth:`predict`. Default: :func:`bnnconvert.sampling.mc_outputs` of ``self.model``.
        """
        return model_outputs(
            self.model, x, samples if self.stochastic else 1, batch_format=self.batch_format
        )

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
            data: an input tensor (N, ...) or (input, target) batches (a DataLoader),
                or mapping batches read by :attr:`batch_format`; targets are collected in
                ``Prediction.targets``.
            samples: S (default ``self.samples``); see :meth:`outputs`.
            batch_size: split a tensor ``data`` into batches of this size.
            keep_samples: keep the per-sample probabilities (S', N, C, ...).

        Same summaries as :func:`bnnconvert.predict` (mean, variance, entropy, expected
        entropy, mutual information over the S' outputs), so one evaluation compares them.
        """
        samples = self.samples if samples is None else samples
        check_positive_int(samples=samples)
        parts = stream_predictions(
            lambda x: self.outputs(x, samples),
            data,
            activation=self.activation,
            batch_size=batch_size,
            keep_samples=keep_samples,
            device=self.device,
            progress=False,
            batch_format=self.batch_format,
        )
        return Prediction.cat(parts)

    def num_parameters(self) -> int:
        """Parameters held for prediction (every member of an ensemble)."""
        return sum(p.numel() for p in self.model.parameters())

    def flops(self, inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> dict[str, int]:
        """FLOPs on one batch ``inputs`` (N, ...) (or keyword inputs) at the training batch
        size, via :func:`bnnconvert.count_flops` and :func:`bnnconvert.training_cost`.

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
            batch_format=self.batch_format,
        )

    # ------------------------------------------------------------------ helpers
    @property
    def activation(self) -> str:
        return "sigmoid" if self.task == "multilabel" else "softmax"

    @property
    def device(self) -> torch.device:
        return model_device(self.model) or torch.device("cpu")

    def _fit_run(
        self,
        train_data: Iterable,
        epochs: int,
        seed: int | None,
        val_data: Iterable | None,
        settings: TrainSettings | None,
        train_kwargs: Mapping[str, Any],
    ) -> FitRun:
        if isinstance(epochs, bool) or not isinstance(epochs, int):
            raise TypeError(f"epochs must be an integer >= 0, got {epochs!r}")
        if epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
        base = self.train_settings(settings if settings is not None else TrainSettings())
        settings, options = TrainSettings.combine(base, train_kwargs)
        unknown = sorted(set(options) - RUN_OPTIONS)
        if unknown:
            raise TypeError(
                f"fit() got an unexpected keyword argument {unknown[0]!r}; it takes the "
                f"fields of TrainSettings and {', '.join(sorted(RUN_OPTIONS))}"
            )
        return FitRun(train_data, epochs, seed, val_data, settings, {"progress": False, **options})

    def _fresh(self) -> nn.Module:
        """A copy of the model given at construction: every fit starts from it."""
        return copy.deepcopy(self.initial)

    def _train(
        self,
        model: nn.Module,
        run: FitRun,
        *,
        epochs: int | None = None,
        seed: int | object | None = RUN_SEED,
        settings: TrainSettings | None = None,
        **options: Any,
    ) -> TrainResult | None:
        """:func:`bnnconvert.training.train` of ``model`` with the run's epochs, seed,
        settings and options (the arguments given here override them); counts the
        steps."""
        epochs = run.epochs if epochs is None else epochs
        if epochs == 0:
            return None
        result = train(
            model,
            run.train_data,
            epochs,
            settings or run.settings,
            task=self.task,
            seed=run.seed if seed is RUN_SEED else seed,
            **{**run.options, **options},
        )
        self.train_steps += sum(int(h["steps"]) for h in result.history)
        return result

    def _loss(self, class_weights: Tensor | None = None) -> LossFn:
        return task_loss(self.task, class_weights)


# ---------------------------------------------------------------------- shared functions
def model_outputs(
    model: nn.Module, x: Inputs, samples: int, *, batch_format: BatchFormat | None = None
) -> Tensor:
    """``samples`` forward passes of ``model`` in eval mode: (S, N, C, ...), through
    :func:`bnnconvert.sampling.mc_outputs` (modes restored afterwards; the logits read by
    ``batch_format``)."""
    with eval_mode(model):
        return mc_outputs(model, x, samples, batch_format=batch_format)


def model_flops(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    *,
    inference_samples: int,
    train_samples: int,
    steps: int,
    saliency_batches: int = 0,
    batch_format: BatchFormat | None = None,
) -> dict[str, int]:
    """The FLOP dict of :meth:`Method.flops` for one model; "inference" counts a
    prediction as :func:`bnnconvert.predict` runs it (the part no stochastic operation
    influences once, the rest ``inference_samples`` times:
    :func:`~bnnconvert.flops.count_prediction_flops`)."""
    forward = count_flops(model, inputs, batch_format=batch_format)
    inference = forward.total
    if inference_samples > 1:
        inference = count_prediction_flops(
            model, inputs, inference_samples, batch_format=batch_format
        )
    cost = training_cost(
        model,
        inputs,
        samples=train_samples,
        saliency_batches=saliency_batches,
        batch_format=batch_format,
    )
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


class StackedBatch(nn.Module):
    """Runs ``fn(x)`` -> K outputs (K, N, C, ...) and returns them folded into the batch
    dimension, (K * N, C, ...), so that :func:`bnnconvert.training.train` and its checks see
    an ordinary model output; pair it with :func:`stacked_loss` and train it with
    :func:`stacked_format` of the data's batch format (x may be keyword inputs).

    Used for several posterior samples per step (bayesian-torch) and several heads
    (layer ensembles).
    """

    def __init__(self, module: nn.Module, fn: Callable[..., Tensor] | None = None):
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        out = (self.module if self.fn is None else self.fn)(*args, **kwargs)
        return out.flatten(0, 1)


def stacked_format(batch_format: BatchFormat | None) -> BatchFormat:
    """The batch format of a :class:`StackedBatch` (its output is already the logits
    tensor): ``batch_format``'s keys, no ``output_fn``."""
    fmt = as_batch_format(batch_format)
    return BatchFormat(fmt.input_key, fmt.target_key)


def stacked_forward(model: nn.Module, fmt: BatchFormat, samples: int) -> Callable[..., Tensor]:
    """``fn`` of a :class:`StackedBatch`: ``samples`` forwards of ``model`` on the same
    inputs, their logits read by ``fmt``, stacked (S, N, C, ...)."""

    def forward(*args: Any, **kwargs: Any) -> Tensor:
        return torch.stack([fmt.output(model(*args, **kwargs)) for _ in range(samples)])

    return forward


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
