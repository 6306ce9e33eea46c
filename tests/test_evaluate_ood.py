"""OOD detection scores (``metrics.ood_scores``, ``bnnconvert evaluate --ood``), the
risk-coverage curve and the reliability diagram of ``evaluate --plots``, each checked
against scikit-learn or numpy computed from the Python API's predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torch import nn

import bnnconvert
from bnnconvert import convert, predict
from bnnconvert.cli import main
from bnnconvert.data import demo_classification, make_loader, open_data
from bnnconvert.metrics import (
    ECE_BINS,
    OOD_SCORES,
    aurc,
    entropy_auroc,
    evaluate,
    expected_calibration_error,
    image_uncertainty,
    ood_scores,
    risk_coverage,
)
from bnnconvert.predict import Prediction
from bnnconvert.training import seed_everything, train

pytest.importorskip("matplotlib")
from bnnconvert import plots

SAMPLES = 3
ARCH = f"{__name__}:tiny_cnn"


def tiny_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A small CNN that learns the digits in a few seconds."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny CNN trained on the bundled digits, 20 % of its entries Bayesian, saved."""
    seed_everything(0)
    net = tiny_cnn()
    data = make_loader(demo_classification("train"), 50, shuffle=True, seed=0, drop_last=True)
    train(net, data, 4, lr=0.05, momentum=0.9, task="multiclass", seed=0, progress=False)
    pbnn = convert(net, "magnitude", 0.2, rho_init=-2.0)
    path = tmp_path_factory.mktemp("ood") / "bayes.pt"
    bnnconvert.save(pbnn, path, arch=ARCH, arch_kwargs={"num_classes": 10, "in_channels": 1})
    return path


def api_predictions(path, seed: int = 0) -> tuple[Prediction, Prediction]:
    """What the CLI computes, through the Python API: test digits, then the photographs,
    each after seeding, with the CLI's loaders (batch 50, seed 0)."""
    net = bnnconvert.load(path)
    out = []
    for spec in ("demo:digits", "demo:ood"):
        seed_everything(seed)
        loader = open_data(spec, "test", batch_size=50, seed=seed)
        out.append(predict(net, loader, SAMPLES, keep_samples=True, output_device="cpu"))
    return out[0], out[1]


# ---------------------------------------------------------------------- references
def reference_scores(prediction: Prediction) -> dict[str, np.ndarray]:
    """Per-image scores in numpy: the entropy and mutual information the prediction holds,
    1 - the top probability, averaged over everything but the item dimension."""
    probs = prediction.probs.double().numpy()
    if prediction.activation == "sigmoid":
        top = 1 - np.maximum(probs, 1 - probs)
    else:
        top = 1 - probs.max(axis=1)
    per_item = {
        "entropy": prediction.entropy.double().numpy(),
        "mutual_info": prediction.mutual_info.double().numpy(),
        "max_prob": top,
    }
    return {k: v.reshape(len(v), -1).mean(1) for k, v in per_item.items()}


def sklearn_ood(in_dist: Prediction, ood: Prediction) -> dict[str, dict[str, float]]:
    """AUROC, AP and FPR at the first ROC point with TPR >= 0.95, OOD positive."""
    neg, pos = reference_scores(in_dist), reference_scores(ood)
    labels = np.r_[np.zeros(len(in_dist)), np.ones(len(ood))]
    out = {}
    for name in OOD_SCORES:
        scores = np.r_[neg[name], pos[name]]
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        out[name] = {
            "auroc": roc_auc_score(labels, scores),
            "aupr": average_precision_score(labels, scores),
            "fpr95": fpr[np.argmax(tpr >= 0.95)],
        }
    return out


def categorical_entropy(q: np.ndarray) -> np.ndarray:
    """-sum_c q_c log q_c over the last axis, 0 log 0 = 0."""
    return -(q * np.log(np.where(q > 0, q, 1))).sum(-1)


def mutual_info_from_samples(samples: torch.Tensor) -> np.ndarray:
    """MI = H[mean_s p_s] - mean_s H[p_s] of softmax samples (S, N, C), numpy."""
    p = samples.double().numpy()
    return np.maximum(categorical_entropy(p.mean(0)) - categorical_entropy(p).mean(0), 0)


def assert_close(got: dict, expected: dict, tol: float) -> None:
    for name in OOD_SCORES:
        for key in ("auroc", "aupr", "fpr95"):
            assert got[name][key] == pytest.approx(expected[name][key], abs=tol), (name, key)


