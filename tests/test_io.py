"""bnnconvert.serialization: loading user checkpoints safely, save/load of converted models;
bnnconvert.pipeline.convert_checkpoint; bnnconvert.data.open_data."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bnnconvert
from bnnconvert import convert, mean_weights, to_deterministic
from bnnconvert.data import open_data
from bnnconvert.layers import bayesian_layers, bayesian_masks
from bnnconvert.pipeline import convert_checkpoint
from bnnconvert.serialization import (
    build_model,
    describe,
    load,
    load_checkpoint,
    parse_arch_kwargs,
    resolve_arch,
    save,
    strip_prefix,
)

ARCH = "bnnconvert.models:resnet18"
KWARGS = {"num_classes": 10, "in_channels": 1}
UNET = "bnnconvert.models:UNet"  # small: most tests use it, ResNet18 where keys matter
UNET_KWARGS = {"in_channels": 1, "num_classes": 2, "base": 4, "depth": 2}
DEMO = Path(bnnconvert.__file__).parent / "demo_data"


@pytest.fixture
def x():
    return torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def xs():
    return torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def pbnn(resnet):
    model = convert(resnet, "magnitude", 0.01)
    # train-like change of rho and mu so that a round trip cannot pass by re-initialising
    with torch.no_grad():
        for _, layer in bayesian_layers(model):
            for name in layer.bayes_names:
                layer.bayes_rho(name).uniform_(-4, -2)
    return model


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------- save / load
def test_round_trip_identical_outputs_masks_and_samples(pbnn, x, tmp_path):
    path = tmp_path / "bayes.pt"
    save(pbnn, path, arch=ARCH, arch_kwargs=KWARGS)
    payload = torch.load(path, weights_only=True)  # no code unpickled
    assert payload["format"] == "bnnconvert.model"
    assert payload["arch"] == ARCH and payload["arch_kwargs"] == KWARGS
    assert payload["info"]["r_bayes"] == 0.01 and payload["info"]["criterion"] == "magnitude"
    assert payload["bnnconvert_version"] == "0.1.0"

    loaded = load(path)
    assert _files(tmp_path) == ["bayes.pt"]  # no temporary left
    assert not loaded.training
    pbnn.eval()
    masks_a, masks_b = bayesian_masks(pbnn), bayesian_masks(loaded)
    assert masks_a.keys() == masks_b.keys() and masks_a
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    assert_same_model(pbnn, loaded, x)
    assert loaded.bnnconvert_info == pbnn.bnnconvert_info


def assert_same_model(pbnn, loaded, x) -> None:
    """Equal state dicts, equal outputs at the means, equal samples under the same seed
    (and a different sample under another draw)."""
    sd_a, sd_b = pbnn.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    with torch.no_grad():
        with mean_weights(pbnn), mean_weights(loaded):
            assert torch.equal(pbnn(x), loaded(x))
        torch.manual_seed(3)
        a = pbnn(x)
        torch.manual_seed(3)
        b = loaded(x)
        assert torch.equal(a, b) and not torch.equal(a, pbnn(x))  # sampled, reproducibly


def test_load_deterministic_gives_the_mu_model(pbnn, resnet, x, tmp_path):
    save(pbnn, tmp_path / "b.pt", arch=ARCH, arch_kwargs=KWARGS)
    det = load(tmp_path / "b.pt", deterministic=True)
    assert not list(bayesian_layers(det)) and type(det.conv1) is nn.Conv2d
    assert det.state_dict().keys() == resnet.state_dict().keys()
    assert torch.equal(det(x), resnet(x))


def test_dense_layer_round_trip(unet, xs, tmp_path):
    masks = {
        "head.weight": torch.ones(2, 4, 1, 1, dtype=torch.bool),  # dense: empty idx
        "up.0.bias": torch.tensor([True, False, False, True] * 2),
    }
    model = convert(unet, masks, None)
    save(model, tmp_path / "d.pt", arch=UNET, arch_kwargs=UNET_KWARGS)
    loaded = load(tmp_path / "d.pt")
    assert bool(loaded.head.bayes_mask("weight").all())
    assert torch.equal(loaded.up[0].bayes_mask("bias"), masks["up.0.bias"])
    with mean_weights(loaded), mean_weights(model):
        assert torch.equal(loaded(xs), model.eval()(xs))


def test_arch_is_remembered_through_load_convert_save(unet, tmp_path):
    torch.save(unet.state_dict(), tmp_path / "sd.pt")
    model = load_checkpoint(tmp_path / "sd.pt", UNET, UNET_KWARGS)
    save(convert(model, "magnitude", 0.01), tmp_path / "b.pt")  # no arch= needed
    reloaded = load(tmp_path / "b.pt")
    assert describe(reloaded)["arch"] == UNET
    save(to_deterministic(reloaded), tmp_path / "det.pt")
    assert describe(load(tmp_path / "det.pt"))["arch_kwargs"] == UNET_KWARGS


def test_save_without_arch_then_load_needs_arch(unet, xs, tmp_path):
    model = convert(unet, "magnitude", 0.01)
    save(model, tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"saved without an architecture.*arch=\.\.\."):
        load(tmp_path / "b.pt")
    loaded = load(tmp_path / "b.pt", arch=UNET, arch_kwargs=UNET_KWARGS)
    with mean_weights(loaded), mean_weights(model):
        assert torch.equal(loaded(xs), model.eval()(xs))


def test_load_refuses_a_user_checkpoint(unet, tmp_path):
    torch.save(unet.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match=r"not written by bnnconvert.save.*load_checkpoint"):
        load(tmp_path / "sd.pt")


def test_a_file_of_a_newer_format_version_is_refused(unet, tmp_path):
    save(convert(unet, "magnitude", 0.01), tmp_path / "b.pt", arch=UNET, arch_kwargs=UNET_KWARGS)
    payload = torch.load(tmp_path / "b.pt", weights_only=True)
    torch.save({**payload, "version": 2, "bnnconvert_version": "9.0"}, tmp_path / "b.pt")
    for read in (load, load_checkpoint):
        with pytest.raises(ValueError, match=r"newer bnnconvert \(9\.0.*upgrade bnnconvert"):
            read(tmp_path / "b.pt")


def test_failed_save_leaves_target_untouched(unet, tmp_path, monkeypatch):
    target = tmp_path / "b.pt"
    target.write_bytes(b"previous content")

    def broken(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save(unet, target, arch=UNET, arch_kwargs=UNET_KWARGS)
    assert target.read_bytes() == b"previous content"
    assert _files(tmp_path) == ["b.pt"]


def test_save_rejects_non_literal_arch_kwargs(unet, tmp_path):
    with pytest.raises(TypeError, match=r"arch_kwargs.*Tensor"):
        save(unet, tmp_path / "b.pt", arch=UNET, arch_kwargs={"w": torch.ones(1)})
    with pytest.raises(ValueError, match="cannot import module"):
        save(unet, tmp_path / "b.pt", arch="no_such_pkg.models:net")
    assert _files(tmp_path) == []


# ----------------------------------------------------------------------- user checkpoints
@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {
            "state_dict": {f"model.{k}": v for k, v in sd.items()},
            "epoch": 3,
            "hyper_parameters": {"lr": 0.1},
        },  # Lightning
        lambda sd: {
            "model_state_dict": {f"module.{k}": v for k, v in sd.items()},
            "optimizer_state_dict": {},
        },
        lambda sd: {"model": {f"net._orig_mod.{k}": v for k, v in sd.items()}},
    ],
    ids=["state_dict", "lightning", "dataparallel", "compiled"],
)
def test_state_dict_checkpoints_with_prefixes(resnet, x, tmp_path, wrap):
    torch.save(wrap(resnet.state_dict()), tmp_path / "c.pt")
    model = load_checkpoint(tmp_path / "c.pt", ARCH, KWARGS).eval()
    assert torch.equal(model(x), resnet(x))


def test_strip_prefix_picks_the_best_match():
    state = {"model.a.weight": 1, "model.b.bias": 2, "ema.model.a.weight": 3, "loss.w": 4}
    assert strip_prefix(state, ["a.weight", "b.bias"]) == {"a.weight": 1, "b.bias": 2}
    assert strip_prefix({"a.weight": 1}, ["a.weight"]) == {"a.weight": 1}


def test_torchvision_arch_spec(tmp_path):
    model = build_model("torchvision.models:resnet18", {"num_classes": 14})
    torch.save(model.state_dict(), tmp_path / "tv.pt")
    loaded = load_checkpoint(
        tmp_path / "tv.pt", "torchvision.models:resnet18", parse_arch_kwargs("num_classes=14")
    )
    assert loaded.fc.out_features == 14


def test_pickled_module_needs_trust(unet, xs, tmp_path):
    torch.save(unet, tmp_path / "whole.pt")
    with pytest.raises(ValueError, match=r"trust_pickle=True.*arbitrary code"):
        load_checkpoint(tmp_path / "whole.pt")
    model = load_checkpoint(tmp_path / "whole.pt", trust_pickle=True)
    assert torch.equal(model(xs), unet(xs))


def test_torchscript_needs_an_arch(unet, xs, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(unet, xs).save(str(tmp_path / "ts.pt"))
    with pytest.raises(ValueError, match=r"TorchScript.*cannot be converted.*arch=\.\.\."):
        load_checkpoint(tmp_path / "ts.pt")
    model = load_checkpoint(tmp_path / "ts.pt", UNET, UNET_KWARGS).eval()
    assert torch.equal(model(xs), unet(xs))


@pytest.mark.parametrize(
    "content, message",
    [
        (os.urandom(4096), "not a PyTorch checkpoint"),
        (b"", "empty"),
        (b"epoch,loss\n1,0.5\n", "not a PyTorch checkpoint"),
    ],
    ids=["random-bytes", "empty", "text"],
)
def test_not_a_checkpoint(tmp_path, content, message):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path / "bad.pt", ARCH, KWARGS)


def test_checkpoint_errors_name_the_fix(resnet, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save(resnet.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match=r"no architecture; pass arch=\.\.\."):
        load_checkpoint(tmp_path / "sd.pt")
    with pytest.raises(ValueError, match=r"cannot import module 'nonexistent_pkg.models'"):
        load_checkpoint(tmp_path / "sd.pt", "nonexistent_pkg.models:net")
    with pytest.raises(ValueError, match="has no 'resnet99'"):
        load_checkpoint(tmp_path / "sd.pt", "bnnconvert.models:resnet99")
    with pytest.raises(ValueError, match=r"'fc.weight': \(10, 512\) in the file, \(14, 512\)"):
        load_checkpoint(tmp_path / "sd.pt", ARCH, {"num_classes": 14, "in_channels": 1})
    with pytest.raises(ValueError, match=r"failed.*unexpected keyword"):
        load_checkpoint(tmp_path / "sd.pt", ARCH, {"depth": 3})
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(ValueError, match="without a state_dict"):
        load_checkpoint(tmp_path / "meta.pt", ARCH)


# ----------------------------------------------------------------------- arch specs
def test_parse_arch_kwargs():
    assert parse_arch_kwargs("num_classes=14,in_channels=1") == {
        "num_classes": 14,
        "in_channels": 1,
    }
    assert parse_arch_kwargs("size=(28, 28), norm=batch, w=None, s='x,y'") == {
        "size": (28, 28),
        "norm": "batch",
        "w": None,
        "s": "x,y",
    }
    assert parse_arch_kwargs('{"num_classes": 3}') == {"num_classes": 3}
    assert parse_arch_kwargs("") == {} and parse_arch_kwargs(None) == {}
    for bad in ["num_classes", "a=1), print(2", "a=__import__('os')", "=3"]:
        with pytest.raises(ValueError, match="arch_kwargs"):
            parse_arch_kwargs(bad)


def test_resolve_arch_errors():
    assert resolve_arch("bnnconvert.models:UNet") is not None
    for bad, message in [
        ("resnet18", "bad architecture spec"),
        ("torchvision.models:nope", "has no 'nope'"),
        ("bnnconvert.models:__doc__", "not callable"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve_arch(bad)


# ----------------------------------------------------------------------- one line
def test_convert_checkpoint_one_line(unet, xs, tmp_path):
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in unet.state_dict().items()}}, tmp_path / "sd.pt"
    )
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(4, 1, 16, 16, generator=g), torch.randint(0, 2, (4, 16, 16), generator=g))
        for _ in range(2)
    ]
    out = tmp_path / "bayes.pt"
    model = convert_checkpoint(
        tmp_path / "sd.pt",
        data,
        0.01,
        arch=UNET,
        arch_kwargs=UNET_KWARGS,
        output=out,
        rho_init=-4.0,
    )
    assert model.bnnconvert_info["criterion"] == "grad2"
    assert model.bnnconvert_info["rho_init"] == -4.0
    loaded = load(out)
    assert bayesian_masks(loaded).keys() == bayesian_masks(model).keys()
    with mean_weights(loaded):
        assert torch.equal(loaded(xs), unet(xs))
    with pytest.raises(ValueError, match="needs data"):
        convert_checkpoint(tmp_path / "sd.pt", None, 0.01, arch=UNET, arch_kwargs=UNET_KWARGS)
    with pytest.raises(ValueError, match="r_bayes must be in"):
        convert_checkpoint(tmp_path / "sd.pt", data, 1.5, arch=UNET, output=tmp_path / "o.pt")
    assert not (tmp_path / "o.pt").exists()


def test_describe(pbnn):
    facts = describe(pbnn)
    assert facts["bayesian"] == round(0.01 * facts["entries"])
    assert facts["conversion"]["criterion"] == "magnitude" and facts["class"] == "ResNet"


# ----------------------------------------------------------------------- data
def test_open_data_npz_folder_and_factory(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        f"{s}_images": rng.integers(0, 255, (20, 28, 28), dtype=np.uint8) for s in ("train", "test")
    }
    arrays.update({f"{s}_labels": rng.integers(0, 3, (20, 1)) for s in ("train", "test")})
    np.savez(tmp_path / "d.npz", **arrays)
    loader = open_data(tmp_path / "d.npz", "train", batch_size=8, shuffle=True, seed=1)
    assert len(loader) == 2 and loader.dataset.task == "multiclass"  # last batch dropped
    x, y = next(iter(loader))
    assert x.shape == (8, 1, 28, 28) and y.shape == (8,)
    assert len(open_data(tmp_path / "d.npz", "test", batch_size=8)) == 3

    seg = open_data(DEMO / "nuclei", "test", batch_size=4)
    assert seg.dataset.task == "segmentation" and len(seg.dataset) == 16

    loader = open_data("tests.test_io:_factory", "val", batch_size=5)
    assert loader == ("val", 5)
    with pytest.raises(FileNotFoundError, match="no data at"):
        open_data(tmp_path / "missing.npz")


def _factory(split, batch_size):
    return (split, batch_size)


def test_open_data_names_the_bundled_sets():
    from bnnconvert.data import demo_classification, demo_segmentation

    loader = open_data("demo:digits", "test", batch_size=500)
    x, y = next(iter(loader))
    reference = demo_classification("test")
    assert x.shape == (500, 1, 28, 28)
    assert torch.equal(y, torch.as_tensor(reference.labels[:, 0], dtype=torch.int64))
    assert torch.equal(x[3], reference[3][0])
    x, y = next(iter(open_data("demo:nuclei", "test", batch_size=4)))
    assert x.shape == (4, 1, 64, 64) and torch.equal(y[0], demo_segmentation("test")[0][1])
    assert len(open_data("demo:ood", "test", batch_size=10).dataset) == 500
    with pytest.raises(ValueError, match=r"demo:digits, demo:nuclei, demo:ood"):
        open_data("demo:chest", "test")
