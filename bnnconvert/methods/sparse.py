"""Sparse (partial) Bayesian networks, the package's method, with any saliency criterion."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..convert import convert
from ..saliency import CRITERIA, DATA_CRITERIA, compute_saliency
from .variational import VariationalMethod

__all__ = ["SparseBayes"]


class SparseBayes(VariationalMethod):
    """The top ``r_bayes`` fraction of weight entries by ``criterion`` made Bayesian.

    Args:
        model, task, samples, name, beta, prior_mu, prior_sigma, rho_init, moped_delta:
            see :class:`~bnnconvert.methods.variational.VariationalMethod`.
        r_bayes: fraction of entries made Bayesian, in (0, 1] (0.01 = 1 %).
        criterion: "grad2" (the paper), "fisher", "variance" (these need one pass over the
            training data, counted in the training FLOPs), "magnitude" or "random"
            (data-free ablations; "random" is seeded with ``fit``'s seed).
        scope: "global" (the paper's global top-k) or "layer".
        saliency_batches: batches of the saliency pass (default: one epoch).
    """

    name = "partial"

    def __init__(
        self,
        model: nn.Module,
        *,
        r_bayes: float = 0.01,
        criterion: str = "grad2",
        scope: str = "global",
        saliency_batches: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        self.r_bayes = r_bayes
        self.criterion = criterion
        self.scope = scope
        self.num_saliency_batches = saliency_batches

    def convert(self, model: nn.Module, train_data: Iterable, seed: int | None) -> nn.Module:
        if self.criterion in DATA_CRITERIA:
            saliency = compute_saliency(
                model,
                train_data,
                self._loss(),
                criterion=self.criterion,
                num_batches=self.num_saliency_batches,
                batch_format=self.batch_format,
            )
            self.saliency_batches = int(saliency.meta["num_batches"])
        else:
            saliency = compute_saliency(model, None, criterion=self.criterion, seed=seed)
        return convert(model, saliency, self.r_bayes, scope=self.scope, inplace=True, **self.prior)
