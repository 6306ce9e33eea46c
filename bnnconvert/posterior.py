"""The posterior of the Bayesian entries: fitted on training data, scaled on validation data.

After :func:`bnnconvert.convert`, every selected entry has a sigma set by ``rho_init`` or
MOPED: a guess. :func:`fit_posterior` replaces the guess with a posterior fitted to the
training data, by one of:

- ``"laplace"`` (post hoc, no gradient step): the diagonal Laplace approximation at the
  trained weights, sigma_i^2 = 1 / (H_ii + lambda), with H the GGN diagonal of the NLL
  summed over the training data (:func:`bnnconvert.curvature.diagonal_ggn`) and lambda,
  the precision of the prior N(0, 1 / lambda), maximising the Laplace marginal likelihood
  (:func:`bnnconvert.curvature.fit_prior_precision`) or given. With
  ``covariance="kron"`` the posterior of each (fully Bayesian) Linear layer or 1x1
  convolution is instead Kronecker-factored, precision B kron A + lambda I
  (:mod:`bnnconvert.kronecker`, :func:`bnnconvert.curvature.kronecker_ggn`), lambda by
  the same evidence with the Kronecker eigenvalues;
- ``"vi"``: ELBO fine-tuning that learns sigma: the textbook KL (summed over the entries)
  divided by the number of training examples and multiplied by a temperature, a prior
  N(0, 1 / lambda) fitted to the scale of the selected weights, and Adam on rho (SGD's step
  on rho is scaled by sigma itself and leaves a small sigma where it started). By default
  the means stay the checkpoint's and every module stays in eval mode (BatchNorm
  statistics frozen), so the model at its means is the checkpoint;
- ``"paper"``: the paper's recipe as published (KL "mean" reduction, beta 0.01, SGD on
  means and rho, train mode).

Then, given validation data, :func:`bnnconvert.calibration.calibrate_posterior` fits one
scale t that multiplies every sigma (t = 0: the model at its means) and the temperature T
of the predictive, by minimising the validation NLL of the Monte Carlo predictive (see
:mod:`bnnconvert.calibration`).

:func:`select_r_bayes` chooses r_bayes on validation data with the Laplace curvature
computed once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import BatchFormat, as_batch_format, batch_length
from .calibration import (
    DEFAULT_SCALES,
    MAX_TEMPERATURE,
    Calibration,
    calibrate_posterior,
    fit_temperature,
    predictive_nll,
    set_temperature,
)
from .convert import convert
from .curvature import (
    diagonal_ggn,
    fit_prior_precision,
    kronecker_ggn,
    laplace_sigma,
    likelihood_of_task,
    log_marginal_likelihood,
)
from .kronecker import eigenbases
from .layers import bayesian_layers, bayesian_masks, set_sigma_scale, softplus_inverse
from .losses import data_task
from .predict import apply_predictive, predictive_of
from .saliency import Saliency
from .training import TrainSettings, train

__all__ = [  # the calibration's names are re-exported: one import for step 4
    "COVARIANCES",
    "DEFAULT_R_GRID",
    "DEFAULT_SCALES",
    "MAX_TEMPERATURE",
    "METHODS",
    "Calibration",
    "PosteriorReport",
    "RSweep",
    "calibrate_posterior",
    "fit_posterior",
    "fit_temperature",
    "predictive_nll",
    "select_r_bayes",
]

log = logging.getLogger(__name__)

METHODS = ("laplace", "vi", "paper")

COVARIANCES = ("diagonal", "kron")
"""The posterior structures of ``method="laplace"``: one sigma per entry, or a
Kronecker-factored covariance per fully Bayesian Linear layer."""

DEFAULT_R_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
"""The r_bayes tried by :func:`select_r_bayes` (0.1 % to 20 %)."""

VI_SETTINGS = TrainSettings(
    beta=1.0, samples=2, kl_reduction="sum", lr=1e-4, optimizer="adam", rho_lr=0.01
)
"""The training settings of ``method="vi"``; beta becomes kl_temperature / N_train."""

PAPER_SETTINGS = TrainSettings()
"""The paper's: beta 0.01, KL "mean", S = 5, SGD lr 0.01, weight decay 1e-5."""


