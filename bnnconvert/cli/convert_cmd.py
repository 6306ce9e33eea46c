"""``bnnconvert saliency`` and ``bnnconvert convert``: steps 2 and 3 of the method."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import click
import torch
from torch import Tensor

from .._utils import check_output_path
from ..calibration import synthetic_outliers
from ..convert import bayes_summary, last_layer_masks
from ..convert import convert as convert_model
from ..demo import Recipe
from ..pipeline import convert_checkpoint
from ..posterior import COVARIANCES, METHODS
from ..predict import PREDICTIVES
from ..saliency import CRITERIA, DATA_CRITERIA, FREE_CRITERIA, compute_saliency
from .options import (
    cli_loader,
    data_options,
    load_cli_model,
    model_options,
    output_option,
    parameter_options,
    r_bayes_type,
    saliency_data,
    show_progress,
)

RECIPE = Recipe()  # the recommended recipe's defaults (bnnconvert.demo)

__all__ = ["convert", "saliency"]


@click.command(
    epilog="""\b
Examples:
  bnnconvert saliency det.pt --data demo:digits --batches 100 -o saliency.pt
  bnnconvert saliency weights.pt --arch torchvision.models:resnet18 \\
      --arch-kwargs num_classes=14 --data chestmnist.npz --as-rgb -o saliency.pt  # your files"""
)
@click.argument("model")
@click.option("--data", help="Training data (required for grad2, fisher and variance).")
@click.option("--split", default="train", show_default=True)
@click.option(
    "--criterion",
    default="grad2",
    show_default=True,
    type=click.Choice(list(CRITERIA)),
)
@click.option("--batches", type=int, help="Stop after N batches (default: all).")
@click.option(
    "--class-weights/--no-class-weights",
    default=True,
    show_default=True,
    help="Class-weighted loss, as in training.",
)
@click.option(
    "--top",
    default=0.01,
    show_default=True,
    type=r_bayes_type(),
    help="Fraction (or percentage, 1%) of entries whose placement per layer is printed.",
)
@parameter_options
@model_options
@data_options
@output_option
@click.pass_context
def saliency(
    ctx: click.Context,
    model: str,
    data: str | None,
    split: str,
    criterion: str,
    batches: int | None,
    class_weights: bool,
    top: float,
    output: str,
    include: list[str] | None,
    exclude: list[str] | None,
    **o: Any,
) -> None:
    """Score every weight entry of a model (step 2).

    Saves the scores of the --criterion (the paper: grad2, the squared gradient summed over
    the data) and prints where the --top fraction of entries sits, layer by layer.
    """
    check_output_path(output)
    if criterion in DATA_CRITERIA and data is None:
        raise click.UsageError(f"--criterion {criterion} needs --data (the training data)")
    net = load_cli_model(model, o["arch"], o["arch_kwargs"], o["trust_pickle"])
    loader = loss_fn = None
    if criterion in DATA_CRITERIA:
        loader, loss_fn = saliency_data(ctx, net, data, split, class_weights, o)
    sal = compute_saliency(
        net,
        loader,
        loss_fn,
        criterion=criterion,
        num_batches=batches,
        device=o["device"],
        seed=o["seed"],
        include=include,
        exclude=exclude,
    )
    sal.save(output)
    summary = bayes_summary(convert_model(net, sal, top))
    click.echo(f"wrote {output}: {criterion} scores of {sal.num_entries:,} entries")
    click.echo(f"where the top {100 * top:g} % ({summary.bayesian:,} entries) sit:")
    click.echo(str(summary))


