"""``bnnconvert train``: step 1 (deterministic) or step 3 (ELBO), resumable, on one or
several processes."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import click
import torch

from .._utils import check_output_path
from ..serialization import build_model
from ..training import (
    TrainSettings,
    checkpoint_path_for,
    distributed,
    evaluate_model,
    seed_everything,
)
from ..training import train as fit
from .group import log
from .options import (
    check_batch_size,
    cli_loader,
    cli_task_loss,
    data_options,
    load_cli_model,
    model_options,
    output_option,
    show_progress,
)

__all__ = ["train"]


@click.command(
    epilog="""\b
Examples:
  bnnconvert train bayes.pt --data demo:digits --epochs 50 --beta 0.01 --samples 5 -o out.pt
  bnnconvert train unet_bayes.pt --data nuclei/ --task segmentation --batch-size 10 \\
      --beta linear:0.2:0.01 -o out.pt  # your converted UNet and images/ + masks/ folder
  bnnconvert train --arch bnnconvert.models:resnet18 \\
      --arch-kwargs num_classes=10,in_channels=1 --data demo:digits --epochs 3 -o det.pt
  bnnconvert train bayes.pt --data demo:digits --epochs 50 --nproc 4 --device cuda \\
      --amp bf16 -o out.pt
  torchrun --nnodes 2 --nproc-per-node 4 ... -m bnnconvert train bayes.pt ... -o out.pt

\b
Resuming: the run state is kept in OUTPUT.ckpt (every epoch and every
--checkpoint-every steps). Rerunning the same command after an interruption
continues from it (same settings required); --restart discards it. It is deleted
once OUTPUT is written.

