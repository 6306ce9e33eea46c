"""torch.distributed (gloo, CPU): the saliency pass over shards equals one pass over all;
DDP ELBO training (noise per rank, gradients averaged, rank-0 files); `train --nproc`."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner
from torch import nn
from torch.utils.data import DistributedSampler, Subset

from bnnconvert.cli import main
from bnnconvert.convert import convert
from bnnconvert.data import demo_classification, make_loader
from bnnconvert.elbo import elbo_loss
from bnnconvert.layers import bayesian_layers
from bnnconvert.models import resnet18
from bnnconvert.predict import eval_mode, mean_weights
from bnnconvert.saliency import Saliency, compute_saliency
from bnnconvert.serialization import build_model, load, parse_arch_kwargs, save
from bnnconvert.training import distributed, seed_everything, train
from bnnconvert.training.distributed import rank_seed

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
@pytest.mark.integration
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


# ----------------------------------------------------------------------- DDP ELBO training
def tiny_cnn(num_classes: int = 10) -> nn.Module:
    """A small CNN for the 28 px bundled digits (the --arch factory of the CLI test)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


DIGITS = "tests.test_distributed:digits_loader"


def digits_loader(split="train", batch_size=16, shuffle=False, seed=0):
    """64 real bundled digits as a seeded DataLoader (the --data factory of the CLI test)."""
    subset = Subset(demo_classification(split), range(64))
    return make_loader(subset, batch_size, shuffle=shuffle, seed=seed, drop_last=shuffle)


def _converted() -> nn.Module:
    torch.manual_seed(3)  # the model remembers its --arch factory: saved files load alone
    return convert(build_model("tests.test_distributed:tiny_cnn"), "magnitude", 0.2)


def _first_layer_outputs(model: nn.Module) -> tuple[list, object]:
    """Record the outputs of the first Bayesian layer (its posterior samples at work)."""
    seen: list[torch.Tensor] = []
    layer = next(layer for _, layer in bayesian_layers(model))
    handle = layer.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    return seen, handle


def _join(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _one_step(model, batch, **kw):
    """One SGD step (lr 1, no decay) of train() on ``[batch]``: p_after = p - grad."""
    settings = {"samples": 2, "beta": 0.1, "lr": 1.0, "weight_decay": 0.0, "seed": 7}
    return train(model, [batch], 1, progress=False, **settings, **kw)


def _run(folder, name, on_step=None, resume=False):
    model = _converted()
    files = {"checkpoint": folder / f"{name}.ckpt", "output": folder / f"{name}.pt"}
    result = train(
        model,
        digits_loader(shuffle=True),
        2,
        samples=2,
        seed=3,
        progress=False,
        checkpoint_every=1,
        resume=resume,
        on_step=on_step,
        **files,
    )
    return model, result


def _stop_at(step):
    def hook(info):
        if info.global_step == step:
            raise KeyboardInterrupt

    return hook


def _ddp_worker(rank, world, ports, folder):
    _join(rank, world, ports[0])
    folder = Path(folder)
    try:
        # the same batch on every rank: only the posterior noise differs between them
        model = _converted()
        seen, handle = _first_layer_outputs(model)
        _one_step(model, next(iter(digits_loader(batch_size=8))))
        handle.remove()
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        noise = seen[1]  # seen[0]: train()'s fit check, at mu
        torch.save({"noise": noise, "params": params}, folder / f"step{rank}.pt")

        # real data sharded by a DistributedSampler, rank 0 writes, then an interrupted
        # run resumed from its rank-0 checkpoint
        model, result = _run(folder, "full")
        x = next(iter(digits_loader("test", batch_size=32)))[0]
        with eval_mode(model), torch.no_grad(), mean_weights(model):
            at_mu = model(x)
        torch.save(
            {"at_mu": at_mu, "state": model.state_dict(), "history": result.history},
            folder / f"full{rank}.pt",
        )
        with pytest.raises(KeyboardInterrupt):
            _run(folder, "cut", on_step=_stop_at(3))
        _run(folder, "cut", resume=True)
    finally:
        dist.destroy_process_group()

    # the CLI as an external launcher (torchrun, SLURM) starts it: it joins the group itself
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_PORT=str(ports[1])
    )
    save(_converted(), folder / f"bayes{rank}.pt")
    args = f"train {folder}/bayes{rank}.pt --data {DIGITS} --epochs 2 --samples 2 "
    args += f"--batch-size 16 --seed 3 -o {folder}/cli.pt"  # = _run(folder, "full")
    result = CliRunner().invoke(main, args.split())
    (folder / f"cli{rank}.txt").write_text(f"{result.exit_code}\n{result.output}")
    assert not dist.is_initialized()  # the command left the process group it joined


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(2, (_free_port(), _free_port()), str(folder)), nprocs=2)
    return folder


