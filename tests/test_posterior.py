"""fit_posterior, calibrate_posterior, select_r_bayes and the Laplace evidence, against
closed forms and independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnnconvert
from bnnconvert.calibration import MIN_NOISY_TEMPERATURE
from bnnconvert.cases import predict_cases
from bnnconvert.curvature import (
    diagonal_ggn,
    fit_prior_precision,
    laplace_sigma,
    log_marginal_likelihood,
)
from bnnconvert.layers import bayesian_layers, convertible_parameters, set_sigma_scale, sigma_scale
from bnnconvert.posterior import VI_SETTINGS, fit_temperature, predictive_nll
from bnnconvert.predict import DEFAULT_SAMPLES, mean_weights, prediction_samples, samples_of
from bnnconvert.training import evaluate_model


# ------------------------------------------------------------------ the evidence
def _orthogonal_design(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    return q * torch.linspace(1.0, 3.0, d, dtype=torch.float64)  # X^T X diagonal


def test_marginal_likelihood_matches_the_linear_gaussian_closed_form():
    """Linear regression y = X w + noise with X^T X diagonal: the diagonal Laplace is exact,
    so log Z equals log N(y; 0, s^2 I + X X^T / lambda), with H from diagonal_ggn."""
    n, d, noise, lam = 40, 5, 0.5, 2.0
    x = _orthogonal_design(n, d)
    g = torch.Generator().manual_seed(1)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + noise * torch.randn(
        n, generator=g, dtype=torch.float64
    )
    w_map = torch.linalg.solve(x.T @ x / noise**2 + lam * torch.eye(d, dtype=torch.float64),
                               x.T @ y / noise**2)  # fmt: skip
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_map[None])
    curv = diagonal_ggn(model, [x], likelihood="gaussian", method="exact", noise_std=noise)
    h = curv.diagonal["weight"].reshape(-1)
    torch.testing.assert_close(h.double(), (x.square().sum(0) / noise**2), rtol=1e-5, atol=0)
    log_lik = torch.distributions.Normal(x @ w_map, noise).log_prob(y).sum()
    ours = log_marginal_likelihood(h, w_map, lam, float(log_lik))
    cov = noise**2 * torch.eye(n, dtype=torch.float64) + x @ x.T / lam
    exact = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov)
    assert ours == pytest.approx(float(exact.log_prob(y)), rel=1e-5)


def test_prior_precision_maximises_the_evidence():
    g = torch.Generator().manual_seed(0)
    h = torch.rand(200, generator=g) * 50
    theta = torch.randn(200, generator=g) * 0.2
    lam = fit_prior_precision(h, theta)
    grid = torch.logspace(-3, 4, 2000).tolist()
    best = max(grid, key=lambda v: log_marginal_likelihood(h, theta, v))
    assert lam == pytest.approx(best, rel=0.01)
    for other in (lam * 0.9, lam * 1.1):
        assert log_marginal_likelihood(h, theta, lam) > log_marginal_likelihood(h, theta, other)


def test_prior_precision_refuses_entries_without_curvature():
    with pytest.raises(ValueError, match="infinitely wide prior"):
        fit_prior_precision(torch.zeros(10), torch.ones(10))
    with pytest.raises(ValueError, match="positive"):
        laplace_sigma(torch.ones(3), 0.0)


# ------------------------------------------------------------------ fixtures
def _classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    w = torch.randn(6, 3, generator=g)
    y = torch.distributions.Categorical(logits=2 * x @ w).sample()
    return x, y


def _loader(x, y, batch=60):
    return DataLoader(TensorDataset(x, y), batch_size=batch)


@pytest.fixture
def trained():
    model = _classifier()
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def _half(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    params = convertible_parameters(model)
    return {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in params.items()}


# ------------------------------------------------------------------ laplace
def test_laplace_sets_sigma_from_the_curvature_and_the_evidence(trained):
    model, x, y = trained
    pbnn = bnnconvert.convert(model, _half(model), None)
    report = bnnconvert.fit_posterior(pbnn, _loader(x, y), method="laplace", curvature="exact")
    ref = diagonal_ggn(model, [x], method="exact").diagonal  # independent pass, same model
    hs, thetas, sigmas = [], [], []
    for name, layer in bayesian_layers(pbnn):
        for t in layer.bayes_names:
            idx = layer.bayes_index(t)
            hs.append(ref[f"{name}.{t}"].reshape(-1)[idx])
            thetas.append(layer._parameters[t].detach().reshape(-1)[idx])
            sigmas.append(F.softplus(layer.bayes_rho(t)).detach())
    h, theta = torch.cat(hs), torch.cat(thetas)
    lam = fit_prior_precision(h, theta)
    assert report.prior_precision == pytest.approx(lam, rel=1e-4)
    torch.testing.assert_close(torch.cat(sigmas), (h + lam).rsqrt(), rtol=1e-4, atol=1e-7)
    assert report.num_bayesian == h.numel() and report.epochs == 0
    assert set(report.sigma_quantiles) == {"min", "q05", "median", "q95", "max"}
    assert report.calibration is None and "curvature" in report.seconds
    for p, q in zip(
        model.parameters(), (pbnn.get_parameter(n) for n, _ in model.named_parameters())
    ):
        assert torch.equal(p, q)  # the means are the checkpoint's


def test_laplace_with_a_given_prior_precision(trained):
    model, x, y = trained
    pbnn = bnnconvert.convert(model, _half(model), None)
    report = bnnconvert.fit_posterior(pbnn, _loader(x, y), prior_precision=50.0)
    assert report.prior_precision == 50.0
    assert report.sigma_quantiles["max"] <= 50**-0.5 + 1e-6


# ------------------------------------------------------------------ calibration
def test_predictive_nll_and_temperature_against_direct_computations():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (30,), generator=g)
    out = torch.randn(4, 30, 5, generator=g) * 3 + 4 * F.one_hot(y, 5)  # overconfident
    mixture = torch.softmax(out / 1.7, -1).mean(0)
    direct = -mixture.log().gather(1, y[:, None]).mean()
    assert float(predictive_nll(out, y, temperature=1.7)) == pytest.approx(float(direct), rel=1e-6)
    t = fit_temperature(out[:1], y)
    grid = torch.linspace(0.2, 10, 5000)
    best = min(grid.tolist(), key=lambda v: F.cross_entropy(out[0] / v, y).item())
    assert t == pytest.approx(best, rel=0.01)
    wrong = 20 * F.one_hot((y + 1) % 5, 5).float()[None]  # confidently wrong: T -> infinity
    with pytest.warns(UserWarning, match="bound"):
        assert fit_temperature(wrong, y) == pytest.approx(100.0)
    labels = (torch.rand(30, 5, generator=g) < 0.5).float()
    p = torch.sigmoid(out / 2).mean(0)
    bern = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    assert float(predictive_nll(out, labels, activation="sigmoid", temperature=2.0)) == (
        pytest.approx(float(bern), rel=1e-6)
    )


def test_calibration_recovers_a_known_scale():
    """Data drawn from the Bayesian predictive at t0 = 0.5: its NLL is lowest at t0."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    pbnn = bnnconvert.convert(model, {"weight": torch.ones(3, 4, dtype=torch.bool)}, None)
    layer = next(m for _, m in bayesian_layers(pbnn))
    with torch.no_grad():
        layer.weight.mul_(3.0)
        layer.weight_rho.fill_(math.log(math.expm1(2.0)))  # sigma = 2
    x = torch.randn(6000, 4)
    with torch.no_grad():
        w = layer.weight + 0.5 * 2.0 * torch.randn(6000, 3, 4)  # one draw per item, t0 = 0.5
        y = torch.distributions.Categorical(
            logits=torch.einsum("nci,ni->nc", w, x) + layer.bias
        ).sample()
    scales = [0.0, 0.25, 0.35, 0.5, 0.7, 1.0, 1.4]
    cal = bnnconvert.calibrate_posterior(
        pbnn, _loader(x, y, 2000), samples=64, scales=scales, temperature=False, refine=False
    )
    assert cal.scale == 0.5
    assert sigma_scale(pbnn) == 0.5 and cal.temperature == 1.0
    assert [row[0] for row in cal.curve] == scales
    assert cal.nll == min(row[2] for row in cal.curve)


