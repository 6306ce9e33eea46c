"""Hoisting the deterministic prefix out of the Monte Carlo loop (bnnconvert.sampling).

Every test compares ``mc_outputs(..., hoist=None)`` (hoisted where possible) with the plain
loop ``hoist=False`` under the same seed: the samples must be identical, in order.
"""

from __future__ import annotations

import copy
import gc
import logging
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnnconvert
from bnnconvert.layers import bayesian_layers, convertible_parameters
from bnnconvert.sampling import hoist_plan, mc_outputs, mc_samples


def _masks(model: nn.Module, prefixes: tuple[str, ...], fraction: float, seed: int = 0):
    """Random masks selecting ``fraction`` of the entries of the parameters under
    ``prefixes`` (every convertible parameter for prefixes=("",))."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(p.shape, generator=g) < fraction
        for n, p in convertible_parameters(model).items()
        if n.startswith(prefixes)
    }


def _both(model: nn.Module, x: torch.Tensor, samples: int = 4, seed: int = 7):
    """(plain, hoisted) Monte Carlo outputs under the same seed."""
    torch.manual_seed(seed)
    plain = mc_outputs(model, x, samples, hoist=False)
    torch.manual_seed(seed)
    hoisted = mc_outputs(model, x, samples)
    return plain, hoisted


def _assert_identical_samples(plain: torch.Tensor, hoisted: torch.Tensor) -> None:
    assert torch.equal(plain, hoisted)
    assert not torch.equal(plain[0], plain[1])  # the samples differ, so their order matters


def _prefix_modules(model: nn.Module) -> set[str]:
    plan = hoist_plan(model)
    assert plan is not None
    return {n.target for n in plan.prefix.graph.nodes if n.op == "call_module"}


# ------------------------------------------------------------------------ identical samples
def test_resnet_last_stage_is_hoisted_with_identical_samples(resnet):
    model = bnnconvert.convert(resnet, _masks(resnet, ("layer4.", "fc."), 0.05), None)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        plain, hoisted = _both(model, x)
    _assert_identical_samples(plain, hoisted)
    prefix = _prefix_modules(model)
    assert "layer3.1.conv2" in prefix and "conv1" in prefix
    assert not any(t.startswith(("layer4", "fc")) for t in prefix)


def test_unet_skip_connections_cross_the_boundary(unet):
    model = bnnconvert.convert(unet, _masks(unet, ("decoder.", "head."), 0.05), None)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        plain, hoisted = _both(model, x)
    _assert_identical_samples(plain, hoisted)
    prefix = _prefix_modules(model)
    assert {"encoder.0.0", "encoder.2.0", "up.0"} <= prefix  # the skips are hoisted
    assert not any(t.startswith("decoder") for t in prefix)


def test_unet_random_selection_beyond_the_first_block(unet, caplog):
    """Random entries in every block but the first: the first block is hoisted and the
    samples equal the plain loop's. A global random selection also hits the first
    convolution, which reads the input: nothing can be hoisted, and the plan says so."""
    later = tuple(n.split(".")[0] + "." for n, _ in unet.named_children() if n != "encoder")
    model = bnnconvert.convert(unet, _masks(unet, ("encoder.1.", "encoder.2.", *later), 0.05), None)
    with torch.no_grad():
        plain, hoisted = _both(model, torch.randn(2, 1, 16, 16))
    _assert_identical_samples(plain, hoisted)
    assert "encoder.0.0" in _prefix_modules(model)

    everywhere = bnnconvert.convert(unet, "random", 0.05)
    assert everywhere.encoder[0][0].bayes_rho("weight").numel() > 0
    with caplog.at_level(logging.DEBUG, logger="bnnconvert.sampling"):
        assert hoist_plan(everywhere) is None
    assert any("nothing to hoist" in r.getMessage() for r in caplog.records)


def test_samples_one_and_validation(resnet):
    model = bnnconvert.convert(resnet, _masks(resnet, ("fc.",), 0.5), None)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        plain = model(x)
        torch.manual_seed(1)
        assert torch.equal(mc_outputs(model, x, 1)[0], plain)
    assert "layer4.1.conv2" in _prefix_modules(model)  # one sample went through a plan
    with pytest.raises(ValueError, match="samples"):
        mc_outputs(model, x, 0)
    with pytest.raises(TypeError, match="samples must be a positive integer"):
        mc_outputs(model, x, 2.0)


# ------------------------------------------------------------------------ stochastic ops
class DropoutNet(nn.Module):
    """conv -> dropout (module or functional) -> conv -> Bayesian head."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.functional = functional
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = F.dropout(x, 0.5, self.training) if self.functional else self.drop(x)
        return self.head(torch.relu(self.conv2(x)).flatten(1))