@pytest.mark.integration
def test_ddp_gradients_are_the_mean_over_ranks_with_per_rank_noise(ddp_run):
    x, y = next(iter(digits_loader(batch_size=8)))
    ranks = [torch.load(ddp_run / f"step{r}.pt") for r in range(2)]
    assert not torch.allclose(ranks[0]["noise"], ranks[1]["noise"])  # independent noise
    grads, noises = [], []
    for r in range(2):  # rank r alone: the seed train() gives it, the same batch
        model = _converted().train()
        seen, handle = _first_layer_outputs(model)
        seed_everything(rank_seed(7, r))
        elbo_loss(model, x, y, beta=0.1, samples=2).loss.backward()
        handle.remove()
        noises.append(seen[0])
        grads.append({n: p.grad for n, p in model.named_parameters()})
    start = dict(_converted().named_parameters())
    for r in range(2):
        torch.testing.assert_close(ranks[r]["noise"], noises[r], rtol=0, atol=1e-6)
        for name, p in ranks[r]["params"].items():
            mean = (grads[0][name] + grads[1][name]) / 2
            torch.testing.assert_close(p, start[name].detach() - mean, rtol=1e-5, atol=1e-6)
    assert any(n.endswith("_rho") for n in ranks[0]["params"])  # rho was trained too


@pytest.mark.integration
def test_ddp_rank0_output_loads_in_one_process_with_identical_outputs(ddp_run):
    ranks = [torch.load(ddp_run / f"full{r}.pt") for r in range(2)]
    loaded = load(ddp_run / "full.pt")
    x = next(iter(digits_loader("test", batch_size=32)))[0]
    with eval_mode(loaded), torch.no_grad(), mean_weights(loaded):
        at_mu = loaded(x)
    assert torch.equal(at_mu, ranks[0]["at_mu"]) and torch.equal(at_mu, ranks[1]["at_mu"])
    for key, value in loaded.state_dict().items():  # every rank ends with rank 0's model
        assert torch.equal(value, ranks[1]["state"][key]), key
    start = _converted().state_dict()
    assert not torch.equal(start["8.weight"], loaded.state_dict()["8.weight"])
    history = ranks[0]["history"]
    assert [h["steps"] for h in history] == [2, 2]  # 64 digits, 2 ranks, batches of 16
    assert history == ranks[1]["history"]  # means over the ranks
    assert not (ddp_run / "full.ckpt").exists()


@pytest.mark.integration
def test_ddp_run_resumed_from_the_rank0_checkpoint_equals_the_uninterrupted_run(ddp_run):
    full, cut = load(ddp_run / "full.pt").state_dict(), load(ddp_run / "cut.pt").state_dict()
    assert full.keys() == cut.keys()
    for key in full:
        assert torch.equal(full[key], cut[key]), key
    assert sorted(p.name for p in ddp_run.iterdir() if p.name.startswith(("full", "cut"))) == [
        "cut.pt",
        "full.pt",
        "full0.pt",
        "full1.pt",
    ]


@pytest.mark.integration
def test_cli_under_a_launcher_joins_the_group_and_equals_train(ddp_run):
    codes, outputs = zip(*((ddp_run / f"cli{r}.txt").read_text().split("\n", 1) for r in range(2)))
    assert codes == ("0", "0")
    assert outputs[0].splitlines()[-1].startswith("wrote ") and outputs[1] == ""  # rank 0
    cli, full = load(ddp_run / "cli.pt").state_dict(), load(ddp_run / "full.pt").state_dict()
    for key in full:  # `bnnconvert train --seed 3` == train(seed=3) on two processes
        assert torch.equal(full[key], cli[key]), key
    assert not (ddp_run / "cli.pt.ckpt").exists()


def test_shard_gives_each_rank_its_part_of_the_epoch_order(monkeypatch):
    loader = digits_loader(shuffle=True, batch_size=8)
    parts = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "world", lambda r=rank: (r, 2))
        part = distributed.shard(loader, seed=5)
        assert isinstance(part.sampler, DistributedSampler) and part.drop_last
        distributed.set_epoch(part, 1)
        parts.append(list(part.sampler))
    reference = DistributedSampler(loader.dataset, num_replicas=2, rank=0, shuffle=True, seed=5)
    reference.set_epoch(1)
    assert parts[0] == list(reference)
    assert sorted(parts[0] + parts[1]) == list(range(64))  # disjoint, covering the data
    monkeypatch.setattr(distributed, "world", lambda: (0, 1))
    assert distributed.shard(loader, seed=5) is loader  # one process: unchanged


