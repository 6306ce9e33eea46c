"""calibrate_posterior with outliers (the scale t chosen for out-of-distribution
detection) and synthetic_outliers, against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnnconvert
from bnnconvert.layers import bayesian_layers


def _neighbour_correlation(images: torch.Tensor) -> float:
    """Mean correlation of horizontally adjacent pixels over images (N, C, H, W)."""
    a, b = images[..., :-1].flatten(), images[..., 1:].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_synthetic_outliers_are_shuffled_inputs_and_smoothed_noise_in_their_range():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 1, 12, 12, generator=g) * 0.5 + 0.2
    out = bnnconvert.synthetic_outliers(x, seed=3)
    assert out.shape == x.shape and out.dtype == x.dtype
    half = len(x) // 2
    shuffled, noise = out[:half], out[half:]
    # the same values as their source item, in another order
    assert torch.equal(shuffled.flatten(1).sort(1).values, x[:half].flatten(1).sort(1).values)
    assert not torch.equal(shuffled, x[:half])
    # each noise image spans exactly the range of the inputs
    assert torch.allclose(noise.flatten(1).amin(1), x.min().expand(len(noise)))
    assert torch.allclose(noise.flatten(1).amax(1), x.max().expand(len(noise)))
    # smoothed: adjacent pixels correlate, unlike white noise or the shuffled inputs
    assert _neighbour_correlation(noise) > 0.6
    assert abs(_neighbour_correlation(shuffled)) < 0.2
    assert torch.equal(out, bnnconvert.synthetic_outliers(x, seed=3))
    assert not torch.equal(out, bnnconvert.synthetic_outliers(x, seed=4))
    flat = bnnconvert.synthetic_outliers(torch.randn(6, 5, generator=g))  # no spatial dims
    assert flat.shape == (6, 5)


def test_synthetic_outliers_refuse_bad_inputs():
    with pytest.raises(TypeError, match="floating-point"):
        bnnconvert.synthetic_outliers(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="N >= 2"):
        bnnconvert.synthetic_outliers(torch.ones(1, 3))


def _noisy_linear(seed: int = 0):
    """A Bayesian linear classifier of 3 inputs (sigma 1 on every weight) whose validation
    data are drawn from its predictive at t0 = 0.5; the third input is 0 in the
    validation data and large in the outliers, where only the noise on its weights acts:
    at t = 0 the outliers look like the validation inputs, noise makes them uncertain."""
    torch.manual_seed(seed)
    pbnn = bnnconvert.convert(nn.Linear(3, 2), {"weight": torch.ones(2, 3, dtype=torch.bool)})
    layer = next(m for _, m in bayesian_layers(pbnn))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 1.0, 0.0], [-2.0, -1.0, 0.0]]))
        layer.bias.zero_()
        layer.weight_rho.fill_(math.log(math.expm1(1.0)))
    x = torch.randn(1200, 3) * torch.tensor([1.0, 1.0, 0.0])
    with torch.no_grad():
        w = layer.weight + 0.5 * torch.randn(1200, 2, 3)
        y = torch.distributions.Categorical(logits=torch.einsum("nci,ni->nc", w, x)).sample()
    outliers = torch.randn(300, 3) * torch.tensor([1.0, 1.0, 0.0]) + torch.tensor([0, 0, 3.0])
    return pbnn, layer, x, y, outliers


def _independent_auroc(layer, x, outliers, t: float, samples: int) -> float:
    """AUROC (scikit-learn) of the entropy of mean_s softmax(x W_s^T + b) over S draws of
    the Gaussian logits, drawn here (its own random numbers, independent per item),
    validation inputs against outliers."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        sigma = layer.posterior_sigma("weight") / layer.bayes_scale  # sigma at t = 1
        scores = []
        for inputs in (x, outliers):
            mean = inputs @ layer.weight.T + layer.bias
            std = ((inputs**2) @ (t * sigma).T ** 2).sqrt()  # logits are Gaussian per class
            eps = torch.randn(samples, *mean.shape, generator=g)
            probs = (mean + std * eps).softmax(2).mean(0)
            scores.append(-(probs * probs.clamp_min(1e-30).log()).sum(1))
    labels = [0] * len(x) + [1] * len(outliers)
    return float(roc_auc_score(labels, torch.cat(scores).numpy()))


def test_calibration_with_outliers_picks_the_best_separation_within_the_nll_of_the_means():
    pbnn, layer, x, y, outliers = _noisy_linear()
    scales = [0.0, 0.25, 0.5, 0.7, 1.0, 2.0]
    common = dict(samples=256, scales=scales, temperature=False, refine=False)
    by_nll = bnnconvert.calibrate_posterior(pbnn, DataLoader(TensorDataset(x, y), 400), **common)
    cal = bnnconvert.calibrate_posterior(
        pbnn, DataLoader(TensorDataset(x, y), 400), outliers=outliers, **common
    )
    assert by_nll.objective == "nll" and by_nll.outlier_auroc == {}
    assert cal.objective == "outliers" and sorted(cal.outlier_auroc) == scales
    # the validation NLLs do not depend on the outliers (the same random numbers)
    assert cal.curve == by_nll.curve
    # every AUROC agrees with an independent Monte Carlo and scikit-learn
    for t, value in cal.outlier_auroc.items():
        assert value == pytest.approx(_independent_auroc(layer, x, outliers, t, 256), abs=0.02)
    # the rule: the best separation among the scales no worse than t = 0 on NLL
    nll = {t: row_nll for t, _, row_nll in cal.curve}
    admissible = [t for t in scales if nll[t] <= nll[0.0]]
    assert 2.0 not in admissible  # the noisiest scale is ruled out by its NLL
    assert cal.scale == max(admissible, key=lambda t: cal.outlier_auroc[t])
    assert cal.scale > by_nll.scale == 0.5  # separation asks for more noise than the NLL
    assert cal.outlier_auroc[cal.scale] > cal.outlier_auroc[0.5] > cal.outlier_auroc[0.0]
    assert layer.bayes_scale.item() == pytest.approx(cal.scale) and "outlier AUROC" in str(cal)


