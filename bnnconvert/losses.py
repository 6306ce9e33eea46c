"""Task losses: the NLL of each task, the loss inferred from a batch, class weights.

- ``"multiclass"``: cross-entropy over (N, C) logits, targets (N,) class indices;
- ``"multilabel"``: binary cross-entropy with logits, targets (N, L) of 0/1;
- ``"segmentation"``: cross-entropy per pixel, logits (N, C, H, W), targets (N, H, W).

Without a task, :func:`default_loss` infers the loss from each batch's target. A data
set may declare its task (``dataset.task``) and class weights (``dataset.class_weights()``,
the paper's inverse-frequency weighting); :func:`data_task` and :func:`data_class_weights`
read them from a loader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TASKS",
    "LossFn",
    "data_class_weights",
    "data_task",
    "default_loss",
    "task_loss",
]

TASKS = ("multiclass", "multilabel", "segmentation")

LossFn = Callable[[Tensor, Tensor], Tensor]
"""(output, target) -> scalar loss."""


def default_loss(output: Tensor, target: Tensor) -> Tensor:
    """The loss used when none is given, inferred from the target:

    - integer target with one dimension fewer than the output (N,C,... vs N,...):
      cross-entropy (multi-class classification and segmentation);
    - target of the output's shape: binary cross-entropy with logits (multi-label).
    """
    if not isinstance(output, Tensor):
        raise TypeError(
            f"the model returned {type(output).__name__}, not a tensor; pass loss_fn="
            "a function (output, target) -> scalar loss"
        )
    if not target.is_floating_point() and output.dim() == target.dim() + 1:
        return F.cross_entropy(output, target)
    if output.shape == target.shape:
        return F.binary_cross_entropy_with_logits(output, target.to(output.dtype))
    raise ValueError(
        f"cannot infer a loss for output {tuple(output.shape)} and target "
        f"{tuple(target.shape)} ({target.dtype}); pass loss_fn=..."
    )


def check_task(task: str | None) -> None:
    """ValueError unless ``task`` is None or one of :data:`TASKS`."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)} or None, got {task!r}")


def task_loss(task: str | None = None, weight: Tensor | None = None) -> LossFn:
    """The NLL of a task as a function (output, target) -> scalar.

    Args:
        task: "multiclass", "multilabel", "segmentation", or None to infer the loss from
            each batch (:func:`default_loss`).
        weight: class weights (C,) for the cross-entropies, or the BCE ``pos_weight`` (L,)
            for "multilabel" (e.g. ``dataset.class_weights()``); None: unweighted.
    """
    check_task(task)
    if task is None:
        if weight is not None:
            raise ValueError("class weights need a task; pass task='multiclass' or another")
        return default_loss
    if task == "multilabel":
        return partial(_bce, pos_weight=weight)
    return partial(_cross_entropy, weight=weight)


def _cross_entropy(output: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy of logits (N, C, ...) and class indices (N, ...) or (N, 1, ...)."""
    if target.dim() == output.dim() and target.shape[1] == 1:
        target = target[:, 0]
    w = None if weight is None else weight.to(output.device, output.dtype)
    return F.cross_entropy(output, target.long(), weight=w)


def _bce(output: Tensor, target: Tensor, pos_weight: Tensor | None = None) -> Tensor:
    """Binary cross-entropy with logits; output and target (N, L)."""
    pw = None if pos_weight is None else pos_weight.to(output.device, output.dtype)
    return F.binary_cross_entropy_with_logits(output, target.to(output.dtype), pos_weight=pw)


def data_task(data: Iterable) -> str | None:
    """The task of a loader's dataset (``loader.dataset.task``), or None."""
    task = getattr(getattr(data, "dataset", None), "task", None)
    return task if task in TASKS else None


def data_class_weights(data: Iterable) -> Tensor | None:
    """``loader.dataset.class_weights()`` (the paper's weighted loss), or None."""
    fn = getattr(getattr(data, "dataset", None), "class_weights", None)
    return fn() if callable(fn) else None