# ------------------------------------------------------------------ the report
@dataclass
class PosteriorReport:
    """What :func:`fit_posterior` fitted.

    Attributes:
        method: "laplace", "vi" or "paper".
        covariance: "diagonal" or "kron" (see :data:`COVARIANCES`).
        num_bayesian: k, the number of Bayesian entries.
        prior_precision: lambda of the prior N(0, 1 / lambda) ("laplace", "vi").
        log_marginal_likelihood: of the Laplace fit at lambda, without log p(D | theta).
        epochs: training epochs ("vi", "paper"; 0 for "laplace").
        sigma_quantiles: {"min", "q05", "median", "q95", "max"} of sigma = softplus(rho)
            after the fit (t = 1, before the calibration's scale).
        seconds: wall times: "curvature", "fit", "calibration".
        calibration: the :class:`Calibration` when validation data were given.
    """

    method: str
    num_bayesian: int
    prior_precision: float | None = None
    log_marginal_likelihood: float | None = None
    epochs: int = 0
    sigma_quantiles: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    calibration: Calibration | None = None
    covariance: str = "diagonal"

    def __str__(self) -> str:
        kind = "" if self.covariance == "diagonal" else f" ({self.covariance} covariance)"
        lines = [f"posterior: {self.method}{kind}, {self.num_bayesian:,} Bayesian entries"]
        if self.prior_precision is not None:
            lines.append(f"prior precision lambda: {self.prior_precision:.4g}")
        if self.epochs:
            lines.append(f"epochs: {self.epochs}")
        if self.sigma_quantiles:
            q = ", ".join(f"{k} {v:.3g}" for k, v in self.sigma_quantiles.items())
            lines.append(f"sigma at t = 1: {q}")
        if self.calibration is not None:
            lines.append(f"calibrated on validation data: {self.calibration}")
        lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


