"""Monte Carlo prediction with uncertainty, and the deterministic forward at mu."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .layers import bayesian_layers

__all__ = ["mean_weights"]


@contextmanager
def mean_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every Bayesian layer uses its mean mu (no noise).

    The converted model then reproduces the original model's outputs.
    """
    layers = [layer for _, layer in bayesian_layers(model)]
    previous = [layer.bayes_sampling for layer in layers]
    for layer in layers:
        layer.bayes_sampling = False
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous):
            layer.bayes_sampling = flag