\b
Several processes: --nproc N starts N processes on this node through torchrun
(gloo on the CPU; nccl with --device cuda, one GPU each); under an external
torchrun or SLURM launch (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS set,
and MASTER_ADDR/MASTER_PORT) the command joins that process group instead.
Each process trains on its shard of the data (--batch-size per process) with
its own posterior noise; the gradients are averaged; rank 0 writes the files.
A run resumes on the same number of processes."""
)
@click.argument("model", required=False)
@click.option("--data", required=True, help="Training data.")
@click.option("--epochs", required=True, type=int)
@click.option(
    "--beta",
    default="0.01",
    show_default=True,
    help="KL weight: 0.01, linear:0.2:0.01, cyclical:0.01:4, blundell.",
)
@click.option("--samples", default=5, show_default=True, help="Posterior samples per step.")
@click.option(
    "--kl-reduction", default="mean", show_default=True, type=click.Choice(["mean", "sum"])
)
@click.option("--lr", default=0.01, show_default=True)
@click.option("--momentum", default=0.0, show_default=True)
@click.option("--weight-decay", default=1e-5, show_default=True)
@click.option(
    "--lr-schedule",
    default="constant",
    show_default=True,
    type=click.Choice(["constant", "cosine"]),
)
@click.option(
    "--class-weights/--no-class-weights",
    default=True,
    show_default=True,
    help="Class-weighted loss (the paper's).",
)
@click.option("--val-split", help="Evaluate on this split after every epoch (e.g. val).")
@click.option(
    "--checkpoint-every",
    default=100,
    show_default=True,
    type=int,
    help="Also checkpoint every N steps (0: only at epoch ends).",
)
@click.option("--restart", is_flag=True, help="Discard the checkpoint of an earlier run.")
@click.option(
    "--nproc",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Train in N processes on this node (torchrun; see below).",
)
@click.option(
    "--amp",
    default="none",
    show_default=True,
    type=click.Choice(["bf16", "fp16", "none"]),
    help="Mixed precision of the forward passes (fp16 scales the loss; for GPUs).",
)
@model_options
@data_options
@output_option
@click.pass_context
def train(
    ctx: click.Context,
    model: str | None,
    data: str,
    epochs: int,
    beta: str,
    samples: int,
    kl_reduction: str,
    lr: float,
    momentum: float,
    weight_decay: float,
    lr_schedule: str,
    class_weights: bool,
    val_split: str | None,
    checkpoint_every: int,
    restart: bool,
    nproc: int,
    amp: str,
    output: str,
    **o: Any,
) -> None:
    """Train with the ELBO (converted) or plain NLL (step 1).

    A converted MODEL trains with the ELBO (--samples posterior samples, --beta KL
    weight); a deterministic MODEL, or a new one from --arch, with the plain NLL.
    """
    check_output_path(output)
    check_batch_size(o["batch_size"])
    if model is None and o["arch"] is None:
        raise click.UsageError("pass MODEL (a converted or trained model) or --arch to train one")
    if nproc > 1:
        _check_gpus(nproc, o["device"])
        try:
            distributed.launch(nproc, _command_line(ctx, drop={"nproc"}))
        except RuntimeError as exc:  # a rank failed; it printed its error
            raise click.ClickException(str(exc)) from None
        return
    ctx.with_resource(_process_group(o["device"]))  # left when the command ends
    main_rank = distributed.is_main_process()
    show = show_progress(ctx) and main_rank
    seed_everything(o["seed"])  # a model built from --arch starts from seeded weights
    net = (
        load_cli_model(model, o["arch"], o["arch_kwargs"], o["trust_pickle"])
        if model
        else build_model(o["arch"], o["arch_kwargs"])
    )
    loader = cli_loader(data, "train", True, o)
    task, loss_fn = cli_task_loss(loader, o["task"], class_weights)
    validate = None
    if val_split:
        val = cli_loader(data, val_split, False, o)
        validate = partial(_validation, val, task, samples, show, amp)
    ckpt = checkpoint_path_for(output)
    settings = TrainSettings(
        beta=beta,
        samples=samples,
        kl_reduction=kl_reduction,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        lr_schedule=lr_schedule,
        amp=amp,
    )
    try:
        result = fit(
            net,
            loader,
            epochs,
            settings,
            task=task,
            loss_fn=loss_fn,
            validate=validate,
            device=o["device"],
            seed=o["seed"],
            checkpoint=ckpt,
            checkpoint_every=checkpoint_every or None,
            resume=not restart,
            output=output,
            progress=show,
        )
    except KeyboardInterrupt:
        if not ckpt.exists():
            raise click.ClickException("interrupted before the first checkpoint") from None
        raise click.ClickException(
            f"interrupted; the run state is in {ckpt}: rerun the same command to resume"
        ) from None
    last = result.history[-1] if result.history else {}
    if main_rank:
        click.echo(
            f"wrote {output}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k not in ("epoch", "steps"))
        )


def _validation(val: Iterable, task: str | None, samples: int, progress: bool, amp: str, model):
    return evaluate_model(model, val, task, samples=samples, progress=progress, amp=amp)[1]


def _check_gpus(nproc: int, device: str) -> None:
    if torch.device(device).type == "cuda" and nproc > torch.cuda.device_count():
        raise click.BadParameter(
            f"{nproc} processes need {nproc} GPUs with --device cuda, this node has "
            f"{torch.cuda.device_count()}",
            param_hint="--nproc",
        )


@contextmanager
def _process_group(device: str) -> Iterator[None]:
    """Within the block, this process is in the launcher's process group (if launched by
    torchrun or SLURM); ranks other than 0 log warnings only."""
    owned = distributed.init_from_env(device)
    if not distributed.is_main_process():
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        if owned:
            torch.distributed.destroy_process_group()


def _command_line(ctx: click.Context, drop: set[str]) -> list[str]:
    """The arguments (after the program name) that invoke ``ctx``'s command with the same
    root and command options, without the parameters named in ``drop``."""
    return [*_given_args(ctx.find_root(), set()), ctx.info_name, *_given_args(ctx, drop)]


def _given_args(ctx: click.Context, drop: set[str]) -> list[str]:
    """Command-line arguments giving ``ctx``'s parameters that were not defaults."""
    options: list[str] = []
    arguments: list[str] = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if param.name in drop or source in (None, click.core.ParameterSource.DEFAULT):
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Argument):
            arguments.append(str(value))
        elif param.count:
            options += [param.opts[0]] * value
        elif param.is_flag:
            names = param.opts if value or not param.secondary_opts else param.secondary_opts
            options += [names[0]] if value or param.secondary_opts else []
        else:  # dicts (--arch-kwargs) as a dict literal, floats exactly
            options += [
                param.opts[0],
                repr(value) if isinstance(value, (dict, float)) else str(value),
            ]
    return [*options, *(["--", *arguments] if arguments else [])]