@pytest.mark.parametrize("functional", [False, True])
def test_dropout_in_train_mode_is_not_hoisted(functional):
    model = bnnconvert.convert(
        DropoutNet(functional), {"head.weight": torch.ones(3, 256) > 0}, None
    )
    model.train()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        plain, hoisted = _both(model, x)
    _assert_identical_samples(plain, hoisted)
    plan = hoist_plan(model)
    prefix_ops = {str(n.target) for n in plan.prefix.graph.nodes}
    assert "conv1" in prefix_ops
    assert not {"drop", "conv2"} & prefix_ops and "dropout" not in plan.prefix.code


@pytest.mark.parametrize("functional", [False, True])
def test_dropout_in_eval_mode_is_hoisted(functional):
    model = bnnconvert.convert(
        DropoutNet(functional), {"head.weight": torch.ones(3, 256) > 0}, None
    )
    model.eval()
    with torch.no_grad():
        plain, hoisted = _both(model, torch.randn(2, 1, 8, 8))
    _assert_identical_samples(plain, hoisted)
    assert "conv2" in _prefix_modules(model)


def test_deterministic_model_and_mean_weights(resnet):
    model = bnnconvert.convert(resnet, _masks(resnet, ("fc.",), 0.5), None)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad(), bnnconvert.mean_weights(model):
        plain, hoisted = _both(model, x, samples=3)
        assert torch.equal(plain, hoisted) and torch.equal(hoisted[0], hoisted[2])
        at_mu = hoist_plan(model)
        assert at_mu is not None and "fc" in _prefix_modules(model)  # nothing samples
    with torch.no_grad():  # sampling again after mean_weights: the plan follows the flag
        plain, hoisted = _both(model, x)
    _assert_identical_samples(plain, hoisted)
    sampling = hoist_plan(model)
    assert sampling is not None and sampling is not at_mu
    assert "fc" not in _prefix_modules(model) and "layer4.1.conv2" in _prefix_modules(model)


# ------------------------------------------------------------------------ fallbacks
class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        h = self.conv(x)
        if h.mean() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = -h
        return self.fc(h.flatten(1))


