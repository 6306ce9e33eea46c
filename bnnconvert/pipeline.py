"""The one-call orchestrator: checkpoint in, partial Bayesian network out.

:func:`convert_checkpoint` chains the steps of the method: load a user checkpoint
(:mod:`bnnconvert.serialization`), score it (:func:`~bnnconvert.compute_saliency`),
choose r_bayes on validation data if asked (:func:`~bnnconvert.select_r_bayes`), convert
(:func:`~bnnconvert.convert`), fit and calibrate the posterior
(:func:`~bnnconvert.fit_posterior`) and save.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._utils import check_output_path
from .convert import INFO_ATTR, convert
from .losses import LossFn
from .posterior import METHODS, PosteriorReport, fit_posterior, select_r_bayes
from .saliency import DATA_CRITERIA, Saliency, check_r_bayes, compute_saliency
from .serialization import load_checkpoint, remember_arch, save

__all__ = ["convert_checkpoint", "posterior_summary"]


def convert_checkpoint(
    checkpoint: str | os.PathLike | nn.Module,
    data: Iterable | None = None,
    r_bayes: float | str | None = 0.01,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    criterion: str = "grad2",
    saliency: Saliency | str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
    device: str | torch.device | None = None,
    posterior: str | None = None,
    val_data: Iterable | None = None,
    posterior_options: Mapping[str, Any] | None = None,
    progress: bool = False,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    **convert_kwargs: Any,
) -> nn.Module:
    """Checkpoint in, partial Bayesian network out: load, score, select, convert, fit the
    posterior, save.

    Args:
        checkpoint: a file :func:`~bnnconvert.serialization.load_checkpoint` reads, or a
            model.
        data: (input, target) batches of the training data: the saliency pass (criteria
            "grad2", "fisher", "variance"), the posterior fit and "auto".
        r_bayes: fraction of entries made Bayesian, in (0, 1], or "auto":
            :func:`~bnnconvert.select_r_bayes` on ``val_data`` (needs ``data``); None
            with ready-made masks as ``saliency`` (e.g.
            :func:`~bnnconvert.last_layer_masks`).
        arch, arch_kwargs, trust_pickle: see
            :func:`~bnnconvert.serialization.load_checkpoint`.
        criterion: saliency criterion when ``saliency`` is None.
        saliency: a ready :class:`~bnnconvert.Saliency`, the path of a saved one, or
            masks {parameter name: bool tensor} (with ``r_bayes=None``).
        output: if given, the converted model is written there with
            :func:`~bnnconvert.serialization.save`.
        loss_fn, num_batches, device: passed to :func:`~bnnconvert.compute_saliency`.
        posterior: "laplace", "vi" or "paper": :func:`~bnnconvert.fit_posterior` on
            ``data`` (and its calibration on ``val_data`` when given); None keeps the
            sigma of the conversion (``rho_init`` or MOPED).
        val_data: validation batches (never the test split) for the calibration and
            "auto".
        posterior_options: more keyword arguments of :func:`~bnnconvert.fit_posterior`.
        progress: tqdm bars.
        include, exclude: which parameters are scored and converted: kinds of
            :data:`~bnnconvert.layers.PARAMETER_KINDS` or state_dict-name globs (default:
            :data:`~bnnconvert.layers.DEFAULT_INCLUDE`); see :func:`~bnnconvert.convert`.
        **convert_kwargs: passed to :func:`~bnnconvert.convert` (prior_sigma, rho_init,
            moped_delta, scope, ...).

    Returns the converted model (it remembers its architecture spec); with a posterior,
    ``model.bnnconvert_info["posterior"]`` summarises the fit (and the r_bayes sweep).
    """
    _check_plan(r_bayes, data, posterior, val_data)
    if output is not None:
        check_output_path(output)
    if isinstance(checkpoint, nn.Module):
        model = checkpoint
        remember_arch(model, arch, arch_kwargs)
    else:
        model = load_checkpoint(checkpoint, arch, arch_kwargs, trust_pickle=trust_pickle)
    if saliency is None:
        if criterion in DATA_CRITERIA and data is None:
            raise ValueError(
                f"criterion {criterion!r} needs data=... for its gradient pass; pass data, a "
                "saved saliency, or criterion='magnitude' / 'random'"
            )
        saliency = compute_saliency(
            model, data, loss_fn, criterion=criterion, num_batches=num_batches, device=device,
            include=include, exclude=exclude,
        )  # fmt: skip
    sweep = None
    if r_bayes == "auto":
        if not isinstance(saliency, Saliency):
            saliency = Saliency.load(saliency)
        sweep = select_r_bayes(model, saliency, data, val_data, device=device, progress=progress)
        r_bayes = sweep.r_bayes
    choice = {k: v for k, v in (("include", include), ("exclude", exclude)) if v is not None}
    pbnn = convert(model, saliency, r_bayes, **choice, **convert_kwargs)
    if posterior is not None:
        report = fit_posterior(pbnn, data, val_data, method=posterior, device=device,
                               progress=progress, **dict(posterior_options or {}))  # fmt: skip
        getattr(pbnn, INFO_ATTR)["posterior"] = posterior_summary(report, sweep)
    if output is not None:
        save(pbnn, output)
    return pbnn


def _check_plan(r_bayes, data, posterior, val_data) -> None:
    if val_data is not None and posterior is None and r_bayes != "auto":
        raise ValueError(
            "val_data calibrates a posterior: pass posterior='laplace' (post hoc, the "
            "cheapest) or 'vi' as well, or leave val_data out"
        )
    if r_bayes == "auto":
        if data is None or val_data is None:
            raise ValueError('r_bayes="auto" needs data=... (training) and val_data=...')
    elif r_bayes is not None:
        check_r_bayes(r_bayes)
    if posterior is not None:
        if posterior not in METHODS:
            raise ValueError(
                f"posterior must be one of {', '.join(METHODS)} or None, got {posterior!r}"
            )
        if data is None:
            raise ValueError(f"posterior={posterior!r} needs data=... (the training batches)")


def posterior_summary(report: PosteriorReport, sweep=None) -> dict[str, Any]:
    """The plain-typed facts of a posterior fit (and an r_bayes sweep) kept in the model's
    info and saved with it."""
    summary: dict[str, Any] = {
        "method": report.method,
        "covariance": report.covariance,
        "num_bayesian": report.num_bayesian,
        "prior_precision": report.prior_precision,
        "epochs": report.epochs,
        "sigma_quantiles": dict(report.sigma_quantiles),
    }
    if report.calibration is not None:
        c = report.calibration
        summary.update(scale=c.scale, temperature=c.temperature, val_nll=c.nll,
                       calibration_curve=[list(row) for row in c.curve],
                       objective=c.objective, predictive=c.predictive)  # fmt: skip
        if c.outlier_auroc:
            summary["outlier_auroc"] = [[t, value] for t, value in sorted(c.outlier_auroc.items())]
    if sweep is not None:
        summary["r_bayes_sweep"] = {"chosen": sweep.r_bayes, "tolerance": sweep.tolerance,
                                    "rows": [dict(row) for row in sweep.rows]}  # fmt: skip
    return summary
