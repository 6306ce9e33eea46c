"""``bnnconvert evaluate`` and ``bnnconvert info``: the metrics of a model, and its facts."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from .. import plots
from .._utils import atomic_write_text, check_output_path, json_safe
from ..convert import bayes_summary
from ..metrics import ECE_BINS, OOD_SCORES, ood_scores
from ..predict import Prediction, predict, prediction_samples
from ..serialization import describe
from ..training import check_fit, evaluate_model, seed_everything
from .options import (
    check_batch_size,
    cli_loader,
    cli_task_loss,
    data_options,
    load_cli_model,
    model_options,
    show_progress,
)

__all__ = ["evaluate", "info"]


@click.command(
    epilog="""\b
Examples:
  bnnconvert evaluate trained.pt --data demo:digits --samples 5
  bnnconvert evaluate trained.pt --data demo:digits --ood demo:ood --json metrics.json
  bnnconvert evaluate trained.pt --data chestmnist.npz --json metrics.json --plots plots/"""
)
@click.argument("model")
@click.option("--data", required=True, help="Evaluation data.")
@click.option("--split", default="test", show_default=True)
@click.option(
    "--samples",
    type=click.IntRange(1),
    help="Posterior samples. Default: the S the model was calibrated with, else 5 (1 for "
    "a deterministic model).",
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Also write the metrics as JSON."
)
@click.option(
    "--ood",
    metavar="DATA",
    help="Out-of-distribution data (e.g. demo:ood): how well entropy, mutual information "
    "and max-probability tell it from --data (AUROC, AUPR, FPR at 95 % TPR).",
)
@click.option("--ood-split", default="test", show_default=True, help="The split of --ood.")
@click.option(
    "--plots",
    "plots_dir",
    type=click.Path(file_okay=False),
    help="Write PNG plots there: reliability diagram (the bins of the printed ECE) and "
    "risk-coverage curve (AURC); segmentation overlays.",
)
@model_options
@data_options
@click.pass_context
def evaluate(
    ctx: click.Context,
    model: str,
    data: str,
    split: str,
    samples: int | None,
    json_path: str | None,
    ood: str | None,
    ood_split: str,
    plots_dir: str | None,
    **o: Any,
) -> None:
    """Metrics of a model on a data split.

    Accuracy / AUC or Dice / IoU, NLL, Brier, ECE and the uncertainty terms of a
    --samples Monte Carlo prediction; with --ood, the OOD detection of each uncertainty
    score (out-of-distribution items are the positives; per image for segmentation).
    """
    if json_path:
        check_output_path(json_path)
    check_batch_size(o["batch_size"])
    net = load_cli_model(model, o["arch"], o["arch_kwargs"], o["trust_pickle"])
    loader = cli_loader(data, split, False, o)
    ood_loader = cli_loader(ood, ood_split, False, o) if ood else None
    task, loss_fn = cli_task_loss(loader, o["task"], False)
    net.to(o["device"])
    seed_everything(o["seed"])  # the Monte Carlo samples
    check_fit(net, loader, loss_fn, task)
    samples = prediction_samples(net, samples)
    prediction, metrics = evaluate_model(
        net, loader, task, samples=samples, device=o["device"], progress=show_progress(ctx)
    )
    click.echo(_table(metrics, f"{model} on {data} [{split}], {len(prediction)} items"))
    record: dict[str, Any] = {
        "model": model,
        "data": data,
        "split": split,
        "task": task,
        "samples": samples,
        "metrics": json_safe(metrics),
    }
    if ood_loader is not None:
        seed_everything(o["seed"])  # the OOD batches get the weight draws of the test batches
        ood_prediction = predict(
            net,
            ood_loader,
            samples,
            activation=prediction.activation,
            keep_samples=False,
            device=o["device"],
            output_device="cpu",
            progress=show_progress(ctx),
        )
        scores = ood_scores(prediction, ood_prediction)
        title = f"OOD: {ood} [{ood_split}], {len(ood_prediction)} items (the positives)"
        click.echo(_ood_table(scores, title))
        record["ood"] = {
            "data": ood,
            "split": ood_split,
            "items": len(ood_prediction),
            "scores": json_safe(scores),
        }
    if json_path:
        atomic_write_text(json_path, json.dumps(record, indent=2) + "\n")
    if plots_dir:
        for path in _write_plots(prediction, task or "multiclass", Path(plots_dir), loader):
            click.echo(f"wrote {path}")


def _table(metrics: dict[str, float], title: str) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join([title, *(f"  {k:<{width}}  {v:.4f}" for k, v in metrics.items())])


def _ood_table(scores: dict[str, dict[str, float]], title: str) -> str:
    """The OOD scores, one row per uncertainty score: AUROC, AUPR, FPR95."""
    width = max(len(k) for k in OOD_SCORES)
    lines = [title, f"  {'score':<{width}}  {'AUROC':>6}  {'AUPR':>6}  {'FPR95':>6}"]
    for name in OOD_SCORES:
        s = scores[name]
        lines.append(f"  {name:<{width}}  {s['auroc']:.4f}  {s['aupr']:.4f}  {s['fpr95']:.4f}")
    return "\n".join(lines)


def _write_plots(prediction: Prediction, task: str, folder: Path, loader: Iterable) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    if task != "segmentation":
        kind = "multilabel" if task == "multilabel" else "multiclass"
        reliability, risk = folder / "reliability.png", folder / "risk_coverage.png"
        plots.reliability_diagram(
            prediction.probs, prediction.targets, ECE_BINS, reliability, task=kind
        )
        plots.risk_coverage_curve(prediction.probs, prediction.targets, risk, task=kind)
        return [reliability, risk]
    dataset = loader.dataset
    paths = []
    for i in range(min(4, len(prediction))):
        path = folder / f"overlay_{i}.png"
        plots.segmentation_overlay(
            dataset[i][0],
            prediction.probs[i].argmax(0),
            prediction.targets[i],
            prediction.entropy[i],
            path=path,
        )
        paths.append(path)
    return paths


@click.command(
    epilog="""\b
Examples:
  bnnconvert info bayes.pt
  bnnconvert info weights.pt --arch torchvision.models:resnet18 --arch-kwargs num_classes=14"""
)
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
@model_options
def info(model: str, as_json: bool, **o: Any) -> None:
    """Architecture and Bayesian entries per layer."""
    net = load_cli_model(model, o["arch"], o["arch_kwargs"], o["trust_pickle"])
    facts = describe(net)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    arch = facts["arch"] or "(not recorded)"
    if facts["arch_kwargs"]:
        arch += "(" + ", ".join(f"{k}={v!r}" for k, v in facts["arch_kwargs"].items()) + ")"
    k, n = facts["bayesian"], facts["entries"]
    click.echo(f"file:          {model}")
    click.echo(f"class:         {facts['class']}")
    click.echo(f"architecture:  {arch}")
    click.echo(f"parameters:    {facts['parameters']:,}")
    click.echo(
        f"bayesian:      {k:,} of {n:,} entries ({100 * k / max(n, 1):.2f} %) "
        f"in {facts['bayesian_layers']} layers"
    )
    if facts["conversion"]:
        click.echo(
            "conversion:    "
            + ", ".join(f"{key} {value}" for key, value in facts["conversion"].items())
        )
    click.echo(str(bayes_summary(net)))
