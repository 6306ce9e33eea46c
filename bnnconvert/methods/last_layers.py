"""The last n layers fully Bayesian (layer positioning, Zeng et al., 2018)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..convert import convert
from ..layers import convertible_parameters
from .base import last_convertible_layers
from .variational import VariationalMethod

__all__ = ["LastLayers", "layer_masks"]


class LastLayers(VariationalMethod):
    """Every entry of the last ``layers`` convertible layers Bayesian, the rest deterministic.

    Zeng et al. found that a few Bayesian layers near the output capture the uncertainty
    of a fully Bayesian CNN, the last dense layer mattering most.

    Args:
        model, task, samples, name, beta, prior_mu, prior_sigma, rho_init, moped_delta:
            see :class:`~bnnconvert.methods.variational.VariationalMethod`.
        layers: n, the number of last convertible layers (Linear/Conv/ConvTranspose) in
            registration order (:func:`~bnnconvert.methods.base.last_convertible_layers`),
            or explicit layer names.
    """

    name = "last_layer"

    def __init__(self, model: nn.Module, *, layers: int | Sequence[str] = 1, **kwargs: Any):
        super().__init__(model, **kwargs)
        if isinstance(layers, int):
            layers = last_convertible_layers(model, layers)
        self.layers = list(layers)
        layer_masks(model, self.layers)  # fail early on unknown names

    def convert(self, model: nn.Module, train_data: Iterable, seed: int | None) -> nn.Module:
        return convert(model, layer_masks(model, self.layers), None, inplace=True, **self.prior)


def layer_masks(model: nn.Module, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """All-True masks of the weight and bias of each named layer (for :func:`convert`)."""
    params = convertible_parameters(model)
    masks = {
        name: torch.ones_like(p, dtype=torch.bool)
        for name, p in params.items()
        if name.rpartition(".")[0] in layers
    }
    found = {name.rpartition(".")[0] for name in masks}
    missing = [layer for layer in layers if layer not in found]
    if missing:
        raise ValueError(
            f"no convertible layer named {missing[0]!r}; give names of Linear/Conv layers "
            "as in model.named_modules()"
        )
    return masks
