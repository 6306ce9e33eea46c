"""bnnconvert.training: the optimiser's parameter groups, TrainSettings, the checks of
train() and of resuming (the resumed run itself is tested in test_cli.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bnnconvert import convert
from bnnconvert.data import make_loader
from bnnconvert.training import TrainSettings, distributed, train
from bnnconvert.training.checkpoint import checkpoint_exists
from bnnconvert.training.loop import _optimizer


def _groups(model: nn.Module) -> tuple[set[int], set[int]]:
    opt = _optimizer(model, TrainSettings(lr=0.1, momentum=0.0, weight_decay=1e-4))
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    free = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    return decay, free


def test_adam_and_the_learning_rate_of_rho():
    net = convert(nn.Sequential(nn.Linear(4, 3)), "magnitude", 0.5)
    opt = _optimizer(net, TrainSettings(lr=1e-4, optimizer="adam", rho_lr=0.05))
    assert isinstance(opt, torch.optim.Adam)
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    rho = {id(p) for n, p in net.named_parameters() if n.endswith("_rho")}
    assert by_lr[0.05] == rho and by_lr[1e-4].isdisjoint(rho)
    for p in net.parameters():  # frozen means: only the rho group remains
        p.requires_grad_(False)
    net[0].weight_rho.requires_grad_(True)
    opt = _optimizer(net, TrainSettings(optimizer="adam", rho_lr=0.05))
    assert [g["lr"] for g in opt.param_groups] == [0.05]
    net[0].weight_rho.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        _optimizer(net, TrainSettings())
    with pytest.raises(ValueError, match="optimizer"):
        TrainSettings(optimizer="lbfgs")
    with pytest.raises(ValueError, match="rho_lr"):
        TrainSettings(rho_lr=0.0)


def test_eval_mode_training_keeps_batchnorm_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), 8)
    stats = net[1].running_mean.clone()
    train(net, data, 1, train_mode=False, progress=False)
    assert torch.equal(net[1].running_mean, stats)
    train(net, data, 1, progress=False)
    assert not torch.equal(net[1].running_mean, stats)


def test_rho_gets_no_weight_decay_ours_and_bayesian_torch():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    ours = convert(net, "magnitude", 0.5)
    decay, free = _groups(ours)
    names = dict(ours.named_parameters())
    assert free == {id(p) for n, p in names.items() if n.endswith("_rho")} and free
    assert decay == {id(p) for n, p in names.items() if not n.endswith("_rho")}

    theirs = copy.deepcopy(net)
    dnn_to_bnn(theirs, {"prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0,
                        "posterior_rho_init": -3.0, "type": "Reparameterization",
                        "moped_enable": False})  # fmt: skip
    decay, free = _groups(theirs)
    rho = {id(p) for n, p in theirs.named_parameters() if n.rsplit(".", 1)[-1].startswith("rho")}
    assert len(rho) == 4 and free == rho
    assert decay == {id(p) for p in theirs.parameters()} - rho


# ----------------------------------------------------------------------- settings
def _loader(n=16, batch=4, seed=0, generator=True):
    """A shuffled loader of n random 1x8x8 images, 3 classes."""
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(
        torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    )
    if generator:
        return make_loader(data, batch, shuffle=True, seed=seed)
    return DataLoader(data, batch_size=batch, shuffle=True)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))


def test_train_settings_check_their_values():
    assert TrainSettings(amp="none").amp is None
    assert TrainSettings().replace(lr=0.1).lr == 0.1
    for bad, message in [
        ({"lr_schedule": "step"}, "lr_schedule must be one of"),
        ({"kl_reduction": "max"}, "kl_reduction must be"),
        ({"samples": 0}, "samples must be a positive integer"),
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"momentum": -0.1}, "momentum and weight_decay must be >= 0"),
        ({"amp": "fp8"}, "amp must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainSettings(**bad)
    with pytest.raises(TypeError, match="samples must be a positive integer"):
        TrainSettings(samples=2.5)
    with pytest.raises(TypeError, match="lr must be a number"):
        TrainSettings(lr="fast")
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        TrainSettings().replace(learning_rate=0.1)


def test_train_takes_settings_or_single_keywords_and_checks_its_own():
    by_settings = train(_net(), _loader(), 1, TrainSettings(lr=0.05), progress=False, seed=1)
    by_keyword = train(_net(), _loader(), 1, lr=0.05, progress=False, seed=1)
    assert by_settings.history == by_keyword.history
    assert by_keyword.history[0]["lr"] == 0.05
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        train(_net(), _loader(), 1, learning_rate=0.05)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        train(_net(), _loader(), 1, lr_schedule="step")
    for bad in (0, -2):
        with pytest.raises(ValueError, match="checkpoint_every must be a positive integer"):
            train(_net(), _loader(), 1, checkpoint_every=bad)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        train(_net(), _loader(), 0)


def _stop_after(steps):
    def hook(info):
        if info.global_step == steps:
            raise KeyboardInterrupt

    return hook


def test_resume_refuses_other_data_generators_and_a_newer_checkpoint(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    model = convert(_net(), "magnitude", 0.5)
    with pytest.raises(KeyboardInterrupt):
        train(model, _loader(), 2, checkpoint=ckpt, checkpoint_every=1, seed=0,
              progress=False, on_step=_stop_after(2))  # fmt: skip
    assert ckpt.exists()
    # the same run, but a loader without its own generator: its order cannot be re-created
    with pytest.raises(ValueError, match=r"random generators.*resume=False"):
        train(convert(_net(), "magnitude", 0.5), _loader(generator=False), 2, checkpoint=ckpt,
              checkpoint_every=1, seed=0, resume=True, progress=False)  # fmt: skip
    payload = torch.load(ckpt, weights_only=True)
    torch.save({**payload, "version": 99}, ckpt)
    with pytest.raises(ValueError, match="written by a newer bnnconvert"):
        train(convert(_net(), "magnitude", 0.5), _loader(), 2, checkpoint=ckpt,
              checkpoint_every=1, seed=0, resume=True, progress=False)  # fmt: skip
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable bnnconvert training checkpoint"):
        train(convert(_net(), "magnitude", 0.5), _loader(), 2, checkpoint=ckpt, resume=True,
              progress=False)  # fmt: skip


def test_a_checkpoint_seen_by_only_some_ranks_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "gather", lambda obj: [obj, not obj])  # two ranks
    with pytest.raises(ValueError, match=r"exists for ranks \[1\] only"):
        checkpoint_exists(tmp_path / "missing.ckpt")
    (tmp_path / "here.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"exists for ranks \[0\] only.*resume=False"):
        checkpoint_exists(tmp_path / "here.ckpt")