def test_outliers_as_batches_equal_outliers_as_a_tensor():
    pbnn, _, x, y, outliers = _noisy_linear(seed=1)
    common = dict(samples=16, scales=[0.25, 1.0], refine=False)
    val = DataLoader(TensorDataset(x[:500], y[:500]), 250)
    as_tensor = bnnconvert.calibrate_posterior(pbnn, val, outliers=outliers, **common)
    batches = DataLoader(TensorDataset(outliers, torch.zeros(len(outliers))), 256)
    as_batches = bnnconvert.calibrate_posterior(pbnn, val, outliers=batches, **common)
    assert sorted(as_tensor.outlier_auroc) == [0.0, 0.25, 1.0]  # t = 0 always tried
    assert as_tensor.outlier_auroc == as_batches.outlier_auroc
    assert as_tensor.scale == as_batches.scale
    with pytest.raises(ValueError, match="outliers is empty"):
        bnnconvert.calibrate_posterior(pbnn, val, outliers=[], **common)
    for wrong in ("synthetic", 3.0):  # the CLI's word, a number
        with pytest.raises(TypeError, match="synthetic_outliers"):
            bnnconvert.calibrate_posterior(pbnn, val, outliers=wrong, **common)


def test_fit_posterior_passes_outliers_to_the_calibration():
    pbnn, _, x, y, outliers = _noisy_linear(seed=2)
    report = bnnconvert.fit_posterior(
        pbnn,
        DataLoader(TensorDataset(x[:800], y[:800]), 200),
        DataLoader(TensorDataset(x[800:], y[800:]), 200),
        samples=16,
        outliers=outliers[:300],
    )
    assert report.calibration.objective == "outliers"
    assert report.calibration.outlier_auroc[report.calibration.scale] >= max(
        report.calibration.outlier_auroc[t]
        for t, _, v in report.calibration.curve
        if v <= report.calibration.curve[0][2]
    )


def _entropy_auroc_at_the_means(model, temperature, x, outliers, activation) -> float:
    """scikit-learn's AUROC of the per-image mean entropy of the model at its means (t = 0
    has no noise: an exact reference), validation inputs against outliers."""
    scores = []
    with torch.no_grad(), bnnconvert.mean_weights(model):
        for inputs in (x, outliers):
            z = model(inputs).double() / temperature
            if activation == "sigmoid":
                p = z.sigmoid()
                h = -(p * p.clamp_min(1e-30).log() + (1 - p) * (1 - p).clamp_min(1e-30).log())
            else:
                p = z.softmax(1)
                h = -(p * p.clamp_min(1e-30).log()).sum(1)
            scores.append(h.flatten(1).mean(1) if h.dim() > 1 else h)
    labels = [0] * len(x) + [1] * len(outliers)
    return float(roc_auc_score(labels, torch.cat(scores).numpy()))


@pytest.mark.parametrize("task", ["segmentation", "multilabel"])
def test_outlier_auroc_per_image_for_segmentation_and_multilabel(task):
    """Per-pixel (segmentation) and per-label (multilabel, Bernoulli) entropies are averaged
    per image; at t = 0 the AUROC equals scikit-learn's on the model at its means."""
    torch.manual_seed(0)
    if task == "segmentation":
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
        x = torch.randn(24, 1, 8, 8)
        y = torch.randint(0, 3, (24, 8, 8))
        activation = "softmax"
    else:
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
        x = torch.randn(24, 1, 8, 8)
        y = torch.randint(0, 2, (24, 5)).float()
        activation = "sigmoid"
    pbnn = bnnconvert.convert(model, bnnconvert.last_layer_masks(model))
    outliers = bnnconvert.synthetic_outliers(x, seed=1)
    cal = bnnconvert.calibrate_posterior(
        pbnn, DataLoader(TensorDataset(x, y), 12), task=task, samples=4,
        scales=[0.0, 0.5], refine=False, outliers=outliers,
        temperature=task == "segmentation",  # untrained multilabel: T would hit its bound
    )  # fmt: skip
    assert sorted(cal.outlier_auroc) == [0.0, 0.5]
    assert all(0.0 <= v <= 1.0 for v in cal.outlier_auroc.values())
    t0_temperature = cal.curve[0][1]
    expected = _entropy_auroc_at_the_means(pbnn, t0_temperature, x, outliers, activation)
    assert cal.outlier_auroc[0.0] == pytest.approx(expected, abs=1e-6)
