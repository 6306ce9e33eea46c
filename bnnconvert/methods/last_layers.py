"""The last n layers fully Bayesian (layer positioning, Zeng et al., 2018)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from ..convert import convert, last_convertible_layers, layer_masks
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
            registration order (:func:`~bnnconvert.convert.last_convertible_layers`),
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
