"""Fully Bayesian networks: bayesian-torch's ``dnn_to_bnn`` with MOPED, or ours at r = 1.

bayesian-torch's converter builds each new layer from a few attributes of the old one:
ConvTranspose layers lose ``output_padding`` and every convolution loses ``padding_mode``
(its layers always zero-pad), so a model relying on either changes its outputs or fails
(an encoder-decoder with ``ConvTranspose2d(..., output_padding=1)`` no longer matches
its skip connections). What this module does about it:

1. ``output_padding`` is patched back onto the converted ConvTranspose layers (their
   forward reads ``self.output_padding``).
2. ``padding_mode`` other than "zeros" cannot be patched (the forward ignores it);
   layers bayesian-torch cannot build (Conv1d, whose tuple kernel_size it rejects;
   subclasses such as ``NonDynamicallyQuantizableLinear``; custom leaf modules named
   "*Conv*") raise; a
   convertible layer it skips (a model that is itself one layer) stays deterministic.
   All of these fall back to :func:`bnnconvert.convert` at r_bayes = 1.0 with the same
   prior and sigma initialisation (MOPED), with a ``UserWarning`` saying why.
3. With MOPED (mu = the trained weights), the converted model must reproduce the
   trained model at mu: on the first training batch, in eval mode, with every rho set
   to -inf (sigma = 0). Any mismatch also falls back, with a warning.

``backend_used`` records which converter the fitted model comes from.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .._utils import BatchFormat, Inputs, as_batch_format, split_batch
from ..convert import convert
from ..elbo import BetaSchedule
from ..layers import is_convertible
from ..predict import eval_mode
from ..training import first_batch
from .base import FitRun, StackedBatch, stacked_format, stacked_forward, stacked_loss
from .variational import VariationalMethod

__all__ = ["BACKENDS", "FullBayes", "bayesian_torch_convert"]

BACKENDS = ("bayesian-torch", "bnnconvert")


class FullBayes(VariationalMethod):
    """Every weight entry Bayesian, initialised from the trained weights (MOPED).

    Args:
        model, task, samples, name, beta, prior_mu, prior_sigma, rho_init:
            see :class:`~bnnconvert.methods.variational.VariationalMethod`.
        backend: "bayesian-torch" (``dnn_to_bnn``, Reparameterization layers, mu and rho
            for every entry, KL "mean" per layer as ours) or "bnnconvert"
            (:func:`bnnconvert.convert` at r_bayes = 1.0).
        moped_delta: MOPED sigma = moped_delta x |w| (default 0.1; None: bayesian-torch
            initialises mu randomly and rho at ``rho_init``, i.e. trains from scratch).

    With the bayesian-torch backend, training uses :func:`bnnconvert.training.train` on a
    wrapper that draws the S samples of a step and adds beta x bayesian-torch's
    ``get_kl_loss``; beta must then be a constant number.
    """

    name = "bayesian"

    def __init__(
        self,
        model: nn.Module,
        *,
        backend: str = "bayesian-torch",
        moped_delta: float | None = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, moped_delta=moped_delta, **kwargs)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "bayesian-torch" and not isinstance(self.beta, (int, float)):
            raise ValueError("the bayesian-torch backend takes a constant beta (a number)")
        self.backend = backend
        self.backend_used = backend

    def convert(self, model: nn.Module, train_data: Iterable, seed: int | None) -> nn.Module:
        if self.backend == "bayesian-torch":
            fmt = self.batch_format
            x, _ = split_batch(first_batch(train_data), self.device, batch_format=fmt)
            converted = bayesian_torch_convert(model, x, batch_format=fmt, **self.prior)
            if converted is not None:
                self.backend_used = "bayesian-torch"
                return converted
        self.backend_used = "bnnconvert"
        return convert(model, "magnitude", 1.0, inplace=True, **self.prior)

    def validate_fit(self, run: FitRun) -> None:
        if self.backend == "bayesian-torch":
            _constant_beta(run.settings.beta)

    def fine_tune(self, run: FitRun) -> None:
        """ELBO training; for a bayesian-torch model through a wrapper drawing S samples."""
        if self.backend_used == "bnnconvert":
            super().fine_tune(run)
            return
        model = self.model
        beta = _constant_beta(run.settings.beta)
        samples = self.train_samples = run.settings.samples
        nll = self._loss(run.options.get("class_weights"))
        loss = stacked_loss(nll, samples, "mean", extra=lambda: beta * _get_kl_loss(model))
        fmt = as_batch_format(self.batch_format)
        wrapper = StackedBatch(model, stacked_forward(model, fmt, samples))
        self._train(wrapper, run, loss_fn=loss, batch_format=stacked_format(fmt))


def bayesian_torch_convert(
    model: nn.Module,
    probe: Inputs,
    *,
    prior_mu: float = 0.0,
    prior_sigma: float = 1.0,
    rho_init: float = -3.0,
    moped_delta: float | None = 0.1,
    batch_format: BatchFormat | None = None,
) -> nn.Module | None:
    """A copy of ``model`` converted by ``dnn_to_bnn``, ``output_padding`` restored, or None
    (with a warning saying why) when the result cannot match the model.

    Args:
        model: the deterministic model (not modified).
        probe: an input batch (N, ...) (or keyword inputs) used to check the outputs at
            mu (MOPED only).
        prior_mu, prior_sigma, rho_init, moped_delta: as in :class:`FullBayes`.
        batch_format: reads the model's outputs (:class:`~bnnconvert.BatchFormat`).
    """
    model = copy.deepcopy(model)
    params = {
        "prior_mu": prior_mu,
        "prior_sigma": prior_sigma,
        "posterior_mu_init": 0.0,
        "posterior_rho_init": rho_init,
        "type": "Reparameterization",
        "moped_enable": moped_delta is not None,
        "moped_delta": moped_delta,
    }
    fmt = as_batch_format(batch_format)
    reason = _unsupported(model) or _convert_and_check(model, probe, params, fmt)
    if reason is None:
        return model
    warnings.warn(
        f"bayesian-torch cannot convert {type(model).__name__} faithfully: {reason}; "
        "falling back to bnnconvert.convert(r_bayes=1.0) with the same prior and sigma "
        "initialisation",
        UserWarning,
        stacklevel=3,
    )
    return None


def _unsupported(model: nn.Module) -> str | None:
    """Why dnn_to_bnn cannot reproduce ``model`` whatever the patches, or None."""
    for name, m in model.named_modules():
        if isinstance(m, _ConvNd) and m.padding_mode != "zeros":
            return f"{name} uses padding_mode={m.padding_mode!r}, which its layers ignore"
    return None


def _convert_and_check(
    model: nn.Module, probe: Inputs, params: dict, fmt: BatchFormat
) -> str | None:
    """dnn_to_bnn in place, ``output_padding``, device and dtype restored; why the result
    does not reproduce the model, or None."""
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn

    moped = params["moped_enable"]
    reference = _reference_output(model, probe, fmt) if moped else None
    original = dict(model.named_modules())
    try:
        dnn_to_bnn(model, params)
    except Exception as exc:  # dnn_to_bnn fails on layers it cannot build
        return f"dnn_to_bnn failed ({type(exc).__name__}: {exc})"
    _restore_attributes(model, original)
    left = [n for n, m in model.named_modules() if is_convertible(m)]
    if left:
        return f"dnn_to_bnn left {left[0]!r} ({type(original[left[0]]).__name__}) unconverted"
    try:
        return _mismatch(model, probe, reference, fmt)
    except Exception as exc:  # the converted model fails on the probe batch
        return f"the converted model fails ({type(exc).__name__}: {exc})"


def _reference_output(model: nn.Module, x: Inputs, fmt: BatchFormat) -> Tensor:
    with eval_mode(model), torch.no_grad():
        return fmt.forward(model, x)


def _restore_attributes(model: nn.Module, original: dict[str, nn.Module]) -> None:
    """Put back what dnn_to_bnn drops: ConvTranspose ``output_padding``; each new layer
    goes to the device and dtype of the layer it replaces."""
    for name, new in model.named_modules():
        old = original.get(name)
        if old is None or new is old:
            continue
        if isinstance(old, _ConvTransposeNd):
            new.output_padding = old.output_padding
        weight = getattr(old, "weight", None)
        if isinstance(weight, Tensor):
            new.to(device=weight.device, dtype=weight.dtype)


def _mismatch(
    model: nn.Module, probe: Inputs, reference: Tensor | None, fmt: BatchFormat
) -> str | None:
    """Why the converted model does not reproduce ``reference`` at mu, or None."""
    with _zero_sigma(model), eval_mode(model), torch.no_grad():
        out = fmt.forward(model, probe)
    if reference is None:
        return None
    if out.shape != reference.shape:
        return f"outputs of shape {tuple(out.shape)} instead of {tuple(reference.shape)}"
    if not torch.allclose(out, reference, rtol=1e-4, atol=1e-5):
        err = (out - reference).abs().max().item()
        return f"the outputs at mu differ from the trained model's (max |diff| {err:.3g})"
    return None


@contextmanager
def _zero_sigma(model: nn.Module) -> Iterator[None]:
    """Within the block, every bayesian-torch rho is -inf: sigma = log1p(exp(rho)) = 0."""
    rhos = [p for n, p in model.named_parameters() if n.rpartition(".")[2].startswith("rho")]
    saved = [p.detach().clone() for p in rhos]
    with torch.no_grad():
        for p in rhos:
            p.fill_(-float("inf"))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(rhos, saved):
                p.copy_(value)


def _get_kl_loss(model: nn.Module) -> Tensor:
    from bayesian_torch.models.dnn_to_bnn import get_kl_loss

    return get_kl_loss(model)


def _constant_beta(beta: BetaSchedule | str | float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise ValueError("the bayesian-torch backend takes a constant beta (a number)")
    return float(beta)
