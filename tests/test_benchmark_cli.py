"""``bnnconvert benchmark``: the comparison table and the r_bayes sweep on real digits."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import bnnconvert
from bnnconvert.cli import main
from bnnconvert.flops import count_flops
from bnnconvert.methods.comparison import SWEEP_R_BAYES, sweep_method_names
from bnnconvert.methods.registry import check_method_names
from bnnconvert.models import resnet18

DEMO = Path(bnnconvert.__file__).parent / "demo_data"
TINY = ["--arch", f"{__name__}:tiny_cnn", "--arch-kwargs", "num_classes=10,in_channels=1"]
BUDGET = ["--epochs", "1", "--samples", "2", "--batch-size", "20"]
COLUMNS = ["accuracy", "AUC", "Brier", "entropy", "ECE", "NLL", "OOD AUROC", "parameters"]


def tiny_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A small CNN (1,946 parameters): the benchmark's protocol at a test's budget."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def conv_linear_entries(model: nn.Module) -> int:
    """Weights and biases of the Conv/Linear layers: what the saliency ranks."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(p.numel() for m in layers for p in m.parameters())


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """200 training and 100 test digits of the bundled set, MedMNIST format."""
    src = np.load(DEMO / "digits.npz")
    arrays = {f"{s}_{k}": src[f"{s}_{k}"][:n] for s, n in [("train", 200), ("test", 100)]
              for k in ("images", "labels")}  # fmt: skip
    path = tmp_path_factory.mktemp("data") / "digits200.npz"
    np.savez(path, **arrays)
    return path


