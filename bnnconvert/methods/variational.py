"""The shared base of the variational methods: convert the model, fine-tune with the ELBO."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable

from torch import nn

from ..elbo import BetaSchedule
from ..training import TrainSettings
from .base import FitRun, Method

__all__ = ["VariationalMethod"]


class VariationalMethod(Method):
    """Convert a copy of the model at :meth:`fit`, then train it with the ELBO of
    :func:`bnnconvert.training.train` (S = ``samples`` posterior samples per step).

    Its fits train with its own ``beta`` and ``samples`` whatever ``settings`` says; a
    ``beta=`` or ``samples=`` keyword of :meth:`fit` overrides them for that fit.

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

    def train_settings(self, settings: TrainSettings) -> TrainSettings:
        return settings.replace(beta=self.beta, samples=self.samples)

    def train_model(self, run: FitRun) -> None:
        """Convert the given model (its weights become mu), then ``run.epochs`` epochs of
        ELBO training (``val_data`` is not used)."""
        self.model = self.convert(self._fresh(), run.train_data, run.seed)
        self.fine_tune(run)

    def fine_tune(self, run: FitRun) -> None:
        """ELBO training of the converted ``self.model`` (beta and S from the settings)."""
        self.train_samples = run.settings.samples
        self._train(self.model, run)