@click.command(
    epilog="""\b
Examples:
  bnnconvert convert det.pt --data demo:digits --val-data demo:digits --posterior laplace \\
      --last-layer -o bayes.pt
  bnnconvert convert det.pt --data demo:digits --val-data demo:digits --posterior laplace \\
      --r-bayes 0.01 -o bayes.pt
  bnnconvert convert det.pt --saliency saliency.pt --r-bayes 0.01 -o bayes.pt
  bnnconvert convert det.pt --data demo:digits --r-bayes 5% --moped-delta 0.1 -o bayes.pt
  bnnconvert convert det.pt --saliency magnitude --r-bayes 0.01 -o bayes.pt"""
)
@click.argument("model")
@click.option(
    "--saliency",
    "saliency_",
    metavar="FILE|magnitude|random",
    help="Saved saliency, or a data-free criterion. Default: a grad2 pass on --data.",
)
@click.option(
    "--data", help="Training data: the saliency pass (without --saliency) and --posterior."
)
@click.option(
    "--r-bayes",
    type=r_bayes_type(auto=True),
    help="Fraction of entries made Bayesian, in (0, 1]: 0.01 or 1%; or 'auto': the "
    "smallest fraction within 1 % of the best validation NLL (needs --data, --val-data). "
    "Required unless --last-layer.",
)
@click.option(
    "--last-layer",
    is_flag=True,
    help="Make every weight and bias of the last layer Bayesian (the recommended recipe "
    "for classifiers, with --posterior laplace) instead of the top --r-bayes entries.",
)
@click.option(
    "--samples",
    type=click.IntRange(1),
    help="Monte Carlo samples per calibration step of --posterior (and the saved model's "
    "default S). Default: none with --predictive probit; "
    f"{RECIPE.last_layer_samples} with --last-layer --predictive sample (its draws cost a "
    f"classifier forward each), else {RECIPE.eval_samples}.",
)
@click.option(
    "--predictive",
    type=click.Choice(list(PREDICTIVES)),
    help="With --posterior and --val-data: sample (Monte Carlo, --samples draws per "
    "prediction) or probit (closed form for a Bayesian last layer: one forward, no "
    "sampling; needs --last-layer or a model whose only Bayesian layer produces its "
    f"output). Default: {RECIPE.last_layer_predictive} with --last-layer unless --samples "
    "is given, else sample.",
)
@click.option(
    "--posterior",
    type=click.Choice(list(METHODS)),
    help="Fit sigma on --data: laplace (post hoc), vi (ELBO, sigma only) or paper (the "
    "paper's ELBO fine-tuning); calibrated on --val-data when given. Default: keep the "
    "initial sigma (--rho-init / --moped-delta).",
)
@click.option(
    "--covariance",
    type=click.Choice(list(COVARIANCES)),
    default="diagonal",
    show_default=True,
    help="With --posterior laplace: one sigma per entry, or kron: a Kronecker-factored "
    "covariance of each Linear layer or 1x1 convolution whose every entry is Bayesian "
    "(with --last-layer).",
)
@click.option("--val-data", help="Validation data (never the test split): calibration, auto.")
@click.option(
    "--outliers",
    type=click.Choice(["synthetic"]),
    help="With --posterior and --val-data: choose the sigma scale for out-of-distribution "
    "detection: among the scales no worse than temperature scaling on the validation NLL, "
    "the one whose entropy best separates the validation inputs from outliers made from "
    "them (shuffled pixels, smoothed noise). Default: the validation NLL alone.",
)
@click.option("--val-split", default="val", show_default=True, help="Split of --val-data.")
@click.option(
    "--epochs",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Training epochs of --posterior vi / paper.",
)
@click.option(
    "--scope", default="global", show_default=True, type=click.Choice(["global", "layer"])
)
@click.option("--prior-mu", default=0.0, show_default=True)
@click.option("--prior-sigma", default=1.0, show_default=True)
@click.option(
    "--rho-init", default=-3.0, show_default=True, help="Initial rho; sigma = softplus(rho)."
)
@click.option("--moped-delta", type=float, help="Initial sigma = delta * |mu| instead.")
@click.option("--batches", type=int, help="Saliency pass: stop after N batches.")
@parameter_options
@model_options
@data_options
@output_option
@click.pass_context
def convert(
    ctx: click.Context,
    model: str,
    saliency_: str | None,
    data: str | None,
    r_bayes: float | str | None,
    last_layer: bool,
    samples: int | None,
    predictive: str | None,
    scope: str,
    prior_mu: float,
    prior_sigma: float,
    rho_init: float,
    moped_delta: float | None,
    batches: int | None,
    posterior: str | None,
    covariance: str,
    val_data: str | None,
    val_split: str,
    outliers: str | None,
    epochs: int,
    output: str,
    include: list[str] | None,
    exclude: list[str] | None,
    **o: Any,
) -> None:
    """Make the top r_bayes entries Bayesian (step 3) and fit their posterior.

    The selected entries get a sigma; the others stay point estimates. With --posterior
    the sigma is fitted on --data (and its scale and the predictive's temperature on
    --val-data). The saved model loads with bnnconvert.load(path) without unpickling code.
    """
    free = saliency_ in FREE_CRITERIA
    if last_layer and (saliency_ is not None or r_bayes is not None):
        raise click.UsageError(
            "--last-layer selects the entries: leave out --saliency and --r-bayes"
        )
    if not last_layer and r_bayes is None:
        raise click.UsageError("pass --r-bayes FRACTION (e.g. 0.01 or 1%), or --last-layer")
    if saliency_ is None and data is None and not last_layer:
        raise click.UsageError("pass --saliency FILE (from `bnnconvert saliency`) or --data")
    needs = [
        flag
        for flag, used in (("--posterior", posterior), ("--r-bayes auto", r_bayes == "auto"))
        if used
    ]
    if needs and data is None:
        raise click.UsageError(f"{needs[0]} needs --data (the training data)")
    if r_bayes == "auto" and val_data is None:
        raise click.UsageError("--r-bayes auto needs --val-data (the validation data)")
    for flag, value in (("--outliers", outliers), ("--predictive", predictive)):
        if value is not None and (posterior is None or val_data is None):
            raise click.UsageError(f"{flag} needs --posterior and --val-data (it calibrates)")
    if covariance != "diagonal" and posterior != "laplace":
        raise click.UsageError(f"--covariance {covariance} needs --posterior laplace")
    if predictive is None:  # --samples asks for Monte Carlo
        last = RECIPE.last_layer_predictive if last_layer else "sample"
        predictive = "sample" if samples is not None else last
    if predictive == "probit" and samples is not None:
        raise click.UsageError("--predictive probit draws no sample: leave out --samples")
    check_output_path(output)
    net = load_cli_model(model, o["arch"], o["arch_kwargs"], o["trust_pickle"])
    loader = loss_fn = None
    if data is not None:  # shuffled for the posterior's training epochs
        shuffle = posterior in ("vi", "paper")
        loader, loss_fn = saliency_data(ctx, net, data, "train", True, o, shuffle=shuffle)
    val = None if val_data is None else cli_loader(val_data, val_split, False, o)
    if samples is None and predictive == "sample":
        samples = RECIPE.last_layer_samples if last_layer else RECIPE.eval_samples
    options = {"epochs": epochs, "seed": o["seed"], "samples": samples}
    if covariance != "diagonal":
        options["covariance"] = covariance
    if val is not None:
        options["predictive"] = predictive
    if outliers is not None:
        options["outliers"] = synthetic_outliers(_inputs_of(val), seed=o["seed"])
    pbnn = convert_checkpoint(
        net,
        loader,
        None if last_layer else r_bayes,
        criterion=saliency_ if free else "grad2",
        saliency=last_layer_masks(net) if last_layer else None if free else saliency_,
        output=output,
        loss_fn=loss_fn,
        num_batches=batches,
        device=o["device"],
        prior_mu=prior_mu,
        prior_sigma=prior_sigma,
        rho_init=rho_init,
        moped_delta=moped_delta,
        scope=scope,
        posterior=posterior,
        val_data=val,
        posterior_options=options,
        include=include,
        exclude=exclude,
        progress=show_progress(ctx),
    )
    click.echo(f"wrote {output}")
    click.echo(str(bayes_summary(pbnn)))
    fitted = pbnn.bnnconvert_info.get("posterior")
    if fitted is not None:
        click.echo(describe_posterior(fitted))


