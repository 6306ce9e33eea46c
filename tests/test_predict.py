"""predict() and Prediction: Monte Carlo sampling, uncertainty decomposition, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnnconvert
from bnnconvert.predict import (
    Prediction,
    eval_mode,
    mean_weights,
    predict,
    predict_batches,
    split_batch,
)


def small_cnn(classes: int = 3) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, classes),
    ).eval()


class Post(nn.Module):
    """Applies ``fn`` to the outputs of ``model`` (saturated, masked or reshaped logits)."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x):
        return self.fn(self.model(x))


@pytest.fixture
def pbnn():
    return bnnconvert.convert(small_cnn(), "random", 0.05)


def np_entropy(p, axis):
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis)


# --------------------------------------------------------------------- sampling
def test_converted_model_samples_differ_and_mean_weights_do_not(pbnn):
    x = torch.randn(5, 1, 8, 8)
    pred = predict(pbnn, x, samples=4)
    assert pred.samples.shape == (4, 5, 3)
    assert not torch.allclose(pred.samples[0], pred.samples[1])
    assert (pred.mutual_info > 0).all()
    with mean_weights(pbnn):
        det = predict(pbnn, x, samples=4)
    assert all(torch.equal(det.samples[0], s) for s in det.samples)
    assert torch.equal(det.mutual_info, torch.zeros(5))
    assert torch.equal(det.variance, torch.zeros(5, 3))


def test_deterministic_model_gives_identical_samples():
    model = small_cnn()
    pred = predict(model, torch.randn(4, 1, 8, 8), samples=3)
    assert all(torch.equal(pred.samples[0], s) for s in pred.samples)
    assert torch.equal(pred.mutual_info, torch.zeros(4))
    assert torch.allclose(pred.entropy, pred.expected_entropy)


def test_same_seed_same_outputs(pbnn):
    x = torch.randn(3, 1, 8, 8)
    torch.manual_seed(7)
    a = predict(pbnn, x, samples=3)
    torch.manual_seed(7)
    b = predict(pbnn, x, samples=3)
    torch.manual_seed(8)
    c = predict(pbnn, x, samples=3)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.entropy, b.entropy)
    assert not torch.equal(a.samples, c.samples)


def test_single_sample_mutual_information_is_zero(pbnn):
    pred = predict(pbnn, torch.randn(4, 1, 8, 8), samples=1)
    assert torch.equal(pred.mutual_info, torch.zeros(4))
    assert torch.equal(pred.variance, torch.zeros(4, 3))
    assert torch.allclose(pred.entropy, pred.expected_entropy)


# --------------------------------------------------------------------- decomposition
def test_decomposition_matches_numpy_softmax(pbnn):
    pred = predict(Post(pbnn, lambda z: 3 * z), torch.randn(6, 1, 8, 8), samples=4)
    p = pred.samples.double().numpy()  # (S, N, C)
    mean = p.mean(0)
    assert np.allclose(pred.probs.numpy(), mean, atol=1e-6)
    assert np.allclose(p.sum(-1), 1)
    assert np.allclose(pred.entropy.numpy(), np_entropy(mean, -1), atol=1e-5)
    assert np.allclose(pred.expected_entropy.numpy(), np_entropy(p, -1).mean(0), atol=1e-5)
    mi = np_entropy(mean, -1) - np_entropy(p, -1).mean(0)
    assert np.allclose(pred.mutual_info.numpy(), mi, atol=1e-5) and (mi > 0).all()
    assert np.allclose(pred.variance.numpy(), p.var(0), atol=1e-6)


def test_decomposition_matches_numpy_sigmoid(pbnn):
    model = Post(pbnn, lambda z: 3 * z)
    pred = predict(model, torch.randn(4, 1, 8, 8), samples=3, activation="sigmoid")
    p = pred.samples.double().numpy()  # (S, N, L)
    mean = p.mean(0)
    assert pred.entropy.shape == (4, 3)
    assert np.allclose(pred.probs.numpy(), mean, atol=1e-6)
    h_mean = np_entropy(np.stack([mean, 1 - mean], -1), -1)
    h_each = np_entropy(np.stack([p, 1 - p], -1), -1).mean(0)
    assert np.allclose(pred.entropy.numpy(), h_mean, atol=1e-5)
    assert np.allclose(pred.expected_entropy.numpy(), h_each, atol=1e-5)
    assert np.allclose(pred.mutual_info.numpy(), np.maximum(h_mean - h_each, 0), atol=1e-5)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_saturated_probabilities_give_no_nan(pbnn, activation):
    x = torch.randn(3, 1, 8, 8)
    # +-inf logits: fine for sigmoid; softmax of +inf is NaN in torch itself
    for scale in (1e4, float("inf")) if activation == "sigmoid" else (1e4,):
        pred = predict(Post(pbnn, lambda z, s=scale: z * s), x, 3, activation=activation)
        assert ((pred.probs == 0) | (pred.probs == 1)).any()
        for t in (pred.probs, pred.entropy, pred.expected_entropy, pred.mutual_info):
            assert torch.isfinite(t).all(), scale
        assert (pred.mutual_info >= 0).all()