def test_launch_env_and_rank_device(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launch_env() is None and not distributed.init_from_env()
    assert distributed.rank_device("cuda") == torch.device("cuda")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert distributed.launch_env() == (3, 4, 1)
    assert distributed.rank_device("cuda") == torch.device("cuda", 1)
    assert distributed.rank_device("cuda:0") == torch.device("cuda", 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.launch_env() == (1, 2, 0)  # torchrun's variables first
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        distributed.init_from_env()
    with pytest.raises(ValueError, match="drop nproc"):
        distributed.launch(2, ["train"])
    assert distributed.rank_seed(7, 0) == 7 and distributed.rank_seed(7, 1) != 7


# ----------------------------------------------------------------------- the CLI
REPO = Path(__file__).resolve().parents[1]


def _bnnconvert(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "bnnconvert", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def test_cli_nproc_forwards_the_command_line(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(distributed, "launch", lambda n, args: seen.update(n=n, args=args))
    out = str(tmp_path / "o.pt")
    args = "-v --no-progress train m.pt --data d.npz --epochs 2 --nproc 3 --lr 0.1 "
    args += "--no-class-weights --arch a.b:c --arch-kwargs num_classes=3,name='x' --amp bf16"
    result = CliRunner().invoke(main, [*args.split(), "-o", out])
    assert result.exit_code == 0, result.output
    assert seen["n"] == 3
    forwarded = "-v --no-progress train --data d.npz --epochs 2 --lr 0.1 --no-class-weights "
    forwarded += "--amp bf16 --arch a.b:c --arch-kwargs"  # non-defaults, without --nproc
    literal = "{'num_classes': 3, 'name': 'x'}"
    assert seen["args"] == [*forwarded.split(), literal, "-o", out, "--", "m.pt"]
    literal = seen["args"][seen["args"].index("--arch-kwargs") + 1]
    assert parse_arch_kwargs(literal) == {"num_classes": 3, "name": "x"}


@pytest.mark.slow  # ~70 s here: torchrun and three processes importing torch, twice
@pytest.mark.integration
def test_cli_train_nproc_2_end_to_end(tmp_path):
    model = _converted()
    save(model, tmp_path / "bayes.pt")
    out = tmp_path / "trained.pt"
    common = ["train", tmp_path / "bayes.pt", "--epochs", "1", "--nproc", "2"]
    run = _bnnconvert(*common, "--data", DIGITS, "--samples", "2", "--batch-size", "16", "-o", out)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("wrote") == 1  # rank 0 reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bayes.pt", "trained.pt"]
    trained = load(out)
    rho = "8.weight_rho"
    assert not torch.equal(trained.state_dict()[rho], model.state_dict()[rho])

    bad = _bnnconvert(*common, "--data", tmp_path / "none.npz", "-o", tmp_path / "bad.pt")
    assert bad.returncode == 1
    assert re.search("rank [01] of 2 failed", bad.stderr.strip().splitlines()[-1])
    assert not (tmp_path / "bad.pt").exists()


# ----------------------------------------------------------------------- CUDA, NCCL
def _nccl_worker(rank, world, port, folder):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    assert distributed.init_from_env("cuda")  # nccl, on GPU `rank`
    try:
        assert dist.get_backend() == "nccl" and torch.cuda.current_device() == rank
        model = _converted()
        train(
            model,
            digits_loader(shuffle=True),
            1,
            samples=2,
            seed=3,
            device="cuda",
            amp="bf16",
            progress=False,
            output=Path(folder) / "nccl.pt",
        )
        assert next(model.parameters()).device == torch.device("cuda", rank)
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        torch.save(state, Path(folder) / f"nccl{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_nccl_ddp_training_on_two_gpus(tmp_path):
    mp.spawn(_nccl_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    loaded = load(tmp_path / "nccl.pt").state_dict()
    start = _converted().state_dict()
    for rank in range(2):
        state = torch.load(tmp_path / f"nccl{rank}.pt")
        for key, value in loaded.items():
            assert torch.equal(value, state[key]), key
    assert not torch.equal(loaded["8.weight_rho"], start["8.weight_rho"])


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cli_train_nproc_2_on_two_gpus(tmp_path):
    save(_converted(), tmp_path / "bayes.pt")
    out = tmp_path / "trained.pt"
    args = f"--data {DIGITS} --epochs 1 --samples 2 --batch-size 16 --nproc 2 --device cuda"
    run = _bnnconvert("train", tmp_path / "bayes.pt", *args.split(), "--amp", "fp16", "-o", out)
    assert run.returncode == 0, run.stderr
    assert load(out).state_dict().keys() == _converted().state_dict().keys()
