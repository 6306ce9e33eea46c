"""torch.distributed (gloo, CPU): the saliency pass over shards equals one pass over all."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bnnconvert.models import resnet18
from bnnconvert.saliency import Saliency, compute_saliency

from .conftest import classification_batches

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(1)
    return resnet18(num_classes=10, in_channels=1).eval()


def _saliency_worker(rank, world, port, criterion, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = classification_batches(4, size=28)[rank::world]
        sal = compute_saliency(_model(), shard, criterion=criterion)
        sal.save(out)  # only rank 0 writes
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("criterion", ["grad2", "fisher"])
def test_sharded_saliency_equals_single_process(tmp_path, criterion):
    out = tmp_path / "sal.pt"
    mp.spawn(_saliency_worker, args=(2, _free_port(), criterion, str(out)), nprocs=2)
    sharded = Saliency.load(out)
    single = compute_saliency(_model(), classification_batches(4, size=28), criterion=criterion)
    assert sharded.meta == single.meta
    for name, score in single.scores.items():
        # the thread count changes the float summation order; grad2 squares sums with
        # cancellations, so compare against the tensor's scale
        scale = float(score.abs().max())
        torch.testing.assert_close(sharded.scores[name], score, rtol=2e-3, atol=1e-4 * scale)
    for r in (0.01, 0.2):
        a, b = sharded.select(r), single.select(r)
        agree = sum(int((a[n] == b[n]).sum()) for n in a) / sharded.num_entries
        assert agree > 0.9999  # float summation order may flip an entry at the threshold
    assert [p.name for p in tmp_path.iterdir()] == ["sal.pt"]
