"""The Kronecker-factored Laplace posterior of a fully Bayesian Linear layer
(fit_posterior(..., covariance="kron")), against independent computations: the factors
from per-example Jacobians (torch.func), the dense covariance (torch.kron and a matrix
inverse), the marginal likelihood's log-determinant (torch.linalg.slogdet), the empirical
covariance of many draws."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

import bnnconvert
from bnnconvert.curvature import kronecker_ggn
from bnnconvert.layers import mean_weights, set_sigma_scale
from bnnconvert.posterior import predictive_nll


def _net(seed: int = 0, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, classes))


def _data(seed: int = 0, n: int = 48, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y, [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def _fitted(seed: int = 0, **options):
    net = _net(seed)
    x, y, data = _data(seed)
    pbnn = bnnconvert.convert(net, bnnconvert.last_layer_masks(net), None)
    report = bnnconvert.fit_posterior(pbnn, data, covariance="kron", **options)
    return pbnn, report, x, y, data


def _hidden(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model[1](model[0](x))


def _dense_precision(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """B kron A + lambda I over vec(W~), W~ = [W, b] row-major (C x P)."""
    return torch.kron(b, a) + lam * torch.eye(a.shape[0] * b.shape[0], dtype=torch.float64)


def _reference_factors(model: nn.Module, x: torch.Tensor, layer: str, likelihood: str):
    """A = mean phi~ phi~^T and B = sum_n G_n^T Lambda_n G_n, with G_n the Jacobian of the
    model's logits in the layer's output (torch.func, one example at a time) and Lambda_n
    diag(p) - p p^T (softmax) or diag(p (1 - p)) (a sigmoid per output)."""
    index = int(layer)
    head = model[index + 1 :]
    with torch.no_grad():
        inp = model[:index](x).double()
        out = model[index](model[:index](x))
        logits = model(x).double()
    phi = torch.cat([inp, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    a = phi.T @ phi / len(x)
    jac = vmap(jacrev(lambda o: head(o.unsqueeze(0))[0]))(out).double()  # (N, C, out)
    if likelihood == "categorical":
        p = logits.softmax(1)
        hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        hess = torch.diag_embed(logits.sigmoid() * (1 - logits.sigmoid()))
    b = torch.einsum("nco,ncd,nde->oe", jac, hess, jac)
    return a, b


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
@pytest.mark.parametrize("layer", ["2", "0"])
def test_kronecker_factors_equal_a_per_example_jacobian_computation(layer, likelihood):
    """kronecker_ggn (exact) of the last layer and of a hidden layer equals A and B built
    from torch.func Jacobians of the logits in the layer's output, for a softmax and for a
    sigmoid per output (multi-label)."""
    net = _net()
    x, _, data = _data()
    curv = kronecker_ggn(net, data, [layer], likelihood=likelihood, method="exact")
    a_ref, b_ref = _reference_factors(net, x, layer, likelihood)
    a, b = curv.factors[layer]
    assert curv.num_data == len(x)
    torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, b_ref, rtol=1e-4, atol=1e-6)


def test_kronecker_mc_factor_is_unbiased():
    """The Monte Carlo B (sampled targets) approaches the exact B with many draws."""
    net = _net()
    _, _, data = _data()
    exact = kronecker_ggn(net, data, ["2"], method="exact").factors["2"][1]
    mc = kronecker_ggn(net, data, ["2"], method="mc", mc_samples=4000, seed=3).factors["2"][1]
    assert (mc - exact).abs().max() < 0.05 * exact.abs().max()


def test_output_moments_and_sigma_equal_the_dense_covariance():
    """The probit's variance phi~^T Sigma_kk phi~ and the marginal sigma (rho) equal those of
    the dense covariance (B kron A + lambda I)^-1, at t = 1 and t = 2."""
    pbnn, report, x, _, data = _fitted()
    layer = pbnn[2]
    a, b = kronecker_ggn(pbnn, data, ["2"]).factors["2"]
    sigma = torch.linalg.inv(_dense_precision(a, b, report.prior_precision)).view(4, 8, 4, 8)
    h = _hidden(pbnn, x)
    phi = torch.cat([h, torch.ones(len(h), 1)], 1).double()
    for t in (1.0, 2.0):
        set_sigma_scale(pbnn, t)
        mean, var = layer.output_moments(h)
        ref = torch.stack([((phi @ sigma[k, :, k, :]) * phi).sum(1) for k in range(4)], 1)
        torch.testing.assert_close(var.double(), t**2 * ref, rtol=1e-4, atol=1e-7)
        with mean_weights(pbnn):
            torch.testing.assert_close(mean, pbnn(x))
    marginal = torch.stack([sigma[k, :, k, :].diagonal() for k in range(4)])
    torch.testing.assert_close(
        layer.posterior_sigma("weight").double(), t * marginal[:, :7].sqrt(), rtol=1e-4, atol=0
    )
    torch.testing.assert_close(
        layer.posterior_sigma("bias").double(), t * marginal[:, 7].sqrt(), rtol=1e-4, atol=0
    )


def test_draws_have_the_dense_covariance():
    """20,000 joint draws of (weight, bias) have mean mu and the dense covariance."""
    pbnn, report, _, _, data = _fitted()
    layer = pbnn[2]
    a, b = kronecker_ggn(pbnn, data, ["2"]).factors["2"]
    sigma = torch.linalg.inv(_dense_precision(a, b, report.prior_precision))
    torch.manual_seed(0)
    draws = []
    for _ in range(20000):
        weight, bias = layer.kronecker_sample()
        draws.append(torch.cat([weight, bias[:, None]], 1).reshape(-1))
    samples = torch.stack(draws).double()
    mu = torch.cat([layer.weight, layer.bias[:, None]], 1).reshape(-1).double().detach()
    scale = sigma.diagonal().sqrt().max()
    assert (samples.mean(0) - mu).abs().max() < 5 * scale / math.sqrt(20000)
    assert (torch.cov(samples.T) - sigma).abs().max() < 0.05 * sigma.abs().max()


def test_monte_carlo_forward_matches_the_closed_form():
    """The sampling forward of the converted model draws outputs whose variance is the
    closed form of output_moments (the forward uses the joint draw)."""
    pbnn, _, x, _, _ = _fitted()
    h = _hidden(pbnn, x[:3])
    _, var = pbnn[2].output_moments(h)
    torch.manual_seed(1)
    with torch.no_grad():
        outs = torch.stack([pbnn(x[:3]) for _ in range(20000)])
    torch.testing.assert_close(outs.var(0), var, rtol=0.05, atol=1e-4)


def test_prior_precision_maximises_the_dense_marginal_likelihood():
    """lambda by the evidence: the dense log-determinant's objective is lower at lambda
    times and divided by 1.05, and the report's value is that objective."""
    pbnn, report, _, _, data = _fitted()
    a, b = kronecker_ggn(pbnn, data, ["2"]).factors["2"]
    theta = torch.cat([pbnn[2].weight, pbnn[2].bias[:, None]], 1).reshape(-1).double().detach()
    k = theta.numel()

    def evidence(lam: float) -> float:
        logdet = torch.linalg.slogdet(_dense_precision(a, b, lam))[1]
        return float(-lam / 2 * theta.square().sum() + k / 2 * math.log(lam) - logdet / 2)

    lam = report.prior_precision
    assert evidence(lam) > evidence(lam * 1.05) and evidence(lam) > evidence(lam / 1.05)
    assert report.log_marginal_likelihood == pytest.approx(evidence(lam), rel=1e-6)


