"""The ``bnnconvert`` command line: a thin layer over the library's public functions.

Errors: every library error (ValueError, FileNotFoundError, TypeError, ...) raised by a
command is turned into a one-line message and exit status 1 by :class:`BnnGroup`; pass
``--debug`` (or set ``BNNCONVERT_DEBUG=1``) to see the traceback instead. Outputs are
written atomically, so a failed command leaves no file behind.

Commands defined in other modules join the group through :data:`PLUGIN_COMMANDS`
(loaded lazily, so this module never imports them at import time and they may import
the shared options below from here).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__, distributed
from .convert import bayes_summary
from .convert import convert as convert_model
from .io import (
    atomic_write_text,
    build_model,
    check_output_path,
    convert_checkpoint,
    describe,
    load_checkpoint,
    open_data,
    parse_arch_kwargs,
)
from .saliency import DATA_CRITERIA, FREE_CRITERIA, LossFn, check_r_bayes, compute_saliency
from .train import (
    check_fit,
    checkpoint_path_for,
    data_class_weights,
    data_task,
    evaluate_model,
    seed_everything,
    task_loss,
)
from .train import train as fit

__all__ = ["PLUGIN_COMMANDS", "BnnGroup", "data_options", "main", "model_options"]

log = logging.getLogger("bnnconvert")

PLUGIN_COMMANDS: dict[str, str] = {
    "flops": "bnnconvert.flops_cli:flops",
    "benchmark": "bnnconvert.benchmark:benchmark_command",
    "demo": "bnnconvert.demo:demo_command",
}
"""Commands defined outside this module, as {name: "package.module:attribute"}.

The attribute is a ``click.Command`` (e.g. ``@click.command("flops")``, decorated with
:func:`model_options` and friends imported from here); it is imported only when the
group lists or runs its commands, and a module that does not exist (yet) is skipped.
The first line of its ``epilog`` that starts with ``bnnconvert `` is shown in
``bnnconvert --help``. Errors it raises get the one-line treatment of :class:`BnnGroup`."""

KILL_ENV = "BNNCONVERT_TEST_KILL_AFTER_STEPS"
"""Testing hook: ``train`` SIGKILLs its own process after this many optimiser steps."""


# ----------------------------------------------------------------------- the group
def _debug(ctx: click.Context) -> bool:
    """--debug on the command line, or BNNCONVERT_DEBUG set to anything but "" or "0"."""
    env = os.environ.get("BNNCONVERT_DEBUG", "")
    return bool(ctx.find_root().params.get("debug")) or env not in ("", "0")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (ValueError, FileNotFoundError, TypeError, PermissionError)):
        return text
    return f"{type(exc).__name__}: {text}"


class BnnGroup(click.Group):
    """A click group that lists :data:`PLUGIN_COMMANDS` and turns every library error
    into a one-line ``click.ClickException`` (unless ``--debug``)."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name) or self._plugin(cmd_name)

    @staticmethod
    def _plugin(name: str) -> click.Command | None:
        spec = PLUGIN_COMMANDS.get(name)
        if spec is None:
            return None
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            return None  # not written yet
        command = getattr(module, attr, None)
        if not isinstance(command, click.Command):
            log.warning("PLUGIN_COMMANDS[%r]: %s is not a click command", name, spec)
            return None
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # one line, with where to look instead of the usage
            if exc.ctx is None or _debug(ctx):
                raise
            hint = f" (see '{exc.ctx.command_path} --help')"
            raise click.UsageError(exc.format_message() + hint) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            raise click.Abort() from None
        except Exception as exc:
            if _debug(ctx):
                raise
            raise click.ClickException(
                f"{_one_line(exc)} (run with --debug for the traceback)"
            ) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        plugins = [name for name in PLUGIN_COMMANDS if self._plugin(name) is not None]
        return [*self.commands, *(p for p in plugins if p not in self.commands)]

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The workflow examples, then the first example of every plugin command."""
        super().format_epilog(ctx, formatter)
        commands = (self._plugin(name) for name in PLUGIN_COMMANDS)
        examples = [e for e in map(_first_example, commands) if e]
        if examples:
            formatter.write_paragraph()
            formatter.write_text("\b\nMore commands:\n" + "\n".join(examples))


def _first_example(command: click.Command | None) -> str | None:
    """The first line of a command's epilog that starts with "bnnconvert"."""
    lines = (line.strip() for line in ((command and command.epilog) or "").splitlines())
    return next((f"  {line}" for line in lines if line.startswith("bnnconvert ")), None)