class EagerNoise(nn.Module):
    """Draws a tensor that tracing would freeze into a constant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1)) + torch.randn(3)


class MutatesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x.mul_(2.0)
        return self.fc(x)


@pytest.mark.parametrize(
    ("cls", "reason"),
    [
        (DataDependent, "cannot trace"),
        (EagerNoise, "drew random numbers"),
        (MutatesInput, "mutates its input"),
    ],
)
def test_untraceable_models_fall_back_with_same_results(cls, reason, caplog):
    model = bnnconvert.convert(cls(), {"fc.weight": torch.ones_like(cls().fc.weight) > 0}, None)
    x = torch.randn(2, 1, 8, 8) if cls is not MutatesInput else torch.randn(2, 4)
    with caplog.at_level(logging.DEBUG, logger="bnnconvert.sampling"), torch.no_grad():
        if cls is MutatesInput:
            torch.manual_seed(7)
            plain = mc_outputs(model, x.clone(), 3, hoist=False)
            torch.manual_seed(7)
            hoisted = mc_outputs(model, x.clone(), 3)
        else:
            plain, hoisted = _both(model, x, samples=3)
        mc_outputs(model, x.clone(), 2)  # a second call: no second log line
    assert torch.equal(plain, hoisted)
    assert hoist_plan(model) is None
    logged = [r for r in caplog.records if reason in r.getMessage()]
    assert len(logged) == 1


def test_wrappers_run_the_plain_loop(resnet, caplog):
    """DataParallel/DDP/torch.compile do work in their own forward that a traced graph of
    the wrapped model would skip: never hoisted through."""
    model = bnnconvert.convert(resnet, _masks(resnet, ("fc.",), 0.5), None)
    x = torch.randn(2, 1, 32, 32)
    with caplog.at_level(logging.DEBUG, logger="bnnconvert.sampling"):
        assert hoist_plan(nn.DataParallel(model)) is None
        assert hoist_plan(torch.compile(model)) is None  # compiles lazily: nothing runs
    assert sum("wraps the model" in r.getMessage() for r in caplog.records) == 2
    with torch.no_grad():
        plain, wrapped = _both(model, x), _both(nn.DataParallel(model), x)
    assert torch.equal(plain[1], wrapped[1])


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.stem(x)
        return self.head(h), h


def test_mc_samples_yields_any_output_in_plain_loop_order():
    model = bnnconvert.convert(TupleOut(), {"head.weight": torch.ones(3, 4) > 0}, None)
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.manual_seed(2)
        plain = [model(x) for _ in range(3)]
        torch.manual_seed(2)
        hoisted = list(mc_samples(model, x, 3))
    assert _prefix_modules(model) == {"stem"}
    for (a, ha), (b, hb) in zip(plain, hoisted):
        assert torch.equal(a, b) and torch.equal(ha, hb)
    assert not torch.equal(hoisted[0][0], hoisted[1][0])


def test_hooks_on_traced_through_modules_fall_back(resnet):
    model = bnnconvert.convert(resnet, _masks(resnet, ("fc.",), 0.5), None)
    calls = []
    handle = model.layer4.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        plain, hoisted = _both(model, x, samples=3)
    assert torch.equal(plain, hoisted) and len(calls) == 6  # the hook ran once per sample
    assert hoist_plan(model) is None
    handle.remove()
    assert hoist_plan(model) is not None  # re-planned without the hook


class InPlace(nn.Module):
    """In-place updates across the prefix/suffix boundary."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.pre = nn.Linear(4, 4)
        self.bayes = nn.Linear(4, 4)
        self.post = nn.Linear(4, 4)

    def forward(self, x):
        h = self.stem(x)
        a = self.pre(h)
        b = self.bayes(a)  # stochastic, reads a before the in-place relu below
        a.relu_()  # deterministic mutation after a stochastic read
        c = self.post(h)
        c.add_(b)  # stochastic mutation of a deterministic tensor
        return a + b + c


def test_in_place_updates_across_the_boundary_keep_the_samples():
    model = bnnconvert.convert(InPlace(), {"bayes.weight": torch.ones(4, 4) > 0}, None)
    with torch.no_grad():
        plain, hoisted = _both(model, torch.randn(3, 4))
    _assert_identical_samples(plain, hoisted)
    # a and c are mutated around the stochastic op: recomputed per sample, h is hoisted
    assert _prefix_modules(model) == {"stem"}


