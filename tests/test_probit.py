"""The probit predictive of a Bayesian output layer (set_predictive, output_moments, the
calibration and prediction with it), against independent computations: Jacobians of the
layer by torch.func, Monte Carlo draws of the same posterior, the model at its means."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import jacrev
from torch.utils.data import DataLoader, TensorDataset

import bnnconvert
from bnnconvert.layers import bayesian_layers, mean_weights, set_sigma_scale
from bnnconvert.predict import prediction_samples, predictive_of, samples_of

LAYERS = [
    (lambda: nn.Linear(6, 4), (5, 6)),
    (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 2, 5, 5)),
    (lambda: nn.Conv2d(4, 4, 3, groups=2, dilation=2, stride=2), (2, 4, 9, 9)),
    (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1), (2, 2, 4, 4)),
    (lambda: nn.Conv1d(3, 2, 1), (3, 3, 7)),
]


def _converted(layer: nn.Module, seed: int = 0, dense: bool = False) -> nn.Module:
    """nn.Sequential(Identity, layer) with a random (or full) selection, MOPED sigma."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Identity(), layer)
    masks = {
        k: torch.ones_like(v, dtype=torch.bool) if dense else torch.rand(v.shape, generator=g) < 0.6
        for k, v in model.named_parameters()
    }
    return bnnconvert.convert(model, masks, None, moped_delta=0.5)


