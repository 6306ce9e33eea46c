"""What a newcomer meets on the command line: warnings as one log line, ``--device auto``
everywhere, and one unit for r_bayes (a fraction, or a percentage with "%")."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import bnnconvert
from bnnconvert._utils import resolve_device
from bnnconvert.cli import demo_cmd, main
from bnnconvert.cli.options import parse_r_bayes
from bnnconvert.datasets import medmnist_npz
from bnnconvert.layers import bayesian_masks, convertible_parameters
from bnnconvert.models import resnet18
from bnnconvert.serialization import load

DIGITS = Path(bnnconvert.__file__).parent / "demo_data" / "digits.npz"
ARCH = ["--arch", "bnnconvert.models:resnet18", "--arch-kwargs", "num_classes=10,in_channels=1"]
AUTO = torch.device("cuda" if torch.cuda.is_available() else "cpu")
"""What "auto" must mean on this machine (the independent reference)."""


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """24 real training digits without a 9 (the test split has nines, so the class weights
    of the training split warn), and the state_dict of a seeded ResNet18."""
    root = tmp_path_factory.mktemp("usability")
    src = np.load(DIGITS)
    keep = np.flatnonzero(src["train_labels"][:, 0] != 9)[:24]
    np.savez(
        root / "no_nines.npz",
        train_images=src["train_images"][keep],
        train_labels=src["train_labels"][keep],
        test_images=src["test_images"][:16],
        test_labels=src["test_labels"][:16],
    )
    torch.manual_seed(0)
    torch.save(resnet18(num_classes=10, in_channels=1).state_dict(), root / "weights.pt")
    return root


def _invoke(args) -> click.testing.Result:
    return CliRunner().invoke(main, [str(a) for a in args])


# --------------------------------------------------------------------------- warnings
def test_library_warning_reaches_the_user_as_one_log_line(ws, tmp_path):
    shown = warnings.showwarning
    data = ["--data", ws / "no_nines.npz", "--batch-size", "8"]
    args = ["saliency", ws / "weights.pt", *ARCH, *data, "--batches", "1"]
    result = _invoke([*args, "-o", tmp_path / "sal.pt"])
    assert result.exit_code == 0, result.output
    assert warnings.showwarning is shown, "the CLI left its warning display installed"
    lines = [line for line in result.stderr.splitlines() if "never occur" in line]
    # the same warning, raised by the library itself
    with pytest.warns(UserWarning, match="never occur") as record:
        medmnist_npz(ws / "no_nines.npz", "train").class_weights()
    assert lines == ["warning: " + " ".join(str(record[0].message).split())]
    assert "UserWarning" not in result.stderr and ".py:" not in result.stderr
    assert "warnings.warn(" not in result.stderr  # no source line


# --------------------------------------------------------------------------- --device
def test_resolve_device():
    assert resolve_device("auto") == AUTO
    assert resolve_device() == AUTO
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"unknown device 'gpu'; use 'auto'"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="cuda:99"):
        resolve_device("cuda:99")
    with pytest.raises(TypeError, match="device must be a string"):
        resolve_device(0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_auto_is_the_cpu_and_cuda_is_refused_without_a_gpu():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_device("cuda")


def test_every_device_option_defaults_to_auto():
    ctx = click.Context(main, info_name="bnnconvert")
    with_device = {}
    for name in main.list_commands(ctx):
        params = {p.name: p for p in main.get_command(ctx, name).params}
        if "device" in params:
            with_device[name] = params["device"].default
    assert {"saliency", "convert", "train", "evaluate", "flops", "benchmark", "demo"} <= set(
        with_device
    )
    assert set(with_device.values()) == {"auto"}, with_device


def test_cli_resolves_auto_once_and_refuses_a_bad_device(monkeypatch, tmp_path):
    seen = {}

    def fake_run_demo(out, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)  # stop before any work

    monkeypatch.setattr(demo_cmd, "run_demo", fake_run_demo)
    assert _invoke(["demo", "--out", tmp_path / "d"]).exit_code == 0
    assert seen["device"] == str(AUTO)
    result = _invoke(["flops", "model.pt", "--input-shape", "1,1,28,28", "--device", "gpu"])
    assert result.exit_code == 2
    assert "Invalid value for '--device': unknown device 'gpu'" in result.output


# --------------------------------------------------------------------------- r_bayes
@pytest.mark.parametrize(
    ("text", "fraction"),
    [
        ("1%", "0.01"),
        ("0.01", "0.01"),
        ("5 %", "0.05"),
        ("0.1%", "0.001"),
        ("100%", "1"),
        ("1.0", "1"),
        ("1.00", "1"),
        ("1e-2", "0.01"),
    ],
)
def test_parse_r_bayes_fraction_or_percentage(text, fraction):
    assert parse_r_bayes(text) == float(fraction)  # the same float, bit for bit


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5", r"r_bayes 5 is above 1 \(for 5 %, write 5%\)"),
        ("0", r"must be in \(0, 1\]"),
        ("101%", r"must be in \(0, 1\]"),
        ("one", "'one' is not a number"),
        ("nan", "not a finite number"),
        ("1%%", "not a number"),
    ],
)
def test_parse_r_bayes_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_r_bayes(text)


AMBIGUOUS = "is ambiguous: write 1% for one percent or 1.0 for every entry"


@pytest.mark.parametrize("text", ["1", " 1 ", "01", "+1", "1."])
def test_parse_r_bayes_refuses_an_integer_looking_one(text):
    with pytest.raises(ValueError, match=re.escape(f"r_bayes {text.strip()} {AMBIGUOUS}")):
        parse_r_bayes(text)


def test_a_bare_one_is_refused_and_one_point_zero_means_every_entry(ws, tmp_path):
    base = ["saliency", ws / "weights.pt", *ARCH, "--criterion", "magnitude"]
    result = _invoke([*base, "--top", "1", "-o", tmp_path / "one.pt"])
    assert result.exit_code == 2 and AMBIGUOUS in result.output, result.output
    assert not (tmp_path / "one.pt").exists()
    result = _invoke(["convert", ws / "weights.pt", *ARCH, "--r-bayes", "1", "-o", tmp_path / "b"])
    assert result.exit_code == 2 and f"r_bayes 1 {AMBIGUOUS}" in result.output, result.output
    assert not (tmp_path / "b").exists()
    scored = convertible_parameters(resnet18(num_classes=10, in_channels=1)).values()
    total = sum(p.numel() for p in scored)
    for value, expected in (("1.0", total), ("100%", total), ("1%", round(0.01 * total))):
        result = _invoke([*base, "--top", value, "-o", tmp_path / "sal.pt"])
        assert result.exit_code == 0, result.output
        assert f"({expected:,} entries) sit" in result.output, (value, result.output)


def test_demo_takes_fractions_and_percentages(monkeypatch, tmp_path):
    seen = []

    def fake_run_demo(out, **kwargs):
        seen.append(kwargs["r_bayes"])
        raise SystemExit(0)

    monkeypatch.setattr(demo_cmd, "run_demo", fake_run_demo)
    for value in ("1%,5%,20%", "0.01,0.05,0.2", "1%,0.05,20 %"):
        assert _invoke(["demo", "--r-bayes", value, "--out", tmp_path / "d"]).exit_code == 0
    assert seen == [(0.01, 0.05, 0.2)] * 3
    result = _invoke(["demo", "--r-bayes", "1,5,20", "--out", tmp_path / "d"])
    assert result.exit_code == 2 and not seen[3:]
    assert f"r_bayes 1 {AMBIGUOUS}" in result.output and "write 5%" in result.output


def test_convert_one_percent_and_a_hundredth_give_the_same_masks(ws, tmp_path):
    masks = []
    for value in ("1%", "0.01"):
        out = tmp_path / f"bayes_{value.strip('%')}.pt"
        data = ["--data", ws / "no_nines.npz", "--batch-size", "8", "--batches", "2"]
        args = ["convert", ws / "weights.pt", *ARCH, *data, "--r-bayes", value]
        result = _invoke([*args, "-o", out])
        assert result.exit_code == 0, result.output
        masks.append(bayesian_masks(load(out)))
    one_percent, hundredth = masks
    assert one_percent.keys() == hundredth.keys() and one_percent
    for name in one_percent:
        assert torch.equal(one_percent[name], hundredth[name]), name
    scored = convertible_parameters(resnet18(num_classes=10, in_channels=1)).values()
    selected = sum(int(m.sum()) for m in one_percent.values())
    assert selected == round(0.01 * sum(p.numel() for p in scored))  # 1 % of the entries
