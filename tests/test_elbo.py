"""KL divergence, beta schedules and the ELBO loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence

import bnnconvert
from bnnconvert import BetaSchedule, convert, elbo_loss, kl_loss
from bnnconvert.layers import bayesian_layers


def _reference_kl(model, reduction):
    """torch.distributions over the masked entries, tensor by tensor."""
    total = torch.zeros((), dtype=torch.float64)
    for _, layer in bayesian_layers(model):
        pm, ps = layer.bayes_prior.tolist()
        for name in layer.bayes_names:
            mask = layer.bayes_mask(name)
            mu = getattr(layer, name).detach().double()[mask]
            sigma = F.softplus(layer.bayes_rho(name).detach().double())
            # bayes_rho is ordered like the flat indices of the mask
            kl = kl_divergence(
                Normal(mu, sigma), Normal(torch.full_like(mu, pm), torch.full_like(mu, ps))
            )
            total += kl.mean() if reduction == "mean" else kl.sum()
    return total


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("prior", [(0.0, 1.0), (0.3, 0.2)])
def test_kl_matches_torch_distributions(resnet, reduction, prior):
    pbnn = convert(resnet, "random", 0.01, prior_mu=prior[0], prior_sigma=prior[1], moped_delta=0.5)
    torch.testing.assert_close(
        kl_loss(pbnn, reduction).double(), _reference_kl(pbnn, reduction), rtol=1e-5, atol=1e-6
    )


def test_kl_only_bayesian_entries():
    model = nn.Sequential(nn.Linear(4, 4))
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = True
    pbnn = convert(model, {"0.weight": mask}, rho_init=0.0)
    mu = model[0].weight[0, 0].item()
    sigma = math.log1p(math.e**0)
    expected = math.log(1 / sigma) + (sigma**2 + mu**2) / 2 - 0.5
    assert kl_loss(pbnn, "sum").item() == pytest.approx(expected, rel=1e-5)
    assert kl_loss(pbnn, "mean").item() == pytest.approx(expected, rel=1e-5)


def test_kl_float32_under_bf16_autocast(resnet):
    pbnn = convert(resnet, "random", 0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl = kl_loss(pbnn)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, kl_loss(pbnn))


def test_kl_of_deterministic_model_is_zero():
    assert kl_loss(nn.Linear(3, 2)).item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        kl_loss(convert(nn.Linear(3, 2), "random", 1.0), "avg")


def test_kl_has_gradient_for_rho_and_mu():
    pbnn = convert(nn.Sequential(nn.Linear(3, 2)), "random", 0.5)
    kl_loss(pbnn).backward()
    assert pbnn[0].weight_rho.grad is not None and pbnn[0].weight.grad is not None


def test_beta_schedules_against_formulas():
    assert BetaSchedule.constant(0.01)(7, 3) == 0.01
    lin = BetaSchedule.linear(0.2, 0.01, 5)
    assert [lin(e) for e in range(6)] == pytest.approx(
        [0.2 - 0.19 * e / 4 for e in range(5)] + [0.01]
    )
    up = BetaSchedule.linear(0.01, 0.2, 3)
    assert [up(e) for e in range(3)] == pytest.approx([0.01, 0.105, 0.2])
    cyc = BetaSchedule.cyclical(1.0, epochs=8, cycles=2, ratio=0.5)
    assert [cyc(e) for e in range(8)] == pytest.approx([0, 0.5, 1, 1, 0, 0.5, 1, 1])
    m = 4
    bl = BetaSchedule.blundell(m)
    weights = [bl(0, i) for i in range(m)]
    assert weights == pytest.approx([2 ** (m - i) / (2**m - 1) for i in range(1, m + 1)])
    assert sum(weights) == pytest.approx(1.0)
    assert BetaSchedule.blundell(5000)(0, 0) == pytest.approx(0.5)


def test_beta_parse():
    assert BetaSchedule.parse("0.01")(3) == 0.01
    assert BetaSchedule.parse("linear:0.2:0.01", epochs=3)(1) == pytest.approx(0.105)
    assert BetaSchedule.parse("cyclical:1:2", epochs=4)(1) == pytest.approx(1.0)
    assert BetaSchedule.parse("blundell", num_batches=2)(0, 1) == pytest.approx(1 / 3)
    for bad in ("fast", "linear:0.2", "linear:a:b", "-1"):
        with pytest.raises(ValueError, match="beta"):
            BetaSchedule.parse(bad, epochs=3)


def test_beta_bad_arguments():
    with pytest.raises(ValueError, match="epochs"):
        BetaSchedule.linear(0.1, 0.2, 0)
    with pytest.raises(ValueError, match="beta"):
        BetaSchedule.constant(-1.0)


def test_elbo_loss_equals_mean_nll_plus_beta_kl(resnet):
    pbnn = convert(resnet, "random", 0.01).train()
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))
    torch.manual_seed(3)
    terms = elbo_loss(pbnn, x, y, beta=0.01, samples=3)
    torch.manual_seed(3)
    nll = sum(F.cross_entropy(pbnn(x), y) for _ in range(3)) / 3
    torch.testing.assert_close(terms.nll, nll)
    torch.testing.assert_close(terms.loss, nll + 0.01 * kl_loss(pbnn))
    terms.loss.backward()
    assert pbnn.fc.weight.grad is not None


def test_elbo_training_reduces_loss():
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2))
    pbnn = convert(model, "random", 0.3)
    opt = torch.optim.SGD(pbnn.parameters(), lr=0.1)
    first = None
    for _ in range(60):
        terms = elbo_loss(pbnn, x, y, beta=0.01, samples=2)
        opt.zero_grad()
        terms.loss.backward()
        opt.step()
        first = first if first is not None else terms.loss.item()
    assert terms.loss.item() < first
    with torch.no_grad(), bnnconvert.mean_weights(pbnn):  # it learned the rule y = x0 > 0
        accuracy = (pbnn(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.5 + 0.3
    assert bnnconvert.kl_loss(pbnn).item() > 0
