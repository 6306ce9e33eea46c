"""``bnnconvert demo`` and :func:`bnnconvert.demo.run_demo` at the "quick" budget.

One CLI run (module fixture) and one library run cost about 20 s of CPU each (marked
``integration``); the other tests read their outputs or fail before any training.
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from PIL import Image
from torch import nn

from bnnconvert.cli import main
from bnnconvert.demo import BUDGETS, Recipe, run_demo
from bnnconvert.models import UNet, resnet18

PLOTS = {  # name: (width, height) in pixels, the figure sizes at 100 dpi
    "reliability_deterministic.png": (500, 600),
    "reliability_partial_1.png": (500, 600),
    "segmentation.png": (1200, 400),
}
ROWS = ["deterministic (step 1)", "deterministic", "partial 1 %"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    return out, result.output, json.loads((out / "results.json").read_text())


def _convertible_entries(model: nn.Module) -> int:
    """Weights and biases of every Conv/ConvTranspose/Linear layer, counted directly."""
    layers = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    return sum(p.numel() for m in model.modules() if isinstance(m, layers) for p in m.parameters())


@pytest.mark.integration
def test_cli_writes_report_and_plots(cli_run):
    out, stdout, _ = cli_run
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["results.md", "results.json", *PLOTS])  # no temporary folder left
    for name, size in PLOTS.items():
        with Image.open(out / name) as img:
            img.load()  # decodes every pixel: a truncated file fails here
            assert img.format == "PNG" and img.size == size
            darkest, brightest = img.convert("L").getextrema()
            assert brightest - darkest > 100  # a drawing, not a blank page
    report = (out / "results.md").read_text()
    assert report in stdout  # the command prints the report it wrote
    for row in ROWS:
        assert f"| {row} |" in report
    assert "OOD AUROC" in report and "Dice" in report


@pytest.mark.integration
def test_metrics_are_finite_and_in_range(cli_run):
    _, _, res = cli_run
    assert [r["method"] for r in res["classification"]] == ROWS
    assert [r["method"] for r in res["segmentation"]] == ROWS
    for row in res["classification"]:
        for key in ("accuracy", "auc", "ece", "brier", "ood_auroc"):
            assert 0.0 <= row[key] <= 1.0, (row["method"], key, row[key])
        assert math.isfinite(row["nll"]) and row["nll"] > 0
        assert 0.0 <= row["entropy"] <= math.log(10) + 1e-6
    for row in res["segmentation"]:
        for key in ("dice", "iou", "ece", "brier", "pixel_accuracy"):
            assert 0.0 <= row[key] <= 1.0, (row["method"], key, row[key])
        assert 0.0 <= row["entropy"] <= math.log(2) + 1e-6
        assert row["ood_auroc"] is None
    assert res["budget"] == {**res["budget"], "name": "quick", "r_values": [0.01]}
    assert res["seed"] == 3


@pytest.mark.integration
def test_the_models_learned(cli_run):
    """Far above chance (10 classes: 0.1; Dice of an all-background mask: 0), and the
    photographs are told from the digits by the entropy better than a coin flip."""
    _, _, res = cli_run
    for row in res["classification"]:
        assert row["accuracy"] > 0.1 + 0.25, (row["method"], row["accuracy"])
        assert row["ood_auroc"] > 0.5 + 0.15, (row["method"], row["ood_auroc"])
    trained = [r for r in res["classification"] if r["method"] != "deterministic (step 1)"]
    assert all(r["accuracy"] > 0.6 for r in trained)
    for row in res["segmentation"]:
        assert row["dice"] > 0.5, (row["method"], row["dice"])


@pytest.mark.integration
def test_parameters_and_flops_follow_the_recipe(cli_run):
    """k = round(1 % of the conv/linear entries) extra parameters (one rho each); the
    pipeline's training FLOPs (P deterministic epochs + one saliency epoch + E ELBO epochs
    of S forwards) over P + E deterministic epochs; S forwards per prediction."""
    _, _, res = cli_run
    budget, samples = BUDGETS["quick"], Recipe().training.samples
    eval_samples = Recipe().eval_samples
    for kind, model, p, e in (
        ("classification", resnet18(10, 1), budget.pretrain_epochs, budget.epochs),
        (
            "segmentation",
            UNet(1, 2, base=budget.unet_base),
            budget.seg_pretrain_epochs,
            budget.seg_epochs,
        ),
    ):
        rows = {r["method"]: r for r in res[kind]}
        det = sum(q.numel() for q in model.parameters())
        k = round(0.01 * _convertible_entries(model))
        assert rows["deterministic"]["parameters"] == det
        assert rows["partial 1 %"]["parameters"] == det + k
        assert rows["deterministic"]["train_flops_x"] == pytest.approx(1.0)
        assert rows["deterministic (step 1)"]["train_flops_x"] == pytest.approx(p / (p + e))
        expected = (p + 1 + e * samples) / (p + e)  # sampling and KL are O(k): small
        assert rows["partial 1 %"]["train_flops_x"] == pytest.approx(expected, rel=0.02)
        assert rows["partial 1 %"]["inference_flops_x"] == pytest.approx(eval_samples, rel=0.02)


@pytest.mark.integration
def test_run_demo_writes_the_same_numbers_for_the_same_seed(cli_run, tmp_path):
    _, _, res = cli_run
    result = run_demo(tmp_path / "lib", quick=True, seed=3)
    assert sorted(p.name for p in result.files) == sorted(["results.md", "results.json", *PLOTS])
    assert all(p.parent == tmp_path / "lib" and p.is_file() for p in result.files)
    again = result.to_json()
    for kind in ("classification", "segmentation"):
        assert again[kind] == res[kind]
    assert (
        json.loads((tmp_path / "lib" / "results.json").read_text())["classification"]
        == (res["classification"])
    )


def test_bad_arguments_fail_before_any_output(tmp_path):
    with pytest.raises(ValueError, match="either quick or full"):
        run_demo(tmp_path / "a", quick=True, full=True)
    with pytest.raises(ValueError, match=r"r_bayes must be in \(0, 1\]"):
        run_demo(tmp_path / "b", quick=True, r_bayes=[0.0])
    with pytest.raises(ValueError, match="r_bayes is empty"):
        run_demo(tmp_path / "c", quick=True, r_bayes=[])
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        run_demo(a_file, quick=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quick", "--full"], "either --quick or --full"),
        (["--r-bayes", "0,5"], "r_bayes must be in (0, 1]"),
        (["--r-bayes", "one"], "percentages separated by commas"),
    ],
)
def test_cli_rejects_bad_options_with_one_line(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["demo", *args, "--out", str(out)])
    assert result.exit_code != 0
    assert message in result.output
    assert not out.exists()


def test_sigma_init_per_task_reaches_convert():
    """The sigma initialisation of the recipe's task reaches convert: the segmentation
    delta for the UNet, the classifier's otherwise (whatever values they are tuned to)."""
    import torch
    from torch import nn

    from bnnconvert import convert
    from bnnconvert.demo import Recipe

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 2, 1))
    own = Recipe(moped_delta=0.2, seg_moped_delta=0.05)
    for recipe, task, delta in [
        (Recipe(), "segmentation", Recipe().seg_moped_delta),
        (Recipe(), "multiclass", Recipe().moped_delta),
        (own, "segmentation", 0.05),
        (own, "multiclass", 0.2),
        (Recipe(seg_moped_delta=None), "segmentation", Recipe().moped_delta),
    ]:
        pbnn = convert(net, "magnitude", 0.5, **recipe.sigma_init(task))
        layer = pbnn[0]
        idx = layer.bayes_index("weight").long()
        mu = layer.weight.detach().reshape(-1)[idx]
        sigma = layer.posterior_sigma("weight").reshape(-1)[idx]
        torch.testing.assert_close(sigma, delta * mu.abs())
