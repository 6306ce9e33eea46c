"""Reference architectures used by the demo, the tests and the benchmarks.

Any nn.Module can be converted; these are here so that the paper's two settings
(ResNet18 classification, UNet segmentation) run out of the box.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["UNet", "resnet18"]


def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet18 with ``in_channels`` input channels and ``num_classes``
    outputs (MedMNIST images of 28 px and up go through unchanged)."""
    import torchvision.models  # here, not at import time: it takes seconds

    model = torchvision.models.resnet18(num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


class _Layers(NamedTuple):
    """The layer classes of one dimensionality."""

    conv: type[nn.Module]
    norm: type[nn.Module]
    pool: type[nn.Module]
    up: type[nn.Module]


_LAYERS = {
    2: _Layers(nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ConvTranspose2d),
    3: _Layers(nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.ConvTranspose3d),
}
"""Layer classes by ``spatial_dims``: one architecture, never a copy per dimensionality."""


def _layers(spatial_dims: int) -> _Layers:
    """The layer classes for ``spatial_dims`` (2 or 3), or a clear error."""
    allowed = " or ".join(map(str, _LAYERS))
    if not isinstance(spatial_dims, int) or isinstance(spatial_dims, bool):
        raise TypeError(
            f"spatial_dims must be an int, {allowed}; got {type(spatial_dims).__name__} "
            f"{spatial_dims!r}"
        )
    if spatial_dims not in _LAYERS:
        raise ValueError(
            f"spatial_dims must be {allowed} (2: images (N, C, H, W), 3: volumes "
            f"(N, C, D, H, W)); got {spatial_dims}"
        )
    return _LAYERS[spatial_dims]


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, layers: _Layers):
        super().__init__(
            layers.conv(cin, cout, 3, padding=1, bias=False),
            layers.norm(cout),
            nn.ReLU(inplace=True),
            layers.conv(cout, cout, 3, padding=1, bias=False),
            layers.norm(cout),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net (Ronneberger et al., 2015) with BatchNorm and transposed-convolution
    upsampling, on images (Conv2d, ConvTranspose2d) or volumes (Conv3d, ConvTranspose3d).

    Args:
        in_channels: C of the input (N, C, H, W), or (N, C, D, H, W) for
            ``spatial_dims=3``; H, W (and D) divisible by 2**depth.
        num_classes: output channels; logits of shape (N, num_classes, H, W), or
            (N, num_classes, D, H, W).
        base: channels of the first stage, doubled at each of the ``depth`` downsamplings.
        depth: number of downsamplings (max-pool 2) and of upsamplings.
        spatial_dims: 2 (images) or 3 (volumes): the same module names and channels
            either way; the kernels of 3 have a third (depth) dimension.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        base: int = 16,
        depth: int = 4,
        spatial_dims: int = 2,
    ):
        super().__init__()
        layers = _layers(spatial_dims)
        self.spatial_dims = spatial_dims
        widths = [base * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList([_DoubleConv(in_channels, widths[0], layers)])
        self.encoder.extend(_DoubleConv(widths[i], widths[i + 1], layers) for i in range(depth))
        self.pool = layers.pool(2)
        self.up = nn.ModuleList(
            layers.up(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.decoder = nn.ModuleList(
            _DoubleConv(2 * widths[i], widths[i], layers) for i in reversed(range(depth))
        )
        self.head = layers.conv(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes, *S) of the inputs (N, in_channels, *S), S = (H, W) or
        (D, H, W)."""
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, block in zip(self.up, self.decoder):
            x = block(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)