def _jacobian_moments(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the layer's output, from its Jacobian in the parameters: the
    output is linear in them, so var = sum_i (d out / d theta_i)^2 sigma_i^2."""
    params = {n: layer._parameters[n].detach() for n in ("weight", "bias")}
    base = layer._bayes_base

    def _call(p: dict) -> torch.Tensor:
        saved = {n: layer._parameters[n] for n in p}
        layer._parameters.update(p)
        try:
            return base.forward(layer, x)
        finally:
            layer._parameters.update(saved)

    mean = _call(params)
    jac = jacrev(_call)(params)
    var = torch.zeros_like(mean)
    for name, j in jac.items():
        sigma2 = layer.posterior_sigma(name).square() if name in layer.bayes_names else 0.0
        var += (j.square() * sigma2).flatten(mean.dim()).sum(-1)
    return mean, var


@pytest.mark.parametrize("make, shape", LAYERS)
def test_output_moments_equal_the_jacobian_computation(make, shape):
    torch.manual_seed(1)
    pbnn = _converted(make())
    layer = pbnn[1]
    set_sigma_scale(pbnn, 0.7)
    x = torch.randn(shape, dtype=torch.float64)
    layer.double()
    mean, var = layer.output_moments(x)
    ref_mean, ref_var = _jacobian_moments(layer, x)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)
    with mean_weights(pbnn):
        torch.testing.assert_close(mean, pbnn(x))
    # the parameters are mu again afterwards
    assert layer.weight.dtype == torch.float64 and layer.weight.requires_grad


def test_output_moments_match_monte_carlo_draws_of_the_same_posterior():
    torch.manual_seed(0)
    pbnn = _converted(nn.Linear(5, 3))
    x = torch.randn(4, 5)
    with torch.no_grad():
        mean, var = pbnn[1].output_moments(x)
        draws = torch.stack([pbnn(x) for _ in range(20000)])
    atol = 4 * float(var.max() / 20000) ** 0.5
    torch.testing.assert_close(draws.mean(0), mean, atol=atol, rtol=0)
    torch.testing.assert_close(draws.var(0), var, rtol=0.05, atol=1e-6)


def _probit_model(task_classes: int = 3, seed: int = 0):
    """Features (Linear, Tanh) and a Bayesian Linear head with large weights and sigma = |mu|
    (the probit's shrinkage then matters)."""
    torch.manual_seed(seed)
    features = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    model = nn.Sequential(features, nn.Linear(8, task_classes))
    with torch.no_grad():
        model[1].weight.mul_(6)
    return bnnconvert.convert(model, bnnconvert.last_layer_masks(model), None, moped_delta=1.0)


def test_probit_logits_predict_and_the_means():
    pbnn = _probit_model()
    x = torch.randn(7, 4)
    bnnconvert.set_predictive(pbnn, "probit", x)
    assert predictive_of(pbnn) == "probit"
    with torch.no_grad():
        mean, var = pbnn[1].output_moments(pbnn[0](x))
        expected = mean / torch.sqrt(1 + math.pi / 8 * var)
        torch.testing.assert_close(pbnn(x), expected)
        torch.testing.assert_close(pbnn(x), pbnn(x))  # no random number drawn
    bnnconvert.calibration.set_temperature(pbnn, 1.7)
    pred = bnnconvert.predict(pbnn, x)
    assert pred.num_samples == 1 and samples_of(pbnn) == 1 and prediction_samples(pbnn) == 1
    torch.testing.assert_close(pred.probs, (expected / 1.7).softmax(1))
    assert torch.all(pred.mutual_info == 0)
    # t = 0: exactly the model at its means
    set_sigma_scale(pbnn, 0.0)
    with torch.no_grad(), mean_weights(pbnn):
        at_means = pbnn(x)
    with torch.no_grad():
        assert torch.equal(pbnn(x), at_means)


def test_probit_per_pixel_for_a_segmentation_head():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    pbnn = bnnconvert.convert(model, bnnconvert.last_layer_masks(model), None, moped_delta=0.3)
    x = torch.randn(2, 1, 6, 6)
    bnnconvert.set_predictive(pbnn, "probit", x)
    pred = bnnconvert.predict(pbnn, x)
    head = pbnn[2]
    with torch.no_grad():
        h = pbnn[1](pbnn[0](x))
        w2 = head.posterior_sigma("weight").square()[:, :, 0, 0]
        var = (
            torch.einsum("nchw,kc->nkhw", h * h, w2)
            + head.posterior_sigma("bias").square()[None, :, None, None]
        )
        logits = torch.nn.functional.conv2d(h, head.weight, head.bias)
    torch.testing.assert_close(pred.probs, (logits / torch.sqrt(1 + math.pi / 8 * var)).softmax(1))


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return 2 * self.head(torch.tanh(self.body(x)))


class _Viewed(_Scaled):
    def forward(self, x):
        return self.head(torch.tanh(self.body(x))).view(len(x), 3, 1).squeeze(2)


def test_set_predictive_refuses_what_the_probit_does_not_fit():
    x = torch.randn(5, 4)
    # two Bayesian layers
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in model.named_parameters()}
    with pytest.raises(ValueError, match=r"exactly one Bayesian layer.*has 2"):
        bnnconvert.set_predictive(bnnconvert.convert(model, masks, None), "probit", x)
    # an operation after the Bayesian layer
    scaled = _Scaled()
    pbnn = bnnconvert.convert(scaled, bnnconvert.last_layer_masks(scaled), None)
    with pytest.raises(ValueError, match="'head' to produce the model's output"):
        bnnconvert.set_predictive(pbnn, "probit", x)
    assert predictive_of(pbnn) == "sample" and not pbnn.head.__dict__.get("bayes_probit")
    # a view of the layer's output is its output
    viewed = _Viewed()
    pbnn = bnnconvert.convert(viewed, bnnconvert.last_layer_masks(viewed), None)
    bnnconvert.set_predictive(pbnn, "probit", x)
    assert predictive_of(pbnn) == "probit"
    # a layer without a closed form (an embedding)
    emb = nn.Sequential(nn.Embedding(5, 3))
    pemb = bnnconvert.convert(emb, {"0.weight": torch.ones(5, 3, dtype=torch.bool)}, None)
    with pytest.raises(ValueError, match=r"Linear or convolution.*0 \(Embedding\)"):
        bnnconvert.set_predictive(pemb, "probit", torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="needs inputs"):
        bnnconvert.set_predictive(_probit_model(), "probit")
    with pytest.raises(ValueError, match="predictive must be one of"):
        bnnconvert.set_predictive(_probit_model(), "laplace", x)
    with pytest.raises(ValueError, match="no Bayesian entry"):
        bnnconvert.set_predictive(nn.Linear(2, 2), "sample")
    wrapped = nn.Sequential(_probit_model())  # a wrapper without the converted model's info
    with pytest.raises(ValueError, match=r"carries no bnnconvert_info.*\.module"):
        bnnconvert.set_predictive(wrapped, "probit", x)


def _synthetic_probit_data(t_true: float, n: int, seed: int):
    """Features, a probit model and labels drawn from its probit predictive at t_true."""
    pbnn = _probit_model(seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g) * 2
    bnnconvert.set_predictive(pbnn, "probit", x[:2])
    set_sigma_scale(pbnn, t_true)
    with torch.no_grad():
        probs = pbnn(x).softmax(1)
    y = torch.multinomial(probs, 1, generator=g).squeeze(1)
    set_sigma_scale(pbnn, 1.0)
    return pbnn, x, y


def test_calibration_with_the_probit_recovers_a_known_scale():
    for t_true in (0.5, 2.0):
        pbnn, x, y = _synthetic_probit_data(t_true, 20000, seed=3)
        val = DataLoader(TensorDataset(x, y), batch_size=5000)
        cal = bnnconvert.calibrate_posterior(
            pbnn, val, predictive="probit", temperature=False, scales=(0, 0.25, 0.5, 1, 2, 4)
        )
        assert cal.predictive == "probit" and cal.samples == 1
        assert cal.scale == t_true, cal  # the grid and its refinement hold t_true
        assert "probit predictive" in str(cal)
        # the calibration's NLL is the probit predictive's NLL at the chosen t
        with torch.no_grad():
            nll = torch.nn.functional.cross_entropy(pbnn(x), y).item()
        assert cal.nll == pytest.approx(nll, rel=1e-5)


def test_calibration_refuses_samples_with_the_probit_and_switches_back():
    pbnn, x, y = _synthetic_probit_data(1.0, 200, seed=0)
    val = [(x, y)]
    with pytest.raises(ValueError, match="draws no sample"):
        bnnconvert.calibrate_posterior(pbnn, val, predictive="probit", samples=10)
    cal = bnnconvert.calibrate_posterior(pbnn, val, predictive="sample", samples=4)
    assert cal.predictive == "sample" and predictive_of(pbnn) == "sample"
    assert not any(layer.__dict__.get("bayes_probit") for _, layer in bayesian_layers(pbnn))
    assert samples_of(pbnn) == 4


def test_saved_and_loaded_probit_model_predicts_the_same(tmp_path):
    pbnn, x, y = _synthetic_probit_data(1.0, 300, seed=1)
    bnnconvert.calibrate_posterior(pbnn, [(x, y)], predictive="probit")
    path = tmp_path / "probit.pt"
    bnnconvert.save(pbnn, path)
    loaded = bnnconvert.load(path, model=bnnconvert.to_deterministic(_probit_model(seed=5)))
    assert predictive_of(loaded) == "probit" and loaded[1].bayes_probit
    torch.testing.assert_close(
        bnnconvert.predict(loaded, x).probs, bnnconvert.predict(pbnn, x).probs
    )


def test_vi_fit_samples_and_restores_the_probit():
    pbnn, x, y = _synthetic_probit_data(1.0, 200, seed=2)
    with pytest.raises(ValueError, match="the ELBO needs Monte Carlo samples"):
        bnnconvert.elbo_loss(pbnn, x, y, beta=1.0)
    data = DataLoader(TensorDataset(x, y), batch_size=50)
    before = pbnn[1].weight_rho.detach().clone()
    report = bnnconvert.fit_posterior(pbnn, data, method="vi", epochs=1)
    assert not torch.equal(pbnn[1].weight_rho.detach(), before)  # sigma was trained
    assert predictive_of(pbnn) == "probit" and report.calibration is None
    report = bnnconvert.fit_posterior(pbnn, data, data, method="laplace")
    assert report.calibration.predictive == "probit"
    summary = bnnconvert.pipeline.posterior_summary(report)
    assert summary["predictive"] == "probit"