def show_progress(ctx: click.Context) -> bool:
    """Whether to draw progress bars: the root ``--progress/--no-progress`` flag, else
    whether stderr is a terminal."""
    flag = ctx.find_root().params.get("progress")
    return sys.stderr.isatty() if flag is None else flag


EXAMPLES = """\b
Examples (the paper's three steps on the bundled real digits; any MedMNIST .npz works):
  bnnconvert train --arch bnnconvert.models:resnet18 \\
      --arch-kwargs num_classes=10,in_channels=1 --data demo:digits --epochs 3 -o det.pt
  bnnconvert saliency det.pt --data demo:digits -o saliency.pt
  bnnconvert convert det.pt --saliency saliency.pt --r-bayes 0.01 -o bayes.pt
  bnnconvert train bayes.pt --data demo:digits --epochs 2 --beta 0.01 --samples 5 -o trained.pt
  bnnconvert evaluate trained.pt --data demo:digits --samples 5 --json metrics.json
  bnnconvert info trained.pt

\b
DATA is a MedMNIST-format .npz, a folder of images/ and masks/ (segmentation,
optionally under train/ val/ test/), package.module:factory returning a DataLoader, or
a bundled real set: demo:digits, demo:nuclei (segmentation), demo:ood.
A state_dict or Lightning checkpoint needs --arch package.module:factory [--arch-kwargs].
"""


@click.group(cls=BnnGroup, epilog=EXAMPLES, context_settings={"max_content_width": 100})
@click.version_option(__version__, message="bnnconvert %(version)s")
@click.option("--debug", is_flag=True, help="Show tracebacks (also BNNCONVERT_DEBUG=1).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bars (default: when stderr is a terminal).",
)
def main(debug: bool, verbose: int, quiet: bool, progress: bool | None) -> None:
    """Convert a trained PyTorch model into a sparse (partial) Bayesian network."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    _log_to_stderr(click.get_current_context(), level)


def _log_to_stderr(ctx: click.Context, level: int) -> None:
    """The library's log records go to stderr, bare, while the command runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False

    def restore() -> None:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]

    ctx.call_on_close(restore)


# ----------------------------------------------------------------------- shared options
def _parse_kwargs(ctx: click.Context, param: click.Parameter, value: str | None) -> dict:
    try:
        return parse_arch_kwargs(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def model_options(fn: Callable) -> Callable:
    """--arch, --arch-kwargs, --trust-pickle."""
    fn = click.option(
        "--trust-pickle",
        is_flag=True,
        help="Allow loading a whole pickled module (torch.save(model)): "
        "unpickling can run arbitrary code.",
    )(fn)
    fn = click.option(
        "--arch-kwargs",
        callback=_parse_kwargs,
        metavar="K=V,...",
        help="Keyword arguments of the factory, Python literals: num_classes=14,in_channels=1.",
    )(fn)
    fn = click.option(
        "--arch",
        metavar="PKG.MOD:FACTORY",
        help="Architecture of a state_dict checkpoint, e.g. torchvision.models:resnet18.",
    )(fn)
    return fn


def data_options(fn: Callable) -> Callable:
    """--task, --batch-size, --size, --as-rgb, --workers, --seed, --device."""
    options = [
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ..."),
        click.option(
            "--seed",
            default=0,
            show_default=True,
            type=int,
            help="Seeds the data order and every RNG.",
        ),
        click.option(
            "--workers", default=0, show_default=True, type=int, help="DataLoader worker processes."
        ),
        click.option(
            "--as-rgb/--as-grey",
            default=None,
            help="Convert images to 3 or 1 channels (default: as stored).",
        ),
        click.option("--size", type=int, help="Resize images to SIZE x SIZE pixels."),
        click.option("--batch-size", default=50, show_default=True, type=int),
        click.option(
            "--task",
            type=click.Choice(["multiclass", "multilabel", "segmentation"]),
            help="The loss and metrics (default: from the data).",
        ),
    ]
    for option in options:
        fn = option(fn)
    return fn


output_option = click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="File to write (atomically).",
)


