"""MC dropout (Gal and Ghahramani, 2016): dropout before the last layers, kept at test time."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .base import FitRun, Method, last_convertible_layers

__all__ = ["MCDropout", "MonteCarloDropout", "insert_dropout"]


class MCDropout(nn.Dropout):
    """Dropout that stays active in eval mode (MC dropout), elementwise with rate p.

    Whatever the module's mode, ``forward`` drops entries: a model holding it samples at
    prediction time while its BatchNorm layers use their running statistics.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, training=True, inplace=self.inplace)


def insert_dropout(model: nn.Module, layers: Sequence[str], p: float) -> nn.Module:
    """Replace each named layer by ``nn.Sequential(MCDropout(p), layer)``, in place.

    State dict keys of a wrapped layer gain ".1" (``fc.weight`` -> ``fc.1.weight``), the
    layout of torchvision's ``classifier = Sequential(Dropout, Linear)``; every other
    key is unchanged. Returns ``model``.
    """
    modules = dict(model.named_modules())
    for name in layers:
        if not name or name not in modules:
            raise ValueError(f"no submodule named {name!r} to put dropout before")
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent], attr, nn.Sequential(MCDropout(p), modules[name]))
    return model


class MonteCarloDropout(Method):
    """Dropout with rate ``p`` before the last ``layers`` convertible layers, fine-tuned
    with the plain NLL for the budget and sampled S times at prediction.

    Args:
        model, task, samples, name: see :class:`~bnnconvert.methods.Method`.
        p: the dropout rate (nnU-Net checkpoint ensembles' MC-dropout baseline: 0.1).
        layers: n, the number of last convertible layers (registration order, see
            :func:`~bnnconvert.convert.last_convertible_layers`) that get a dropout
            on their input, or explicit layer names.

    Dropout is active in training and prediction (:class:`MCDropout`); BatchNorm follows
    the model's mode (batch statistics in training, running statistics in prediction).
    """

    name = "mc_dropout"
    stochastic = True

    def __init__(
        self,
        model: nn.Module,
        *,
        p: float = 0.1,
        layers: int | Sequence[str] = 1,
        task: str | None = None,
        samples: int = 5,
        name: str | None = None,
    ) -> None:
        super().__init__(model, task=task, samples=samples, name=name)
        if not 0.0 < p < 1.0:
            raise ValueError(f"p must be in (0, 1), got {p}")
        self.p = p
        self.layers = last_convertible_layers(model, layers) if isinstance(layers, int) else layers
        insert_dropout(self.initial, self.layers, p)
        self.model = self._fresh()

    def train_model(self, run: FitRun) -> None:
        """NLL training of the model with dropout for ``run.epochs`` epochs."""
        self.model = self._fresh()
        self._train(self.model, run)