def _trained(seed: int = 0):
    """The tiny network fitted (200 Adam steps) to labels of a random linear rule, its last
    layer converted and given a Kronecker posterior: (model, x, y, batches)."""
    net = _net(seed)
    x, _, data = _data(seed, n=96)
    y = (x @ torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))).argmax(1)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    data = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]
    pbnn = bnnconvert.convert(net, bnnconvert.last_layer_masks(net), None)
    bnnconvert.fit_posterior(pbnn, data, covariance="kron")
    return pbnn, x, y, data


def test_scale_zero_and_probit_calibration():
    """t = 0 predicts exactly the model at its means; the probit calibration of a Kronecker
    posterior tries t = 0 (temperature scaling) and keeps an NLL no higher than there."""
    pbnn, x, _, data = _trained()
    set_sigma_scale(pbnn, 0.0)
    bnnconvert.set_predictive(pbnn, "probit", x)
    with mean_weights(pbnn):
        ref = pbnn(x)
    torch.testing.assert_close(pbnn(x), ref, rtol=0, atol=0)
    cal = bnnconvert.calibrate_posterior(pbnn, data, predictive="probit")
    at_zero = {t: nll for t, _, nll in cal.curve}[0.0]
    assert cal.nll <= at_zero
    logits = torch.cat([pbnn(xb) for xb, _ in data])[None]
    y = torch.cat([yb for _, yb in data])
    nll = float(predictive_nll(logits.detach(), y, temperature=cal.temperature))
    torch.testing.assert_close(nll, cal.nll, rtol=1e-5, atol=0)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_saved_and_loaded_kronecker_model_predicts_the_same(tmp_path, fmt):
    """The factors, t and the predictive are saved and loaded (both formats): the loaded
    model's probit logits equal the original's; to_deterministic drops the factors."""
    pbnn, x, _, data = _trained()
    bnnconvert.calibrate_posterior(pbnn, data, predictive="probit")
    path = tmp_path / "kron.pt"
    bnnconvert.save(pbnn, path, format=fmt)
    loaded = bnnconvert.load(path, model=_net(5))
    assert loaded[2].is_kronecker
    torch.testing.assert_close(loaded(x), pbnn(x), rtol=0, atol=0)
    plain = bnnconvert.to_deterministic(loaded)
    assert not any(k.startswith("2.kron") for k in plain.state_dict())
    with mean_weights(pbnn):
        torch.testing.assert_close(plain(x), pbnn(x))