def load_cli_model(path: str, arch: str | None, arch_kwargs: dict, trust_pickle: bool) -> nn.Module:
    """The model behind a command's MODEL argument and ``--arch``/``--arch-kwargs``/
    ``--trust-pickle`` options (:func:`bnnconvert.io.load_checkpoint`)."""
    return load_checkpoint(path, arch, arch_kwargs or None, trust_pickle=trust_pickle)


def cli_loader(data: str, split: str, shuffle: bool, o: dict[str, Any]) -> Iterable:
    """The DataLoader of ``--data`` (a file, folder or ``demo:`` name) for ``split``, with
    the command's batch size, seed and image options ``o``."""
    return open_data(
        data,
        split,
        batch_size=o["batch_size"],
        shuffle=shuffle,
        seed=o["seed"],
        size=o["size"],
        as_rgb=o["as_rgb"],
        num_workers=o["workers"],
    )


def cli_task_loss(loader: Iterable, task: str | None, weighted: bool) -> tuple[str | None, LossFn]:
    """(task, loss function) for ``loader``: ``--task`` or the task the data declares,
    with inverse-frequency class weights if ``weighted``."""
    task = task or data_task(loader)
    weights = data_class_weights(loader) if weighted and task is not None else None
    return task, task_loss(task, weights)


def _saliency_data(ctx, net, data: str, split: str, weighted: bool, o: dict[str, Any]):
    """(progress-wrapped loader, loss) of the saliency pass, checked against the model."""
    check_batch_size(o["batch_size"])
    loader = cli_loader(data, split, False, o)
    task, loss_fn = cli_task_loss(loader, o["task"], weighted)
    check_fit(net, loader, loss_fn, task)
    bar = tqdm(loader, desc="saliency", unit="batch", disable=not show_progress(ctx), leave=False)
    return bar, loss_fn


def check_batch_size(value: int) -> None:
    """Raise click.BadParameter (exit code 2) for a ``--batch-size`` below 1."""
    if value < 1:
        raise click.BadParameter(f"must be >= 1, got {value}", param_hint="--batch-size")


