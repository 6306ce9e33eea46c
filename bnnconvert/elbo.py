"""The variational objective: KL over the Bayesian entries, beta schedules, the ELBO loss.

KL reduction conventions (both closed form, KL(N(mu, sigma^2) || N(prior_mu, prior_sigma^2))):

- ``"mean"`` (default): the mean over each tensor's Bayesian entries, summed over tensors.
  This is what bayesian-torch and the paper's reference code compute, so the paper's beta
  values (0.01 for classification, 0.2 -> 0.01 for segmentation) carry over.
- ``"sum"``: the textbook KL, the sum over all Bayesian entries. With it, beta plays the
  role of 1 / (number of training samples) in the usual minibatch ELBO, and values
  comparable to "mean" are about beta_mean / k_t (k_t: Bayesian entries per tensor).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._utils import BatchFormat, Inputs, as_batch_format, check_positive_int, model_device
from .layers import bayesian_layers
from .losses import LossFn, default_loss
from .sampling import mc_samples

__all__ = ["BetaSchedule", "ELBOTerms", "elbo_loss", "kl_loss"]


def kl_loss(model: nn.Module, reduction: str = "mean") -> Tensor:
    """KL(q || prior) of every Bayesian entry of ``model`` (a float32 scalar, or wider).

    Deterministic entries contribute nothing; a model without Bayesian layers gives 0.
    See the module docstring for the two reductions.
    """
    total = None
    for _, layer in bayesian_layers(model):
        term = layer.kl_loss(reduction)
        total = term if total is None else total + term
    if total is None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        return torch.zeros((), device=model_device(model))
    return total


class BetaSchedule:
    """The KL weight beta as a function of (epoch, batch), both 0-based.

    Build one with :meth:`constant`, :meth:`linear`, :meth:`cyclical`, :meth:`blundell`,
    or :meth:`parse` ("0.01", "linear:0.2:0.01", "cyclical:0.01:4", "blundell").
    """

    def __init__(self, fn: Callable[[int, int], float], description: str):
        self._fn = fn
        self.description = description

    def __call__(self, epoch: int, batch: int = 0) -> float:
        return float(self._fn(epoch, batch))

    def __repr__(self) -> str:
        return f"BetaSchedule({self.description})"

    @classmethod
    def constant(cls, beta: float) -> BetaSchedule:
        """beta at every step (the paper's classification setting: 0.01)."""
        _check_nonneg(beta=beta)
        return cls(lambda epoch, batch: beta, f"constant {beta}")

    @classmethod
    def linear(cls, start: float, end: float, epochs: int) -> BetaSchedule:
        """From ``start`` at epoch 0 to ``end`` at epoch ``epochs - 1``, then ``end``.

        Either direction: the paper's segmentation sentence anneals 0.2 -> 0.01 while its
        printed formula grows; use linear(0.2, 0.01, E) or linear(0.01, 0.2, E).
        """
        _check_nonneg(start=start, end=end)
        check_positive_int(epochs=epochs)

        def fn(epoch: int, batch: int) -> float:
            t = min(epoch / (epochs - 1), 1.0) if epochs > 1 else 1.0
            return start + (end - start) * t

        return cls(fn, f"linear {start} -> {end} over {epochs} epochs")

    @classmethod
    def cyclical(
        cls, max_beta: float, epochs: int, cycles: int = 4, ratio: float = 0.5
    ) -> BetaSchedule:
        """Cyclical annealing (Fu et al., 2019): in each of ``cycles`` cycles over
        ``epochs`` epochs, beta rises linearly from 0 to ``max_beta`` during the first
        ``ratio`` of the cycle and stays there for the rest."""
        _check_nonneg(max_beta=max_beta)
        check_positive_int(epochs=epochs, cycles=cycles)
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        period = epochs / cycles

        def fn(epoch: int, batch: int) -> float:
            tau = (epoch % period) / period
            return max_beta * min(tau / ratio, 1.0)

        return cls(fn, f"cyclical max {max_beta}, {cycles} cycles over {epochs} epochs")

    @classmethod
    def blundell(cls, num_batches: int, scale: float = 1.0) -> BetaSchedule:
        """Blundell et al. (2015) per-batch weights pi_i = 2^(M-i) / (2^M - 1), i = 1..M
        (M = ``num_batches``): early batches weigh the KL most, and the weights of an
        epoch sum to 1 (times ``scale``)."""
        check_positive_int(num_batches=num_batches)
        _check_nonneg(scale=scale)

        def fn(epoch: int, batch: int) -> float:
            i = batch % num_batches + 1
            return scale * 2.0 ** (-i) / (1.0 - 2.0 ** (-num_batches))

        return cls(fn, f"blundell over {num_batches} batches")

    @classmethod
    def parse(cls, spec: str, epochs: int = 1, num_batches: int = 1) -> BetaSchedule:
        """From a string: "0.01" or "constant:0.01", "linear:START:END",
        "cyclical:MAX[:CYCLES]", "blundell[:SCALE]"."""
        kind, *args = str(spec).split(":")
        try:
            if not args and kind not in ("blundell",):
                return cls.constant(float(kind))
            values = [float(a) for a in args]
            if kind == "constant" and len(values) == 1:
                return cls.constant(values[0])
            if kind == "linear" and len(values) == 2:
                return cls.linear(values[0], values[1], epochs)
            if kind == "cyclical" and len(values) in (1, 2):
                cycles = int(values[1]) if len(values) == 2 else min(4, epochs)
                return cls.cyclical(values[0], epochs, cycles)
            if kind == "blundell" and len(values) <= 1:
                return cls.blundell(num_batches, *values)
        except ValueError as exc:
            raise ValueError(f"bad beta schedule {spec!r}: {exc}") from None
        raise ValueError(
            f"bad beta schedule {spec!r}; use e.g. 0.01, linear:0.2:0.01, cyclical:0.01:4 "
            "or blundell"
        )


def _check_nonneg(**values: float) -> None:
    for name, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


@dataclass
class ELBOTerms:
    """The terms of one ELBO evaluation (scalar tensors): loss = nll + beta * kl."""

    loss: Tensor
    nll: Tensor
    kl: Tensor


def elbo_loss(
    model: nn.Module,
    inputs: Inputs,
    targets: Tensor,
    loss_fn: LossFn | None = None,
    *,
    beta: float,
    samples: int = 5,
    kl_reduction: str = "mean",
    batch_format: BatchFormat | None = None,
) -> ELBOTerms:
    """Mean NLL over ``samples`` posterior draws + beta * KL, for a user's training loop.

    Args:
        model: a converted model (each forward draws fresh noise).
        inputs: (N, ...) batch, or keyword inputs {name: (N, ...)} (e.g. from
            ``batch_format.split(batch)``); targets: what ``loss_fn`` expects.
        loss_fn: (logits, target) -> scalar NLL; default :func:`default_loss`.
        beta: the KL weight (see :class:`BetaSchedule`).
        samples: S, the number of posterior samples (the paper uses 5).
        kl_reduction: "mean" (bayesian-torch convention, default) or "sum".
        batch_format: reads the logits of each output for ``loss_fn`` (its
            ``output_fn``; default: the tensor, ``.logits``, ``["logits"]`` or a tuple's
            first item), see :class:`bnnconvert.BatchFormat`.

    The S forwards go through :func:`bnnconvert.sampling.mc_samples`: where torch.fx can
    trace the model, the part that no Bayesian entry influences runs forward (and, in
    ``backward()``, backward) once, and only the rest S times; the draws and losses equal
    the plain loop's under the same seed, the gradients up to float summation order.

    Call ``terms.loss.backward()``; ``terms.nll``/``terms.kl`` are for logging.
    """
    check_positive_int(samples=samples)
    if any(getattr(m, "bayes_probit", False) for _, m in bayesian_layers(model)):
        raise ValueError(
            "the ELBO needs Monte Carlo samples, but the model predicts with the probit "
            "predictive: call bnnconvert.set_predictive(model, 'sample') before training"
        )
    if any(m.is_kronecker for _, m in bayesian_layers(model)):
        raise ValueError(
            "the ELBO trains rho, but a Kronecker-factored posterior (fit_posterior(..., "
            "covariance='kron')) draws from its fixed factors: convert the model again for "
            "ELBO training"
        )
    fmt = as_batch_format(batch_format)
    loss_fn = loss_fn or default_loss
    outputs = mc_samples(model, inputs, samples)
    nll = sum(loss_fn(fmt.output(out), targets) for out in outputs) / samples
    kl = kl_loss(model, kl_reduction)
    return ELBOTerms(nll + beta * kl, nll, kl)
