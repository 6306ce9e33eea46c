"""Loading into the user's own instance (``model=...``) and safetensors files:
bnnconvert.load / load_checkpoint / save(format=...), and ``bnnconvert convert`` on a
``.safetensors`` checkpoint."""

from __future__ import annotations

import itertools
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from safetensors import safe_open
from torch import nn

import bnnconvert
from bnnconvert import calibrate_posterior, convert, mean_weights
from bnnconvert.cli import main
from bnnconvert.convert import num_bayesian
from bnnconvert.layers import bayesian_layers, bayesian_masks, sigma_scale
from bnnconvert.predict import temperature_of
from bnnconvert.serialization import load, load_checkpoint, save

ARCH = "bnnconvert.models:resnet18"
KWARGS = {"num_classes": 10, "in_channels": 1}
ARCH_FLAGS = ["--arch", ARCH, "--arch-kwargs", "num_classes=10,in_channels=1"]
CONVERT = ["--saliency", "magnitude", "--r-bayes", "0.01"]
# numpy dtypes of the safetensors dtype codes these models use (the format's spec)
NUMPY_DTYPES = {"F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64}


def _net_class() -> type[nn.Module]:
    class Net(nn.Module):  # defined here: no "package.module:factory" spec can name it
        def __init__(self, classes: int = 3, extra: bool = False):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, classes)
            self.extra = nn.Linear(classes, classes) if extra else None

        def forward(self, x):
            h = self.fc(torch.relu(self.conv(x)).flatten(1))
            return h if self.extra is None else self.extra(h)

    return Net


def _x(n: int = 5, size: int = 8) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(7))


def _perturb_rho(model: nn.Module) -> nn.Module:
    """A train-like change of rho, so that no round trip passes by re-initialising."""
    with torch.no_grad():
        for _, layer in bayesian_layers(model):
            for name in layer.bayes_names:
                layer.bayes_rho(name).uniform_(-4, -2)
    return model


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        assert sd_a[key].dtype == sd_b[key].dtype and torch.equal(sd_a[key], sd_b[key]), key