# ------------------------------------------------------------------ fit_posterior
def fit_posterior(
    model: nn.Module,
    train_data: Iterable,
    val_data: Iterable | None = None,
    *,
    method: str = "laplace",
    task: str | None = None,
    prior_precision: float | str = "marglik",
    covariance: str = "diagonal",
    curvature: str | None = None,
    mc_samples: int = 1,
    epochs: int = 1,
    kl_temperature: float = 1.0,
    train_means: bool = False,
    settings: TrainSettings | None = None,
    samples: int | None = None,
    scales: Sequence[float] = DEFAULT_SCALES,
    temperature: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    batch_format: BatchFormat | None = None,
    outliers: Tensor | Iterable | None = None,
    predictive: str | None = None,
) -> PosteriorReport:
    """Fit the posterior of a converted model's Bayesian entries, in place.

    Args:
        model: a model returned by :func:`bnnconvert.convert`.
        train_data: (input, target) batches of the training data (a DataLoader).
        val_data: validation batches; if given, :func:`calibrate_posterior` runs after the
            fit. Never the test split.
        method: "laplace", "vi" or "paper" (see the module docstring).
        task: "multiclass", "multilabel" or "segmentation"; default ``data.dataset.task``,
            else "multiclass".
        prior_precision: "marglik" or a number lambda > 0. "laplace": the marginal
            likelihood's lambda; "vi": "marglik" fits the prior to the weights' scale,
            lambda = k / |theta|^2 (the evidence's optimum when the data constrain nothing).
        covariance: "diagonal" or "kron" ("laplace" only; "kron" needs every Bayesian
            layer to be a Linear or a 1x1 convolution whose every entry is Bayesian, e.g.
            ``--last-layer`` of a classifier or of a segmentation network).
        curvature, mc_samples: the GGN estimator ("mc" or "exact") of
            :func:`~bnnconvert.curvature.diagonal_ggn` /
            :func:`~bnnconvert.curvature.kronecker_ggn`, "laplace" only. Default: "mc" for
            the diagonal and for segmentation, else "exact" for "kron".
        epochs: training epochs ("vi", "paper").
        kl_temperature: "vi": the KL's weight relative to the textbook ELBO (beta =
            kl_temperature / N_train); 1 is the Bayesian posterior.
        train_means: "vi": also train the means (and BatchNorm statistics, in train mode).
        settings: "vi" / "paper": training settings to start from (default
            :data:`VI_SETTINGS` / :data:`PAPER_SETTINGS`).
        samples, scales, temperature, outliers, predictive: of
            :func:`calibrate_posterior` (outliers: choose the scale t for
            out-of-distribution detection; predictive "probit": the closed-form predictive
            of a Bayesian output layer, see :func:`bnnconvert.predict.set_predictive`).
        seed: seeds the curvature's targets, training and calibration.
        device, progress: where to run; tqdm bars.
        batch_format: how to read mapping batches and structured outputs
            (:class:`bnnconvert.BatchFormat`), for both data sets.

    Returns a :class:`PosteriorReport` (also printable).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {', '.join(COVARIANCES)}, got {covariance!r}")
    if covariance != "diagonal" and method != "laplace":
        raise ValueError(f"covariance={covariance!r} needs method='laplace', got {method!r}")
    _check_prior_precision(prior_precision)
    fmt = as_batch_format(batch_format)
    layers = list(bayesian_layers(model))
    if not layers:
        raise ValueError("the model has no Bayesian entry; convert it with bnnconvert.convert()")
    task = task or data_task(train_data) or "multiclass"
    k = sum(layer.bayes_rho(name).numel() for _, layer in layers for name in layer.bayes_names)
    report = PosteriorReport(method, k, covariance=covariance)
    set_sigma_scale(model, 1.0)
    set_temperature(model, 1.0)
    if method == "laplace" and covariance == "kron":
        exact = "mc" if task == "segmentation" else "exact"  # "exact" needs (N, C) outputs
        _fit_kronecker(model, train_data, report, task, prior_precision, curvature or exact,
                       mc_samples, seed, device, progress, fmt)  # fmt: skip
    elif method == "laplace":
        _fit_laplace(model, train_data, report, task, prior_precision, curvature or "mc",
                     mc_samples, seed, device, progress, fmt)  # fmt: skip
    else:
        start = time.perf_counter()
        with _sampling(model):
            if method == "vi":
                _fit_vi(model, train_data, report, task, prior_precision, epochs,
                        kl_temperature, train_means, settings, seed, device, progress,
                        fmt)  # fmt: skip
            else:
                train(model, train_data, epochs, settings or PAPER_SETTINGS, task=task,
                      seed=seed, device=device, progress=progress,
                      batch_format=fmt)  # fmt: skip
        report.epochs = epochs
        report.seconds["fit"] = time.perf_counter() - start
    report.sigma_quantiles = _sigma_quantiles(model)
    if val_data is not None:
        report.calibration = calibrate_posterior(
            model, val_data, task=task, samples=samples, scales=scales,
            temperature=temperature, seed=seed, device=device, batch_format=fmt,
            outliers=outliers, predictive=predictive,
        )  # fmt: skip
        report.seconds["calibration"] = report.calibration.seconds
    return report


def _check_prior_precision(value: float | str) -> None:
    if isinstance(value, str):
        if value != "marglik":
            raise ValueError(f"prior_precision must be 'marglik' or a number, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"prior_precision must be 'marglik' or a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"prior_precision must be positive, got {value!r}")


def _per_entry(
    model: nn.Module, tensors: Mapping[str, Tensor]
) -> Iterator[tuple[Any, str, Tensor]]:
    """(layer, tensor name, the Bayesian entries (k,) of ``tensors[full name]``)."""
    for name, layer in bayesian_layers(model):
        for t in layer.bayes_names:
            full = f"{name}.{t}" if name else t
            yield layer, t, tensors[full].reshape(-1)[layer.bayes_index(t)]


def _bayesian_values(model: nn.Module, tensors: Mapping[str, Tensor] | None = None) -> Tensor:
    """The Bayesian entries (k,) of ``tensors`` (default: the means), in layer order."""
    if tensors is None:
        tensors = {
            f"{n}.{t}" if n else t: layer._parameters[t].detach()
            for n, layer in bayesian_layers(model)
            for t in layer.bayes_names
        }
    return torch.cat([values for _, _, values in _per_entry(model, tensors)])


def _fit_laplace(model, data, report, task, prior_precision, method, mc_samples, seed, device,
                 progress, fmt) -> None:  # fmt: skip
    curv = diagonal_ggn(
        model, data, likelihood=likelihood_of_task(task), masks=bayesian_masks(model),
        method=method, mc_samples=mc_samples, seed=seed, device=device, progress=progress,
        batch_format=fmt,
    )  # fmt: skip
    report.seconds["curvature"] = curv.seconds
    start = time.perf_counter()
    h, theta = _bayesian_values(model, curv.diagonal), _bayesian_values(model)
    lam = fit_prior_precision(h, theta) if prior_precision == "marglik" else prior_precision
    report.prior_precision = float(lam)
    report.log_marginal_likelihood = log_marginal_likelihood(h, theta, lam)
    _set_sigma(model, curv.diagonal, float(lam))
    report.seconds["fit"] = time.perf_counter() - start


def _fit_kronecker(model, data, report, task, prior_precision, method, mc_samples, seed,
                   device, progress, fmt) -> None:  # fmt: skip
    layers = dict(bayesian_layers(model))
    for layer in layers.values():
        layer._check_kronecker()
    curv = kronecker_ggn(
        model, data, list(layers), likelihood=likelihood_of_task(task), method=method,
        mc_samples=mc_samples, seed=seed, device=device, progress=progress, batch_format=fmt,
    )  # fmt: skip
    report.seconds["curvature"] = curv.seconds
    start = time.perf_counter()
    bases = {name: eigenbases(a, b) for name, (a, b) in curv.factors.items()}
    h = torch.cat([products.reshape(-1) for _, _, products in bases.values()])
    theta = _bayesian_values(model).double()
    lam = fit_prior_precision(h, theta) if prior_precision == "marglik" else prior_precision
    report.prior_precision = float(lam)
    report.log_marginal_likelihood = log_marginal_likelihood(h, theta, lam)
    for name, (qa, qb, products) in bases.items():
        layers[name].set_kronecker_posterior(qa, qb, 1 / (products + lam))
    report.seconds["fit"] = time.perf_counter() - start


def _set_sigma(model: nn.Module, curvature: Mapping[str, Tensor], lam: float) -> None:
    """rho of every Bayesian entry such that softplus(rho) = 1 / sqrt(H + lambda)."""
    for layer, t, h in _per_entry(model, curvature):
        rho = layer.bayes_rho(t)
        with torch.no_grad():
            rho.copy_(softplus_inverse(laplace_sigma(h.double(), lam)).to(rho))


def _fit_vi(model, data, report, task, prior_precision, epochs, kl_temperature, train_means,
            settings, seed, device, progress, fmt) -> None:  # fmt: skip
    if not (math.isfinite(kl_temperature) and kl_temperature > 0):
        raise ValueError(f"kl_temperature must be a positive number, got {kl_temperature!r}")
    theta = _bayesian_values(model)
    if prior_precision == "marglik":
        lam = theta.numel() / max(float(theta.double().square().sum()), 1e-12)
    else:
        lam = float(prior_precision)
    report.prior_precision = lam
    for _, layer in bayesian_layers(model):
        layer._buffers["bayes_prior"].copy_(torch.tensor([0.0, lam**-0.5]))
    base = settings or VI_SETTINGS
    run = base.replace(beta=kl_temperature / _num_examples(data, fmt), kl_reduction="sum",
                       train_mode=train_means)  # fmt: skip
    with _only_rho_trains(model, not train_means):
        train(model, data, epochs, run, task=task, seed=seed, device=device, progress=progress,
              batch_format=fmt)  # fmt: skip


@contextmanager
def _sampling(model: nn.Module) -> Iterator[None]:
    """Within the block the model predicts by Monte Carlo (the ELBO's forwards), then its
    predictive (:func:`bnnconvert.predict.predictive_of`) is restored."""
    before = predictive_of(model)
    apply_predictive(model, "sample")
    try:
        yield
    finally:
        apply_predictive(model, before)


@contextmanager
def _only_rho_trains(model: nn.Module, active: bool) -> Iterator[None]:
    """Within the block, only the rho parameters require grad (if ``active``)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    if active:
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("_rho"))
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _num_examples(data: Iterable, fmt: BatchFormat) -> int:
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    return sum(batch_length(fmt.split(batch)[0]) for batch in data)