# ---------------------------------------------------------------------- the library
def test_ood_scores_equal_scikit_learn_on_real_predictions(model_file):
    digits, photos = api_predictions(model_file)
    scores = ood_scores(digits, photos)
    assert list(scores) == list(OOD_SCORES)
    assert_close(scores, sklearn_ood(digits, photos), tol=1e-6)
    assert scores["entropy"]["auroc"] == entropy_auroc(digits, photos)
    # the mutual information is the samples' (the prediction keeps it per item)
    for pred in (digits, photos):
        np.testing.assert_allclose(
            pred.mutual_info.numpy(), mutual_info_from_samples(pred.samples), atol=1e-5
        )
    # the trained classifier (about 88 % accurate) tells photographs from digits better
    # than chance by each score (about 0.74, 0.74, 0.67)
    assert scores["entropy"]["auroc"] > 0.65 and scores["max_prob"]["auroc"] > 0.65
    assert scores["mutual_info"]["auroc"] > 0.55


@pytest.mark.parametrize(
    ("model", "shape", "activation"),
    [
        (nn.Conv2d(1, 3, 3, padding=1), (6, 1, 8, 8), "softmax"),  # segmentation, 3 classes
        (nn.Conv2d(1, 1, 3, padding=1), (7, 1, 8, 8), "sigmoid"),  # binary, one channel
        (nn.Linear(5, 4), (9, 5), "sigmoid"),  # multi-label
    ],
)
def test_per_image_means_for_segmentation_and_sigmoid(model, shape, activation):
    torch.manual_seed(0)
    pbnn = convert(model, "magnitude", 0.5, rho_init=0.0)
    in_dist = predict(pbnn, torch.randn(shape), 4, activation=activation)
    ood = predict(pbnn, 3 * torch.randn(5, *shape[1:]), 4, activation=activation)
    scores = ood_scores(in_dist, ood)
    assert_close(scores, sklearn_ood(in_dist, ood), tol=1e-6)
    for name, values in reference_scores(ood).items():
        np.testing.assert_allclose(image_uncertainty(ood, name).numpy(), values, rtol=1e-6)


def test_a_deterministic_model_has_chance_mutual_information():
    model = nn.Linear(6, 3)
    in_dist = predict(model, torch.randn(20, 6), 3)
    ood = predict(model, 4 * torch.randn(30, 6), 3)
    scores = ood_scores(in_dist, ood)
    assert scores["mutual_info"]["auroc"] == 0.5
    assert scores["mutual_info"]["aupr"] == pytest.approx(30 / 50)  # the OOD share
    assert scores["mutual_info"]["fpr95"] == 1.0  # every item flagged at MI >= 0


def test_bad_predictions_are_refused():
    model = nn.Linear(6, 3)
    softmax = predict(model, torch.randn(4, 6), 1)
    with pytest.raises(ValueError, match="different activations"):
        ood_scores(softmax, predict(model, torch.randn(4, 6), 1, activation="sigmoid"))
    raw = predict(model, torch.randn(4, 6), 1, activation="none")
    with pytest.raises(ValueError, match="activation='softmax'"):
        ood_scores(raw, raw)
    with pytest.raises(ValueError, match="score must be one of"):
        image_uncertainty(softmax, "variance")
    empty = Prediction(torch.zeros(0, 3), torch.zeros(0, 3), entropy=torch.zeros(0))
    with pytest.raises(ValueError, match="at least one in-distribution and one OOD"):
        ood_scores(softmax, empty)


