"""``bnnconvert benchmark``: the paper's comparison of methods on the user's data.

A thin click wrapper over :func:`bnnconvert.methods.run_comparison` (the table, the
r_bayes sweep and its figure, written to a folder).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import click
from torch import nn

from .._utils import check_output_folder
from ..losses import data_class_weights
from ..methods import results_markdown, run_comparison
from ..methods.comparison import DEFAULT_METHODS, SWEEP_R_BAYES
from ..methods.registry import check_method_names
from ..serialization import build_model, load_checkpoint
from ..training import TrainSettings, check_fit
from .options import (
    check_batch_size,
    cli_loader,
    cli_task_loss,
    data_options,
    model_options,
    show_progress,
)

__all__ = ["benchmark_command"]

_DEFAULT_ARCH = {"segmentation": "bnnconvert.models:UNet"}
_DEFAULT_CLASSIFIER = "bnnconvert.models:resnet18"


@click.command(
    "benchmark",
    epilog="""\b
Examples:
  bnnconvert benchmark --data demo:digits --ood demo:ood --epochs 2 --out bench/
  bnnconvert benchmark det.pt --data chestmnist.npz --pretrain-epochs 50 \\
      --methods deterministic,ensemble5,partial1,partial5,partial20,bayesian --out bench/
  bnnconvert benchmark det.pt --data demo:digits --methods deterministic,temperature,laplace-ll \\
      --val-split val --pretrain-epochs 5 --no-sweep --out bench/
  bnnconvert benchmark --arch bnnconvert.models:UNet --arch-kwargs base=8 \\
      --data demo:nuclei --batch-size 10 --no-sweep --out bench/

\b
Writes OUT/results.md (settings and the comparison table), OUT/results.json and, with
--sweep, OUT/r_bayes_sweep.png. Without MODEL or --arch, a ResNet18 (classification)
or UNet (segmentation) sized from the data is trained as step 1.""",
)
@click.argument("model", required=False)
@click.option("--data", required=True, help="Train and test data (its train/test splits).")
@click.option(
    "--methods",
    default=DEFAULT_METHODS,
    show_default=True,
    help="Comma-separated method names (see bnnconvert.methods.get_method); laplace_ll "
    "and laplace_ll_diag need pip install 'bnnconvert[compare]'.",
)
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(0))
@click.option(
    "--pretrain-epochs",
    type=click.IntRange(0),
    help="Step 1 epochs (default: --epochs); with MODEL: how long it was trained.",
)
@click.option("--samples", default=5, show_default=True, type=click.IntRange(1))
@click.option(
    "--sweep/--no-sweep",
    default=True,
    show_default=True,
    help="Also run partial 1, 5, 10, 20, 40, 80 % and plot the sweep.",
)
@click.option("--ood", help="Out-of-distribution data for the OOD AUROC (its --ood-split).")
@click.option("--ood-split", default="test", show_default=True)
@click.option("--test-split", default="test", show_default=True)
@click.option("--val-split", help="Validation split (the 'temperature' method needs one).")
@click.option(
    "--lr", type=float, help="SGD learning rate of every fit (default: bnnconvert.train's)."
)
@click.option(
    "--class-weights/--no-class-weights",
    default=True,
    show_default=True,
    help="Class-weighted loss (the paper's).",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder to write into."
)
@model_options
@data_options
@click.pass_context
def benchmark_command(
    ctx: click.Context,
    model: str | None,
    data: str,
    methods: str,
    epochs: int,
    pretrain_epochs: int | None,
    samples: int,
    sweep: bool,
    ood: str | None,
    ood_split: str,
    test_split: str,
    val_split: str | None,
    lr: float | None,
    class_weights: bool,
    out: str,
    **o: Any,
) -> None:
    """Compare methods on your data: the paper's table and r_bayes sweep."""
    try:
        names = check_method_names(methods)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--methods") from None
    if "temperature" in (n.lower() for n in names) and val_split is None:
        raise click.BadParameter(
            "'temperature' needs --val-split (e.g. val)", param_hint="--methods"
        )
    check_output_folder(out)
    check_batch_size(o["batch_size"])
    train_data = cli_loader(data, "train", True, o)
    task, loss_fn = cli_task_loss(train_data, o["task"], False)
    task = task or "multiclass"
    net, label = _model(model, train_data, task, o)
    check_fit(net if isinstance(net, nn.Module) else net(), train_data, loss_fn, task)
    weights = data_class_weights(train_data) if class_weights else None
    result = run_comparison(
        net,
        train_data,
        cli_loader(data, test_split, False, o),
        task=task,
        methods=names,
        sweep=SWEEP_R_BAYES if sweep else None,
        epochs=epochs,
        pretrain_epochs=pretrain_epochs,
        samples=samples,
        seed=o["seed"],
        ood_data=cli_loader(ood, ood_split, False, o) if ood else None,
        val_data=cli_loader(data, val_split, False, o) if val_split else None,
        settings=TrainSettings() if lr is None else TrainSettings(lr=lr),
        train_kwargs={"class_weights": weights, "device": o["device"]},
        facts={"data": data, "model": label, "ood": ood, "batch_size": o["batch_size"]},
        progress=show_progress(ctx),
    )
    for path in result.write(out):
        click.echo(f"wrote {path}")
    click.echo(results_markdown(result.rows).split("\n\n")[0])


def _model(spec: str | None, data: Iterable, task: str, o: Mapping[str, Any]):
    """(a trained model or a factory of a fresh one, its label for the report)."""
    if spec is not None:
        net = load_checkpoint(
            spec, o["arch"], o["arch_kwargs"] or None, trust_pickle=o["trust_pickle"]
        )
        return net, spec
    arch, kwargs = o["arch"], dict(o["arch_kwargs"] or {})
    if arch is None:
        arch = _DEFAULT_ARCH.get(task, _DEFAULT_CLASSIFIER)
        dataset = getattr(data, "dataset", None)
        for key in ("num_classes", "in_channels"):
            if hasattr(dataset, key):
                kwargs.setdefault(key, getattr(dataset, key))
    label = arch + "(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    return (lambda: build_model(arch, kwargs)), label