def test_kronecker_refusals():
    """A partial selection, a convolution, method="vi", ELBO training and inputs with extra
    dimensions are refused with errors naming the fix."""
    net = _net()
    x, y, data = _data()
    partial = bnnconvert.convert(net, {"2.weight": torch.rand(4, 7) < 0.5}, None)
    with pytest.raises(ValueError, match=r"not every entry of its weight is Bayesian.*last-layer"):
        bnnconvert.fit_posterior(partial, data, covariance="kron")
    no_bias = bnnconvert.convert(net, {"2.weight": torch.ones(4, 7, dtype=torch.bool)}, None)
    with pytest.raises(ValueError, match="bias is Bayesian"):
        bnnconvert.fit_posterior(no_bias, data, covariance="kron")
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    pconv = bnnconvert.convert(conv, bnnconvert.last_layer_masks(conv), None)
    images = [(torch.randn(4, 1, 5, 5), torch.zeros(4, 3, 3, dtype=torch.long))]
    with pytest.raises(ValueError, match="not a Linear layer or a 1x1"):
        bnnconvert.fit_posterior(pconv, images, covariance="kron", task="segmentation")
    whole = bnnconvert.convert(net, bnnconvert.last_layer_masks(net), None)
    with pytest.raises(ValueError, match="needs method='laplace'"):
        bnnconvert.fit_posterior(whole, data, method="vi", covariance="kron")
    with pytest.raises(ValueError, match="covariance must be one of"):
        bnnconvert.fit_posterior(whole, data, covariance="full")
    bnnconvert.fit_posterior(whole, data, covariance="kron")
    with pytest.raises(ValueError, match="Kronecker-factored posterior"):
        bnnconvert.elbo_loss(whole, x, y, beta=1.0)
    seq = nn.Sequential(nn.Linear(5, 3))
    pseq = bnnconvert.convert(seq, bnnconvert.last_layer_masks(seq), None)
    tokens = [(torch.randn(2, 6, 5), torch.zeros(2, 6, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"\(N, in_features\) inputs"):
        bnnconvert.fit_posterior(pseq, tokens, covariance="kron", curvature="mc")


def test_flops_of_the_draw_and_the_probit_equal_an_analytic_count():
    """fvcore's count (fma convention) of S sampling forwards and of one probit forward of
    a Kronecker last layer (C = 4 classes, P = 7 + 1 inputs, N = 5 items), op by op: a draw
    is Q_B (t sqrt(V) eps) Q_A^T + mu (two products, five elementwise ops per entry),
    charged to the layer's Bayesian sampling; the probit variance is three products."""
    pbnn, _, x, _, _ = _fitted()
    n, c, p, s = 5, 4, 8, 3
    body = n * 5 * 7 + n * 7 * c + n * 7  # Linear(5, 7), Tanh, Linear(7, 4) at the mean
    draw = c * c * p + c * p * p + 5 * c * p
    cost = bnnconvert.count_flops(pbnn, x[:n], samples=s)
    assert cost.total == s * (body + draw) and cost.bayes_overhead == s * draw
    assert cost.bayes_by_operator["matmul"] == s * (c * c * p + c * p * p)
    bnnconvert.set_predictive(pbnn, "probit", x)
    probit = bnnconvert.count_flops(pbnn, x[:n])
    variance = n * p * p + n * p * c + n * c * c  # products: Q_A^T phi, (.)^2 V^T, (.) (Q_B^2)^T
    elementwise = (n * p + 1 + c * c) + c * p + 2 * n * c + n * c + n * c
    assert probit.by_operator["matmul"] == variance
    assert probit.total == body + variance + elementwise and probit.unsupported_ops == {}


def _segmenter(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 1))


def test_one_by_one_convolution_head_every_position_a_row():
    """A segmentation head (1x1 convolution): A is the mean over every position of
    phi~ phi~^T, B the sum over positions of diag(p) - p p^T (Monte Carlo with many targets
    against that closed form); the fitted head's per-pixel output variance equals the dense
    covariance's, and its draws have the weight's shape."""
    net = _segmenter()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 2, 5, 5, generator=g), torch.randint(0, 4, (8, 5, 5), generator=g)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    with torch.no_grad():
        h = net[1](net[0](x))
        p = net(x).softmax(1).movedim(1, -1).reshape(-1, 4).double()
    phi = torch.cat([h.movedim(1, -1).reshape(-1, 3), torch.ones(200, 1)], 1).double()
    a_ref = phi.T @ phi / 200
    b_ref = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).sum(0)
    curv = kronecker_ggn(net, data, ["2"], method="mc", mc_samples=3000, seed=1)
    a, b = curv.factors["2"]
    torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-6)
    assert (b - b_ref).abs().max() < 0.03 * b_ref.abs().max()

    pbnn = bnnconvert.convert(net, bnnconvert.last_layer_masks(net), None)
    report = bnnconvert.fit_posterior(pbnn, data, task="segmentation", covariance="kron")
    a, b = kronecker_ggn(pbnn, data, ["2"], method="mc", seed=0).factors["2"]
    sigma = torch.linalg.inv(_dense_precision(a, b, report.prior_precision)).view(4, 4, 4, 4)
    set_sigma_scale(pbnn, 1.5)
    mean, var = pbnn[2].output_moments(h)
    ref = torch.stack([((phi @ sigma[k, :, k, :]) * phi).sum(1) for k in range(4)], 1)
    ref = ref.view(8, 5, 5, 4).movedim(-1, 1)
    torch.testing.assert_close(var.double(), 1.5**2 * ref, rtol=1e-4, atol=1e-8)
    with mean_weights(pbnn):
        torch.testing.assert_close(mean, pbnn(x))
    weight, bias = pbnn[2].kronecker_sample()
    assert weight.shape == (4, 3, 1, 1) and bias.shape == (4,)
    bnnconvert.set_predictive(pbnn, "probit", x)
    assert pbnn(x).shape == (8, 4, 5, 5)


