"""The options and helpers that several commands share.

:func:`model_options` adds ``--arch``, ``--arch-kwargs``, ``--trust-pickle``;
:func:`data_options` adds ``--task``, ``--batch-size``, ``--size``, ``--as-rgb/--as-grey``,
``--workers``, ``--seed``, ``--device``; :data:`output_option` adds ``-o/--output``;
:data:`device_option` is the one ``--device`` of every command (``auto``: CUDA when
available) and :func:`r_bayes_type` the one type of every r_bayes option (a fraction,
``0.01``, or a percentage, ``1%``). The helpers turn those options into library calls: the
model (:func:`load_cli_model`), the loader (:func:`cli_loader`), the task and its loss
(:func:`cli_task_loss`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

import click
from torch import nn
from tqdm.auto import tqdm

from .._utils import BatchFormat, resolve_device, tuple_batches
from ..data import open_data
from ..layers import DEFAULT_INCLUDE, PARAMETER_KINDS
from ..losses import LossFn, data_class_weights, data_task, task_loss
from ..saliency import check_r_bayes
from ..serialization import load_checkpoint, parse_arch_kwargs
from ..training import check_fit

__all__ = [
    "check_batch_size",
    "cli_loader",
    "cli_task_loss",
    "data_options",
    "device_option",
    "load_cli_model",
    "model_options",
    "output_option",
    "parameter_options",
    "parse_r_bayes",
    "r_bayes_type",
    "saliency_data",
    "show_progress",
]


def show_progress(ctx: click.Context) -> bool:
    """Whether to draw progress bars: the root ``--progress/--no-progress`` flag, else
    whether stderr is a terminal."""
    flag = ctx.find_root().params.get("progress")
    return sys.stderr.isatty() if flag is None else flag


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
        help="Architecture of a state_dict checkpoint: PKG.MOD:FACTORY "
        "(torchvision.models:resnet18), or a model name of timm or torchvision "
        "(timm:resnet18, torchvision:mobilenet_v3_small; no weights are downloaded).",
    )(fn)
    return fn


def _device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """The device ``--device`` names, resolved once (:func:`bnnconvert._utils.resolve_device`:
    ``auto`` is CUDA when available), as a string such as "cpu" or "cuda"."""
    try:
        return str(resolve_device(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    callback=_device,
    help="auto (CUDA when available, else cpu), cpu, cuda, cuda:1, ...",
)
"""``--device``, the same in every command: ``auto`` by default, a bad name exits with 2."""


def data_options(fn: Callable) -> Callable:
    """--task, --batch-size, --size, --as-rgb, --workers, --seed, --device, --input-key,
    --target-key."""
    options = [
        click.option(
            "--target-key",
            help="Key of the target in dict batches (e.g. label); with --input-key.",
        ),
        click.option(
            "--input-key",
            help="Key of the input in dict batches (e.g. image, a MONAI-style data set); "
            "default: (input, target) batches.",
        ),
        device_option,
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


def _names(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise click.BadParameter("give comma-separated kinds or name patterns, e.g. linear,conv")
    return names


def parameter_options(fn: Callable) -> Callable:
    """--include, --exclude: which parameters are scored and converted."""
    kinds = ", ".join(PARAMETER_KINDS)
    for flag, text in (
        ("--exclude", "Leave these out (the same forms)."),
        (
            "--include",
            f"Parameters to score and convert, comma-separated: kinds ({kinds}) or "
            "state_dict-name patterns (fc.*). Default: " + ",".join(DEFAULT_INCLUDE) + ".",
        ),
    ):
        fn = click.option(flag, metavar="KINDS", callback=_names, help=text)(fn)
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
    ``--trust-pickle`` options (:func:`bnnconvert.serialization.load_checkpoint`)."""
    return load_checkpoint(path, arch, arch_kwargs or None, trust_pickle=trust_pickle)


def cli_loader(data: str, split: str, shuffle: bool, o: dict[str, Any]) -> Iterable:
    """The DataLoader of ``--data`` (a file, folder or ``demo:`` name) for ``split``, with
    the command's batch size, seed and image options ``o``; with ``--input-key`` /
    ``--target-key``, dict batches are read into (input, target) tuples
    (:func:`bnnconvert._utils.tuple_batches`)."""
    loader = open_data(
        data,
        split,
        batch_size=o["batch_size"],
        shuffle=shuffle,
        seed=o["seed"],
        size=o["size"],
        as_rgb=o["as_rgb"],
        num_workers=o["workers"],
    )
    keys = o.get("input_key"), o.get("target_key")
    return loader if keys == (None, None) else tuple_batches(loader, BatchFormat(*keys))


