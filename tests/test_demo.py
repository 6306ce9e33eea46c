"""``bnnconvert demo`` and :func:`bnnconvert.demo.run_demo` at the "quick" budget.

One CLI run (module fixture) and one library run cost about 20 s of CPU each (marked
``integration``); the other tests read their outputs or fail before any training.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from bnnconvert.cli import main
from bnnconvert.demo import BUDGETS, Recipe, _slug, run_demo
from bnnconvert.flops import count_flops
from bnnconvert.models import UNet, resnet18

RECIPE = Recipe()
NAME = {kind: RECIPE.name(task) for kind, task in (("classification", "multiclass"),
                                                    ("segmentation", "segmentation"))}  # fmt: skip
PLOTS = {  # name: (width, height) in pixels, the figure sizes at 100 dpi
    "reliability_deterministic.png": (500, 600),
    f"reliability_{_slug(NAME['classification'])}.png": (500, 600),
    "segmentation.png": (1200, 400),
}
PAPER = "partial 1 %, the paper's ELBO"
LAPLACE = "last-layer Laplace (laplace-torch)"
ROWS = {
    kind: ["deterministic (step 1)", "deterministic", "temperature scaling"]
    + ([LAPLACE] if kind == "classification" else [])
    + [NAME[kind], f"{NAME[kind]}, at its means", PAPER]
    for kind in NAME
}


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
    for row in ROWS["classification"] + ROWS["segmentation"]:
        assert f"| {row} |" in report
    assert "OOD AUROC" in report and "Dice" in report


@pytest.mark.integration
def test_metrics_are_finite_and_in_range(cli_run):
    _, _, res = cli_run
    for kind, rows in ROWS.items():
        assert [r["method"] for r in res[kind]] == rows
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
def test_paired_differences_against_temperature_scaling(cli_run):
    """Every other row minus temperature scaling, item by item: the estimates equal the
    differences of the tables' NLL (the classification metrics, the segmentation meter's
    pixel NLL) and OOD AUROC, computed independently; each inside its interval; the
    per-item values stay out of results.json."""
    out, _, res = cli_run
    for kind, rows in ROWS.items():
        table = {r["method"]: r for r in res[kind]}
        paired = res["paired"][kind]
        assert set(paired) == set(rows) - {"temperature scaling"}
        ts = table["temperature scaling"]
        for name, diff in paired.items():
            nll = diff["nll"]
            assert nll["estimate"] == pytest.approx(table[name]["nll"] - ts["nll"], abs=1e-5)
            assert nll["low"] <= nll["estimate"] <= nll["high"]
            if kind == "classification":
                ood = diff["ood_auroc"]["estimate"]
                assert ood == pytest.approx(table[name]["ood_auroc"] - ts["ood_auroc"], abs=1e-6)
        assert all("per_item" not in r for r in res[kind])
    report = (out / "results.md").read_text()
    assert report.count("### Paired differences against temperature scaling") == 2


@pytest.mark.integration
def test_the_models_learned(cli_run):
    """Far above chance (10 classes: 0.1; Dice of an all-background mask: 0), and the
    photographs are told from the digits by the entropy better than a coin flip (except by
    the paper's recipe, whose sigma of softplus(-3) = 0.049 on the grad2 entries makes the
    photographs look *more* certain: docs/results.md)."""
    _, _, res = cli_run
    for row in res["classification"]:
        assert row["accuracy"] > 0.1 + 0.25, (row["method"], row["accuracy"])
        if row["method"] != PAPER:
            assert row["ood_auroc"] > 0.5 + 0.15, (row["method"], row["ood_auroc"])
    trained = [r for r in res["classification"] if r["method"] != "deterministic (step 1)"]
    assert all(r["accuracy"] > 0.6 for r in trained)
    for row in res["segmentation"]:
        assert row["dice"] > 0.5, (row["method"], row["dice"])


@pytest.mark.integration
def test_parameters_and_costs_follow_the_recipe(cli_run):
    """Parameters: the paper's rows add k = round(1 % of the conv/linear entries) (one rho
    each), the recommended recipe one per entry of its selection. Training cost in epochs
    of deterministic steps over the checkpoint's P + E: the paper's P + saliency + E x S;
    inference: S forwards per prediction against one."""
    _, stdout, res = cli_run
    budget, samples, eval_samples = BUDGETS["quick"], RECIPE.training.samples, RECIPE.eval_samples
    for kind, model, p, e, table, batch in (
        ("classification", resnet18(10, 1), budget.pretrain_epochs, budget.epochs,
         "ResNet18, digits", (50, 1, 28, 28)),
        ("segmentation", UNet(1, 2, base=budget.unet_base), budget.seg_pretrain_epochs,
         budget.seg_epochs, "UNet, nuclei", (10, 1, 64, 64)),
    ):  # fmt: skip
        rows = {r["method"]: r for r in res[kind]}
        det = sum(q.numel() for q in model.parameters())
        k = round(0.01 * _convertible_entries(model))
        assert rows["deterministic"]["parameters"] == det
        assert rows["temperature scaling"]["parameters"] == det
        assert rows[PAPER]["parameters"] == det + k
        last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
        task = "multiclass" if kind == "classification" else "segmentation"
        selection = RECIPE.choice(task)[1]
        selected = k if selection == "grad2" else sum(q.numel() for q in last.parameters())
        assert rows[NAME[kind]]["parameters"] == det + selected
        assert rows["deterministic"]["train_flops_x"] == pytest.approx(1.0)
        assert rows["deterministic (step 1)"]["train_flops_x"] == pytest.approx(p / (p + e))
        assert rows[PAPER]["train_flops_x"] == pytest.approx((p + 1 + e * samples) / (p + e))
        assert rows[NAME[kind]]["train_flops_x"] > 1.0
        # S forwards when the first layers are Bayesian (the grad2 top 1 % reaches conv1);
        # when only the last layer is, the S draws share the rest (hoisting): the forward F
        # once, the classifier's N x in x out FLOPs S - 1 more times, 5 per entry per draw
        forward = count_flops(model, torch.randn(batch)).total
        assert rows[PAPER]["inference_flops_x"] == pytest.approx(eval_samples, rel=0.02)
        recipe_samples = RECIPE.samples(task)
        if selection == "grad2":
            assert rows[NAME[kind]]["inference_flops_x"] == pytest.approx(recipe_samples, rel=0.02)
        elif RECIPE.predictive(task) == "probit":
            # one forward, the classifier once more on x^2 (the variance), and per item
            # x^2 (N x in), per entry softplus, scale and square, per logit 4 (the probit)
            n, cin, cout = batch[0], last.in_features, last.out_features
            extra = n * cin * cout + n * cin + 3 * selected + 4 * n * cout
            assert rows[NAME[kind]]["inference_flops_x"] == pytest.approx(
                (forward + extra) / forward, rel=1e-9
            )
        else:
            head = (recipe_samples - 1) * batch[0] * last.in_features * last.out_features
            expected = (forward + head + recipe_samples * 5 * selected) / forward
            assert rows[NAME[kind]]["inference_flops_x"] == pytest.approx(expected, rel=1e-9)
        assert rows[f"{NAME[kind]}, at its means"]["inference_flops_x"] == pytest.approx(1.0)
        # the FLOP table of the paper's rows counts a prediction at the S of the metrics
        # beside it: S x (F + 5k) / F on a training batch, as the metrics table's row
        inference = res["flops"][table]["partial r = 1 %"]["inference"]
        assert inference == pytest.approx(eval_samples * (forward + 5 * k) / forward, rel=1e-9)
        assert inference == pytest.approx(rows[PAPER]["inference_flops_x"], rel=0.02)
    assert f"S = {samples} samples per training step and S = {eval_samples} per" in stdout


@pytest.mark.integration
def test_the_posterior_rows_are_calibrated_on_validation_data(cli_run):
    """The recommended recipe's note names the t and T fitted on the validation split;
    at t = 0 (its means) it predicts like the checkpoint: the same accuracy."""
    _, _, res = cli_run
    for kind in ("classification", "segmentation"):
        rows = {r["method"]: r for r in res[kind]}
        note = rows[NAME[kind]]["note"]
        assert "t = " in note and "T = " in note and "validation" in note
        assert "T = " in rows["temperature scaling"]["note"]
        key = "accuracy" if kind == "classification" else "dice"
        means = rows[f"{NAME[kind]}, at its means"]
        assert means[key] == pytest.approx(rows["deterministic"][key], abs=0.011)


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
        (["--r-bayes", "one"], "'one' is not a number"),
        (["--r-bayes", "1,5"], "r_bayes 5 is above 1 (for 5 %, write 5%)"),
    ],
)
def test_cli_rejects_bad_options_with_one_line(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["demo", *args, "--out", str(out)])
    assert result.exit_code != 0
    assert message in result.output
    assert not out.exists()


def test_recipe_rejects_unknown_choices():
    with pytest.raises(ValueError, match="posterior"):
        Recipe(posterior="mcmc")
    with pytest.raises(ValueError, match="seg_selection"):
        Recipe(seg_selection="first layer")
    own = Recipe(posterior="vi", selection="grad2", seg_posterior="laplace")
    assert own.name("multiclass") == "bnnconvert: vi, grad2"
    assert own.choice("segmentation") == ("laplace", Recipe().seg_selection)


def test_recipe_samples_follow_the_selection():
    """Many draws where they cost a classifier forward (the last layer), eval_samples where
    every draw runs the whole network (grad2); the probit predictive (last layer only)
    draws none."""
    own = Recipe(selection="last layer", seg_selection="grad2", eval_samples=7,
                 last_layer_samples=40, last_layer_predictive="sample")  # fmt: skip
    assert own.samples("multiclass") == 40 and own.samples("segmentation") == 7
    swapped = Recipe(selection="grad2", seg_selection="last layer", eval_samples=7,
                     last_layer_samples=40, last_layer_predictive="sample")  # fmt: skip
    assert swapped.samples("multiclass") == 7 and swapped.samples("segmentation") == 40
    probit = Recipe(selection="last layer", seg_selection="grad2", eval_samples=7,
                    last_layer_predictive="probit")  # fmt: skip
    assert probit.predictive("multiclass") == "probit" and probit.samples("multiclass") == 1
    assert probit.predictive("segmentation") == "sample" and probit.samples("segmentation") == 7
    with pytest.raises(ValueError, match="last_layer_predictive"):
        Recipe(last_layer_predictive="laplace")
