"""``bnnconvert saliency`` and ``bnnconvert convert``: steps 2 and 3 of the method."""

from __future__ import annotations

from typing import Any

import click

from .._utils import check_output_path
from ..convert import bayes_summary
from ..convert import convert as convert_model
from ..pipeline import convert_checkpoint
from ..saliency import CRITERIA, DATA_CRITERIA, FREE_CRITERIA, check_r_bayes, compute_saliency
from .options import data_options, load_cli_model, model_options, output_option, saliency_data

__all__ = ["convert", "saliency"]


@click.command(
    epilog="""\b
Examples:
  bnnconvert saliency det.pt --data chestmnist.npz --batches 100 -o saliency.pt
  bnnconvert saliency weights.pt --arch torchvision.models:resnet18 \\
      --arch-kwargs num_classes=14 --data chestmnist.npz --as-rgb -o saliency.pt"""
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
    type=click.FloatRange(0, 1, min_open=True),
    help="Fraction whose placement per layer is printed.",
)
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
    )
    sal.save(output)
    summary = bayes_summary(convert_model(net, sal, top))
    click.echo(f"wrote {output}: {criterion} scores of {sal.num_entries:,} entries")
    click.echo(f"where the top {100 * top:g} % ({summary.bayesian:,} entries) sit:")
    click.echo(str(summary))


@click.command(
    epilog="""\b
Examples:
  bnnconvert convert det.pt --saliency saliency.pt --r-bayes 0.01 -o bayes.pt
  bnnconvert convert det.pt --data digits.npz --r-bayes 0.05 --moped-delta 0.1 -o bayes.pt
  bnnconvert convert det.pt --saliency magnitude --r-bayes 0.01 -o bayes.pt"""
)
@click.argument("model")
@click.option(
    "--saliency",
    "saliency_",
    metavar="FILE|magnitude|random",
    help="Saved saliency, or a data-free criterion. Default: a grad2 pass on --data.",
)
@click.option("--data", help="Training data for the saliency pass (without --saliency).")
@click.option(
    "--r-bayes",
    required=True,
    type=float,
    help="Fraction of entries made Bayesian, in (0, 1]: 0.01 is 1 %.",
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
@model_options
@data_options
@output_option
@click.pass_context
def convert(
    ctx: click.Context,
    model: str,
    saliency_: str | None,
    data: str | None,
    r_bayes: float,
    scope: str,
    prior_mu: float,
    prior_sigma: float,
    rho_init: float,
    moped_delta: float | None,
    batches: int | None,
    output: str,
    **o: Any,
) -> None:
    """Make the top r_bayes entries Bayesian (step 3).

    The selected entries get a learned sigma; the others stay point estimates. The saved
    model loads with bnnconvert.load(path) without unpickling code.
    """
    check_r_bayes(r_bayes)
    free = saliency_ in FREE_CRITERIA
    if saliency_ is None and data is None:
        raise click.UsageError("pass --saliency FILE (from `bnnconvert saliency`) or --data")
    check_output_path(output)
    net = load_cli_model(model, o["arch"], o["arch_kwargs"], o["trust_pickle"])
    loader = loss_fn = None
    if saliency_ is None:
        loader, loss_fn = saliency_data(ctx, net, data, "train", True, o)
    pbnn = convert_checkpoint(
        net,
        loader,
        r_bayes,
        criterion=saliency_ if free else "grad2",
        saliency=None if free else saliency_,
        output=output,
        loss_fn=loss_fn,
        num_batches=batches,
        device=o["device"],
        prior_mu=prior_mu,
        prior_sigma=prior_sigma,
        rho_init=rho_init,
        moped_delta=moped_delta,
        scope=scope,
    )
    click.echo(f"wrote {output}")
    click.echo(str(bayes_summary(pbnn)))
