"""Monte Carlo forward passes: S posterior samples of a model's output.

``mc_outputs`` is the one entry point that prediction and ELBO training use to draw
samples. (Placeholder: the plain loop; the hoisting of the deterministic part of the
network out of the sampling loop replaces the body.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["mc_outputs"]


def mc_outputs(model: nn.Module, x: Tensor, samples: int) -> Tensor:
    """Run ``samples`` stochastic forwards of ``model`` on ``x``.

    Returns a tensor of shape (S, *output_shape), sample s being the s-th forward in
    order. Gradients flow when grad mode is on (usable in training).
    """
    return torch.stack([model(x) for _ in range(samples)])
