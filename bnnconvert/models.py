"""Reference architectures used by the demo, the tests and the benchmarks.

Any nn.Module can be converted; these are here so that the paper's two settings
(ResNet18 classification, UNet segmentation) run out of the box.
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn

__all__ = ["UNet", "resnet18"]


def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet18 with ``in_channels`` input channels and ``num_classes``
    outputs (MedMNIST images of 28 px and up go through unchanged)."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net (Ronneberger et al., 2015) with BatchNorm and ConvTranspose2d upsampling.

    Args:
        in_channels: C of the input (N, C, H, W); H and W divisible by 2**depth.
        num_classes: output channels; logits of shape (N, num_classes, H, W).
        base: channels of the first stage, doubled at each of the ``depth`` downsamplings.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base: int = 16, depth: int = 4):
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList([_DoubleConv(in_channels, widths[0])])
        self.encoder.extend(_DoubleConv(widths[i], widths[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            for i in reversed(range(depth))
        )
        self.decoder = nn.ModuleList(
            _DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, block in zip(self.up, self.decoder):
            x = block(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)