def first_table(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    """(header, {method: cells}) of the first markdown table."""
    section = markdown.split("## Comparison")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert all(len(r) == len(rows[0]) for r in rows) and set(rows[1]) <= {"---", "---:"}
    return rows[0], {r[0]: r[1:] for r in rows[2:]}


def invoke(*args: str):
    return CliRunner().invoke(main, ["benchmark", *args])


# ----------------------------------------------------------------------- the run
@pytest.fixture(scope="module")
def bench(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    methods = "deterministic,ensemble5,partial1"
    args = [*TINY, *BUDGET, "--data", str(digits), "--ood", "demo:ood"]
    result = invoke(*args, "--methods", methods, "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_table_has_one_row_per_method_and_the_issue_columns(bench):
    header, rows = first_table((bench / "results.md").read_text())
    assert list(rows) == ["deterministic", "ensemble5", "partial1"]
    assert all(column in header for column in COLUMNS)
    assert "training FLOPs" in header
    recorded = json.loads((bench / "results.json").read_text())["rows"]
    for row in recorded:  # the table shows what was measured
        cells = dict(zip(header[1:], rows[row["method"]]))
        assert float(cells["ECE"]) == pytest.approx(row["ece"], abs=5e-5)
        assert float(cells["NLL"]) == pytest.approx(row["nll"], abs=5e-5)
        assert 0.0 <= row["ood_auroc"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0


def test_training_flops_are_multiples_of_the_deterministic_pipeline(bench):
    header, rows = first_table((bench / "results.md").read_text())
    flops = {m: cells[header.index("training FLOPs") - 1] for m, cells in rows.items()}
    assert flops["deterministic"] == "1.00x" and flops["ensemble5"] == "5.00x"
    by = {r["method"]: r for r in json.loads((bench / "results.json").read_text())["rows"]}
    # the convention: 5 members trained from scratch for the deterministic pipeline's
    # P + E epochs each; the deterministic pipeline is P + E epochs of one model
    det, ens = by["deterministic"], by["ensemble5"]
    assert ens["train_flops"] == pytest.approx(5 * det["train_flops"], rel=1e-9)
    assert ens["epochs"] == 2 and det["epochs"] == 1
    # partial1: P deterministic epochs + one saliency epoch (forward and backward, as a
    # training epoch) + E ELBO epochs of S = 2 forwards, over P + E deterministic epochs;
    # the sampling and the KL are O(k), small
    expected = (det["epochs"] + 1 + det["epochs"] * 2) / (2 * det["epochs"])
    assert by["partial1"]["train_flops_x"] == pytest.approx(expected, rel=0.02)


def test_parameters_are_the_model_plus_the_bayesian_sigmas(bench):
    data = json.loads((bench / "results.json").read_text())
    model = tiny_cnn()
    base = sum(p.numel() for p in model.parameters())
    entries = conv_linear_entries(model)
    by = {r["method"]: r for r in data["rows"]}
    assert by["deterministic"]["parameters"] == base
    assert by["ensemble5"]["parameters"] == 5 * base
    assert [r["r_bayes"] for r in data["sweep"]] == list(SWEEP_R_BAYES)
    for row in data["sweep"]:  # one sigma per selected entry: k = round(r N)
        assert row["parameters"] == base + round(row["r_bayes"] * entries)
    assert by["partial1"]["parameters"] == data["sweep"][0]["parameters"]  # trained once


def test_inference_flops_count_the_samples_of_the_predictions(bench):
    """The inference column counts one prediction as the metrics beside it ran it: the
    layers before the first Bayesian one once (hoisting), the rest S = 2 (--samples) times
    with 5 FLOPs per Bayesian entry per draw; M = 5 member forwards for the ensemble. The
    first Bayesian layer of the tiny CNN is its first conv, its second or the Linear:
    prefix model[:0], model[:4] or model[:9]."""
    by = {r["method"]: r for r in json.loads((bench / "results.json").read_text())["rows"]}
    model = tiny_cnn().eval()
    x = torch.randn(20, 1, 28, 28)
    forward = count_flops(model, x).total
    k = round(0.01 * conv_linear_entries(model))
    assert by["deterministic"]["inference_flops"] == forward
    assert by["ensemble5"]["inference_flops"] == 5 * forward
    prefixes = [0] + [count_flops(model[:p], x).total for p in (4, 9)]
    possible = {f + 2 * (forward - f + 5 * k) for f in prefixes}
    assert by["partial1"]["inference_flops"] in possible
    assert by["partial1"]["inference_flops_x"] == pytest.approx(
        by["partial1"]["inference_flops"] / forward
    )


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, decoded in full (a truncated file fails)."""
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        return img.size


def test_sweep_plot_and_table_are_written(bench):
    # the sweep figure: one panel per metric (accuracy, ECE, NLL, Brier, OOD AUROC) of
    # 4.2 x 3.6 inches at 100 dpi
    assert png_size(bench / "r_bayes_sweep.png") == (5 * 420, 360)
    sweep = (bench / "results.md").read_text().split("## r_bayes sweep")[1]
    names = re.findall(r"^\| (partial[\d.]+) \|", sweep, flags=re.M)
    assert names == ["partial1", "partial5", "partial10", "partial20", "partial40", "partial80"]
    assert not list(bench.glob(".*tmp*"))


# ----------------------------------------------------------------------- errors
def test_unknown_method_fails_in_one_line_and_writes_nothing(digits, tmp_path):
    out = tmp_path / "out"
    result = invoke(*TINY, "--data", str(digits), "--methods", "deterministic,bogus3",
                    "--out", str(out))  # fmt: skip
    assert result.exit_code != 0
    message = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(message) == 1 and "bogus3" in message[0]
    assert "ensembleM" in message[0] and "deterministic" in message[0]  # the valid names
    assert not out.exists()


def test_output_that_is_a_file_fails_before_training(digits, tmp_path):
    out = tmp_path / "taken"
    out.write_text("keep me")
    result = invoke(*TINY, *BUDGET, "--data", str(digits), "--out", str(out))
    assert result.exit_code != 0 and "is a file" in result.output
    assert "training" not in result.output and out.read_text() == "keep me"


def test_method_names_are_checked_before_anything_is_built():
    assert check_method_names(" deterministic, ensemble5 ,partial1") == [
        "deterministic",
        "ensemble5",
        "partial1",
    ]
    for bad in ("", "deterministic,,partial1", "partial", "ensemble"):
        with pytest.raises(ValueError, match="known"):
            check_method_names(bad)
    assert sweep_method_names((0.01, 0.1, 0.4)) == {"partial1": 0.01, "partial10": 0.1,
                                                    "partial40": 0.4}  # fmt: skip
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        sweep_method_names((5,))


# ----------------------------------------------------------------------- the default model
def test_without_arch_a_resnet18_is_sized_from_the_bundled_data(tmp_path):
    out = tmp_path / "out"
    args = ["--data", "demo:digits", "--methods", "deterministic", "--no-sweep"]
    result = invoke(*args, "--epochs", "0", "--pretrain-epochs", "0", "--out", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    expected = sum(p.numel() for p in resnet18(num_classes=10, in_channels=1).parameters())
    assert data["rows"][0]["parameters"] == expected
    assert data["settings"]["model"].startswith("bnnconvert.models:resnet18(num_classes=10")
    assert not (out / "r_bayes_sweep.png").exists() and data["sweep"] == []


# ----------------------------------------------------------------------- the library call
def test_run_benchmark_is_reproducible_and_renders_without_a_sweep():
    from torch.utils.data import Subset

    from bnnconvert.data import demo_classification, make_loader
    from bnnconvert.methods import run_comparison

    def once():
        train = make_loader(Subset(demo_classification("train"), range(60)), 20, shuffle=True,
                            seed=0, drop_last=True)  # fmt: skip
        test = make_loader(Subset(demo_classification("test"), range(40)), 20, shuffle=False,
                           seed=0)  # fmt: skip
        return run_comparison(tiny_cnn, train, test, task="multiclass",
                             methods=["deterministic", "partial5"], sweep=None, epochs=1,
                             samples=2, seed=3)  # fmt: skip

    first, second = once(), once()
    keys = ("accuracy", "nll", "ece", "brier", "train_flops")
    assert [[r[k] for k in keys] for r in first.rows] == [[r[k] for k in keys] for r in second.rows]
    assert first.sweep == [] and "## r_bayes sweep" not in first.markdown()
    with pytest.raises(ValueError, match="no sweep"):
        first.sweep_figure()


def nuclei_folder(root: Path, n: dict[str, int]) -> Path:
    """The first tiles of the bundled nuclei folder: an image + mask folder per split."""
    for split, count in n.items():
        for kind in ("images", "masks"):
            (root / split / kind).mkdir(parents=True)
            source = sorted((DEMO / "nuclei" / split / kind).glob("*.png"))[:count]
            for path in source:
                shutil.copy(path, root / split / kind / path.name)
    return root


def test_segmentation_benchmark_reports_dice_and_plots_the_sweep(tmp_path):
    out = tmp_path / "out"
    unet = ["--arch", "bnnconvert.models:UNet", "--arch-kwargs", "base=4,depth=2"]
    folder = nuclei_folder(tmp_path / "nuclei", {"train": 40, "test": 8})
    data = ["--data", str(folder), "--size", "32"]
    result = invoke(*unet, *BUDGET, *data, "--methods", "deterministic", "--out", str(out))
    assert result.exit_code == 0, result.output
    header, rows = first_table((out / "results.md").read_text())
    assert header[:3] == ["method", "Dice", "IoU"] and "accuracy" not in header
    assert list(rows) == ["deterministic"]
    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["sweep"]] == list(sweep_method_names())
    assert all(0.0 <= r["dice"] <= 1.0 for r in data["sweep"])
    assert png_size(out / "r_bayes_sweep.png") == (4 * 420, 360)  # Dice, ECE, NLL, Brier


def test_temperature_without_validation_split_fails_before_training(digits, tmp_path):
    out = tmp_path / "out"
    result = invoke(*TINY, "--data", str(digits), "--methods", "deterministic,temperature",
                    "--out", str(out))  # fmt: skip
    assert result.exit_code != 0 and "--val-split" in result.output
    assert not out.exists()