# ---------------------------------------------------------------------- the command line
def _invoke(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def parse_ood_table(output: str) -> dict[str, dict[str, float]]:
    """{score: {auroc, aupr, fpr95}} from the lines after the OOD title."""
    lines = output.split("OOD: ", 1)[1].splitlines()
    assert lines[1].split() == ["score", "AUROC", "AUPR", "FPR95"]
    table = {}
    for line in lines[2:5]:
        name, *values = line.split()
        table[name] = dict(zip(("auroc", "aupr", "fpr95"), map(float, values)))
    return table


def test_cli_ood_scores_equal_scikit_learn_on_the_api_predictions(model_file, tmp_path):
    out = _invoke(
        "evaluate", model_file, "--data", "demo:digits", "--ood", "demo:ood",
        "--samples", SAMPLES, "--device", "cpu", "--json", tmp_path / "m.json",
    )  # fmt: skip
    assert "on demo:digits [test], 500 items" in out
    assert "OOD: demo:ood [test], 500 items" in out
    printed = parse_ood_table(out)
    assert list(printed) == list(OOD_SCORES)
    expected = sklearn_ood(*api_predictions(model_file))
    assert_close(printed, expected, tol=5.1e-5)  # printed with 4 decimals
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["ood"]["data"] == "demo:ood" and record["ood"]["items"] == 500
    assert_close(record["ood"]["scores"], expected, tol=1e-6)


def test_cli_same_seed_same_ood_numbers(model_file):
    args = ["evaluate", model_file, "--data", "demo:digits", "--ood", "demo:ood",
            "--samples", SAMPLES, "--device", "cpu"]  # fmt: skip
    first, again = _invoke(*args), _invoke(*args)
    assert parse_ood_table(first) == parse_ood_table(again)
    other = parse_ood_table(_invoke(*args, "--seed", "1"))
    assert other["mutual_info"] != parse_ood_table(first)["mutual_info"]  # other weight draws


def test_cli_missing_ood_data_fails_in_one_line_before_any_output(model_file, tmp_path):
    result = CliRunner().invoke(
        main,
        ["evaluate", str(model_file), "--data", "demo:digits", "--ood", str(tmp_path / "no.npz"),
         "--device", "cpu", "--json", str(tmp_path / "m.json")],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "no data at" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.json").exists()


# ---------------------------------------------------------------------- plots
def png_size(path) -> tuple[int, int]:
    """(width, height) of a PNG decoded in full (a truncated file fails)."""
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        return img.size


def legend_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_cli_plots_use_the_bins_of_the_printed_ece(model_file, tmp_path, monkeypatch):
    figures = {}
    for name in ("reliability_diagram", "risk_coverage_curve"):
        real = getattr(plots, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            figures[_name] = _real(*args, **kwargs)
            return figures[_name]

        monkeypatch.setattr(plots, name, spy)
    out = _invoke(
        "evaluate", model_file, "--data", "demo:digits", "--samples", SAMPLES,
        "--device", "cpu", "--json", tmp_path / "m.json", "--plots", tmp_path / "plots",
    )  # fmt: skip
    assert png_size(tmp_path / "plots" / "reliability.png") == (500, 600)
    assert png_size(tmp_path / "plots" / "risk_coverage.png") == (500, 400)
    assert "risk_coverage.png" in out
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    reliability = figures["reliability_diagram"]
    assert len(reliability.axes[1].patches) == ECE_BINS  # one share bar per bin
    assert f"outcome (ECE = {metrics['ece']:.3f})" in legend_texts(reliability)
    assert f"AURC = {metrics['aurc']:.4f}" in legend_texts(figures["risk_coverage_curve"])


def _classifier_outputs(n: int = 400, classes: int = 4):
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(n, classes, generator=g)
    targets = torch.distributions.Categorical(logits=0.6 * logits).sample()
    return torch.softmax(logits, 1), targets


def test_reliability_diagram_defaults_to_the_ece_bins():
    probs, targets = _classifier_outputs()
    fig = plots.reliability_diagram(probs, targets)
    assert len(fig.axes[1].patches) == ECE_BINS
    ece = expected_calibration_error(probs, targets, n_bins=ECE_BINS)
    zeros = torch.zeros(len(probs))
    prediction = Prediction(probs, probs * 0, entropy=zeros, expected_entropy=zeros,
                            mutual_info=zeros)  # fmt: skip
    assert evaluate(prediction, targets)["ece"] == float(ece)  # the table's ECE
    assert f"outcome (ECE = {float(ece):.3f})" in legend_texts(fig)
    ten = expected_calibration_error(probs, targets, n_bins=10)
    assert f"outcome (ECE = {float(ten):.3f})" in legend_texts(
        plots.reliability_diagram(probs, targets, 10)
    )


def reference_curve(confidence: np.ndarray, correct: np.ndarray):
    order = np.argsort(-confidence, kind="stable")
    kept = np.arange(1, len(order) + 1)
    return kept / len(order), np.cumsum(1 - correct[order]) / kept


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_risk_coverage_curve_matches_numpy(tmp_path, task):
    probs, targets = _classifier_outputs()
    if task == "multilabel":
        targets = torch.nn.functional.one_hot(targets, 4)
        p = probs.numpy().ravel()
        confidence, correct = np.maximum(p, 1 - p), ((p > 0.5) == targets.numpy().ravel())
    else:
        confidence = probs.numpy().max(1)
        correct = probs.numpy().argmax(1) == targets.numpy()
    coverage, risk = reference_curve(confidence, correct.astype(float))
    got_coverage, got_risk = risk_coverage(probs, targets, task=task)
    np.testing.assert_allclose(got_coverage.numpy(), coverage)
    np.testing.assert_allclose(got_risk.numpy(), risk)
    area = aurc(probs, targets, task=task)
    assert float(area) == pytest.approx(risk.mean(), rel=1e-12)
    path = tmp_path / "rc.png"
    fig = plots.risk_coverage_curve(probs, targets, path, task=task, dpi=50)
    assert png_size(path) == (250, 200)  # figsize (5, 4) x 50 dpi
    x, y = fig.axes[0].lines[0].get_data()
    np.testing.assert_allclose(x, coverage)
    np.testing.assert_allclose(y, risk)
    assert f"AURC = {float(area):.4f}" in legend_texts(fig)
    with pytest.raises(ValueError, match="at least one item"):
        plots.risk_coverage_curve(probs[:0], targets[:0], task=task)