def test_kronecker_refuses_a_spatial_convolution():
    """A 3x3 convolution is not pointwise: refused, naming the layers that fit."""
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1))
    pbnn = bnnconvert.convert(net, bnnconvert.last_layer_masks(net), None)
    data = [(torch.randn(2, 2, 5, 5), torch.zeros(2, 5, 5, dtype=torch.long))]
    with pytest.raises(ValueError, match="1x1 convolution"):
        bnnconvert.fit_posterior(pbnn, data, task="segmentation", covariance="kron")


def test_kronecker_ggn_and_loading_refuse_what_they_cannot_handle(tmp_path):
    """kronecker_ggn: an unknown name, a strided 1x1 convolution, an empty list and a layer
    called twice per forward are refused; loading a file whose Kronecker buffers are
    incomplete says the file is damaged."""
    net = _net()
    _, _, data = _data()
    with pytest.raises(ValueError, match="'head' is no module"):
        kronecker_ggn(net, data, ["head"])
    with pytest.raises(ValueError, match="layers is empty"):
        kronecker_ggn(net, data, [])
    strided = nn.Sequential(nn.Conv2d(2, 3, 1, stride=2))
    with pytest.raises(ValueError, match=r"is a Conv2d; .*1x1 convolutions"):
        kronecker_ggn(strided, [(torch.randn(2, 2, 4, 4), None)], ["0"])

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    with pytest.raises(ValueError, match="called once per forward"):
        kronecker_ggn(Twice(), [(torch.randn(3, 4), None)], ["fc"])

    pbnn, _, _, _, _ = _fitted()
    path = tmp_path / "kron.pt"
    bnnconvert.save(pbnn, path)
    payload = torch.load(path, weights_only=False)
    del payload["state_dict"]["2.kron_qa"]
    torch.save(payload, path)
    with pytest.raises(ValueError, match="lacks \\['kron_qa'\\]; the file is damaged"):
        bnnconvert.load(path, model=_net(5))