def test_temperature_with_noise_stays_above_its_lower_bound(trained):
    """fit_temperature's lower bound is exact (the unbounded optimum lies below it, found by
    a grid); calibrate_posterior fits T >= MIN_NOISY_TEMPERATURE wherever t > 0 and lets
    t = 0 (temperature scaling) go lower."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=g)
    logits = 0.3 * (4 * F.one_hot(y, 4).float() + torch.randn(400, 4, generator=g))
    grid = torch.linspace(0.02, 2.0, 4000)
    best = min(grid.tolist(), key=lambda v: F.cross_entropy(logits / v, y).item())
    assert best < 0.5  # underconfident logits: the optimum sharpens them
    assert fit_temperature(logits[None], y) == pytest.approx(best, rel=0.01)
    assert fit_temperature(logits[None], y, min_temperature=0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="min_temperature"):
        fit_temperature(logits[None], y, min_temperature=0.0)

    model, x, yy = trained
    pbnn = bnnconvert.convert(model, _half(model), None)
    with torch.no_grad():  # shrink the logits: the checkpoint becomes underconfident
        for _, layer in bayesian_layers(pbnn):
            layer.weight.mul_(0.1)
            layer.bias.mul_(0.1)
    cal = bnnconvert.calibrate_posterior(pbnn, _loader(x, yy), samples=8, refine=False)
    assert cal.curve[0][0] == 0 and cal.curve[0][1] < MIN_NOISY_TEMPERATURE
    assert all(row[1] >= MIN_NOISY_TEMPERATURE - 1e-9 for row in cal.curve if row[0] > 0)


def test_scale_zero_reproduces_mean_weights_exactly(trained):
    model, x, _ = trained
    pbnn = bnnconvert.convert(model, _half(model), None, rho_init=0.0)
    set_sigma_scale(pbnn, 0.0)
    with torch.no_grad():
        sampled = torch.stack([pbnn(x) for _ in range(3)])
        with mean_weights(pbnn):
            mean = pbnn(x)
        original = model(x)
    for out in sampled:
        assert torch.equal(out, mean)
    assert torch.equal(mean, original)


def test_calibrated_model_is_saved_and_loaded_with_its_scale_sigma_and_temperature(
    trained, tmp_path
):
    model, x, y = trained
    pbnn = bnnconvert.convert(model, _half(model), None)
    bnnconvert.fit_posterior(pbnn, _loader(x, y), _loader(x[:120], y[:120]), samples=4)
    set_sigma_scale(pbnn, 0.7)  # a value no default grid holds
    pbnn.bnnconvert_info["temperature"] = 1.3
    bnnconvert.save(pbnn, tmp_path / "m.pt", arch="tests.test_posterior:_classifier")
    loaded = bnnconvert.load(tmp_path / "m.pt")
    assert sigma_scale(loaded) == pytest.approx(0.7)
    assert loaded.bnnconvert_info["temperature"] == 1.3
    for (_, a), (_, b) in zip(bayesian_layers(pbnn), bayesian_layers(loaded)):
        for t in a.bayes_names:
            assert torch.equal(a.bayes_rho(t), b.bayes_rho(t))
    torch.manual_seed(0)
    p1 = bnnconvert.predict(pbnn, x, 4).probs
    torch.manual_seed(0)
    p2 = bnnconvert.predict(loaded, x, 4).probs
    torch.testing.assert_close(p1, p2)


def test_predictions_default_to_the_calibrated_number_of_samples(trained, tmp_path):
    """calibrate_posterior stores its S; predict, evaluate_model and predict_cases draw that
    many by default (t and T were chosen for it), also after save/load; an explicit S
    wins; an uncalibrated model draws 5 and a deterministic one runs once."""
    model, x, y = trained
    pbnn = bnnconvert.convert(model, _half(model), None)
    assert samples_of(pbnn) == DEFAULT_SAMPLES == 5
    assert bnnconvert.predict(pbnn, x[:10]).samples.shape[0] == 5
    bnnconvert.calibrate_posterior(pbnn, _loader(x[:120], y[:120]), samples=7, refine=False)
    assert pbnn.bnnconvert_info["samples"] == 7
    assert bnnconvert.predict(pbnn, x[:10]).samples.shape[0] == 7
    assert bnnconvert.predict(pbnn, x[:10], 3).samples.shape[0] == 3
    torch.manual_seed(0)
    by_default, _ = evaluate_model(pbnn, _loader(x[:30], y[:30]))
    torch.manual_seed(0)
    explicit = bnnconvert.predict(pbnn, _loader(x[:30], y[:30]), 7, keep_samples=False)
    torch.testing.assert_close(by_default.probs, explicit.probs)
    report = predict_cases(pbnn, _loader(x[:30], y[:30]), tmp_path / "cases", seed=0)
    assert report.samples == 7
    bnnconvert.save(pbnn, tmp_path / "m.pt", arch="tests.test_posterior:_classifier")
    assert samples_of(bnnconvert.load(tmp_path / "m.pt")) == 7
    assert prediction_samples(model) == 1 and prediction_samples(pbnn, 2) == 2


def test_predict_applies_the_stored_temperature(trained):
    model, x, _ = trained
    pbnn = bnnconvert.convert(model, _half(model), None)
    pbnn.bnnconvert_info["temperature"] = 2.0
    torch.manual_seed(0)
    probs = bnnconvert.predict(pbnn, x, 3).probs
    torch.manual_seed(0)
    raw = bnnconvert.predict(pbnn, x, 3, activation="none").samples
    torch.testing.assert_close(probs, torch.softmax(raw / 2.0, -1).mean(0))


def test_old_checkpoints_without_a_scale_load_with_scale_one(trained):
    model, _, _ = trained
    pbnn = bnnconvert.convert(model, _half(model), None)
    state = {k: v for k, v in pbnn.state_dict().items() if not k.endswith("bayes_scale")}
    set_sigma_scale(pbnn, 0.3)
    pbnn.load_state_dict(state)
    assert sigma_scale(pbnn) == 1.0


# ------------------------------------------------------------------ vi and paper
def test_vi_learns_sigma_and_keeps_the_checkpoint(trained):
    model, x, y = trained
    model.insert(1, nn.BatchNorm1d(16))  # statistics that train mode would change
    model.eval()
    pbnn = bnnconvert.convert(model, _half(model), None, moped_delta=0.01)
    before = {k: v.clone() for k, v in pbnn.state_dict().items()}
    sigma0 = _sigmas(pbnn)
    settings = VI_SETTINGS.replace(rho_lr=0.1)
    report = bnnconvert.fit_posterior(pbnn, _loader(x, y), method="vi", epochs=3, settings=settings)
    sigma1 = _sigmas(pbnn)
    assert (sigma1.median() / sigma0.median()) > 2  # Adam on rho moves a small sigma
    assert report.epochs == 3 and report.prior_precision > 0
    for k, v in pbnn.state_dict().items():
        if not (k.endswith("_rho") or k.endswith("bayes_prior")):
            assert torch.equal(v, before[k]), k  # means and BatchNorm statistics unchanged


def _sigmas(model: nn.Module) -> torch.Tensor:
    return torch.cat(
        [
            F.softplus(layer.bayes_rho(t)).detach()
            for _, layer in bayesian_layers(model)
            for t in layer.bayes_names
        ]
    )


def test_paper_method_trains_the_means(trained):
    model, x, y = trained
    pbnn = bnnconvert.convert(model, _half(model), None)
    w0 = pbnn[0].weight.detach().clone()
    report = bnnconvert.fit_posterior(pbnn, _loader(x, y), method="paper", epochs=1)
    assert report.epochs == 1 and report.prior_precision is None
    assert not torch.equal(pbnn[0].weight, w0)


# ------------------------------------------------------------------ r_bayes on validation
def test_select_r_bayes_applies_its_rule(trained):
    model, x, y = trained
    sal = bnnconvert.compute_saliency(model, _loader(x, y))
    sweep = bnnconvert.select_r_bayes(
        model, sal, _loader(x, y), _loader(x[:120], y[:120]), grid=(0.1, 0.3, 0.6), samples=4
    )
    assert [row["r_bayes"] for row in sweep.rows] == [0.1, 0.3, 0.6]
    best = min(row["val_nll"] for row in sweep.rows)
    eligible = [row["r_bayes"] for row in sweep.rows if row["val_nll"] <= best * 1.01]
    assert sweep.r_bayes == min(eligible)
    assert "chosen" in str(sweep)
    assert not any(True for _ in bayesian_layers(model))  # the model is left as it was


# ------------------------------------------------------------------ bad input
def test_bad_arguments(trained):
    model, x, y = trained
    data = _loader(x, y)
    with pytest.raises(ValueError, match="no Bayesian entry"):
        bnnconvert.fit_posterior(model, data)
    pbnn = bnnconvert.convert(model, _half(model), None)
    with pytest.raises(ValueError, match="method"):
        bnnconvert.fit_posterior(pbnn, data, method="mcmc")
    with pytest.raises(ValueError, match="prior_precision"):
        bnnconvert.fit_posterior(pbnn, data, prior_precision="evidence")
    with pytest.raises(ValueError, match="positive"):
        bnnconvert.fit_posterior(pbnn, data, prior_precision=-1.0)
    with pytest.raises(ValueError, match="scales"):
        bnnconvert.calibrate_posterior(pbnn, data, scales=[])
    with pytest.raises(ValueError, match=">= 0"):
        bnnconvert.calibrate_posterior(pbnn, data, scales=[-1.0])
    with pytest.raises(ValueError, match=r"\(input, target\)"):
        bnnconvert.calibrate_posterior(pbnn, [x], scales=[0.0])
    with pytest.raises(ValueError, match="scale"):
        set_sigma_scale(pbnn, float("nan"))


def test_convert_checkpoint_fits_the_posterior_and_refuses_a_lone_val_data(trained):
    model, x, y = trained
    data, val = _loader(x, y), _loader(x[:120], y[:120])
    masks = bnnconvert.last_layer_masks(model)
    pbnn = bnnconvert.convert_checkpoint(
        model, data, None, saliency=masks, posterior="laplace", val_data=val,
        posterior_options={"samples": 4},
    )  # fmt: skip
    info = pbnn.bnnconvert_info["posterior"]
    assert info["method"] == "laplace" and info["num_bayesian"] == 16 * 3 + 3
    assert info["scale"] == sigma_scale(pbnn) and "calibration_curve" in info
    with pytest.raises(ValueError, match="val_data calibrates a posterior"):
        bnnconvert.convert_checkpoint(model, data, None, saliency=masks, val_data=val)
    with pytest.raises(ValueError, match="needs data"):
        bnnconvert.convert_checkpoint(model, None, None, saliency=masks, posterior="laplace")