def _inputs_of(batches: Iterable) -> Tensor:
    """The inputs (N, ...) of (input, target) batches, concatenated."""
    inputs = [batch[0] for batch in batches]
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise click.UsageError(
            "--outliers synthetic needs validation batches of input tensors; with keyword "
            "inputs build the outliers in Python (bnnconvert.synthetic_outliers)"
        )
    return torch.cat(inputs)


def describe_posterior(summary: dict[str, Any]) -> str:
    """A few lines on a fitted posterior (the summary kept in the model's info)."""
    kind = summary.get("covariance", "diagonal")
    kind = "" if kind == "diagonal" else f" ({kind} covariance)"
    lines = [f"posterior: {summary['method']}{kind}, {summary['num_bayesian']:,} Bayesian entries"]
    if summary.get("prior_precision") is not None:
        lines.append(f"prior precision lambda: {summary['prior_precision']:.4g}")
    q = summary.get("sigma_quantiles") or {}
    if q:
        lines.append("sigma: " + ", ".join(f"{k} {v:.3g}" for k, v in q.items()))
    if "scale" in summary:
        lines.append(
            f"calibrated on --val-data: scale t = {summary['scale']:.4g}, temperature T = "
            f"{summary['temperature']:.4g}, validation NLL {summary['val_nll']:.4f}"
            + (", probit predictive" if summary.get("predictive") == "probit" else "")
        )
    if summary.get("outlier_auroc"):
        chosen = dict(map(tuple, summary["outlier_auroc"]))[summary["scale"]]
        lines.append(f"scale chosen for OOD detection: outlier AUROC {chosen:.4f}")
    sweep = summary.get("r_bayes_sweep")
    if sweep is not None:
        lines.append(
            f"r_bayes auto: {sweep['chosen']:g} (validation NLL per r: "
            + ", ".join(f"{row['r_bayes']:g}: {row['val_nll']:.4f}" for row in sweep["rows"])
            + ")"
        )
    return "\n".join(lines)
