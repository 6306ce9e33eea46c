"""The shared base of the variational methods: convert the model, then fine-tune with the
ELBO or fit the posterior with :func:`bnnconvert.fit_posterior`."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable

from torch import nn

from ..elbo import BetaSchedule
from ..posterior import METHODS, PosteriorReport, fit_posterior
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
        posterior: None (default: the ELBO fine-tuning above), or "laplace" / "vi" /
            "paper": :func:`bnnconvert.fit_posterior` on the training data after the
            conversion, calibrated on ``val_data`` when :meth:`fit` gets it (``epochs``
            is the fine-tuning budget of "vi" and "paper"; "laplace" trains nothing).
        covariance: with ``posterior="laplace"``: "diagonal" or "kron" (a
            Kronecker-factored covariance for each fully Bayesian Linear layer or 1x1
            convolution).

    Attributes:
        report: the :class:`~bnnconvert.posterior.PosteriorReport` of the last fit with a
            ``posterior`` (None otherwise).
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
        posterior: str | None = None,
        covariance: str = "diagonal",
        name: str | None = None,
    ) -> None:
        if posterior is not None and posterior not in METHODS:
            raise ValueError(f"posterior must be None or one of {METHODS}, got {posterior!r}")
        if covariance != "diagonal" and posterior != "laplace":
            raise ValueError(f"covariance={covariance!r} needs posterior='laplace'")
        super().__init__(model, task=task, samples=samples, name=name)
        self.posterior = posterior
        self.covariance = covariance
        self.report: PosteriorReport | None = None
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
        ELBO training (``val_data`` is not used), or the ``posterior`` fit."""
        self.model = self.convert(self._fresh(), run.train_data, run.seed)
        if self.posterior is None:
            self.fine_tune(run)
            return
        self.report = fit_posterior(
            self.model,
            run.train_data,
            run.val_data,
            method=self.posterior,
            covariance=self.covariance,
            task=self.task,
            epochs=max(run.epochs, 1),
            samples=self.samples,
            seed=run.seed or 0,
            device=run.options.get("device"),
            progress=bool(run.options.get("progress", False)),
            batch_format=self.batch_format,
        )

    def fine_tune(self, run: FitRun) -> None:
        """ELBO training of the converted ``self.model`` (beta and S from the settings)."""
        self.train_samples = run.settings.samples
        self._train(self.model, run)