def _sigma_quantiles(model: nn.Module) -> dict[str, float]:
    """Quantiles of softplus(rho) over every Bayesian entry (a subsample of 2^24 at most)."""
    sigma = torch.cat(
        [
            F.softplus(layer.bayes_rho(t)).detach().float().cpu()
            for _, layer in bayesian_layers(model)
            for t in layer.bayes_names
        ]
    )
    if sigma.numel() > 2**24:
        pick = torch.randperm(sigma.numel(), generator=torch.Generator().manual_seed(0))
        sigma = sigma[pick[: 2**24]]
    levels = torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0])
    return dict(zip(("min", "q05", "median", "q95", "max"), torch.quantile(sigma, levels).tolist()))


# ------------------------------------------------------------------ r_bayes on validation
@dataclass
class RSweep:
    """What :func:`select_r_bayes` measured.

    Attributes:
        r_bayes: the chosen fraction.
        rows: one dict per r tried: "r_bayes", "k", "prior_precision", "scale",
            "temperature", "val_nll".
        tolerance: the relative tolerance of the rule.
        seconds: wall time, the curvature pass included.
    """

    r_bayes: float
    rows: list[dict[str, float]]
    tolerance: float
    seconds: float = math.nan

    def __str__(self) -> str:
        lines = ["r_bayes      k  lambda    t      T      val NLL"]
        for row in self.rows:
            mark = "  <- chosen" if row["r_bayes"] == self.r_bayes else ""
            lines.append(
                f"{row['r_bayes']:<7.4g} {int(row['k']):>7,} {row['prior_precision']:<8.3g} "
                f"{row['scale']:<6.3g} {row['temperature']:<6.3g} {row['val_nll']:.4f}{mark}"
            )
        return "\n".join(lines)