def test_masked_class_gives_zero_probability_and_no_nan(pbnn):
    def mask(z):
        return z.index_fill(1, torch.tensor([1]), -float("inf"))

    pred = predict(Post(pbnn, mask), torch.randn(3, 1, 8, 8), samples=3)
    assert (pred.probs[:, 1] == 0).all()
    assert torch.isfinite(pred.entropy).all() and torch.isfinite(pred.mutual_info).all()


def test_activation_none_keeps_raw_outputs(pbnn):
    pred = predict(pbnn, torch.randn(3, 1, 8, 8), samples=2, activation="none")
    assert torch.allclose(pred.probs, pred.samples.mean(0))
    assert (pred.probs < 0).any()  # raw logits
    with pytest.raises(ValueError, match="not defined for activation='none'"):
        _ = pred.entropy


# --------------------------------------------------------------------- shapes
def test_shapes_multiclass_resnet18(resnet):
    pbnn = bnnconvert.convert(resnet, "random", 0.05)
    pred = predict(pbnn, torch.randn(2, 1, 32, 32), samples=2)
    assert pred.probs.shape == (2, 10) and pred.samples.shape == (2, 2, 10)
    assert pred.entropy.shape == pred.mutual_info.shape == (2,)
    assert torch.allclose(pred.probs.sum(1), torch.ones(2))


def test_shapes_multilabel(pbnn):
    pred = predict(pbnn, torch.randn(5, 1, 8, 8), samples=2, activation="sigmoid")
    assert pred.probs.shape == pred.entropy.shape == pred.variance.shape == (5, 3)
    assert ((pred.probs > 0) & (pred.probs < 1)).all()


def test_shapes_segmentation_2d(unet):
    pbnn = bnnconvert.convert(unet, "random", 0.05)
    pred = predict(pbnn, torch.randn(2, 1, 16, 16), samples=3)
    assert pred.probs.shape == (2, 2, 16, 16) and pred.samples.shape == (3, 2, 2, 16, 16)
    assert pred.entropy.shape == pred.expected_entropy.shape == pred.mutual_info.shape
    assert pred.entropy.shape == (2, 16, 16)
    assert (pred.entropy <= np.log(2) + 1e-6).all()


def test_shapes_segmentation_3d():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 1))
    pbnn = bnnconvert.convert(net, "random", 0.2)
    pred = predict(pbnn, torch.randn(2, 1, 6, 5, 4), samples=2)
    assert pred.probs.shape == (2, 3, 6, 5, 4) and pred.samples.shape == (2, 2, 3, 6, 5, 4)
    assert pred.mutual_info.shape == (2, 6, 5, 4)
    binary = predict(pbnn, torch.randn(2, 1, 6, 5, 4), samples=2, activation="sigmoid")
    assert binary.entropy.shape == (2, 3, 6, 5, 4)


# --------------------------------------------------------------------- data and modes
def test_dataloader_equals_tensor_input(pbnn):
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 3, (10,))
    # a DataLoader with its own generator leaves the global RNG to the sampling
    loader = DataLoader(TensorDataset(x, y), batch_size=4, generator=torch.Generator())
    torch.manual_seed(5)
    from_loader = predict(pbnn, loader, samples=3, progress=False)
    torch.manual_seed(5)
    from_tensor = predict(pbnn, x, samples=3, batch_size=4)
    assert torch.equal(from_loader.samples, from_tensor.samples)
    assert torch.equal(from_loader.mutual_info, from_tensor.mutual_info)
    assert torch.equal(from_loader.targets, y) and from_tensor.targets is None
    # a deterministic model gives the same answer whatever the batching
    with mean_weights(pbnn):
        whole = predict(pbnn, x, samples=2)
        parts = predict(pbnn, [x[:3], x[3:]], samples=2, progress=False)
    assert torch.allclose(whole.probs, parts.probs, atol=1e-6)


