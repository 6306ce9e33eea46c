"""Saliency pass and top-k selection (step 2 of the paper)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnnconvert
from bnnconvert.curvature import diagonal_ggn, fit_prior_precision, likelihood_of_task
from bnnconvert.layers import convertible_parameters
from bnnconvert.saliency import Saliency, compute_saliency

from .conftest import classification_batches, segmentation_batches


def _manual_grads(model, batches, loss_fn=F.cross_entropy):
    """Independent reference: per-batch gradients by loss.backward() on a copy."""
    ref = copy.deepcopy(model).train()
    params = convertible_parameters(ref)
    per_batch = []
    for x, y in batches:
        ref.zero_grad()
        loss_fn(ref(x), y).backward()
        per_batch.append({n: p.grad.clone() for n, p in params.items()})
    return per_batch


def test_grad2_is_square_of_accumulated_gradient(resnet):
    batches = classification_batches()
    sal = compute_saliency(resnet, batches, criterion="grad2")
    per_batch = _manual_grads(resnet, batches)
    for name, score in sal.scores.items():
        expected = sum(g[name] for g in per_batch) ** 2
        torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-12)


def test_fisher_is_sum_of_squared_batch_gradients(resnet):
    batches = classification_batches()
    sal = compute_saliency(resnet, batches, criterion="fisher")
    per_batch = _manual_grads(resnet, batches)
    for name in ("conv1.weight", "layer4.1.conv2.weight", "fc.bias"):
        expected = sum(g[name] ** 2 for g in per_batch)
        torch.testing.assert_close(sal.scores[name], expected, rtol=1e-4, atol=1e-12)


def test_scores_cover_convertible_layers_only(resnet):
    sal = compute_saliency(resnet, classification_batches(1))
    assert set(sal.scores) == set(convertible_parameters(resnet))
    assert not any("bn" in n or "downsample.1" in n for n in sal.scores)
    assert "fc.bias" in sal.scores and "conv1.weight" in sal.scores
    assert sal.num_entries == sum(p.numel() for p in convertible_parameters(resnet).values())


def test_pass_leaves_model_unchanged(resnet):
    resnet.fc.weight.grad = torch.full_like(resnet.fc.weight, 7.0)
    resnet.layer1[0].conv1.weight.requires_grad_(False)
    params = {n: p.detach().clone() for n, p in resnet.named_parameters()}
    buffers = {n: b.clone() for n, b in resnet.named_buffers()}
    modes = {n: m.training for n, m in resnet.named_modules()}
    compute_saliency(resnet, classification_batches())
    for n, p in resnet.named_parameters():
        assert torch.equal(p, params[n]), n
    for n, b in resnet.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert {n: m.training for n, m in resnet.named_modules()} == modes
    assert torch.equal(resnet.fc.weight.grad, torch.full_like(resnet.fc.weight, 7.0))
    assert resnet.conv1.weight.grad is None
    assert resnet.layer1[0].conv1.weight.requires_grad is False


def test_segmentation_default_loss_and_num_batches(unet):
    batches = segmentation_batches(n_batches=3)
    sal = compute_saliency(unet, batches, num_batches=2)
    assert sal.meta["num_batches"] == 2
    ref = compute_saliency(unet, batches[:2])
    for n in sal.scores:
        torch.testing.assert_close(sal.scores[n], ref.scores[n])
    assert any(n.startswith("up.") for n in sal.scores)  # ConvTranspose2d scored


def test_multilabel_default_loss():
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
    x, y = torch.randn(5, 8), torch.randint(0, 2, (5, 3)).float()
    sal = compute_saliency(model, [(x, y)])
    ref = copy.deepcopy(model)
    F.binary_cross_entropy_with_logits(ref(x), y).backward()
    torch.testing.assert_close(sal.scores["1.weight"], ref[1].weight.grad ** 2)


class _MultilabelSet(torch.utils.data.TensorDataset):
    """A data set that declares its task, as ``bnnconvert.data_task`` reads it."""

    task = "multilabel"


def _laplace_variances(model, batches, task):
    """Independent reference: 1 / (H + lambda) from the curvature of an explicit task."""
    h = diagonal_ggn(model, batches, likelihood=likelihood_of_task(task)).diagonal
    lam = fit_prior_precision(
        torch.cat([v.reshape(-1) for v in h.values()]),
        torch.cat([model.get_parameter(n).detach().reshape(-1) for n in h]),
    )
    return {n: 1.0 / (v.double() + lam) for n, v in h.items()}


def test_variance_num_batches_keeps_the_data_task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16, 4)).float()
    loader = torch.utils.data.DataLoader(_MultilabelSet(x, y), batch_size=8)
    sal = compute_saliency(model, loader, criterion="variance", num_batches=1)
    assert sal.meta["num_samples"] == 8
    first = [(x[:8], y[:8])]
    multilabel = _laplace_variances(model, first, "multilabel")
    multiclass = _laplace_variances(model, first, "multiclass")
    for name, score in sal.scores.items():
        torch.testing.assert_close(score.double(), multilabel[name], rtol=1e-5, atol=0)
        assert not torch.allclose(score.double(), multiclass[name], rtol=1e-3), name


@pytest.mark.parametrize("r", [0.001, 0.01, 0.2, 1.0])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_select_exactly_k(resnet, r, scope):
    sal = compute_saliency(resnet, None, criterion="magnitude")
    masks = sal.select(r, scope)
    total = sum(int(m.sum()) for m in masks.values())
    if scope == "global":
        assert total == round(r * sal.num_entries)
    else:
        assert total == sum(round(r * s.numel()) for s in sal.scores.values())
        for n, m in masks.items():
            assert int(m.sum()) == round(r * sal.scores[n].numel())


def test_select_takes_the_top_scores():
    scores = {
        "a.weight": torch.tensor([[0.1, 5.0], [3.0, 0.2]]),
        "b.weight": torch.tensor([4.0, 1.0]),
    }
    masks = Saliency(scores, "grad2").select(0.5)
    # top 3 of 6: 5.0, 4.0, 3.0
    assert masks["a.weight"].tolist() == [[False, True], [True, False]]
    assert masks["b.weight"].tolist() == [True, False]


def test_select_ties_exactly_k_and_deterministic():
    scores = {"a.weight": torch.ones(10, 10), "b.bias": torch.ones(7)}
    sal = Saliency(scores, "grad2")
    for r in (0.001 * 107 / 10, 0.01 * 107 / 10, 0.2, 0.5, 1.0):
        masks = sal.select(r)
        k = round(r * 107)
        assert sum(int(m.sum()) for m in masks.values()) == k
        flat = torch.cat([m.reshape(-1) for m in masks.values()])
        assert flat[:k].all() and not flat[k:].any()  # ties broken by position
    # partial ties at the threshold
    scores = {"w": torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0])}
    assert Saliency(scores, "grad2").select(0.6)["w"].tolist() == [True, True, True, False, False]


def test_random_criterion_seeded(resnet):
    a = compute_saliency(resnet, None, criterion="random", seed=3).select(0.01)
    b = compute_saliency(resnet, None, criterion="random", seed=3).select(0.01)
    c = compute_saliency(resnet, None, criterion="random", seed=4).select(0.01)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)
    torch.manual_seed(9)
    d = compute_saliency(resnet, None, criterion="random").select(0.01)
    torch.manual_seed(9)
    e = compute_saliency(resnet, None, criterion="random").select(0.01)
    assert all(torch.equal(d[n], e[n]) for n in d)


def test_magnitude_criterion(resnet):
    sal = compute_saliency(resnet, None, criterion="magnitude")
    torch.testing.assert_close(sal.scores["fc.weight"], resnet.fc.weight.detach().abs())


def test_save_load_round_trip_weights_only(resnet, tmp_path):
    sal = compute_saliency(resnet, classification_batches(1))
    path = tmp_path / "sal.pt"
    sal.save(path)
    payload = torch.load(path, weights_only=True)
    assert payload["criterion"] == "grad2"
    loaded = Saliency.load(path)
    assert loaded.criterion == sal.criterion and loaded.meta == sal.meta
    assert all(torch.equal(loaded.scores[n], s) for n, s in sal.scores.items())
    assert list(loaded.scores) == list(sal.scores)
    m1, m2 = sal.select(0.01), loaded.select(0.01)
    assert all(torch.equal(m1[n], m2[n]) for n in m1)


def test_save_is_atomic_on_bad_folder(tmp_path):
    sal = Saliency({"w": torch.ones(3)}, "grad2")
    with pytest.raises(FileNotFoundError, match="output folder"):
        sal.save(tmp_path / "missing" / "sal.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("r", [0, -0.1, 1.5, float("nan")])
def test_bad_r_bayes(r):
    sal = Saliency({"w": torch.ones(100)}, "grad2")
    with pytest.raises(ValueError, match=r"r_bayes must be in \(0, 1\]"):
        sal.select(r)


def test_r_bayes_selecting_nothing():
    with pytest.raises(ValueError, match="selects round"):
        Saliency({"w": torch.ones(10)}, "grad2").select(0.01)


def test_empty_data(resnet):
    with pytest.raises(ValueError, match="no batch"):
        compute_saliency(resnet, [])


def test_no_convertible_layer():
    with pytest.raises(ValueError, match="no Linear/Conv/ConvTranspose"):
        compute_saliency(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), None, criterion="random")


def test_non_finite_gradient_names_parameter():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1, bias=False))
    nn.init.zeros_(model[1].weight)
    x, y = torch.randn(3, 2), torch.zeros(3)

    def loss(out, target):  # sqrt'(0) = inf: a finite loss with an infinite gradient
        return out.abs().sqrt().sum()

    with pytest.raises(
        FloatingPointError, match=r"non-finite gradient for parameter\(s\) .*'1\.weight'"
    ):
        compute_saliency(model, [(x, y)], loss)


def test_non_finite_loss_names_batch():
    model = nn.Linear(4, 2)
    batches = [
        (torch.randn(2, 4), torch.tensor([0, 1])),
        (torch.full((2, 4), float("nan")), torch.tensor([0, 1])),
    ]
    with pytest.raises(FloatingPointError, match="batch 1"):
        compute_saliency(model, batches)


def test_unknown_criterion_and_missing_data(resnet):
    with pytest.raises(ValueError, match="criterion must be one of"):
        compute_saliency(resnet, None, criterion="hessian")
    with pytest.raises(ValueError, match="needs data"):
        compute_saliency(resnet, None)


def test_bad_batch_structure(resnet):
    with pytest.raises(TypeError, match=r"\(input, target\) pair"):
        compute_saliency(resnet, [torch.randn(2, 1, 32, 32)])


def test_load_rejects_other_files(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a saliency file"):
        Saliency.load(bad)
    torch.save({"a": torch.ones(1)}, bad)
    with pytest.raises(ValueError, match="not a saliency file"):
        Saliency.load(bad)
    with pytest.raises(FileNotFoundError):
        Saliency.load(tmp_path / "missing.pt")


def test_bad_scope_and_a_newer_file_version(tmp_path):
    sal = compute_saliency(nn.Sequential(nn.Linear(4, 3)), None, criterion="magnitude")
    with pytest.raises(ValueError, match="scope must be 'global' or 'layer', got 'neuron'"):
        sal.select(0.5, scope="neuron")
    sal.save(tmp_path / "sal.pt")
    payload = torch.load(tmp_path / "sal.pt", weights_only=True)
    torch.save({**payload, "version": 2, "bnnconvert_version": "9.0"}, tmp_path / "sal.pt")
    with pytest.raises(ValueError, match=r"written by a newer bnnconvert \(9\.0"):
        Saliency.load(tmp_path / "sal.pt")


def test_public_api_exports():
    assert bnnconvert.compute_saliency is compute_saliency
    assert bnnconvert.Saliency is Saliency