def select_r_bayes(
    model: nn.Module,
    saliency: Saliency,
    train_data: Iterable,
    val_data: Iterable,
    *,
    grid: Sequence[float] = DEFAULT_R_GRID,
    tolerance: float = 0.01,
    task: str | None = None,
    samples: int = 10,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    batch_format: BatchFormat | None = None,
) -> RSweep:
    """Choose r_bayes on validation data: the smallest r whose calibrated Laplace posterior
    has a validation NLL within ``tolerance`` (relative) of the best r of ``grid``.

    The GGN diagonal of every scored entry is computed once; each r then costs a
    conversion (no copy of the curvature) and one :func:`calibrate_posterior`.

    Args:
        model: the trained deterministic model (left unchanged).
        saliency: its :class:`~bnnconvert.Saliency` (the ranking to cut at each r).
        train_data, val_data: training and validation batches.
        grid: the fractions to try, in (0, 1].
        tolerance: e.g. 0.01: within 1 % of the best validation NLL.
        task, samples, seed, device, progress, batch_format: as for :func:`fit_posterior`.

    Returns an :class:`RSweep` (printable).
    """
    if not grid:
        raise ValueError("grid is empty; pass fractions in (0, 1], e.g. (0.01, 0.05)")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    start = time.perf_counter()
    task = task or data_task(train_data) or "multiclass"
    largest = saliency.select(max(grid))
    curv = diagonal_ggn(
        model, train_data, likelihood=likelihood_of_task(task), masks=largest, seed=seed,
        device=device, progress=progress, batch_format=batch_format,
    )  # fmt: skip
    rows = []
    for r in sorted(grid):
        pbnn = convert(model, saliency, r)
        h, theta = _bayesian_values(pbnn, curv.diagonal), _bayesian_values(pbnn)
        lam = fit_prior_precision(h, theta)
        _set_sigma(pbnn, curv.diagonal, lam)
        cal = calibrate_posterior(pbnn, val_data, task=task, samples=samples, seed=seed,
                                  device=device, batch_format=batch_format)  # fmt: skip
        rows.append(
            {
                "r_bayes": r,
                "k": float(h.numel()),
                "prior_precision": lam,
                "scale": cal.scale,
                "temperature": cal.temperature,
                "val_nll": cal.nll,
            }
        )
        log.info("r_bayes %g: validation NLL %.4f (t = %g)", r, cal.nll, cal.scale)
    best = min(row["val_nll"] for row in rows)
    chosen = next(row["r_bayes"] for row in rows if row["val_nll"] <= best * (1 + tolerance))
    return RSweep(chosen, rows, tolerance, time.perf_counter() - start)