def test_keep_samples_false_keeps_the_summaries(unet):
    pbnn = bnnconvert.convert(unet, "random", 0.05)
    x = torch.randn(4, 1, 16, 16)
    torch.manual_seed(6)
    full = predict(pbnn, x, samples=2, batch_size=2)
    torch.manual_seed(6)
    lean = predict(pbnn, x, samples=2, batch_size=2, keep_samples=False)
    assert lean.samples is None and lean.num_samples is None and full.num_samples == 2
    for name in ("probs", "entropy", "expected_entropy", "mutual_info", "variance"):
        assert torch.equal(getattr(full, name), getattr(lean, name)), name


def test_model_modes_and_grad_mode_are_restored(pbnn):
    pbnn.train()
    pbnn[1].eval()  # a mixed state must come back exactly
    bn = pbnn[1]
    stats = bn.running_mean.clone()
    pred = predict(pbnn, torch.randn(4, 1, 8, 8), samples=2)
    assert pbnn.training and pbnn[0].training and not pbnn[1].training
    assert torch.equal(bn.running_mean, stats)  # BatchNorm ran in eval mode
    assert torch.is_grad_enabled() and not pred.probs.requires_grad
    # streaming: the model is in its own mode between batches
    for part in predict_batches(pbnn, [torch.randn(2, 1, 8, 8)] * 2, samples=2):
        assert pbnn.training and torch.is_grad_enabled()
        assert isinstance(part, Prediction) and len(part) == 2


def test_eval_mode_matches_model_eval(pbnn):
    x = torch.randn(3, 1, 8, 8)
    pbnn.train()
    with mean_weights(pbnn):
        pred = predict(pbnn, x, samples=1)
        pbnn.eval()
        expected = torch.softmax(pbnn(x), 1)
    assert torch.allclose(pred.probs, expected, atol=1e-6)


def test_eval_mode_restores_each_module_flag(pbnn):
    pbnn.train()
    pbnn[1].eval()  # a mixed state: one BatchNorm already in eval mode
    before = [m.training for m in pbnn.modules()]
    with eval_mode(pbnn):
        assert not any(m.training for m in pbnn.modules())
    assert [m.training for m in pbnn.modules()] == before
    with pytest.raises(RuntimeError), eval_mode(pbnn):
        raise RuntimeError("a failing forward")
    assert [m.training for m in pbnn.modules()] == before


def test_split_batch_forms_and_error():
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    assert split_batch(x) == (x, None)
    for batch in ((x, y), [x, y, "meta"]):
        got = split_batch(batch)
        assert got[0] is x and got[1] is y
    assert split_batch((x, "not a tensor")) == (x, None)
    with pytest.raises(TypeError, match="cannot read a batch of type dict"):
        split_batch({"image": x})


def test_device_and_prediction_to_cpu(pbnn):
    pred = predict(
        pbnn,
        [(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))],
        2,
        device="cpu",
        output_device="cpu",
        progress=False,
    )
    moved = pred.to("cpu")
    assert moved is not pred and torch.equal(moved.probs, pred.probs)
    assert pred.cpu().targets.dtype == torch.int64
    assert "probs=(2, 3)" in repr(pred)


def test_clear_errors(pbnn):
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        predict(pbnn, x, samples=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        predict(pbnn, x, activation="relu")
    with pytest.raises(TypeError, match="expected a tensor or an"):
        predict(pbnn, [{"image": x}], progress=False)
    with pytest.raises(ValueError, match="class dimension"):
        predict(Post(pbnn, lambda z: z[:, 0]), x, samples=2)
    with pytest.raises(ValueError, match="no predictions"):
        predict(pbnn, [], progress=False)
    loader = DataLoader(TensorDataset(x, torch.zeros(2, dtype=torch.long)), batch_size=1)
    with pytest.raises(ValueError, match="batch_size applies to tensor input"):
        predict(pbnn, loader, batch_size=1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        predict(pbnn, x, batch_size=0)
    with pytest.raises(TypeError, match="samples must be a positive integer"):
        predict(pbnn, x, samples=2.5)
    soft = predict(pbnn, x, samples=2)
    sig = predict(pbnn, x, samples=2, activation="sigmoid")
    with pytest.raises(ValueError, match="cannot concatenate predictions of activations"):
        Prediction.cat([soft, sig])
