"""Does the data fit the model? One forward and one loss on a small first batch.

:func:`train` runs :func:`check_fit` before its first step, the command line before any
long pass, so that a wrong input size, channel or class count fails in a second with a
message that names the argument to change, instead of deep inside a training loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import BatchFormat, Inputs, as_batch_format, call_model, first_line, model_device
from ..losses import TASKS, LossFn, default_loss
from ..predict import eval_mode, mean_weights

__all__ = ["check_fit", "first_batch"]


def check_fit(
    model: nn.Module,
    data: Iterable,
    loss_fn: LossFn | None = None,
    task: str | None = None,
    *,
    batch_format: BatchFormat | None = None,
) -> None:
    """Raise ValueError if the data does not fit the model: one forward (at mu, eval mode,
    no gradient) and one loss on the first two samples (or the first batch). Batches and
    outputs are read by ``batch_format`` (:class:`bnnconvert.BatchFormat`); a batch or an
    output it cannot read raises its TypeError."""
    fmt = as_batch_format(batch_format)
    x, y = fmt.split(first_batch(data), model_device(model), need_target=True)
    with eval_mode(model), torch.no_grad(), mean_weights(model):
        try:
            raw = call_model(model, x)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise ValueError(
                f"the data does not fit the model: inputs of shape {_shapes(x)} fail in "
                f"its forward ({first_line(exc)}); check the model's input channels "
                "(in_channels in arch_kwargs=...) and the image size (size=..., as_rgb=...)"
            ) from None
        out = fmt.output(raw)
        _check_classes(out, data, task)
        try:
            (loss_fn or default_loss)(out, y)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ValueError(
                f"the model's outputs {tuple(out.shape[1:])} do not fit the targets "
                f"{tuple(y.shape[1:])} ({first_line(exc)}); check num_classes "
                "(in arch_kwargs=...) and task=..."
            ) from None


def _shapes(x: Inputs) -> str:
    """The shapes of the inputs without N: "(1, 28, 28)", or "pixel_values (3, 32, 32)"."""
    if isinstance(x, Tensor):
        return str(tuple(x.shape[1:]))
    return ", ".join(f"{k} {tuple(v.shape[1:])}" for k, v in x.items())


def first_batch(data: Iterable) -> Any:
    """A small batch without advancing a DataLoader's sampler (no RNG is drawn)."""
    dataset = getattr(data, "dataset", None)
    collate = getattr(data, "collate_fn", None)
    if collate is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        if len(dataset) == 0:
            raise ValueError("the data is empty; pass a dataset with at least one sample")
        return collate([dataset[i] for i in range(min(2, len(dataset)))])
    for batch in data:
        return batch
    raise ValueError("the data yielded no batch; pass a non-empty iterable of (input, target)")


def _check_classes(out: Tensor, data: Iterable, task: str | None) -> None:
    classes = getattr(getattr(data, "dataset", None), "num_classes", None)
    if not isinstance(classes, int) or out.dim() < 2 or task not in TASKS:
        return
    width = out.shape[1]
    if (task == "multilabel" and width != classes) or width < classes:
        raise ValueError(
            f"the model outputs {width} {'labels' if task == 'multilabel' else 'classes'} but "
            f"the data has {classes}; build the model with num_classes={classes} "
            "(in arch_kwargs=...)"
        )
