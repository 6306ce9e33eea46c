"""Training: the loop (steps 1 and 3), its settings, its resumable state, several processes.

- :mod:`~bnnconvert.training.settings`: :class:`TrainSettings`, how to train (beta, S,
  SGD, learning-rate schedule, precision), one object for the loop, the methods, the
  demo and the CLI;
- :mod:`~bnnconvert.training.loop`: :func:`train` and :func:`evaluate_model`;
- :mod:`~bnnconvert.training.checks`: :func:`check_fit`, does the data fit the model;
- :mod:`~bnnconvert.training.checkpoint`: the resumable run state, RNG snapshots, the
  checkpoint file;
- :mod:`~bnnconvert.training.distributed`: launch, process group, shards, per-rank seeds,
  DistributedDataParallel.
"""

from .checkpoint import checkpoint_path_for, loader_generators, seed_everything
from .checks import check_fit, first_batch
from .loop import StepInfo, TrainResult, evaluate_model, train
from .settings import TrainSettings

__all__ = [
    "StepInfo",
    "TrainResult",
    "TrainSettings",
    "check_fit",
    "checkpoint_path_for",
    "evaluate_model",
    "first_batch",
    "loader_generators",
    "seed_everything",
    "train",
]
