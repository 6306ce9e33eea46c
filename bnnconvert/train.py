"""Deprecated alias of :mod:`bnnconvert.training` (and :mod:`bnnconvert.losses` for the
task losses), kept for one release: import from those instead."""

import warnings

from .losses import TASKS, data_class_weights, data_task, task_loss
from .training import (
    StepInfo,
    TrainResult,
    check_fit,
    checkpoint_path_for,
    evaluate_model,
    first_batch,
    loader_generators,
    seed_everything,
    train,
)

__all__ = [
    "TASKS",
    "StepInfo",
    "TrainResult",
    "check_fit",
    "checkpoint_path_for",
    "data_class_weights",
    "data_task",
    "evaluate_model",
    "first_batch",
    "loader_generators",
    "seed_everything",
    "task_loss",
    "train",
]

warnings.warn(
    "bnnconvert.train is deprecated and will be removed; import from bnnconvert.training "
    "(train, evaluate_model, TrainSettings, ...) and bnnconvert.losses (task_loss, ...)",
    DeprecationWarning,
    stacklevel=2,
)
