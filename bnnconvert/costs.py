"""The cost of each method in FLOPs and parameters, like Table 1 of the paper.

:func:`compare_method_costs` counts, with :func:`~bnnconvert.flops.count_flops` and
:func:`~bnnconvert.flops.training_cost`, what each method of the comparison costs for one
model and one input batch (deterministic, an M-member ensemble, partial Bayesian at each
r_bayes, fully Bayesian with bnnconvert and with bayesian-torch), in multiples of the
deterministic model, without training anything. :func:`flops_report_text` is the report
of ``bnnconvert flops``. (The methods themselves, trained and evaluated on data, are
compared by :func:`bnnconvert.methods.evaluate_methods`.)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._utils import check_positive_int, model_device
from .convert import convert, num_bayesian, to_deterministic
from .flops import (
    BACKWARD_FACTOR,
    FlopReport,
    convention_note,
    count_flops,
    format_flops,
    training_cost,
)

__all__ = [
    "BAYESIAN_TORCH_PRIOR",
    "ComparisonTable",
    "MethodCost",
    "compare_method_costs",
    "compare_methods",
    "flops_report_text",
    "parse_input_shape",
]


@dataclass(frozen=True)
class MethodCost:
    """The cost of one method, absolute FLOPs and parameters (see :class:`ComparisonTable`).

    forward: one eval-mode forward (one sample); inference: a prediction (S_inf samples, or
    M members); train_step: one training step; train_run: the whole training run.
    """

    method: str
    bayesian_entries: int
    parameters: int
    forward: int
    inference: int
    train_step: int
    train_run: int


@dataclass(frozen=True)
class ComparisonTable:
    """Cost of each method in multiples of the deterministic model, like Table 1 of the
    preprint. ``str(table)`` renders markdown; ``multiples()`` gives the numbers.

    The first row is the deterministic model (1x by definition). ``samples`` is S of
    each training step, ``inference_samples`` S_inf of each prediction.
    """

    rows: list[MethodCost]
    samples: int
    inference_samples: int
    members: int
    epochs: int
    full_bayes_epochs: int
    pretrain_epochs: int
    steps_per_epoch: int
    saliency_batches: int
    backward_factor: float
    convention: str
    input_shapes: tuple[tuple[int, ...], ...]
    device: str

    def multiples(self) -> dict[str, dict[str, float]]:
        """{method: {"inference" | "train_step" | "train_run" | "parameters": x det}}."""
        det = self.rows[0]
        keys = ("inference", "train_step", "train_run", "parameters")
        return {r.method: {k: getattr(r, k) / getattr(det, k) for k in keys} for r in self.rows}

    def __str__(self) -> str:
        mult = self.multiples()
        lines = [
            "| method | Bayesian entries | parameters | forward FLOPs | inference | "
            "training step | training run |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            m = mult[r.method]
            lines.append(
                f"| {r.method} | {r.bayesian_entries:,} | {r.parameters:,} "
                f"| {format_flops(r.forward)} "
                f"| {m['inference']:.2f}x | {m['train_step']:.2f}x | {m['train_run']:.2f}x |"
            )
        return "\n".join([*lines, "", self.notes()])

    def notes(self) -> str:
        """What each multiplier counts."""
        shapes = ", ".join(str(s) for s in self.input_shapes)
        s, m, b = self.samples, self.members, self.backward_factor
        return "\n".join([
            f"Counted by fvcore on {self.device}, input {shapes}; "
            f"{convention_note(self.convention)}.",
            f"- inference: S = {self.inference_samples} forwards for the Bayesian models "
            f"(eval mode), M = {m} member forwards for the ensemble, over one deterministic "
            "forward.",
            f"- training step: (1 + {b:g} backward) x (S = {s} training-mode forwards + one KL) "
            f"for the Bayesian models, M = {m} deterministic steps for the ensemble, over "
            "one deterministic step (1 forward + backward). A Bayesian model's forward costs "
            "the deterministic forward plus 5 FLOPs per Bayesian entry (5 for bayesian-torch) "
            f"and its KL about 12 per entry, so its step is about {s}x when k is small "
            "against one forward.",
            f"- training run: {self.epochs} epochs x {self.steps_per_epoch} steps; partial "
            f"models add the saliency pass ({self.saliency_batches} forward+backward "
            f"batches) and {self.pretrain_epochs} epochs of deterministic pretraining; the "
            f"fully Bayesian models train {self.full_bayes_epochs} epochs (ours at r = 1 "
            f"also counts the pretraining, bayesian-torch trains from scratch); the ensemble "
            f"trains M = {m} deterministic models.",
            "- The preprint's multiples (partial 1 % 3.36x, 20 % 3.8x, Bayesian ~15x) do not "
            "state what they count; these numbers count only what is listed here.",
        ])  # fmt: skip


def compare_method_costs(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    *,
    r_values: Sequence[float] = (0.01, 0.05, 0.2),
    members: int = 5,
    samples: int = 5,
    inference_samples: int | None = None,
    epochs: int = 50,
    steps_per_epoch: int = 1,
    saliency_batches: int | None = None,
    pretrain_epochs: int = 0,
    full_bayes_epochs: int | None = None,
    backward_factor: float = BACKWARD_FACTOR,
    bayesian_torch: bool = True,
    device: str | torch.device | None = None,
    convention: str = "fma",
) -> ComparisonTable:
    """The cost of each method for ``model``, in multiples of the deterministic model.

    Rows: deterministic; an M-member ensemble; partial Bayesian for each r in
    ``r_values``; fully Bayesian with bnnconvert (r = 1.0); fully Bayesian with
    bayesian-torch's ``dnn_to_bnn`` (every Conv/Linear, reparameterization layers). The
    Bayesian models are converted with magnitude saliency: the cost depends on k only,
    not on which entries are selected.

    Args:
        model: the deterministic model (a converted one is first made deterministic);
            not modified.
        inputs: one batch at the training batch size (N, ...).
        r_values: the fractions of Bayesian entries of the partial models, in (0, 1].
        members: M, the ensemble size. samples: S, Monte Carlo samples per training step
            (and per prediction unless ``inference_samples`` is given).
        inference_samples: S_inf, Monte Carlo samples per prediction (the inference
            column); default ``samples``. Pass the S that the predictions beside the
            table use.
        epochs: training epochs of every method (the paper: 50).
        steps_per_epoch: optimiser steps (batches) per epoch.
        saliency_batches: batches of the saliency pass (default: one epoch).
        pretrain_epochs: deterministic epochs before the conversion, added to the
            methods that start from the trained model (partial and ours at r = 1); 0 takes
            the trained model as given, as the deterministic and ensemble rows do.
        full_bayes_epochs: epochs of the fully Bayesian models (default: ``epochs``);
            the preprint notes that they needed more.
        backward_factor, device, convention: as in :func:`training_cost`.
        bayesian_torch: include the bayesian-torch row.

    Returns a :class:`ComparisonTable`.

    What the multiples count (F: one deterministic forward on ``inputs``; k: Bayesian
    entries; each multiple is over the deterministic model's same quantity):

    - inference: the ensemble runs M forwards (M x). A Bayesian model runs S_inf forwards
      of a network costing F plus its sampling, 5 FLOPs per Bayesian entry for bnnconvert
      (softplus, the sigma scale, normal draw, multiply, add) and 5 for bayesian-torch
      (exp and log1p instead of softplus, no scale): S_inf x (1 + 5k / F). Every sample
      is counted as a full forward.
    - training step: deterministic (1 + b) x F with b the backward factor; a Bayesian
      model (1 + b) x (S x (F + sampling) + KL), the KL costing about 12 FLOPs per
      Bayesian entry; the ensemble M deterministic steps. So a partial model costs about
      S x = 5x a deterministic step at any small r: the sampling and the KL are O(k), the
      network is paid in full for every sample. The preprint's Table 1 gives 3.36x (1 %),
      3.45x (5 %), 3.8x (20 %) and ~15x (fully Bayesian, averaged over datasets needing
      different epochs) without saying what was counted; these numbers are not
      reproduced here, and this count includes exactly what is listed.
    - training run: steps x step, plus for the partial models the saliency pass
      (``saliency_batches`` x (1 + b) x F) and ``pretrain_epochs`` deterministic epochs
      (ours at r = 1 also counts the pretraining but needs no saliency pass; the
      bayesian-torch model trains from scratch, for ``full_bayes_epochs``).
    - Forwards are counted in eval mode for inference and in training mode for training
      (BatchNorm: 2 vs 5 FLOPs per element).
    """
    inference_samples = samples if inference_samples is None else inference_samples
    check_positive_int(
        members=members,
        samples=samples,
        inference_samples=inference_samples,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
    )
    if full_bayes_epochs is not None:
        check_positive_int(full_bayes_epochs=full_bayes_epochs)
    if pretrain_epochs < 0:
        raise ValueError(f"pretrain_epochs must be >= 0, got {pretrain_epochs}")
    for r in r_values:
        if not 0 < r <= 1:
            raise ValueError(f"every r in r_values must be in (0, 1], got {r}")
    base = to_deterministic(model) if num_bayesian(model) else model
    if device is None:
        device = model_device(base) or torch.device("cpu")
    device = torch.device(device)
    plan = _Plan(
        inputs, samples, inference_samples, epochs * steps_per_epoch, backward_factor, device,
        convention,
        saliency_batches=steps_per_epoch if saliency_batches is None else saliency_batches,
        full_steps=(full_bayes_epochs or epochs) * steps_per_epoch,
    )  # fmt: skip
    det = plan.deterministic(base)
    pretrain = pretrain_epochs * steps_per_epoch * det.train_step
    rows = [det, _ensemble(det, members)]
    rows += [
        plan.bayesian(f"partial r = {100 * r:g} %", base, r, pretrain) for r in r_values if r < 1
    ]
    rows.append(plan.bayesian("Bayesian (bnnconvert, r = 100 %)", base, 1.0, pretrain))
    if bayesian_torch:
        rows.append(plan.bayesian_torch(base))
    shapes = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    return ComparisonTable(
        rows, samples, inference_samples, members, epochs, full_bayes_epochs or epochs,
        pretrain_epochs, steps_per_epoch, plan.saliency_batches, backward_factor, convention,
        tuple(tuple(x.shape) for x in shapes if isinstance(x, Tensor)), str(device),
    )  # fmt: skip


def compare_methods(*args, **kwargs) -> ComparisonTable:
    """Deprecated alias of :func:`compare_method_costs` (the old name did not say that it
    compares costs, not results); it will be removed in a later release."""
    warnings.warn(
        "bnnconvert.compare_methods is deprecated; use bnnconvert.compare_method_costs",
        DeprecationWarning,
        stacklevel=2,
    )
    return compare_method_costs(*args, **kwargs)


def _ensemble(det: MethodCost, members: int) -> MethodCost:
    return MethodCost(
        f"ensemble (M = {members})", 0, members * det.parameters, det.forward,
        members * det.inference, members * det.train_step, members * det.train_run,
    )  # fmt: skip


@dataclass
class _Plan:
    """The shared settings of :func:`compare_method_costs`, and the cost of one method."""

    inputs: Tensor | Sequence[Tensor]
    samples: int
    inference_samples: int
    steps: int
    backward_factor: float
    device: torch.device
    convention: str
    saliency_batches: int
    full_steps: int

    def deterministic(self, model: nn.Module) -> MethodCost:
        inference = self._forward(model, samples=1)
        train = self._train(model, samples=1, steps=self.steps)
        return MethodCost(
            "deterministic", 0, _num_parameters(model), inference.total, inference.total,
            train.per_step, train.per_run,
        )  # fmt: skip

    def bayesian(self, label: str, base: nn.Module, r: float, pretrain: int) -> MethodCost:
        """bnnconvert at r; ``pretrain``: FLOPs of the deterministic training before it."""
        model = convert(base, "magnitude", r)
        full = r >= 1.0
        steps = self.full_steps if full else self.steps
        cost = self._method(label, model, steps, saliency=0 if full else self.saliency_batches)
        return MethodCost(**{**cost.__dict__, "train_run": cost.train_run + pretrain})

    def bayesian_torch(self, base: nn.Module) -> MethodCost:
        from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn

        model = copy.deepcopy(base)  # dnn_to_bnn converts in place
        dnn_to_bnn(model, BAYESIAN_TORCH_PRIOR)
        return self._method("Bayesian (bayesian-torch dnn_to_bnn)", model, self.full_steps, 0)

    def _method(self, label: str, model: nn.Module, steps: int, saliency: int) -> MethodCost:
        inference = self._forward(model, samples=self.inference_samples)
        train = self._train(model, self.samples, steps, saliency)
        return MethodCost(
            label, inference.bayesian_entries, _num_parameters(model),
            inference.per_forward, inference.total, train.per_step, train.per_run,
        )  # fmt: skip

    def _forward(self, model: nn.Module, samples: int) -> FlopReport:
        return count_flops(
            model, self.inputs, samples=samples, device=self.device, convention=self.convention
        )

    def _train(self, model: nn.Module, samples: int, steps: int, saliency: int = 0):
        return training_cost(
            model, self.inputs, samples=samples, steps=steps, saliency_batches=saliency,
            backward_factor=self.backward_factor, device=self.device, convention=self.convention,
        )  # fmt: skip


BAYESIAN_TORCH_PRIOR = {
    "prior_mu": 0.0,
    "prior_sigma": 1.0,
    "posterior_mu_init": 0.0,
    "posterior_rho_init": -3.0,
    "type": "Reparameterization",
    "moped_enable": False,
}
"""dnn_to_bnn settings of the bayesian-torch row (the cost does not depend on them)."""


def _num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------- the flops report
def flops_report_text(
    model: nn.Module,
    input_shape: Sequence[int] | str,
    device: str | torch.device | None = None,
    compare: bool = False,
    samples: int | None = None,
    convention: str = "fma",
) -> str:
    """The text of ``bnnconvert flops``: the per-module FLOP table of ``model`` on a random
    input of ``input_shape`` ("1,3,224,224" or a sequence of ints), and with ``compare``
    the method comparison table (markdown). ``samples``: the Monte Carlo forwards of the
    FLOP table and S_inf of the comparison's inference column (None: 1 forward, and the
    comparison's default S = 5; its training columns keep S = 5). Raises ValueError for a
    bad shape or an input the model rejects."""
    shape = parse_input_shape(input_shape)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    inputs = torch.randn(shape, dtype=dtype)
    forwards = 1 if samples is None else samples
    text = str(count_flops(model, inputs, samples=forwards, device=device, convention=convention))
    if compare:
        table = compare_method_costs(
            model, inputs, inference_samples=samples, device=device, convention=convention
        )
        text += "\n\nCost of each method, in multiples of the deterministic model:\n\n"
        text += str(table)
    return text


def parse_input_shape(shape: Sequence[int] | str) -> tuple[int, ...]:
    """'1,3,224,224' (or 1x3x224x224, or a sequence) -> (1, 3, 224, 224), all >= 1."""
    parts = shape.replace("x", ",").split(",") if isinstance(shape, str) else list(shape)
    try:
        dims = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"bad input shape {shape!r}: give positive integers such as 1,3,224,224")
    return dims
