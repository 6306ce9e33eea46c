"""``bnnconvert predict``: per-case predictions and uncertainty maps
(a thin click wrapper over :func:`bnnconvert.cases.predict_cases`)."""

from __future__ import annotations

from typing import Any

import click

from .._utils import split_batch
from ..cases import check_cases_folder, predict_cases
from ..training import check_fit, first_batch
from .options import (
    check_batch_size,
    cli_loader,
    cli_task_loss,
    data_options,
    load_cli_model,
    model_options,
    show_progress,
)

__all__ = ["predict_command"]


def _fraction(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not 0 < value <= 1:
        raise click.BadParameter(f"must be a fraction in (0, 1], e.g. 0.05, got {value}")
    return value


@click.command(
    "predict",
    epilog="""\b
Examples:
  bnnconvert predict bayes.pt --data demo:digits -o cases/ --flag-top 0.05
  bnnconvert predict nuclei_bayes.pt --data demo:nuclei -o nuclei_cases/ --batch-size 4

\b
From a fresh clone, make bayes.pt and nuclei_bayes.pt first (a few minutes on a CPU):
  bnnconvert train --arch bnnconvert.models:resnet18 \\
      --arch-kwargs num_classes=10,in_channels=1 --data demo:digits --epochs 1 -o det.pt
  bnnconvert convert det.pt --data demo:digits --r-bayes 0.01 -o bayes.pt
  bnnconvert train --arch bnnconvert.models:UNet --arch-kwargs base=8,depth=2 \\
      --data demo:nuclei --epochs 3 --batch-size 8 -o nuclei_det.pt
  bnnconvert convert nuclei_det.pt --data demo:nuclei --r-bayes 0.01 -o nuclei_bayes.pt""",
)
@click.argument("model")
@click.option("--data", required=True, help="The cases to predict.")
@click.option("--split", default="test", show_default=True)
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for cases.csv, cases.npz or the per-case maps, flagged.csv, run.json.",
)
@click.option(
    "--samples",
    type=click.IntRange(1),
    help="Posterior samples. Default: the S the model was calibrated with, else 5 (a "
    "model without Bayesian layers is run once).",
)
@click.option(
    "--flag-top",
    type=float,
    callback=_fraction,
    metavar="FRACTION",
    help="List the FRACTION of cases with the highest predictive entropy in flagged.csv.",
)
@click.option("--overwrite", is_flag=True, help="Replace the files of an earlier run in OUT.")
@click.option(
    "--keep-samples", is_flag=True, help="Also write the per-sample probabilities (S x ...)."
)
@model_options
@data_options
@click.pass_context
def predict_command(
    ctx: click.Context,
    model: str,
    data: str,
    split: str,
    out: str,
    samples: int | None,
    flag_top: float | None,
    overwrite: bool,
    keep_samples: bool,
    **o: Any,
) -> None:
    """Per-case predictions and uncertainty maps, written to a folder.

    For every item of the split: the prediction, the mean probabilities, the predictive
    entropy, expected entropy, mutual information and sample variance of a --samples
    Monte Carlo prediction, as cases.csv and cases.npz; for segmentation, per case, the
    maps of the mean probability, entropy and mutual information (.npy, a PNG overlay,
    NIfTI when the input was NIfTI). Streams over the data batch by batch.
    """
    check_cases_folder(out, overwrite)  # before any work
    check_batch_size(o["batch_size"])
    net = load_cli_model(model, o["arch"], o["arch_kwargs"], o["trust_pickle"])
    loader = cli_loader(data, split, False, o)
    task, loss_fn = cli_task_loss(loader, o["task"], False)
    net.to(o["device"])
    if split_batch(first_batch(loader))[1] is not None:  # unlabeled data is fine too
        check_fit(net, loader, loss_fn, task)
    report = predict_cases(
        net,
        loader,
        out,
        samples=samples,
        task=task,
        seed=o["seed"],
        device=o["device"],
        flag_top=flag_top,
        keep_samples=keep_samples,
        overwrite=overwrite,
        progress=show_progress(ctx),
    )
    click.echo(report.summary())
