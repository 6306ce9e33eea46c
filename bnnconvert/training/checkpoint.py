"""The resumable state of a training run: what a checkpoint holds, its file, the RNG states.

With ``train(checkpoint=PATH)`` the full run state (:class:`RunState`) is written
atomically to PATH at the end of every epoch and every ``checkpoint_every`` optimiser
steps: model, optimiser, learning-rate scheduler, gradient scaler, position (epoch, step
within the epoch), the running sums of the epoch, the history, and the RNG states of
torch (CPU and CUDA), numpy, Python and the DataLoader's generators, both as they were
when the epoch began and as they are now. A resumed run restores the epoch-start states,
re-creates the epoch's batch order, skips the batches already trained on, restores the
current RNG states and continues: on the same machine and thread count it reproduces the
uninterrupted run exactly.

The file is one dict readable with ``torch.load(weights_only=True)``::

    {"format": "bnnconvert.train-checkpoint", "version": 1, "fingerprint": {...},
     "epoch", "step", "global_step", "sums", "history", "model", "optimizer",
     "scheduler", "scaler", "epoch_rng", "rng"}

Under torch.distributed rank 0 writes it, with every rank's RNG states (one entry per
rank), so that a run resumes on the same number of processes.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._utils import atomic_torch_save, first_line, load_payload
from . import distributed

__all__ = [
    "CHECKPOINT_FORMAT",
    "RunState",
    "checkpoint_exists",
    "checkpoint_path_for",
    "loader_generators",
    "restore_checkpoint",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "write_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "bnnconvert.train-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class RunState:
    """The state of one training run: everything a checkpoint must hold."""

    model: nn.Module  # the user's model, unwrapped: what checkpoints and output hold
    objective: nn.Module  # the loss as a module, in DDP under torch.distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler  # enabled for amp="fp16" only
    fingerprint: dict[str, Any]  # the settings a resumed run must share
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    epoch_rng: dict[str, Any] | None = None  # RNG states when the current epoch began
    rng: dict[str, Any] | None = None  # RNG states at the checkpoint (resume only)


def checkpoint_path_for(output: str | os.PathLike) -> Path:
    """Where the resumable checkpoint of a run writing ``output`` is kept (the CLI's
    convention): ``<output>.ckpt`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".ckpt")


# ----------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's global and torch's RNGs (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global RNG user code draws from)
    torch.manual_seed(seed)


def loader_generators(data: Iterable) -> list[torch.Generator]:
    """The torch.Generators that decide a DataLoader's order and worker seeds."""
    sampler = getattr(data, "sampler", None)
    batch_sampler = getattr(data, "batch_sampler", None)
    found = [
        getattr(data, "generator", None),
        getattr(sampler, "generator", None),
        getattr(getattr(batch_sampler, "sampler", None), "generator", None),
    ]
    out: list[torch.Generator] = []
    for g in found:
        if isinstance(g, torch.Generator) and all(g is not h for h in out):
            out.append(g)
    return out


def rng_state(data: Iterable) -> dict[str, Any]:
    """Every RNG state that training draws from, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (global RNG)
    version, internal, gauss_next = random.getstate()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
        "generators": [g.get_state() for g in loader_generators(data)],
    }


def set_rng_state(state: Mapping[str, Any], data: Iterable, generators: bool = True) -> None:
    """Restore :func:`rng_state`; ``generators=False`` leaves the data's generators be.

    Raises ValueError when ``data`` has other generators than the state was taken from.
    """
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if not generators:
        return
    gens = loader_generators(data)
    if len(gens) != len(state["generators"]):
        raise ValueError(
            f"the data has {len(gens)} random generators, the checkpoint's data had "
            f"{len(state['generators'])}; resume with the same kind of loader, or pass "
            "resume=False"
        )
    for g, s in zip(gens, state["generators"]):
        g.set_state(s)


def epoch_batches(run: RunState, data: Iterable) -> Iterator:
    """The epoch's batches from ``run.step`` on.

    On resume: the epoch-start RNG states re-create the epoch's order (the data's
    generators are drawn from only by the iterator, a DistributedSampler's order follows
    its seed and the epoch), the batches already trained on are skipped, then the other
    RNGs are set to their states at the checkpoint."""
    distributed.set_epoch(data, run.epoch)
    if run.rng is None:
        run.epoch_rng = rng_state(data)
        return iter(data)
    set_rng_state(run.epoch_rng, data)
    it = iter(data)
    for _ in range(run.step):
        next(it)
    set_rng_state(run.rng, data, generators=False)
    run.rng = None
    return it


# ----------------------------------------------------------------------- the file
def checkpoint_exists(path: Path) -> bool:
    """Whether ``path`` exists; under torch.distributed, the same answer on every rank
    (ValueError when only some ranks see it)."""
    seen = distributed.gather(path.exists())
    if len(set(seen)) > 1:
        raise ValueError(
            f"the checkpoint {path} exists for ranks {[r for r, s in enumerate(seen) if s]} "
            "only; put it on a file system that every rank reads, or delete it "
            "(resume=False)"
        )
    return seen[0]


def write_checkpoint(run: RunState, path: Path, data: Iterable) -> None:
    """Write the run state (rank 0; every rank takes part: the RNG states are gathered,
    one entry per rank under torch.distributed)."""
    start = time.perf_counter()
    rng, epoch_rng = rng_state(data), run.epoch_rng if run.step else None
    if distributed.is_distributed():
        per_rank = distributed.gather((rng, epoch_rng))
        rng, epoch_rng = [r for r, _ in per_rank], [e for _, e in per_rank]
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "fingerprint": run.fingerprint,
        "epoch": run.epoch,
        "step": run.step,
        "global_step": run.global_step,
        "sums": dict(run.sums),
        "history": list(run.history),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": None if run.scheduler is None else run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch_rng": epoch_rng,
        "rng": rng,
    }
    atomic_torch_save(payload, path)
    log.debug("checkpoint %s written in %.2fs", path, time.perf_counter() - start)


def restore_checkpoint(run: RunState, path: Path) -> None:
    """Load the checkpoint at ``path`` into ``run`` (ValueError when it is not a training
    checkpoint, belongs to a run with other settings or does not fit the model)."""
    wrong = (
        f"{path} is not a readable bnnconvert training checkpoint; delete it or pass resume=False"
    )
    payload = load_payload(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, wrong)
    _check_fingerprint(run.fingerprint, payload["fingerprint"], path)
    try:
        run.model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise ValueError(
            f"the checkpoint {path} does not fit this model ({first_line(exc)}); pass resume=False"
        ) from None
    run.optimizer.load_state_dict(payload["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(payload["scheduler"])
    if payload.get("scaler"):
        run.scaler.load_state_dict(payload["scaler"])
    run.epoch, run.step, run.global_step = payload["epoch"], payload["step"], payload["global_step"]
    run.sums, run.history = dict(payload["sums"]), list(payload["history"])
    rng, epoch_rng = payload["rng"], payload["epoch_rng"]
    if run.fingerprint["world_size"] > 1:  # one entry per rank
        rank = distributed.world()[0]
        rng, epoch_rng = rng[rank], epoch_rng[rank]
    run.rng = rng
    run.epoch_rng = epoch_rng if run.step else rng


def _check_fingerprint(now: Mapping[str, Any], saved: Mapping[str, Any], path: Path) -> None:
    for key, value in now.items():
        old = saved.get(key, 1 if key == "world_size" else None)
        if old != value:
            raise ValueError(
                f"the checkpoint {path} belongs to a run with other settings ({key}: {old!r} "
                f"there, {value!r} now); rerun with its settings to resume, or pass "
                "resume=False to discard it"
            )
