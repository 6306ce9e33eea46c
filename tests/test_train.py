"""train(): the optimiser's parameter groups."""

from __future__ import annotations

import copy

from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn
from torch import nn

from bnnconvert import convert
from bnnconvert.training.loop import _optimizer


def _groups(model: nn.Module) -> tuple[set[int], set[int]]:
    opt = _optimizer(model, lr=0.1, momentum=0.0, weight_decay=1e-4)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    free = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    return decay, free


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