def _probs(model: nn.Module, x: torch.Tensor, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    return bnnconvert.predict(model, x, samples=4).probs


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------- model=instance
@pytest.mark.parametrize("suffix", ["pt", "safetensors"])
def test_plain_weights_load_into_an_instance_of_a_local_class(tmp_path, suffix):
    net_class = _net_class()
    net, x = net_class().eval(), _x()
    path = tmp_path / f"weights.{suffix}"
    if suffix == "pt":
        torch.save(net.state_dict(), path)
    else:
        safetensors.torch.save_file(net.state_dict(), path)
    torch.manual_seed(1)
    fresh = net_class()
    assert not torch.equal(fresh.fc.weight, net.fc.weight)  # the load has to do the work
    loaded = load_checkpoint(path, model=fresh)
    assert loaded is fresh
    assert torch.equal(loaded.eval()(x), net(x))


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_converted_model_loads_into_an_instance_of_a_local_class(tmp_path, caplog, fmt):
    net_class = _net_class()
    net, x = net_class().eval(), _x()
    pbnn = _perturb_rho(convert(net, "magnitude", 0.2)).eval()
    path = tmp_path / "bayes.bin"
    save(pbnn, path, format=fmt)
    assert "without an architecture spec" in caplog.text
    with pytest.raises(ValueError, match=r"saved without an architecture.*model=\.\.\."):
        load(path)

    torch.manual_seed(5)
    fresh = net_class()
    loaded = load(path, model=fresh)
    assert loaded is fresh and not loaded.training
    masks_a, masks_b = bayesian_masks(pbnn), bayesian_masks(loaded)
    assert masks_a.keys() == masks_b.keys() and masks_a
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    _assert_same_state(pbnn, loaded)
    assert loaded.bnnconvert_info == pbnn.bnnconvert_info
    probs = _probs(loaded, x)
    assert torch.equal(probs, _probs(pbnn, x))
    assert not torch.equal(probs, _probs(pbnn, x, seed=4))  # sampled, reproducibly
    with mean_weights(loaded):
        assert torch.allclose(loaded(x), net(x), atol=1e-6)  # the original outputs at mu

    via_checkpoint = load_checkpoint(path, model=net_class())
    assert num_bayesian(via_checkpoint) == num_bayesian(pbnn) > 0
    _assert_same_state(pbnn, via_checkpoint)
    det = load(path, model=net_class(), deterministic=True)
    assert not list(bayesian_layers(det)) and torch.equal(det(x), net(x))


def test_model_argument_errors_name_the_fix(tmp_path):
    net_class = _net_class()
    path = tmp_path / "bayes.pt"
    save(convert(net_class(), "magnitude", 0.2), path)
    for read in (load, load_checkpoint):
        with pytest.raises(ValueError, match=r"either arch=\.\.\..*or model=\.\.\..*not both"):
            read(path, arch=ARCH, model=net_class())
        with pytest.raises(ValueError, match="not both"):
            read(path, arch_kwargs={"classes": 3}, model=net_class())
        with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module.*str"):
            read(path, model="Net")
        with pytest.raises(ValueError, match=r"already converted.*to_deterministic"):
            read(path, model=convert(net_class(), "magnitude", 0.2))
        with pytest.raises(
            ValueError,
            match=r"model=Net\(\.\.\.\) does not fit the architecture.*'fc\.weight': \(3, 256\) "
            r"in the file, \(4, 256\) in the model.*check that model=\.\.\. is built like",
        ):
            read(path, model=net_class(classes=4))


def test_a_failed_load_leaves_the_instance_as_it_was(tmp_path):
    net_class = _net_class()
    big = net_class(extra=True)
    masks = {"conv.weight": torch.rand(4, 1, 3, 3) < 0.5, "extra.weight": torch.ones(3, 3) > 0}
    save(convert(big, masks, None), tmp_path / "bayes.safetensors")
    small = net_class()
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(ValueError, match=r"Bayesian layer 'extra' that the architecture lacks"):
        load(tmp_path / "bayes.safetensors", model=small)
    assert not list(bayesian_layers(small))  # conv was converted, then undone
    after = small.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


# ----------------------------------------------------------------------- safetensors
def test_safetensors_round_trip_keeps_state_predictions_scale_and_temperature(resnet, tmp_path):
    x = _x(6, 16)
    val_x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    val = [(val_x, resnet(val_x).argmax(1))]  # targets the model's outputs inform
    pbnn = _perturb_rho(convert(resnet, "magnitude", 0.01))
    calibrate_posterior(pbnn, val, samples=2, scales=(0.5, 2.0), refine=False)
    t, temperature = sigma_scale(pbnn), temperature_of(pbnn)
    assert t in (0.5, 2.0) and temperature != 1.0  # both set away from their defaults
    assert pbnn.bnnconvert_info["temperature"] == temperature  # where predict reads T from
    path = tmp_path / "bayes.safetensors"
    save(pbnn, path, arch=ARCH, arch_kwargs=KWARGS)  # safetensors: from the suffix
    assert _files(tmp_path) == ["bayes.safetensors"]  # no temporary left

    loaded = load(path)
    _assert_same_state(pbnn, loaded)
    assert sigma_scale(loaded) == t and temperature_of(loaded) == temperature
    assert loaded.bnnconvert_info == pbnn.bnnconvert_info
    assert torch.equal(_probs(loaded, x), _probs(pbnn, x))

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        assert set(handle.keys()) == set(pbnn.state_dict())
    header = json.loads(metadata["bnnconvert"])
    assert header["format"] == "bnnconvert.model" and header["version"] == 1
    assert header["arch"] == ARCH and header["arch_kwargs"] == KWARGS
    assert header["info"]["temperature"] == temperature
    assert header["bayesian"] == {n: list(m.bayes_names) for n, m in bayesian_layers(pbnn)}


def test_safetensors_file_holds_no_pickle(unet, tmp_path):
    """Every byte is accounted for by the format's spec: an 8-byte header length, the JSON
    header, then exactly the raw tensor data, which decodes (with numpy) to the state."""
    model = convert(unet, "magnitude", 0.05)
    path = tmp_path / "bayes.safetensors"
    save(model, path)
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    data = raw[8 + size :]
    header.pop("__metadata__")
    spans = sorted(entry["data_offsets"] for entry in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # no gap for anything else
    state = model.state_dict()
    assert header.keys() == state.keys()
    for key, entry in header.items():
        start, end = entry["data_offsets"]
        array = np.frombuffer(data[start:end], dtype=NUMPY_DTYPES[entry["dtype"]])
        np.testing.assert_array_equal(array.reshape(entry["shape"]), state[key].numpy())
    assert not zipfile.is_zipfile(path)  # not a torch (pickle) archive


def test_tied_weights_and_dense_layers_round_trip(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.b.weight = self.a.weight  # tied: one storage under two keys

        def forward(self, x):
            return self.c(self.b(torch.tanh(self.a(x))))

    masks = {"c.weight": torch.ones(2, 4, dtype=torch.bool), "b.bias": torch.rand(4) < 0.5}
    masks["b.bias"][0] = True
    model = _perturb_rho(convert(Tied(), masks, None)).eval()
    assert model.c.weight_idx.numel() == 0  # dense: an empty index tensor
    save(model, tmp_path / "tied.safetensors")
    fresh = Tied()
    loaded = load(tmp_path / "tied.safetensors", model=fresh)
    _assert_same_state(model, loaded)
    assert fresh.b.weight is fresh.a.weight  # the instance keeps its tying
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_probs(loaded, x), _probs(model, x))


def test_save_format_rule(unet, tmp_path):
    model = convert(unet, "magnitude", 0.05)
    save(model, tmp_path / "a.bin", format="safetensors")  # explicit: any name
    save(model, tmp_path / "b.pt")  # default from the suffix: torch
    with safe_open(tmp_path / "a.bin", framework="pt") as handle:
        assert "bnnconvert" in handle.metadata()
    assert zipfile.is_zipfile(tmp_path / "b.pt")
    for name in ("a.bin", "b.pt"):
        _assert_same_state(model, load(tmp_path / name, model=type(unet)(1, 2, base=4, depth=2)))
    with pytest.raises(ValueError, match=r"format must be one of torch, safetensors.*'onnx'"):
        save(model, tmp_path / "c.onnx", format="onnx")
    with pytest.raises(ValueError, match=r"\.safetensors name for a torch file.*\.pt"):
        save(model, tmp_path / "c.safetensors", format="torch")
    assert _files(tmp_path) == ["a.bin", "b.pt"]


def test_plain_safetensors_checkpoint_through_load_checkpoint(resnet, tmp_path):
    x = _x(3, 28)
    path = tmp_path / "weights.safetensors"
    state = {f"model.{k}": v.contiguous() for k, v in resnet.state_dict().items()}
    safetensors.torch.save_file(state, path, metadata={"format": "pt"})  # Lightning-like keys
    model = load_checkpoint(path, ARCH, KWARGS).eval()
    assert torch.equal(model(x), resnet(x))
    with pytest.raises(ValueError, match=r"not written by bnnconvert\.save.*load_checkpoint"):
        load(path)
    with pytest.raises(ValueError, match=r"no architecture; pass arch=\.\.\..*model=\.\.\."):
        load_checkpoint(path)


def _invoke(args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_converts_a_safetensors_checkpoint(resnet, tmp_path):
    safetensors.torch.save_file(resnet.state_dict(), tmp_path / "weights.safetensors")
    out = tmp_path / "bayes.safetensors"
    result = _invoke(
        ["convert", tmp_path / "weights.safetensors", *ARCH_FLAGS, *CONVERT, "-o", out]
    )
    assert result.exit_code == 0, result.output
    expected = convert(
        load_checkpoint(tmp_path / "weights.safetensors", ARCH, KWARGS), "magnitude", 0.01
    )
    loaded = load(out)
    _assert_same_state(expected, loaded)
    with safe_open(out, framework="pt") as handle:
        assert json.loads(handle.metadata()["bnnconvert"])["arch"] == ARCH


def test_refused_safetensors_files_leave_no_output(resnet, tmp_path):
    torch.manual_seed(0)
    other = bnnconvert.serialization.build_model(ARCH, {"num_classes": 14, "in_channels": 1})
    safetensors.torch.save_file(other.state_dict(), tmp_path / "weights14.safetensors")
    out = tmp_path / "bayes.safetensors"
    result = _invoke(
        ["convert", tmp_path / "weights14.safetensors", *ARCH_FLAGS, *CONVERT, "-o", out]
    )
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert message.startswith("Error: ") and len(message.splitlines()) == 1
    assert "does not fit" in message and "'fc.weight': (14, 512) in the file, (10, 512)" in message
    assert "--arch-kwargs" in message
    assert not out.exists() and not list(tmp_path.glob(".bayes*"))

    # a converted model's file whose tensors were altered is refused too
    save(
        convert(resnet, "magnitude", 0.01),
        tmp_path / "good.safetensors",
        arch=ARCH,
        arch_kwargs=KWARGS,
    )
    with safe_open(tmp_path / "good.safetensors", framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors["fc.weight"] = torch.zeros(14, 512)
    safetensors.torch.save_file(tensors, tmp_path / "altered.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match=r"does not fit.*'fc\.weight': \(14, 512\) in the file"):
        load(tmp_path / "altered.safetensors")
    result = _invoke(["info", tmp_path / "altered.safetensors"])
    assert result.exit_code == 1 and "fc.weight" in result.stderr

    damaged = tmp_path / "cut.safetensors"
    damaged.write_bytes((tmp_path / "good.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_checkpoint(damaged, ARCH, KWARGS)