def cli_task_loss(loader: Iterable, task: str | None, weighted: bool) -> tuple[str | None, LossFn]:
    """(task, loss function) for ``loader``: ``--task`` or the task the data declares,
    with inverse-frequency class weights if ``weighted``."""
    task = task or data_task(loader)
    weights = data_class_weights(loader) if weighted and task is not None else None
    return task, task_loss(task, weights)


def saliency_data(
    ctx, net, data: str, split: str, weighted: bool, o: dict[str, Any], shuffle: bool = False
):
    """(progress-wrapped loader, loss) of the saliency pass, checked against the model."""
    check_batch_size(o["batch_size"])
    loader = cli_loader(data, split, shuffle, o)
    task, loss_fn = cli_task_loss(loader, o["task"], weighted)
    check_fit(net, loader, loss_fn, task)
    bar = tqdm(loader, desc="saliency", unit="batch", disable=not show_progress(ctx), leave=False)
    return bar, loss_fn


def check_batch_size(value: int) -> None:
    """Raise click.BadParameter (exit code 2) for a ``--batch-size`` below 1."""
    if value < 1:
        raise click.BadParameter(f"must be >= 1, got {value}", param_hint="--batch-size")


_BARE_ONE = re.compile(r"\+?0*1\.?")
"""A 1 written like an integer ("1", "01", "+1", "1."): 1 % or every entry?"""


def parse_r_bayes(text: str) -> float:
    """An r_bayes written on the command line as a fraction ("0.01") or a percentage
    ("1%"), as the fraction in (0, 1]; "1%" and "0.01" give the same float.

    Raises ValueError for anything else, for a number above 1 written without "%" (is "5"
    5 % or 500 %?), and for a 1 written like an integer ("1", "01", "1."): users who type
    it nearly always mean 1 %; every entry is written "1.0" or "100%".
    """
    text = text.strip()
    percent = text.endswith("%")
    try:
        number = Decimal(text.removesuffix("%").strip())
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a number") from None
    if not number.is_finite():
        raise ValueError(f"{text!r} is not a finite number")
    if number > 1 and not percent:
        raise ValueError(f"r_bayes {text} is above 1 (for {text} %, write {text}%)")
    if not percent and _BARE_ONE.fullmatch(text):
        raise ValueError(
            f"r_bayes {text} is ambiguous: write 1% for one percent or 1.0 for every entry"
        )
    r = float(number / 100 if percent else number)
    check_r_bayes(r)
    return r


class _RBayes(click.ParamType):
    """A fraction in (0, 1] or a percentage ("1%"); "auto" when allowed; a comma-separated
    list of them (a tuple) when ``many``."""

    def __init__(self, auto: bool, many: bool) -> None:
        self.auto, self.many = auto, many
        one = "FRACTION|N%" + ("|auto" if auto else "")
        self.name = f"{one},..." if many else one

    def convert(self, value: Any, param: Any, ctx: Any) -> float | str | tuple[float, ...]:
        if isinstance(value, (float, tuple)) or (self.auto and value == "auto"):
            return value
        texts = str(value).split(",") if self.many else [str(value)]
        values, errors = [], []
        for text in texts:  # every bad value in one message
            try:
                values.append(parse_r_bayes(text))
            except ValueError as exc:
                errors.append(str(exc))
        if errors:
            example = "e.g. 0.01,0.05 or 1%,5%" if self.many else "e.g. 0.01 or 1%"
            problems = "; ".join(errors)
            self.fail(
                f"{problems}; pass a fraction in (0, 1] or a percentage, {example}", param, ctx
            )
        return tuple(values) if self.many else values[0]


def r_bayes_type(auto: bool = False, many: bool = False) -> click.ParamType:
    """The click type of every r_bayes option: a fraction in (0, 1] ("0.01") or a
    percentage ("1%"), or "auto" (``auto``); comma-separated values give a tuple
    (``many``)."""
    return _RBayes(auto, many)