class ReadsWeight(nn.Module):
    """Reads a parameter directly (a get_attr node in the traced graph)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.extra = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(F.linear(self.stem(x), self.extra.weight))


def test_replaced_parameter_is_seen():
    model = bnnconvert.convert(ReadsWeight(), {"head.weight": torch.ones(3, 4) > 0}, None)
    x = torch.randn(3, 4)
    with torch.no_grad():
        _both(model, x)
        model.extra.weight = nn.Parameter(torch.randn(4, 4))
        plain, hoisted = _both(model, x)
    _assert_identical_samples(plain, hoisted)
    assert _prefix_modules(model) == {"stem"}


# ------------------------------------------------------------------------ training
def _elbo(model, x, y, hoist, samples=3):
    outs = mc_outputs(model, x, samples, hoist=hoist)
    nll = sum(F.cross_entropy(o, y) for o in outs) / samples
    return outs, nll + 0.01 * bnnconvert.kl_loss(model)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_gradients_and_batchnorm_statistics_match(resnet, momentum):
    for m in resnet.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    base = bnnconvert.convert(resnet, _masks(resnet, ("layer4.1.", "fc."), 0.05), None).train()
    models = {hoist: copy.deepcopy(base) for hoist in (False, None)}
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))
    outs, grads = {}, {}
    for hoist, model in models.items():
        torch.manual_seed(3)
        outs[hoist], loss = _elbo(model, x, y, hoist)
        loss.backward()
        grads[hoist] = {n: p.grad for n, p in model.named_parameters()}
    assert hoist_plan(models[None]) is not None
    assert "layer4.0.conv1" in _prefix_modules(models[None])
    assert torch.equal(outs[False], outs[None])
    for name, g in grads[False].items():
        assert (g is None) == (grads[None][name] is None), name
        if g is not None:  # equal up to float summation order
            atol = 1e-5 * float(g.abs().max())
            torch.testing.assert_close(grads[None][name], g, rtol=1e-4, atol=atol, msg=name)
    plain, hoisted = (dict(models[h].named_buffers()) for h in (False, None))
    for name, buf in plain.items():
        torch.testing.assert_close(hoisted[name], buf, rtol=1e-5, atol=1e-6, msg=name)


def test_elbo_loss_hoists_and_matches_the_plain_loop(resnet):
    """elbo_loss runs the prefix forward and backward once; its losses equal the plain
    loop's bit for bit and its gradients up to float summation order."""
    base = bnnconvert.convert(resnet, _masks(resnet, ("layer4.", "fc."), 0.05), None).train()
    models = {hoist: copy.deepcopy(base) for hoist in (False, True)}
    x, y = torch.randn(4, 1, 32, 32).requires_grad_(), torch.randint(0, 10, (4,))
    calls, losses = {}, {}
    for hoist, model in models.items():
        counts = calls[hoist] = {"forward": 0, "backward": 0}
        model.conv1.register_forward_hook(lambda *a, c=counts: c.update(forward=c["forward"] + 1))
        model.conv1.register_full_backward_hook(
            lambda *a, c=counts: c.update(backward=c["backward"] + 1)
        )
        torch.manual_seed(3)
        if hoist:
            assert hoist_plan(model) is not None and "layer3.1.conv2" in _prefix_modules(model)
            terms = bnnconvert.elbo_loss(model, x, y, beta=0.01, samples=3)
            nll, loss = terms.nll, terms.loss
        else:  # the plain loop, written out
            nll = sum(F.cross_entropy(model(x), y) for _ in range(3)) / 3
            loss = nll + 0.01 * bnnconvert.kl_loss(model)
        loss.backward()
        losses[hoist] = (nll, loss)
    assert calls == {False: {"forward": 3, "backward": 3}, True: {"forward": 1, "backward": 1}}
    assert torch.equal(losses[True][0], losses[False][0])
    assert torch.equal(losses[True][1], losses[False][1])
    hoisted = dict(models[True].named_parameters())
    for name, p in models[False].named_parameters():
        assert p.grad is not None, name
        atol = 1e-5 * float(p.grad.abs().max())
        torch.testing.assert_close(hoisted[name].grad, p.grad, rtol=1e-4, atol=atol, msg=name)
    rho = [n for n in hoisted if n.endswith("_rho")]
    assert rho and all(n.startswith(("layer4.", "fc.")) for n in rho)


def test_plan_follows_train_eval_and_is_weakly_cached(resnet):
    model = bnnconvert.convert(resnet, _masks(resnet, ("fc.",), 0.5), None)
    plan_eval = hoist_plan(model)
    model.train()
    plan_train = hoist_plan(model)
    assert plan_train is not plan_eval and plan_train is hoist_plan(model)
    ref = weakref.ref(model)
    del model, plan_eval, plan_train
    gc.collect()
    assert ref() is None


# ------------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize("r_bayes", [0.01, 0.2, 1.0])
def test_parameter_counts_match_the_formula(resnet, r_bayes):
    model = bnnconvert.convert(resnet, "random", r_bayes)
    layers = [m for _, m in bayesian_layers(model)]
    k = sum(m.bayes_rho(n).numel() for m in layers for n in m.bayes_names)
    n_entries = sum(p.numel() for p in convertible_parameters(resnet).values())
    assert k == round(r_bayes * n_entries)
    count = lambda tensors: sum(t.numel() for t in tensors)  # noqa: E731
    assert count(model.parameters()) == count(resnet.parameters()) + k
    idx = sum(m._buffers[f"{n}_idx"].numel() for m in layers for n in m.bayes_names)
    assert idx == (0 if r_bayes == 1.0 else k)  # dense tensors store no index
    assert count(model.buffers()) == count(resnet.buffers()) + idx + 3 * len(layers)
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    # float32 rho, int32 indices, a float64 (prior_mu, prior_sigma) and a float32 sigma
    # scale per layer
    extra = 4 * k + 4 * idx + 20 * len(layers)
    assert nbytes([*model.parameters(), *model.buffers()]) == (
        nbytes([*resnet.parameters(), *resnet.buffers()]) + extra
    )
