"""Mixed precision (autocast bf16/fp16, GradScaler) and torch.compile of converted models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

from bnnconvert import convert, kl_loss
from bnnconvert.elbo import elbo_loss
from bnnconvert.layers import bayesian_layers
from bnnconvert.predict import amp_autocast, predict
from bnnconvert.training import train

cuda = pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")


@pytest.fixture
def pbnn():
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3),
    )  # fmt: skip
    return convert(net, "magnitude", 0.2)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(9)
    return torch.randn(6, 1, 10, 10, generator=g), torch.randint(0, 3, (6,), generator=g)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------- autocast
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_samples_and_kl_stay_float32_and_match_full_precision(pbnn, batch, amp):
    x, y = batch
    pbnn.train()
    _, layer = next(iter(bayesian_layers(pbnn)))
    with amp_autocast("cpu", amp):
        torch.manual_seed(2)
        sample = layer.sample_parameter(layer.bayes_names[0])
        out = pbnn(x)
        kl = kl_loss(pbnn)
        terms = elbo_loss(pbnn, x, y, beta=0.1, samples=2)
    assert sample.dtype == kl.dtype == terms.kl.dtype == terms.nll.dtype == torch.float32
    assert out.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    torch.manual_seed(2)
    assert torch.equal(sample, layer.sample_parameter(layer.bayes_names[0]))  # same noise
    torch.testing.assert_close(kl, kl_loss(pbnn), rtol=0, atol=0)
    torch.manual_seed(2)
    layer.sample_parameter(layer.bayes_names[0])
    reference = pbnn(x)  # float32, the same draws
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)

    terms.loss.backward()  # backward through the half-precision forward
    grads = _grads(pbnn)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    pbnn.zero_grad()
    torch.manual_seed(7)
    with amp_autocast("cpu", amp):
        half = elbo_loss(pbnn, x, y, beta=0.1, samples=2)
    half.loss.backward()
    half_grads = _grads(pbnn)
    pbnn.zero_grad()
    torch.manual_seed(7)
    elbo_loss(pbnn, x, y, beta=0.1, samples=2).loss.backward()
    for n, g in _grads(pbnn).items():  # same noise: gradients agree to half precision
        scale = float(g.abs().max()) + 1e-6
        torch.testing.assert_close(half_grads[n], g, rtol=0.1, atol=0.05 * scale)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_with_amp_tracks_full_precision(pbnn, batch, amp, tmp_path):
    data = [batch] * 4
    full = train(copy.deepcopy(pbnn), data, 1, samples=2, seed=0, progress=False).history[0]
    ckpt = tmp_path / "run.ckpt"

    def stop(info):  # in epoch 2, after the checkpoint of epoch 1
        if info.global_step == 5:
            raise KeyboardInterrupt

    model = copy.deepcopy(pbnn)
    settings = {"samples": 2, "seed": 0, "progress": False, "checkpoint": ckpt}
    with pytest.raises(KeyboardInterrupt):
        train(model, data, 2, amp=amp, on_step=stop, **settings)
    state = torch.load(ckpt, weights_only=True)
    assert state["fingerprint"]["amp"] == amp
    assert bool(state["scaler"]) == (amp == "fp16")  # fp16 scales the loss
    if amp == "fp16":
        assert state["scaler"]["scale"] > 1
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for key in ("nll", "kl"):  # epoch 1: the same noise, half-precision forwards
        assert state["history"][0][key] == pytest.approx(full[key], rel=0.05), key
    with pytest.raises(ValueError, match="other settings"):  # no resume in another precision
        train(copy.deepcopy(pbnn), data, 2, resume=True, **settings)


def test_predict_with_amp_matches_full_precision(pbnn, batch):
    x, _ = batch
    torch.manual_seed(3)
    full = predict(pbnn, x, 4)
    torch.manual_seed(3)
    half = predict(pbnn, x, 4, amp="bf16")
    assert half.probs.dtype == half.entropy.dtype == torch.float32
    torch.testing.assert_close(half.probs, full.probs, rtol=0, atol=0.03)
    torch.testing.assert_close(half.entropy, full.entropy, rtol=0, atol=0.05)
    assert not torch.equal(half.probs, full.probs)  # autocast did run in bf16


def test_unknown_precision_is_refused(pbnn, batch):
    with pytest.raises(ValueError, match="bf16, fp16 or 'none'"):
        predict(pbnn, batch[0], 2, amp="fp8")
    with pytest.raises(ValueError, match="bf16, fp16 or 'none'"):
        train(pbnn, [batch], 1, amp="half", progress=False)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_training_and_prediction(pbnn, batch, amp):
    data = [(x.cuda(), y.cuda()) for x, y in [batch] * 3]
    model = copy.deepcopy(pbnn).cuda()
    history = train(model, data, 1, samples=2, seed=0, progress=False, amp=amp).history[0]
    reference = train(
        copy.deepcopy(pbnn).cuda(), data, 1, samples=2, seed=0, progress=False
    ).history
    assert history["nll"] == pytest.approx(reference[0]["nll"], rel=0.05)
    with amp_autocast("cuda", amp):
        assert kl_loss(model).dtype == torch.float32
    torch.manual_seed(1)
    half = predict(model, data[0][0], 3, amp=amp)
    torch.manual_seed(1)
    full = predict(model, data[0][0], 3)
    torch.testing.assert_close(half.probs, full.probs, rtol=0, atol=0.03)


# ----------------------------------------------------------------------- torch.compile
def _three_samples(model, pbnn, x, y):
    """Outputs (3, N, C) of three posterior samples drawn after torch.manual_seed(11), the
    gradients of their loss, and the next number of the global RNG."""
    pbnn.zero_grad()
    torch.manual_seed(11)
    out = torch.stack([model(x) for _ in range(3)])
    nn.functional.cross_entropy(out.flatten(0, 1), y.repeat(3)).backward()
    return out.detach(), _grads(pbnn), torch.rand(1)


def _assert_same(compiled, eager, atol):
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=atol)
    for name, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][name], grad, rtol=1e-4, atol=atol)
    assert torch.equal(compiled[2], eager[2])  # the compiled code drew as many numbers


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_gives_the_eager_samples_without_graph_breaks(pbnn, batch, backend):
    x, y = batch
    pbnn.train()
    explanation = torch._dynamo.explain(pbnn)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = _three_samples(torch.compile(pbnn, backend=backend), pbnn, x, y)
    assert not torch.equal(compiled[0][0], compiled[0][1])  # sampling is kept
    _assert_same(compiled, _three_samples(pbnn, pbnn, x, y), atol=1e-6)
    torch.manual_seed(5)
    a = predict(torch.compile(pbnn, backend=backend), x, 3)
    torch.manual_seed(5)
    torch.testing.assert_close(a.probs, predict(pbnn, x, 3).probs, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # inductor compiles C++: about a minute on a small CPU
def test_inductor_with_fallback_random_gives_the_eager_samples(pbnn, batch, monkeypatch):
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    x, y = batch
    pbnn.train()
    torch._dynamo.reset()
    compiled = _three_samples(torch.compile(pbnn), pbnn, x, y)
    _assert_same(compiled, _three_samples(pbnn, pbnn, x, y), atol=1e-5)
