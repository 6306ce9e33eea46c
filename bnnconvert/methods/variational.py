"""The shared base of the variational methods: convert the model, fine-tune with the ELBO."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from typing import Any

from torch import nn

from ..elbo import BetaSchedule
from .base import Method

__all__ = ["VariationalMethod"]


class VariationalMethod(Method):
    """Convert a copy of the model at :meth:`fit`, then train it with the ELBO of
    :func:`bnnconvert.train.train` (S = ``samples`` posterior samples per step).

    Args:
        model, task, samples, name: see :class:`~bnnconvert.methods.Method`.
        beta: the KL weight (a number, a :class:`~bnnconvert.BetaSchedule` or its string
            form); the paper: 0.01 for classification.
        prior_mu, prior_sigma: the Gaussian prior N(prior_mu, prior_sigma^2).
        rho_init: initial rho of the Bayesian entries, sigma = softplus(rho_init).
        moped_delta: MOPED initialisation sigma = moped_delta x |mu| instead of rho_init.
    """

    stochastic = True

    def __init__(
        self,
        model: nn.Module,
        *,
        task: str | None = None,
        samples: int = 5,
        beta: BetaSchedule | str | float = 0.01,
        prior_mu: float = 0.0,
        prior_sigma: float = 1.0,
        rho_init: float = -3.0,
        moped_delta: float | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(model, task=task, samples=samples, name=name)
        self.beta = beta
        self.prior = {
            "prior_mu": prior_mu,
            "prior_sigma": prior_sigma,
            "rho_init": rho_init,
            "moped_delta": moped_delta,
        }

    @abstractmethod
    def convert(self, model: nn.Module, train_data: Iterable, seed: int | None) -> nn.Module:
        """The converted model (``model`` is a fresh copy that may be converted in place)."""

    def fit(
        self,
        train_data: Iterable,
        *,
        epochs: int,
        seed: int | None = None,
        val_data: Iterable | None = None,
        **train_kwargs: Any,
    ) -> VariationalMethod:
        """Convert the given model (its weights become mu), then ``epochs`` epochs of ELBO
        training (``val_data`` is not used)."""
        self._begin(train_data, epochs, seed)
        self.model = self.convert(self._fresh(), train_data, seed)
        self.fine_tune(train_data, epochs, seed, **train_kwargs)
        return self

    def fine_tune(
        self, train_data: Iterable, epochs: int, seed: int | None, **train_kwargs: Any
    ) -> None:
        """ELBO training of the converted ``self.model`` (beta and S from the method)."""
        train_kwargs.setdefault("beta", self.beta)
        self.train_samples = train_kwargs.setdefault("samples", self.samples)
        self._train(self.model, train_data, epochs, seed, **train_kwargs)
