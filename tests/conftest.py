"""Shared fixtures: small real architectures and seeded data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnnconvert.models import UNet, resnet18

# One intra-op thread for the whole session (nothing in the package changes it): no OpenMP
# spin-waiting on a shared 2-core machine, and the same summation order in every test (the
# resume tests compare results bit for bit with uninterrupted runs).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def resnet():
    """torchvision ResNet18 (10 classes, grey input), eval mode, perturbed BN statistics so
    that train/eval differences and statistic updates are visible."""
    torch.manual_seed(1)
    model = resnet18(num_classes=10, in_channels=1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def unet():
    torch.manual_seed(2)
    return UNet(in_channels=1, num_classes=2, base=4, depth=2).eval()


def classification_batches(n_batches=3, batch=4, size=32, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 1, size, size, generator=g),
            torch.randint(0, classes, (batch,), generator=g),
        )
        for _ in range(n_batches)
    ]


def segmentation_batches(n_batches=2, batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 1, size, size, generator=g),
            torch.randint(0, 2, (batch, size, size), generator=g),
        )
        for _ in range(n_batches)
    ]
