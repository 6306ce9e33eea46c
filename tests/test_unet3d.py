"""bnnconvert.models.UNet on volumes (``spatial_dims=3``) and unchanged on images.

References: the 2-D UNet as it was before ``spatial_dims`` existed and the hand-written
3-D UNet of ``benchmarks/bench_predict_memory.py`` (both copied below verbatim from commit
d9db7ad), and the parameter shapes a U-Net of a given base and depth must have.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import bnnconvert
from bnnconvert import mean_weights
from bnnconvert.convert import last_layer_masks
from bnnconvert.layers import bayesian_layers
from bnnconvert.models import UNet
from bnnconvert.serialization import build_model, describe, load, save

from .test_io import assert_same_model

UNET = "bnnconvert.models:UNet"


# ------------------------------------------------------------------ frozen references
class _DoubleConvD9db7ad(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class _UNet2dD9db7ad(nn.Module):
    """bnnconvert.models.UNet at commit d9db7ad (2-D only)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base: int = 16, depth: int = 4):
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList([_DoubleConvD9db7ad(in_channels, widths[0])])
        self.encoder.extend(_DoubleConvD9db7ad(widths[i], widths[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            for i in reversed(range(depth))
        )
        self.decoder = nn.ModuleList(
            _DoubleConvD9db7ad(2 * widths[i], widths[i]) for i in reversed(range(depth))
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


def _block3d(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    )


class _BenchUNet3dD9db7ad(nn.Module):
    """The two-stage 3-D U-Net of benchmarks/bench_predict_memory.py at commit d9db7ad."""

    def __init__(self, base: int = 8) -> None:
        super().__init__()
        self.enc1, self.enc2 = _block3d(1, base), _block3d(base, 2 * base)
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ConvTranspose3d(2 * base, base, 2, stride=2)
        self.dec = _block3d(2 * base, base)
        self.head = nn.Conv3d(base, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        skip = self.enc1(x)
        x = self.up(self.enc2(self.pool(skip)))
        return self.head(self.dec(torch.cat([skip, x], dim=1)))


def _expected_shapes(cin: int, classes: int, base: int, depth: int, dims: int) -> dict:
    """{parameter name: shape} of a U-Net: double convolutions (conv 3, BN, ReLU) x 2 down
    and up, transposed convolutions 2 / stride 2 between the stages, a 1x1 head."""
    k3, k2, k1 = (3,) * dims, (2,) * dims, (1,) * dims
    widths = [base * 2**i for i in range(depth + 1)]

    def double(prefix: str, cin: int, cout: int) -> dict:
        return {
            f"{prefix}.0.weight": (cout, cin, *k3),
            f"{prefix}.1.weight": (cout,),
            f"{prefix}.1.bias": (cout,),
            f"{prefix}.3.weight": (cout, cout, *k3),
            f"{prefix}.4.weight": (cout,),
            f"{prefix}.4.bias": (cout,),
        }

    shapes = double("encoder.0", cin, widths[0])
    for i in range(depth):
        shapes |= double(f"encoder.{i + 1}", widths[i], widths[i + 1])
    for j, i in enumerate(reversed(range(depth))):  # ConvTranspose weight: (cin, cout, *k)
        shapes |= {f"up.{j}.weight": (widths[i + 1], widths[i], *k2), f"up.{j}.bias": (widths[i],)}
    for j, i in enumerate(reversed(range(depth))):
        shapes |= double(f"decoder.{j}", 2 * widths[i], widths[i])
    return shapes | {"head.weight": (classes, widths[0], *k1), "head.bias": (classes,)}


# ------------------------------------------------------------------ 2-D: unchanged
@pytest.mark.parametrize(
    "kwargs", [{}, {"in_channels": 3, "num_classes": 4, "base": 4, "depth": 2}]
)
def test_default_2d_unet_is_the_unet_of_before(kwargs):
    torch.manual_seed(11)
    new = UNet(**kwargs).eval()
    torch.manual_seed(11)
    old = _UNet2dD9db7ad(**kwargs).eval()
    sd_new, sd_old = new.state_dict(), old.state_dict()
    assert list(sd_new) == list(sd_old)  # same names, same order
    assert all(torch.equal(sd_new[k], sd_old[k]) for k in sd_old)  # same seed, same init
    leaves = [(n, type(m)) for n, m in new.named_modules() if not list(m.children())]
    assert leaves == [(n, type(m)) for n, m in old.named_modules() if not list(m.children())]
    x = torch.randn(2, kwargs.get("in_channels", 1), 32, 48)
    with torch.no_grad():
        assert torch.equal(new(x), old(x))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("cin, classes, base, depth", [(1, 2, 16, 4), (2, 5, 3, 1)])
def test_parameter_shapes(cin, classes, base, depth, dims):
    model = UNet(cin, classes, base=base, depth=depth, spatial_dims=dims)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == _expected_shapes(cin, classes, base, depth, dims)
    convs = {type(m) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}
    assert convs == (
        {nn.Conv2d, nn.ConvTranspose2d} if dims == 2 else {nn.Conv3d, nn.ConvTranspose3d}
    )
    norms = {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert norms == {nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d}
    assert isinstance(model.pool, nn.MaxPool2d if dims == 2 else nn.MaxPool3d)


# ------------------------------------------------------------------ 3-D
def test_3d_unet_is_the_hand_written_one_of_the_memory_benchmark():
    torch.manual_seed(0)
    bench = _BenchUNet3dD9db7ad().eval()
    torch.manual_seed(0)
    ours = UNet(1, 2, base=8, depth=1, spatial_dims=3).eval()
    renamed = {"enc1": "encoder.0", "enc2": "encoder.1", "up": "up.0", "dec": "decoder.0"}
    sd_bench, sd_ours = bench.state_dict(), ours.state_dict()
    mapped = {}
    for name, value in sd_bench.items():
        module, rest = name.split(".", 1)
        mapped[f"{renamed.get(module, module)}.{rest}"] = value
    assert list(mapped) == list(sd_ours)
    assert all(torch.equal(mapped[k], sd_ours[k]) for k in sd_ours)  # same seed, same init
    x = torch.randn(2, 1, 8, 12, 16)
    with torch.no_grad():
        assert torch.equal(ours(x), bench(x))


def test_3d_forward_shape():
    model = UNet(in_channels=2, num_classes=3, base=4, depth=2, spatial_dims=3).eval()
    x = torch.randn(2, 2, 8, 12, 4)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 3, 8, 12, 4)
    assert model.spatial_dims == 3


@pytest.mark.parametrize("value", [1, 4, 0, -2])
def test_bad_spatial_dims_value(value):
    with pytest.raises(ValueError, match=rf"spatial_dims must be 2 or 3 .*got {value}$"):
        UNet(spatial_dims=value)


@pytest.mark.parametrize("value", ["3", 3.0, True, None])
def test_bad_spatial_dims_type(value):
    with pytest.raises(TypeError, match=r"spatial_dims must be an int, 2 or 3; got"):
        UNet(spatial_dims=value)


def test_bad_spatial_dims_through_an_architecture_spec():
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        build_model(UNET, {"spatial_dims": 4})
    with pytest.raises(ValueError, match=r"UNet\(spatial_dims='3'\) failed: spatial_dims must"):
        build_model(UNET, {"spatial_dims": "3"})


def test_3d_convert_and_predict():
    torch.manual_seed(0)
    model = UNet(in_channels=1, num_classes=3, base=4, depth=2, spatial_dims=3).eval()
    masks = last_layer_masks(model)
    assert set(masks) == {"head.weight", "head.bias"}
    pbnn = bnnconvert.convert(model, masks)
    assert [name for name, _ in bayesian_layers(pbnn)] == ["head"]
    assert isinstance(pbnn.head, nn.Conv3d)  # still an instance of its original class
    x = torch.randn(2, 1, 8, 12, 4)
    torch.manual_seed(5)
    pred = bnnconvert.predict(pbnn, x, samples=2)
    assert pred.probs.shape == (2, 3, 8, 12, 4) and pred.samples.shape == (2, 2, 3, 8, 12, 4)
    assert pred.entropy.shape == (2, 8, 12, 4)
    torch.testing.assert_close(pred.probs.sum(1), torch.ones(2, 8, 12, 4))
    # reference: two sampled forwards under the same seed, softmax over the classes
    pbnn.eval()
    torch.manual_seed(5)
    with torch.no_grad():
        reference = torch.stack([pbnn(x).softmax(1) for _ in range(2)])
    torch.testing.assert_close(pred.samples, reference)
    assert not torch.equal(reference[0], reference[1])  # the head samples its weights
    with mean_weights(pbnn), torch.no_grad():
        assert torch.equal(pbnn(x), model(x))


def test_3d_save_load_round_trip(tmp_path):
    kwargs = {"in_channels": 1, "num_classes": 2, "base": 4, "depth": 1, "spatial_dims": 3}
    torch.manual_seed(0)
    model = build_model(UNET, kwargs).eval()
    pbnn = bnnconvert.convert(model, "magnitude", 0.05)
    with torch.no_grad():  # a trained-like rho, so that re-initialising cannot pass
        for _, layer in bayesian_layers(pbnn):
            for name in layer.bayes_names:
                layer.bayes_rho(name).uniform_(-4, -2)
    save(pbnn, tmp_path / "unet3d.pt")  # the spec remembered by build_model
    loaded = load(tmp_path / "unet3d.pt")
    assert describe(loaded)["arch"] == UNET and describe(loaded)["arch_kwargs"] == kwargs
    assert isinstance(loaded.head, nn.Conv3d) and loaded.spatial_dims == 3
    pbnn.eval()
    x = torch.randn(2, 1, 4, 6, 8)
    assert_same_model(pbnn, loaded, x)
    det = load(tmp_path / "unet3d.pt", deterministic=True)
    with torch.no_grad():
        assert torch.equal(det(x), model(x))
