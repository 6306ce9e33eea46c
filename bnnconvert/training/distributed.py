"""Training on several processes: launch, process group, data shards, per-rank seeds, DDP.

Two ways to train on N processes (one per GPU, or N CPU processes with gloo):

- ``bnnconvert train --nproc N ...`` runs the same command in N processes through
  ``torch.distributed.run`` (torchrun, single node, :func:`launch`);
- an external launcher: ``torchrun --nproc-per-node N -m bnnconvert train ...`` on one or
  more nodes, or SLURM (``srun`` with ``MASTER_ADDR``/``MASTER_PORT`` exported). Each
  process finds its place in the environment (:func:`launch_env`: ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, else ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``) and
  :func:`init_from_env` joins the process group: gloo on the CPU, nccl on CUDA, where
  ``--device cuda`` becomes ``cuda:LOCAL_RANK``.

A Python script launched that way calls :func:`init_from_env` (or
``torch.distributed.init_process_group`` itself) before :func:`bnnconvert.training.train`,
which
then, whenever a process group of two or more processes is initialised:

- wraps the model's ELBO objective in DistributedDataParallel: every step, the gradients
  of mu and rho are averaged over the ranks (each rank's S posterior samples and KL term
  run in one DDP forward). Every parameter that requires a gradient must take part in
  the forward (DDP's ``find_unused_parameters=False``); freeze the others;
- shards a DataLoader with a DistributedSampler (:func:`shard`) whose order comes from the
  shared seed; any other iterable is taken as this rank's shard as it is. Every rank must
  yield the same number of batches;
- seeds each rank with :func:`rank_seed`, so the posterior noise differs between ranks;
- writes checkpoints and the output on rank 0 only, with the unwrapped model's state (a
  checkpoint loads in one process), and keeps every rank's RNG states in the checkpoint
  so that a run resumes on the same number of processes (the checkpoint must be on a
  file system that every rank reads);
- ends with rank 0's BatchNorm statistics on every rank, so all ranks return the model
  that was saved;
- logs and reports the step and epoch metrics averaged over the ranks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from .._utils import check_positive_int, is_main_process

__all__ = [
    "RANK_SEED_STRIDE",
    "backend_for",
    "barrier",
    "broadcast_buffers",
    "gather",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "launch",
    "launch_env",
    "mean_over_ranks",
    "rank_device",
    "rank_seed",
    "set_epoch",
    "shard",
    "world",
    "wrap",
]

log = logging.getLogger(__name__)

RANK_SEED_STRIDE = 1_000_003
"""Rank r draws its noise from seed + r * RANK_SEED_STRIDE (a prime: no two ranks of
nearby seeds share a stream)."""

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


# ----------------------------------------------------------------------- environment
def launch_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from a launcher's environment, or None.

    torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` first, then SLURM's
    ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` (an ``srun`` step of several tasks).
    """
    for names in (_TORCHRUN_VARS, _SLURM_VARS):
        values = [os.environ.get(name) for name in names]
        if all(v is not None for v in values[:2]):
            try:
                rank, size, local = (int(v) if v is not None else 0 for v in values)
            except ValueError:
                raise ValueError(
                    f"{'/'.join(names)} must be integers, got {values}; check the launcher"
                ) from None
            return rank, size, local
    return None


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True when a process group of two or more processes is initialised."""
    return world()[1] > 1


def backend_for(device: str | torch.device | None) -> str:
    """ "nccl" for a CUDA device, else "gloo"."""
    return "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"


def rank_device(device: str | torch.device | None) -> torch.device | None:
    """Where this rank trains: a bare "cuda" becomes ``cuda:LOCAL_RANK`` under a launcher
    (one GPU per process); any other device, or no launcher, is returned as it is."""
    if device is None:
        return None
    device = torch.device(device)
    env = launch_env()
    if device.type == "cuda" and device.index is None and env is not None:
        return torch.device("cuda", env[2])
    return device


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Join the process group described by the launcher's environment.

    Does nothing (returns False) without a launcher, for a world of one process, or when a
    process group is already initialised. Otherwise initialises it (gloo, or nccl for a
    CUDA ``device``, after selecting ``cuda:LOCAL_RANK``) and returns True: the caller then
    owns it and calls ``torch.distributed.destroy_process_group()`` when done.
    """
    env = launch_env()
    if env is None or env[1] < 2 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; install one that has")
    rank, size, local = env
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ValueError(
            f"the launcher set rank {rank} of {size} but not {' and '.join(missing)}; export "
            "MASTER_ADDR (the first node's host name) and MASTER_PORT (a free port) for SLURM, "
            "or launch with torchrun"
        )
    backend = backend_for(device)
    if backend == "nccl":
        _check_gpu(local)
        torch.cuda.set_device(local)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size)
    log.debug("rank %d of %d joined the %s process group", rank, size, backend)
    return True


