"""The GGN diagonal against per-example Jacobians computed with torch.func."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from bnnconvert.convert import convert
from bnnconvert.curvature import diagonal_ggn
from bnnconvert.layers import convertible_parameters


class ManyLayers(nn.Module):
    """Every layer geometry the fast path handles: padding modes, 'same', dilation,
    groups, transposed with output_padding, Conv1d, Linear on a sequence, bias-free."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.c1d = nn.Conv1d(6, 3, 2, padding=1, padding_mode="circular")
        self.seq = nn.Linear(3, 5)
        self.fc = nn.Linear(5, classes)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu_(self.bn(self.c2(h)))
        h = self.up(h).flatten(2)[:, :, :20]  # (N, 6, 20)
        h = torch.relu(self.c1d(h)).transpose(1, 2)  # (N, 21, 3)
        return self.fc(torch.tanh(self.seq(h)).mean(1))


def _reference(model, x, likelihood="categorical", noise_std=1.0):
    """sum_n J_n^T Lambda_n J_n, diagonal, from full per-example Jacobians (torch.func)."""
    params = convertible_parameters(model)
    theta = {n: p.detach() for n, p in params.items()}
    ref = {n: torch.zeros_like(p) for n, p in theta.items()}
    for xi in x:
        jac = jacrev(lambda th, xi=xi: functional_call(model, th, (xi[None],))[0])(theta)
        with torch.no_grad():
            out = model(xi[None])[0]
        if likelihood == "categorical":
            p = out.softmax(-1)
            lam = torch.diag(p) - torch.outer(p, p)
        elif likelihood == "bernoulli":
            p = out.sigmoid()
            lam = torch.diag(p * (1 - p))
        else:
            lam = torch.eye(len(out)) / noise_std**2
        for n in ref:
            j = jac[n].reshape(len(out), -1)
            ref[n] += torch.einsum("ci,cd,di->i", j, lam, j).reshape(ref[n].shape)
    return ref


@pytest.fixture
def many():
    torch.manual_seed(0)
    model = ManyLayers()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    return model.eval(), torch.randn(6, 2, 10, 10)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_exact_matches_per_example_jacobians(many, likelihood):
    model, x = many
    curv = diagonal_ggn(model, x.split(4), likelihood=likelihood, method="exact", noise_std=0.5)
    ref = _reference(model, x, likelihood, noise_std=0.5)
    assert curv.num_data == 6 and set(curv.diagonal) == set(ref)
    for name in ref:
        torch.testing.assert_close(curv.diagonal[name], ref[name], rtol=1e-4, atol=1e-6)


def test_monte_carlo_fisher_is_unbiased(many):
    model, x = many
    curv = diagonal_ggn(model, [x], method="mc", mc_samples=3000, seed=1)
    ref = _reference(model, x)
    for name in ref:  # relative error of the mean over a tensor's entries ~ 1 / sqrt(3000)
        assert curv.diagonal[name].sum() == pytest.approx(float(ref[name].sum()), rel=0.05)
    flat = torch.cat([c.flatten() for c in curv.diagonal.values()])
    flat_ref = torch.cat([r.flatten() for r in ref.values()])
    assert torch.corrcoef(torch.stack([flat, flat_ref]))[0, 1] > 0.99


def test_masks_compute_only_the_selected_entries(many):
    model, x = many
    full = diagonal_ggn(model, [x], method="exact").diagonal
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in full.items()}
    part = diagonal_ggn(model, [x], method="exact", masks=masks).diagonal
    for name, mask in masks.items():
        torch.testing.assert_close(part[name][mask], full[name][mask], rtol=1e-5, atol=1e-7)
        assert (part[name][~mask] == 0).all()


def test_segmentation_outputs_sum_over_pixels():
    """Per-pixel categorical NLL: the MC Fisher matches sum over pixels of J^T Lambda J."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 1)).eval()
    x = torch.randn(2, 1, 5, 5)
    params = convertible_parameters(model)
    theta = {n: p.detach() for n, p in params.items()}
    ref = {n: torch.zeros_like(p) for n, p in theta.items()}
    for xi in x:
        jac = jacrev(lambda th, xi=xi: functional_call(model, th, (xi[None],))[0])(theta)
        p = model(xi[None])[0].softmax(0).detach()  # (C, H, W)
        for i in range(5):
            for j in range(5):
                lam = torch.diag(p[:, i, j]) - torch.outer(p[:, i, j], p[:, i, j])
                for n in ref:
                    jn = jac[n][:, i, j].reshape(3, -1)
                    ref[n] += torch.einsum("ci,cd,di->i", jn, lam, jn).reshape(ref[n].shape)
    curv = diagonal_ggn(model, [x], method="mc", mc_samples=4000, seed=0)
    for name in ref:
        assert curv.diagonal[name].sum() == pytest.approx(float(ref[name].sum()), rel=0.05)
    with pytest.raises(ValueError, match="method='mc'"):
        diagonal_ggn(model, [x], method="exact")


def test_shared_layer_falls_back_to_torch_func():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.head = shared, nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))

    model = Twice().eval()
    x = torch.randn(5, 4)
    curv = diagonal_ggn(model, [x], method="exact")
    ref = _reference(model, x)
    for name in ref:
        torch.testing.assert_close(curv.diagonal[name], ref[name], rtol=1e-4, atol=1e-6)


def test_converted_model_uses_its_means_and_is_left_as_found(many):
    model, x = many
    masks = {
        n: torch.ones(p.shape, dtype=torch.bool) for n, p in convertible_parameters(model).items()
    }
    pbnn = convert(model, masks, None, rho_init=0.0)  # sigma 0.69: noise would show
    pbnn.train()
    flags = {n: p.requires_grad for n, p in pbnn.named_parameters()}
    before = {k: v.clone() for k, v in pbnn.state_dict().items()}
    curv = diagonal_ggn(pbnn, [x], method="exact")
    ref = _reference(model, x)
    for name in ref:
        torch.testing.assert_close(curv.diagonal[name], ref[name], rtol=1e-4, atol=1e-6)
    assert pbnn.training and all(m.training for m in pbnn.modules())
    assert {n: p.requires_grad for n, p in pbnn.named_parameters()} == flags
    assert all(p.grad is None for p in pbnn.parameters())
    for k, v in pbnn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_arguments(many):
    model, x = many
    with pytest.raises(ValueError, match="likelihood"):
        diagonal_ggn(model, [x], likelihood="poisson")
    with pytest.raises(ValueError, match="method"):
        diagonal_ggn(model, [x], method="kfac")
    with pytest.raises(ValueError, match="not a floating-point parameter"):
        diagonal_ggn(model, [x], names=["bn.running_mean"])  # a buffer
    with pytest.raises(ValueError, match="no batch"):
        diagonal_ggn(model, [])
    with pytest.raises(ValueError, match="shape"):
        diagonal_ggn(model, [x], masks={"fc.weight": torch.ones(2, 2, dtype=torch.bool)})
