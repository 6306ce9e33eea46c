"""Architectures named by model library: ``timm:<name>`` and ``torchvision:<name>``.

Each spec is checked against the library's own constructor (timm.create_model,
torchvision.models.get_model), then through the whole path a user takes: a state_dict
loaded with load_checkpoint and the CLI, saliency, conversion, save and load by the
remembered spec. Everything runs offline: any network connection fails the test.
"""

from __future__ import annotations

import socket
import sys

import pytest
import timm
import torch
import torchvision.models
from click.testing import CliRunner
from torch import nn

import bnnconvert
from bnnconvert.cli import main
from bnnconvert.convert import num_bayesian
from bnnconvert.serialization import build_model, load_checkpoint, resolve_arch

TIMM = ("timm:resnet18", {"num_classes": 10, "in_chans": 1})
TORCHVISION = ("torchvision:mobilenet_v3_small", {"num_classes": 10})
ZOO = pytest.mark.parametrize("spec, kwargs", [TIMM, TORCHVISION], ids=["timm", "torchvision"])


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network (no weights are ever downloaded)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def reference(spec: str, kwargs: dict) -> nn.Module:
    """The model built by the library's own constructor, without bnnconvert."""
    library, _, name = spec.partition(":")
    if library == "timm":
        return timm.create_model(name, pretrained=False, **kwargs)
    return torchvision.models.get_model(name, weights=None, **kwargs)


def channels(kwargs: dict) -> int:
    return kwargs.get("in_chans", 3)


def entries(model: nn.Module) -> int:
    """N: the weight and bias entries of the model's convolution and Linear layers."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(p.numel() for m in layers for p in m.parameters(recurse=False))


@ZOO
def test_spec_builds_the_library_model(spec, kwargs):
    torch.manual_seed(0)
    model = build_model(spec, kwargs)
    ref = reference(spec, kwargs)
    assert type(model) is type(ref)
    ref.load_state_dict(model.state_dict(), strict=True)  # the same keys and shapes
    x = torch.randn(2, channels(kwargs), 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x))
    assert model.bnnconvert_arch == {"arch": spec, "kwargs": kwargs}


def test_timm_pretrained_is_not_remembered():
    model = build_model("timm:resnet18", {"pretrained": False, "num_classes": 3})
    assert model.bnnconvert_arch == {"arch": "timm:resnet18", "kwargs": {"num_classes": 3}}
    assert model.get_classifier().out_features == 3


@ZOO
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_convert_save_load_by_spec(spec, kwargs, suffix, tmp_path):
    torch.manual_seed(0)
    model = build_model(spec, kwargs)
    x = torch.randn(4, channels(kwargs), 32, 32)
    y = torch.randint(0, 10, (4,))
    sal = bnnconvert.compute_saliency(model, [(x, y)])
    pbnn = bnnconvert.convert(model, sal, 0.01)
    assert num_bayesian(pbnn) == round(0.01 * entries(model))
    path = tmp_path / f"bayes{suffix}"
    bnnconvert.save(pbnn, path)

    loaded = bnnconvert.load(path)  # rebuilt from the spec stored in the file
    assert type(loaded) is type(model)
    assert loaded.bnnconvert_arch == {"arch": spec, "kwargs": kwargs}
    assert num_bayesian(loaded) == num_bayesian(pbnn)
    pbnn.eval()
    for got, want in zip(loaded.state_dict().items(), pbnn.state_dict().items(), strict=True):
        assert got[0] == want[0] and torch.equal(got[1], want[1])
    torch.manual_seed(1)
    want = bnnconvert.predict(pbnn, x, samples=3).probs
    torch.manual_seed(1)
    got = bnnconvert.predict(loaded, x, samples=3).probs
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(want, bnnconvert.predict(loaded, x, samples=3).probs)  # sampled


@ZOO
def test_load_checkpoint_state_dict_by_spec(spec, kwargs, tmp_path):
    torch.manual_seed(0)
    ref = reference(spec, kwargs).eval()
    path = tmp_path / "weights.pt"
    state = {f"model.{k}": v for k, v in ref.state_dict().items()}  # a Lightning checkpoint
    torch.save({"state_dict": state, "epoch": 3}, path)
    model = load_checkpoint(path, spec, kwargs).eval()
    x = torch.randn(2, channels(kwargs), 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    assert model.bnnconvert_arch == {"arch": spec, "kwargs": kwargs}


def test_cli_convert_a_timm_state_dict(tmp_path):
    torch.manual_seed(0)
    ref = reference(*TIMM)
    weights, out = tmp_path / "weights.pt", tmp_path / "bayes.pt"
    torch.save(ref.state_dict(), weights)
    args = [
        "convert",
        weights,
        "--arch",
        "timm:resnet18",
        "--arch-kwargs",
        "num_classes=10,in_chans=1",
        "--data",
        "demo:digits",
        "--batches",
        "1",
        "--batch-size",
        "8",
        "--r-bayes",
        "0.01",
        "-o",
        out,
    ]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    loaded = bnnconvert.load(out)
    assert isinstance(loaded, type(ref))
    assert loaded.bnnconvert_arch == {"arch": TIMM[0], "kwargs": TIMM[1]}
    assert num_bayesian(loaded) == round(0.01 * entries(ref))
    state = loaded.state_dict()
    for key, value in ref.state_dict().items():  # mu is the pretrained weight
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize(
    "spec, words",
    [
        ("timm:resnet1888", ["unknown timm model 'resnet1888'", "resnet18", "timm.list_models"]),
        ("torchvision:resnet1888", ["unknown torchvision model", "resnet18", "list_models()"]),
        ("torchvision:mobilenet_v3_smal", ["close matches: mobilenet_v3_small"]),
        ("timm:zzzzzz", ["no close match"]),
    ],
)
def test_unknown_model_names(spec, words, tmp_path):
    with pytest.raises(ValueError) as caught:
        resolve_arch(spec)
    for word in words:
        assert word in str(caught.value)

    weights, out = tmp_path / "weights.pt", tmp_path / "bayes.pt"
    torch.save(nn.Linear(2, 2).state_dict(), weights)
    args = ["convert", weights, "--arch", spec, "--saliency", "magnitude", "--r-bayes", "0.01"]
    result = CliRunner().invoke(main, [str(a) for a in [*args, "-o", out]])
    assert result.exit_code != 0
    assert words[0] in result.output
    assert not out.exists()


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ValueError, match=r"bnnconvert\[timm\]"):
        build_model("timm:resnet18")
    assert isinstance(build_model("torchvision:resnet18", {"num_classes": 2}), nn.Module)