def _check_gpu(local_rank: int) -> None:
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"local rank {local_rank} needs GPU {local_rank} but this node has {count}; start "
            "at most one process per GPU"
        )


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s RNGs: ``seed + rank * RANK_SEED_STRIDE`` (rank 0 keeps
    ``seed``), so that every rank draws independent posterior noise."""
    return seed + rank * RANK_SEED_STRIDE


# ----------------------------------------------------------------------- data and model
def shard(data: Iterable, seed: int | None = None) -> Iterable:
    """This rank's part of ``data`` under an initialised process group.

    A DataLoader over a map-style dataset is rebuilt with a
    :class:`~torch.utils.data.DistributedSampler` (shuffled if the loader shuffled, with the
    shared ``seed``, default 0; its ``drop_last``), keeping its batch size, workers, collate
    function and generator. A loader that already has a DistributedSampler, any other
    iterable, and every input without a process group are returned unchanged (an
    iterable is then taken to be this rank's shard).
    """
    rank, size = world()
    if size < 2 or not isinstance(data, DataLoader):
        return data
    if isinstance(data.sampler, DistributedSampler):
        return data
    if data.batch_size is None or not hasattr(data.dataset, "__len__"):
        raise ValueError(
            "cannot shard a DataLoader with a custom batch_sampler or an iterable dataset; pass "
            "a DataLoader with a DistributedSampler (or this rank's shard) instead"
        )
    sampler = DistributedSampler(
        data.dataset,
        num_replicas=size,
        rank=rank,
        shuffle=isinstance(data.sampler, RandomSampler),
        seed=0 if seed is None else seed,
        drop_last=data.drop_last,
    )
    return DataLoader(
        data.dataset,
        batch_size=data.batch_size,
        sampler=sampler,
        num_workers=data.num_workers,
        collate_fn=data.collate_fn,
        pin_memory=data.pin_memory,
        drop_last=data.drop_last,
        timeout=data.timeout,
        worker_init_fn=data.worker_init_fn,
        generator=data.generator,
        persistent_workers=data.persistent_workers,
    )


def set_epoch(data: Iterable, epoch: int) -> None:
    """Tell a DataLoader's DistributedSampler the epoch (its order changes every epoch)."""
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def wrap(module: nn.Module, device: torch.device | None = None) -> nn.Module:
    """``module`` in DistributedDataParallel under a process group of two or more
    processes (``device_ids`` for a CUDA device), else ``module`` itself.

    DDP broadcasts rank 0's parameters and buffers when it is built, and every forward
    (``broadcast_buffers``), so all ranks start from, and keep, rank 0's state.
    """
    if not is_distributed():
        return module
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return nn.parallel.DistributedDataParallel(module, device_ids=[index])
    return nn.parallel.DistributedDataParallel(module)


# ----------------------------------------------------------------------- collectives
def mean_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """{name: the mean of the value over all ranks} (the input itself without a group).

    A collective: every rank must call it with the same names in the same order. A NaN on
    any rank makes the mean NaN on all of them.
    """
    if not is_distributed():
        return dict(values)
    device = _collective_device()
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(values, tensor.tolist()))


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a group."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics, ...) to every rank (nothing without a
    group). DDP does so at the start of each forward; after the last step, each rank's
    statistics hold its own last update."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def barrier() -> None:
    """Wait for every rank (nothing without a group)."""
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------- launch
def launch(nproc: int, args: Sequence[str], *, module: str = "bnnconvert") -> None:
    """Run ``python -m <module> <args>`` in ``nproc`` processes on this node through
    torch.distributed.run (``torchrun --standalone --nproc-per-node nproc``).

    The processes find their rank in the environment (:func:`init_from_env`); each uses
    ``OMP_NUM_THREADS`` threads, 1 unless set (torchrun's default). Raises RuntimeError
    naming the first failed rank when a process fails (its own error is printed above by
    that process).
    """
    check_positive_int(nproc=nproc)
    env = launch_env()
    if env is not None and env[1] > 1:
        raise ValueError(
            f"already rank {env[0]} of {env[1]} processes started by a launcher (torchrun or "
            "SLURM); drop nproc=...: the launcher starts the processes"
        )
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    argv = ["--standalone", f"--nproc-per-node={nproc}", "--module", module, *args]
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise RuntimeError(
            f"rank {rank} of {nproc} failed (exit status {failure.exitcode}); its error is "
            "printed above"
        ) from None
