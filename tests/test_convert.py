"""convert(), the masked layers, mean_weights(), to_deterministic(), bayes_summary()."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from bayesian_torch.models.dnn_to_bnn import get_kl_loss
from torch import nn

import bnnconvert
from bnnconvert import bayes_summary, convert, mean_weights, to_deterministic
from bnnconvert.convert import num_bayesian
from bnnconvert.layers import BayesianLayer, bayesian_layers, convertible_parameters

from .conftest import classification_batches


def _total(model):
    return sum(p.numel() for p in convertible_parameters(model).values())


def test_contracts_on_resnet18(resnet):
    original = copy.deepcopy(resnet)
    pbnn = convert(resnet, bnnconvert.compute_saliency(resnet, classification_batches(2)), 0.01)
    # the original is untouched
    for (n, p), (_, q) in zip(resnet.state_dict().items(), original.state_dict().items()):
        assert torch.equal(p, q), n
    assert not any(isinstance(m, BayesianLayer) for m in resnet.modules())
    # mu IS the pretrained weight under its key
    sd = pbnn.state_dict()
    for key, value in original.state_dict().items():
        assert torch.equal(sd[key], value), key
    # parameters = original + k, never doubled
    k = num_bayesian(pbnn)
    assert k == round(0.01 * _total(original))
    n_orig = sum(p.numel() for p in original.parameters())
    assert sum(p.numel() for p in pbnn.parameters()) == n_orig + k
    # still instances of their classes
    assert isinstance(pbnn.conv1, nn.Conv2d) and isinstance(pbnn.fc, nn.Linear)
    # mean_weights reproduces the original outputs
    x = torch.randn(3, 1, 32, 32)
    with mean_weights(pbnn):
        torch.testing.assert_close(pbnn(x), original(x), rtol=0, atol=0)
    assert not torch.allclose(pbnn(x), original(x))  # sampling is back on


def test_mean_weights_unet_with_conv_transpose(unet):
    pbnn = convert(unet, "random", 0.2)
    assert any(
        isinstance(m, nn.ConvTranspose2d) and isinstance(m, BayesianLayer) for m in pbnn.modules()
    )
    x = torch.randn(2, 1, 16, 16)
    with mean_weights(pbnn):
        torch.testing.assert_close(pbnn(x), unet(x), rtol=0, atol=0)
    assert not torch.allclose(pbnn(x), unet(x))


def test_to_deterministic_restores_architecture(resnet):
    pbnn = convert(resnet, "random", 0.05)
    det = to_deterministic(pbnn)
    assert set(det.state_dict()) == set(resnet.state_dict())
    for key, value in resnet.state_dict().items():
        assert torch.equal(det.state_dict()[key], value)
    assert type(det.conv1) is nn.Conv2d and type(det.fc) is nn.Linear
    assert not hasattr(det, "bnnconvert_info")
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(det(x), resnet(x), rtol=0, atol=0)
    # the converted model is untouched by to_deterministic
    assert num_bayesian(pbnn) == round(0.05 * _total(resnet))


def test_noise_exactly_at_the_mask():
    layer = nn.Conv2d(3, 8, 3)
    masks = {
        "weight": torch.rand(layer.weight.shape) < 0.1,
        "bias": torch.tensor([True] + [False] * 7),
    }
    model = convert(nn.Sequential(layer), {f"0.{k}": v for k, v in masks.items()})
    conv = model[0]
    for name, mask in masks.items():
        mu = getattr(conv, name).detach()
        changed = torch.zeros_like(mask)
        for _ in range(20):
            changed |= conv.sample_parameter(name).detach() != mu
        assert torch.equal(changed, mask), name
        assert torch.equal(conv.bayes_mask(name), mask)
        assert conv.bayes_rho(name).shape == (int(mask.sum()),)


def test_gradients_flow_to_mu_and_rho_only_at_selected_entries():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[1, 2] = mask[4, 0] = True
    pbnn = convert(model, {"0.weight": mask})
    loss = F.cross_entropy(pbnn(torch.randn(8, 6)), torch.randint(0, 3, (8,)))
    loss.backward()
    layer = pbnn[0]
    assert layer.weight_rho.grad.shape == (2,)
    assert torch.all(layer.weight_rho.grad != 0)
    assert layer.weight.grad is not None and pbnn[2].weight.grad is not None
    # no rho anywhere else: deterministic tensors carry no sigma
    rho_names = [n for n, _ in pbnn.named_parameters() if n.endswith("_rho")]
    assert rho_names == ["0.weight_rho"]


def test_dense_case_r1_full_bayesian():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    pbnn = convert(model, "random", 1.0)
    assert num_bayesian(pbnn) == _total(model)
    assert sum(p.numel() for p in pbnn.parameters()) == 2 * _total(model)
    for _, layer in bayesian_layers(pbnn):
        for name in layer.bayes_names:
            assert layer.bayes_mask(name).all()
            assert (layer.sample_parameter(name) != getattr(layer, name)).all()


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2, padding_mode="reflect"), (2, 3, 17)),
        (
            nn.Conv2d(4, 8, 3, groups=2, padding=2, dilation=2, padding_mode="circular"),
            (2, 4, 9, 9),
        ),
        (
            nn.Conv3d(2, 4, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False),
            (1, 2, 3, 8, 8),
        ),
        (nn.ConvTranspose1d(3, 2, 3, stride=2, output_padding=1), (2, 3, 7)),
        (
            nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1, groups=2),
            (2, 4, 5, 5),
        ),
        (
            nn.ConvTranspose3d(2, 2, 3, stride=2, output_padding=(1, 0, 1), dilation=1),
            (1, 2, 3, 4, 4),
        ),
        (nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"), (2, 3, 6, 6)),
        (nn.Linear(5, 3, dtype=torch.float64), (4, 5)),
        (nn.Conv2d(3, 2, 3, dtype=torch.float64), (1, 3, 5, 5)),
    ],
)
def test_hyperparameters_survive(layer, shape):
    model = nn.Sequential(layer)
    x = torch.randn(shape, dtype=layer.weight.dtype)
    ref = model(x)
    pbnn = convert(model, "random", 0.5)
    conv = pbnn[0]
    assert isinstance(conv, type(layer)) and isinstance(conv, BayesianLayer)
    for attr in (
        "stride",
        "padding",
        "dilation",
        "groups",
        "output_padding",
        "padding_mode",
        "in_features",
        "out_features",
        "kernel_size",
        "in_channels",
        "out_channels",
    ):
        assert getattr(conv, attr, None) == getattr(layer, attr, None), attr
    assert conv.weight.dtype == layer.weight.dtype and conv.weight_rho.dtype == layer.weight.dtype
    assert (conv.bias is None) == (layer.bias is None)
    with mean_weights(pbnn):
        out = pbnn(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.equal(pbnn(x), ref)


def test_frozen_layer_keeps_requires_grad():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    pbnn = convert(model, "random", 1.0)
    assert pbnn[0].weight.requires_grad is False
    assert pbnn[0].weight_rho.requires_grad is True
    assert pbnn[1].weight.requires_grad is True


def test_untouched_layers_stay_exactly_as_they_were():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    pbnn = convert(model, {"1.weight": torch.ones(2, 4, dtype=torch.bool)})
    assert type(pbnn[0]) is nn.Linear
    assert set(pbnn[0].state_dict()) == {"weight", "bias"}
    assert isinstance(pbnn[1], BayesianLayer)


def test_nested_containers_moduledict_and_custom():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Sequential(nn.Linear(4, 2))})
            self.shared = nn.ModuleList([nn.Conv1d(1, 1, 1)])

        def forward(self, x):
            y = self.heads["a"](x)
            return self.heads["b"](y) + self.shared[0](y.unsqueeze(1)).squeeze(1)[:, :2]

    model = nn.Sequential(Block())
    pbnn = convert(model, "random", 1.0)
    names = {n for n, _ in bayesian_layers(pbnn)}
    assert names == {"0.heads.a", "0.heads.b.0", "0.shared.0"}
    x = torch.randn(3, 4)
    with mean_weights(pbnn):
        torch.testing.assert_close(pbnn(x), model(x))


def test_multihead_attention_out_proj_gets_noise():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    model = nn.Sequential()
    model.attn = mha

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    wrap = Wrap().eval()
    params = convertible_parameters(wrap)
    assert "attn.out_proj.weight" in params  # NonDynamicallyQuantizableLinear is scored
    pbnn = convert(wrap, "random", 0.5)
    assert isinstance(pbnn.attn.out_proj, BayesianLayer)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():  # the fast path reads out_proj.weight directly
        a, b = pbnn(x), pbnn(x)
        with mean_weights(pbnn):
            torch.testing.assert_close(pbnn(x), wrap(x))
    assert not torch.allclose(a, b)
    # after the call, mu is back in place
    assert isinstance(pbnn.attn.out_proj._parameters["weight"], nn.Parameter)


def test_state_dict_round_trip(resnet):
    pbnn = convert(resnet, "random", 0.02)
    buf = io.BytesIO()
    torch.save(pbnn.state_dict(), buf)
    fresh = convert(resnet, "random", 0.02)  # other random masks
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for (_, a), (_, b) in zip(bayesian_layers(pbnn), bayesian_layers(fresh)):
        for name in a.bayes_names:
            assert torch.equal(a.bayes_mask(name), b.bayes_mask(name))
            assert torch.equal(a.bayes_rho(name), b.bayes_rho(name))
    x = torch.randn(2, 1, 32, 32)
    torch.manual_seed(5)
    ya = pbnn(x)
    torch.manual_seed(5)
    torch.testing.assert_close(fresh(x), ya, rtol=0, atol=0)


def test_whole_module_pickles(resnet):
    pbnn = convert(resnet, "random", 0.01)
    buf = io.BytesIO()
    torch.save(pbnn, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    x = torch.randn(1, 1, 32, 32)
    with mean_weights(again), mean_weights(pbnn):
        torch.testing.assert_close(again(x), pbnn(x))


def test_same_seed_same_masks_and_outputs(resnet):
    data = classification_batches(2)
    x = torch.randn(2, 1, 32, 32)
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        sal = bnnconvert.compute_saliency(resnet, data)
        pbnn = convert(resnet, sal, 0.01)
        outs.append((pbnn, pbnn(x)))
    (a, ya), (b, yb) = outs
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    for (_, la), (_, lb) in zip(bayesian_layers(a), bayesian_layers(b)):
        for n in la.bayes_names:
            assert torch.equal(la.bayes_index(n), lb.bayes_index(n))


def test_moped_initialisation():
    model = nn.Sequential(nn.Linear(10, 10))
    pbnn = convert(model, "random", 1.0, moped_delta=0.1)
    sigma = pbnn[0].posterior_sigma("weight")
    expected = (0.1 * model[0].weight.detach().abs()).clamp_min(1e-6)
    torch.testing.assert_close(sigma, expected, rtol=1e-5, atol=1e-7)


def test_rho_init_and_prior_stored():
    pbnn = convert(nn.Sequential(nn.Linear(3, 3)), "random", 1.0, rho_init=-5.0, prior_sigma=0.1)
    torch.testing.assert_close(
        pbnn[0].posterior_sigma("weight"), torch.full((3, 3), F.softplus(torch.tensor(-5.0)).item())
    )
    assert pbnn[0].bayes_prior.tolist() == [0.0, 0.1]
    assert pbnn.bnnconvert_info["r_bayes"] == 1.0


def test_bayesian_torch_get_kl_loss_works(resnet):
    pbnn = convert(resnet, "random", 0.01)
    torch.testing.assert_close(get_kl_loss(pbnn), bnnconvert.kl_loss(pbnn))


def test_bayes_summary(resnet):
    pbnn = convert(resnet, "random", 0.01)
    summary = bayes_summary(pbnn)
    assert summary.entries == _total(resnet)
    assert summary.bayesian == num_bayesian(pbnn) == round(0.01 * _total(resnet))
    row = {r.name: r for r in summary.rows}["fc"]
    assert row.entries == 10 * 512 + 10 and row.kind == "Linear"
    text = str(summary)
    assert "layer4.1.conv2" in text and "total" in text.splitlines()[-1]


def test_errors(resnet, unet):
    with pytest.raises(ValueError, match=r"r_bayes must be in \(0, 1\]"):
        convert(resnet, "random", 1.5)
    with pytest.raises(ValueError, match=r"r_bayes must be in \(0, 1\]"):
        convert(resnet, "random", 0.0)
    sal_other = bnnconvert.compute_saliency(unet, None, criterion="magnitude")
    with pytest.raises(ValueError, match="another architecture"):
        convert(resnet, sal_other, 0.01)
    other = bnnconvert.models.resnet18(num_classes=5, in_channels=1)
    sal_shape = bnnconvert.compute_saliency(other, None, criterion="magnitude")
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(5, 512\)"):
        convert(resnet, sal_shape, 0.01)
    with pytest.raises(ValueError, match="no Linear/Conv/ConvTranspose"):
        convert(nn.Sequential(nn.ReLU()), "random", 0.1)
    with pytest.raises(ValueError, match="already converted"):
        convert(convert(resnet, "random", 0.01), "random", 0.01)
    with pytest.raises(TypeError, match="saliency must be"):
        convert(resnet, 42, 0.1)
    with pytest.raises(FileNotFoundError):
        convert(resnet, "missing-file.pt", 0.1)
    with pytest.raises(ValueError, match="r_bayes=None"):
        convert(resnet, {"fc.weight": torch.ones(10, 512, dtype=torch.bool)}, 0.1)


def test_make_bayesian_errors():
    from bnnconvert.layers import make_bayesian

    masks = {"weight": torch.ones(3, 4, dtype=torch.bool)}
    layer = make_bayesian(nn.Linear(4, 3), masks)
    with pytest.raises(ValueError, match="Linear is already Bayesian"):
        make_bayesian(layer, masks)
    for delta in (0.0, -0.1):
        with pytest.raises(ValueError, match="moped_delta must be positive"):
            make_bayesian(nn.Linear(4, 3), masks, moped_delta=delta)
        with pytest.raises(ValueError, match="moped_delta must be positive"):
            convert(nn.Sequential(nn.Linear(4, 3)), "magnitude", 0.5, moped_delta=delta)
    with pytest.raises(ValueError, match="moped_delta must be finite"):
        make_bayesian(nn.Linear(4, 3), masks, moped_delta=float("inf"))
    with pytest.raises(ValueError, match="prior_sigma must be positive"):
        make_bayesian(nn.Linear(4, 3), masks, prior_sigma=0.0)
    counter = nn.Module()  # any module may be converted, but only floating-point tensors
    counter.steps = nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)
    with pytest.raises(TypeError, match="not an initialised floating-point parameter"):
        make_bayesian(counter, {"steps": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="has no parameter 'bias'"):
        make_bayesian(nn.Linear(4, 3, bias=False), {"bias": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="made for another architecture"):
        make_bayesian(nn.Linear(4, 3), {"weight": torch.ones(4, 3, dtype=torch.bool)})


# ------------------------------------------------------------------ sampling without grad
def _mixed_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """conv1: 1 % of the entries (perturbed in place without grad), fc.weight: half (copied),
    fc.bias: every entry (dense)."""
    g = torch.Generator().manual_seed(0)
    return {
        "conv1.weight": torch.rand(model.conv1.weight.shape, generator=g) < 0.01,
        "fc.weight": torch.rand(model.fc.weight.shape, generator=g) < 0.5,
        "fc.bias": torch.ones_like(model.fc.bias, dtype=torch.bool),
    }


def test_prediction_perturbs_in_place_with_the_same_samples(resnet):
    pbnn = convert(resnet, _mixed_masks(resnet), None)
    x = torch.randn(2, 1, 32, 32)
    params = {n: p.detach().clone() for n, p in pbnn.named_parameters()}
    versions = {n: p._version for n, p in pbnn.named_parameters()}
    assert not pbnn.conv1.perturbs_in_place("weight")  # grad mode: a copy of mu
    torch.manual_seed(4)
    reference = torch.stack([pbnn(x) for _ in range(3)]).detach()
    with torch.no_grad():
        in_place = {(n, name): m.perturbs_in_place(name) for n, m in bayesian_layers(pbnn)
                    for name in m.bayes_names}  # fmt: skip
        assert in_place == {("conv1", "weight"): True, ("fc", "weight"): False,
                            ("fc", "bias"): False}  # fmt: skip
        torch.manual_seed(4)
        no_grad = torch.stack([pbnn(x) for _ in range(3)])
    with torch.inference_mode():
        torch.manual_seed(4)
        inference = torch.stack([pbnn(x) for _ in range(3)])
    assert torch.equal(no_grad, reference) and torch.equal(inference, reference)
    assert not torch.equal(reference[0], reference[1])
    for n, p in pbnn.named_parameters():  # mu written back bit for bit, autograd unaware
        assert torch.equal(p, params[n]) and p._version == versions[n], n
    assert isinstance(pbnn.conv1._parameters["weight"], nn.Parameter)


def test_posterior_cache_gives_the_same_draws_with_one_softplus(resnet, monkeypatch):
    from bnnconvert import layers as layers_mod
    from bnnconvert.sampling import mc_outputs

    pbnn = convert(resnet, _mixed_masks(resnet), None)
    x = torch.randn(2, 1, 32, 32)
    params = {n: p.detach().clone() for n, p in pbnn.named_parameters()}
    calls = []
    softplus = layers_mod.F.softplus
    monkeypatch.setattr(layers_mod.F, "softplus", lambda t: calls.append(t.numel()) or softplus(t))
    with torch.no_grad():
        torch.manual_seed(5)
        uncached = torch.stack([pbnn(x) for _ in range(4)])  # one softplus per tensor and draw
        assert len(calls) == 3 * 4
        calls.clear()
        torch.manual_seed(5)
        cached = mc_outputs(pbnn, x, 4, hoist=False)
    assert len(calls) == 3  # conv1.weight, fc.weight, fc.bias: once each for 4 draws
    assert torch.equal(cached, uncached) and not torch.equal(cached[0], cached[1])
    for n, p in pbnn.named_parameters():
        assert torch.equal(p, params[n]), n
    assert all(m._bayes_cache is None for _, m in bayesian_layers(pbnn))  # dropped after


def test_posterior_cache_follows_changes_of_rho_and_mu(resnet):
    from bnnconvert.layers import posterior_cache

    pbnn = convert(resnet, _mixed_masks(resnet), None)
    x = torch.randn(2, 1, 32, 32)

    def change(model):  # in place, as an optimiser step does
        model.conv1.weight_rho.add_(0.5)
        model.fc.bias_rho.sub_(0.25)
        model.conv1.weight.mul_(1.5)

    reference = copy.deepcopy(pbnn)
    with torch.no_grad():
        torch.manual_seed(6)
        expected = [reference(x)]
        change(reference)
        expected.append(reference(x))
        torch.manual_seed(6)
        with posterior_cache(pbnn):
            got = [pbnn(x)]
            change(pbnn)
            got.append(pbnn(x))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(pbnn.conv1.weight, reference.conv1.weight)


def test_posterior_cache_in_training_keeps_gradients(resnet):
    from bnnconvert.layers import posterior_cache

    pbnn = convert(resnet, _mixed_masks(resnet), None)
    x, y = torch.randn(3, 1, 32, 32), torch.tensor([0, 1, 2])

    def grads(cache: bool):
        pbnn.zero_grad()
        torch.manual_seed(7)
        if cache:
            with posterior_cache(pbnn):
                loss = sum(F.cross_entropy(pbnn(x), y) for _ in range(3))
        else:
            loss = sum(F.cross_entropy(pbnn(x), y) for _ in range(3))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in pbnn.named_parameters()}

    loss_plain, plain = grads(False)
    loss_cached, cached = grads(True)
    assert torch.equal(loss_plain, loss_cached)
    for n, g in plain.items():  # the shared sigma sums its three branches' gradients
        torch.testing.assert_close(cached[n], g, rtol=1e-5, atol=1e-7, msg=n)
    assert cached["conv1.weight_rho"].abs().sum() > 0


def test_failed_forward_restores_mu(resnet):
    pbnn = convert(resnet, _mixed_masks(resnet), None)
    before = {n: p.detach().clone() for n, p in pbnn.named_parameters()}
    with torch.no_grad(), pytest.raises(RuntimeError):
        pbnn(torch.randn(2, 3, 32, 32))  # conv1 expects one channel: fails mid-forward
    with pytest.raises(RuntimeError):
        pbnn.fc(torch.randn(2, 7))
    assert all(torch.equal(p, before[n]) for n, p in pbnn.named_parameters())
    assert not any(m._bayes_active for _, m in bayesian_layers(pbnn))


def test_indices_are_int32_and_int64_checkpoints_load(resnet):
    from bnnconvert.layers import index_dtype

    assert index_dtype(2**31 - 1) == torch.int32 and index_dtype(2**31) == torch.int64
    pbnn = convert(resnet, "random", 0.02)
    state = pbnn.state_dict()
    idx_keys = [k for k in state if k.endswith("_idx")]
    assert idx_keys and all(state[k].dtype == torch.int32 for k in idx_keys)
    old = {k: v.long() if k in idx_keys else v for k, v in state.items()}  # before int32
    fresh = convert(resnet, "random", 0.02)  # other masks
    fresh.load_state_dict(old)
    loaded = fresh.state_dict()
    for k in idx_keys:
        assert loaded[k].dtype == torch.int32 and torch.equal(loaded[k].long(), old[k]), k
    x = torch.randn(2, 1, 32, 32)
    torch.manual_seed(5)
    ya = pbnn(x)
    torch.manual_seed(5)
    assert torch.equal(fresh(x), ya)
    old[idx_keys[0]] = old[idx_keys[0]].clone()
    old[idx_keys[0]][-1] = 2**40  # beyond the tensor: int32 would wrap it silently
    with pytest.raises(RuntimeError, match=r"damaged or belongs to another architecture"):
        fresh.load_state_dict(old)


def test_last_layer_masks_select_the_head_only(resnet, unet):
    for model, head in ((resnet, "fc"), (unet, "head")):
        masks = bnnconvert.last_layer_masks(model)
        layer = model.get_submodule(head)
        assert set(masks) == {f"{head}.{n}" for n, _ in layer.named_parameters()}
        assert all(m.all() for m in masks.values())
        pbnn = bnnconvert.convert(model, masks)
        assert [name for name, _ in bayesian_layers(pbnn)] == [head]
        assert bnnconvert.bayes_summary(pbnn).bayesian == sum(p.numel() for p in layer.parameters())
    with pytest.raises(ValueError, match="no Linear/Conv"):
        bnnconvert.last_layer_masks(nn.Sequential(nn.ReLU()))