# ----------------------------------------------------------------------- saliency
@main.command(
    epilog="""\b
Examples:
  bnnconvert saliency det.pt --data chestmnist.npz --batches 100 -o saliency.pt
  bnnconvert saliency weights.pt --arch torchvision.models:resnet18 \\
      --arch-kwargs num_classes=14 --data chestmnist.npz --as-rgb -o saliency.pt"""
)
@click.argument("model")
@click.option("--data", help="Training data (required for grad2 and fisher).")
@click.option("--split", default="train", show_default=True)
@click.option(
    "--criterion",
    default="grad2",
    show_default=True,
    type=click.Choice(["grad2", "fisher", "magnitude", "random"]),
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
        loader, loss_fn = _saliency_data(ctx, net, data, split, class_weights, o)
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


# ----------------------------------------------------------------------- convert
@main.command(
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
        loader, loss_fn = _saliency_data(ctx, net, data, "train", True, o)
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


# ----------------------------------------------------------------------- train
@main.command(
    epilog="""\b
Examples:
  bnnconvert train bayes.pt --data digits.npz --epochs 50 --beta 0.01 --samples 5 -o out.pt
  bnnconvert train bayes.pt --data nuclei/ --task segmentation --batch-size 10 \\
      --beta linear:0.2:0.01 -o out.pt
  bnnconvert train --arch bnnconvert.models:resnet18 \\
      --arch-kwargs num_classes=10,in_channels=1 --data digits.npz --epochs 3 -o det.pt
  bnnconvert train bayes.pt --data digits.npz --epochs 50 --nproc 4 --device cuda \\
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
    try:
        result = fit(
            net,
            loader,
            epochs,
            task=task,
            loss_fn=loss_fn,
            beta=beta,
            samples=samples,
            kl_reduction=kl_reduction,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            lr_schedule=lr_schedule,
            validate=validate,
            device=o["device"],
            seed=o["seed"],
            checkpoint=ckpt,
            checkpoint_every=checkpoint_every or None,
            resume=not restart,
            output=output,
            progress=show,
            on_step=_kill_hook(),
            amp=amp,
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


def _kill_hook() -> Callable | None:
    """The :data:`KILL_ENV` testing hook: SIGKILL after N steps of this process."""
    limit = int(os.environ.get(KILL_ENV, "0") or 0)
    if limit <= 0:
        return None
    done = [0]

    def hook(info: Any) -> None:
        done[0] += 1
        if done[0] >= limit:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


# ----------------------------------------------------------------------- evaluate
@main.command(
    epilog="""\b
Examples:
  bnnconvert evaluate trained.pt --data demo:digits --samples 5
  bnnconvert evaluate trained.pt --data chestmnist.npz --json metrics.json --plots plots/"""
)
@click.argument("model")
@click.option("--data", required=True, help="Evaluation data.")
@click.option("--split", default="test", show_default=True)
@click.option(
    "--samples",
    default=5,
    show_default=True,
    help="Posterior samples (1 for a deterministic model).",
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Also write the metrics as JSON."
)
@click.option(
    "--plots",
    "plots_dir",
    type=click.Path(file_okay=False),
    help="Write PNG plots (reliability diagram; segmentation overlays) there.",
)
@model_options
@data_options
@click.pass_context
def evaluate(
    ctx: click.Context,
    model: str,
    data: str,
    split: str,
    samples: int,
    json_path: str | None,
    plots_dir: str | None,
    **o: Any,
) -> None:
    """Metrics of a model on a data split.

    Accuracy / AUC or Dice / IoU, NLL, Brier, ECE and the uncertainty terms of a
    --samples Monte Carlo prediction.
    """
    if json_path:
        check_output_path(json_path)
    check_batch_size(o["batch_size"])
    net = load_cli_model(model, o["arch"], o["arch_kwargs"], o["trust_pickle"])
    loader = cli_loader(data, split, False, o)
    task, loss_fn = cli_task_loss(loader, o["task"], False)
    net.to(o["device"])
    seed_everything(o["seed"])  # the Monte Carlo samples
    check_fit(net, loader, loss_fn, task)
    prediction, metrics = evaluate_model(
        net, loader, task, samples=samples, device=o["device"], progress=show_progress(ctx)
    )
    click.echo(_table(metrics, f"{model} on {data} [{split}], {len(prediction)} items"))
    if json_path:
        record = {
            "model": model,
            "data": data,
            "split": split,
            "task": task,
            "samples": samples,
            "metrics": _json_safe(metrics),
        }
        atomic_write_text(json_path, json.dumps(record, indent=2) + "\n")
    if plots_dir:
        for path in _write_plots(prediction, task or "multiclass", Path(plots_dir), loader):
            click.echo(f"wrote {path}")


def _table(metrics: dict[str, float], title: str) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join([title, *(f"  {k:<{width}}  {v:.4f}" for k, v in metrics.items())])


def _json_safe(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


def _write_plots(prediction: Any, task: str, folder: Path, loader: Iterable) -> list[Path]:
    try:
        from . import plots
    except ImportError as exc:
        raise click.ClickException(
            f"--plots needs matplotlib ({exc}); pip install 'bnnconvert[plots]'"
        ) from None
    folder.mkdir(parents=True, exist_ok=True)
    if task != "segmentation":
        path = folder / "reliability.png"
        plots.reliability_diagram(
            prediction.probs,
            prediction.targets,
            path=path,
            task="multilabel" if task == "multilabel" else "multiclass",
        )
        return [path]
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


# ----------------------------------------------------------------------- info
@main.command(
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


if __name__ == "__main__":  # pragma: no cover
    main()
