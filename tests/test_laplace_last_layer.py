"""bnnconvert.methods.LaplaceLastLayer: laplace-torch's last-layer Laplace under the protocol.

The reference is laplace-torch itself, called directly on the same trained model and data.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bnnconvert import BatchFormat
from bnnconvert.cli import main
from bnnconvert.methods import Deterministic, LaplaceLastLayer, evaluate_methods, get_method
from bnnconvert.methods.registry import check_method_names
from bnnconvert.models import UNet

CLASSES = 3
needs_laplace = pytest.mark.skipif(
    importlib.util.find_spec("laplace") is None,
    reason='needs laplace-torch: pip install "bnnconvert[compare]"',
)


def tiny_mlp(in_features: int = 6, num_classes: int = CLASSES) -> nn.Module:
    """A small MLP whose output is its last Linear layer's output."""
    return nn.Sequential(
        nn.Linear(in_features, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes)
    )


def tiny_cnn(num_classes: int = 2, in_channels: int = 1) -> nn.Module:
    """A small CNN for the command line test."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


@pytest.fixture(scope="module")
def data():
    """96 points of 3 separable classes; targets (N, 1) as MedMNIST stores them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


@pytest.fixture(scope="module")
def loader(data):
    x, y = data
    return DataLoader(TensorDataset(x, y[:, None]), batch_size=16, shuffle=False)


@pytest.fixture(scope="module")
def flat_loader(data):
    """The same batches with targets (N,), as the metrics take them."""
    return DataLoader(TensorDataset(*data), batch_size=16, shuffle=False)


@pytest.fixture(scope="module")
def trained(loader):
    """The tiny MLP trained for a few epochs (the checkpoint of a post hoc use)."""
    torch.manual_seed(0)
    return Deterministic(tiny_mlp(), task="multiclass").fit(loader, epochs=5, seed=0, lr=0.1).model


def reference(model: nn.Module, data, hessian_structure: str = "kron", **prior):
    """laplace-torch called directly: fit, marglik prior precision (scalar)."""
    import laplace

    x, y = data
    la = laplace.Laplace(
        copy.deepcopy(model),
        "classification",
        subset_of_weights="last_layer",
        hessian_structure=hessian_structure,
    )
    la.fit(DataLoader(TensorDataset(x, y), batch_size=16))
    la.optimize_prior_precision(method="marglik", prior_structure="scalar", **prior)
    return la


# ------------------------------------------------------------------ the predictive
@needs_laplace
@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_probit_predictive_and_prior_equal_laplace_torch(trained, loader, data, structure):
    method = LaplaceLastLayer(trained, task="multiclass", hessian_structure=structure)
    method.fit(loader, epochs=0)
    la = reference(trained, data, structure, pred_type="glm", link_approx="probit")
    x, _ = data
    with torch.no_grad():
        expected = la(x, pred_type="glm", link_approx="probit")
    prediction = method.predict(x)
    assert prediction.samples.shape == (1, len(x), CLASSES)
    torch.testing.assert_close(prediction.probs, expected, rtol=1e-4, atol=1e-5)
    assert method.prior_precision == pytest.approx(float(la.prior_precision), rel=1e-4)
    assert 0 < method.prior_precision < math.inf
    assert method.laplace_seconds > 0 and method.hessian_batches == len(loader)


@needs_laplace
@pytest.mark.parametrize("pred_type", ["nn", "glm"])
def test_mc_predictive_equals_laplace_torch_under_the_same_seed(trained, loader, data, pred_type):
    method = LaplaceLastLayer(trained, task="multiclass", pred_type=pred_type, link_approx="mc")
    method.fit(loader, epochs=0)
    la = reference(trained, data, pred_type=pred_type, link_approx="mc")
    x, _ = data
    torch.manual_seed(3)
    prediction = method.predict(x, samples=7)
    torch.manual_seed(3)
    with torch.no_grad():
        expected = la(x, pred_type=pred_type, link_approx="mc", n_samples=7)
    assert prediction.samples.shape == (7, len(x), CLASSES)
    torch.testing.assert_close(prediction.probs, expected, rtol=1e-4, atol=1e-6)
    assert prediction.mutual_info.mean() > 0  # the samples differ: epistemic uncertainty


@needs_laplace
def test_fit_trains_like_the_deterministic_baseline_then_fits_the_posterior(loader, data):
    model = tiny_mlp()
    det = Deterministic(model, task="multiclass").fit(loader, epochs=2, seed=0, lr=0.1)
    method = get_method("laplace-ll", model, task="multiclass")
    method.fit(loader, epochs=2, seed=0, lr=0.1)
    for key, value in det.model.state_dict().items():
        torch.testing.assert_close(method.model.state_dict()[key], value)
    assert method.train_steps == det.train_steps == 2 * len(loader)
    x, y = data
    prediction = method.predict(x)
    assert (prediction.probs.argmax(1) == y).float().mean() > 0.5  # learned: chance is 1/3
    # softmax of the returned log-probabilities is the predictive: rows sum to one
    torch.testing.assert_close(prediction.probs.sum(1), torch.ones(len(x)))


@needs_laplace
def test_comparison_rows_and_costs(trained, flat_loader):
    rows = evaluate_methods(
        trained,
        flat_loader,
        flat_loader,
        task="multiclass",
        methods="deterministic,laplace_ll,laplace_ll_diag",
        epochs=0,
        ood_data=torch.randn(32, 6) * 5,
    )
    by_name = {r["method"]: r for r in rows}
    det, kron, diag = by_name["deterministic"], by_name["laplace_ll"], by_name["laplace_ll_diag"]
    for row in (kron, diag):
        assert 0.0 <= row["ood_auroc"] <= 1.0 and math.isfinite(row["nll"])
        assert "prior precision" in row["note"] and row["inference_flops_x"] == 1.0
        assert row["train_flops"] > det["train_flops"]  # + one forward per Hessian batch
    # the posterior precision is held too: kron's factors, diag's P entries (16 x 3 + 3)
    assert diag["parameters"] == det["parameters"] + 16 * CLASSES + CLASSES
    assert kron["parameters"] > det["parameters"]
    assert kron["note"].startswith("kron Hessian, glm/probit predictive")


# ------------------------------------------------------------------ mapping batches
@dataclass
class _Output:
    """What a Hugging Face classifier returns (a ModelOutput): the logits and more."""

    logits: torch.Tensor
    hidden: torch.Tensor


class _KeywordMLP(nn.Module):
    """A Hugging Face-like classifier: ``model(features=x).logits``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, features: torch.Tensor) -> _Output:
        return _Output(logits=self.net(features), hidden=features.mean())


MAPPINGS = {
    "positional": (("image", "label"), BatchFormat("image", "label")),
    "keywords": (("features", "labels"), BatchFormat(["features"], "labels")),
}


@needs_laplace
@pytest.mark.parametrize("kind", list(MAPPINGS))
@pytest.mark.parametrize(
    "options",
    [{}, {"hessian_structure": "diag", "link_approx": "mc", "pred_type": "nn"}],
    ids=["kron-probit", "diag-nn-mc"],
)
def test_mapping_batches_give_the_predictions_of_tuple_batches(trained, data, kind, options):
    """Dict batches read by a BatchFormat (one positional key; or keyword inputs with a
    dataclass output) fit and predict as the same data in (input, target) tuples."""
    keys, fmt = MAPPINGS[kind]
    x, y = data
    tuples = [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(x), 16)]
    mappings = [dict(zip(keys, batch)) for batch in tuples]
    model = _KeywordMLP(copy.deepcopy(trained)) if fmt.keywords else trained
    expected = LaplaceLastLayer(trained, task="multiclass", **options).fit(tuples, epochs=0)
    method = LaplaceLastLayer(model, task="multiclass", **options)
    method.fit(mappings, epochs=0, batch_format=fmt)
    torch.manual_seed(3)
    reference = expected.predict(tuples, samples=4)
    torch.manual_seed(3)
    prediction = method.predict(mappings, samples=4)
    torch.testing.assert_close(prediction.samples, reference.samples)
    torch.testing.assert_close(prediction.targets, y)
    assert method.prior_precision == pytest.approx(expected.prior_precision, rel=1e-6)
    assert method.hessian_batches == expected.hessian_batches == len(tuples)
    assert method.num_parameters() == expected.num_parameters()
    inputs = {"features": x[:16]} if fmt.keywords else x[:16]
    assert method.flops(inputs) == expected.flops(x[:16])


# ------------------------------------------------------------------ errors
def test_segmentation_and_multilabel_fail_with_what_to_use_instead():
    for task in ("segmentation", "multilabel"):
        with pytest.raises(ValueError, match=r"task='multiclass'.*'mc_dropout'"):
            LaplaceLastLayer(UNet(1, 2, base=4, depth=2), task=task)
        with pytest.raises(ValueError, match="task='multiclass'"):
            check_method_names("deterministic,laplace_ll", task=task)  # before any training


@needs_laplace
def test_the_task_of_the_data_is_checked_at_fit():
    dataset = TensorDataset(torch.randn(8, 6), torch.zeros(8, dtype=torch.long))
    dataset.task = "segmentation"
    with pytest.raises(ValueError, match="task='segmentation'"):
        LaplaceLastLayer(tiny_mlp()).fit(DataLoader(dataset, batch_size=4), epochs=0)


def test_missing_laplace_torch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "laplace", None)  # import laplace now fails
    with pytest.raises(ImportError, match=r'pip install "bnnconvert\[compare\]"'):
        LaplaceLastLayer(tiny_mlp())
    with pytest.raises(ImportError, match=r"bnnconvert\[compare\]"):
        check_method_names("deterministic,laplace-ll")  # before anything is built
    assert check_method_names("deterministic,partial1") == ["deterministic", "partial1"]
    args = ["benchmark", "--data", "never-read.npz", "--methods", "laplace-ll", "--out", "o"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "bnnconvert[compare]" in result.output
    assert len(result.output.strip().splitlines()) == 1


@needs_laplace
def test_bad_arguments_and_calls_out_of_order(trained, loader):
    with pytest.raises(ValueError, match="link_approx='mc'"):
        LaplaceLastLayer(trained, pred_type="nn", link_approx="probit")
    with pytest.raises(ValueError, match="hessian_structure must be one of kron, diag, full"):
        LaplaceLastLayer(trained, hessian_structure="lowrank")
    with pytest.raises(ValueError, match=r"nn\.Linear"):
        LaplaceLastLayer(trained, last_layer="1")  # the BatchNorm1d
    with pytest.raises(RuntimeError, match="before predict"):
        LaplaceLastLayer(trained).predict(torch.randn(4, 6))
    log_softmax = nn.Sequential(copy.deepcopy(trained), nn.LogSoftmax(dim=1))
    with pytest.raises(ValueError, match=r"last module called is an nn\.Linear"):
        LaplaceLastLayer(log_softmax, task="multiclass").fit(loader, epochs=0)
    with pytest.raises(ValueError, match=r"not the output of its last Linear layer '0\.3'"):
        LaplaceLastLayer(log_softmax, task="multiclass", last_layer="0.3").fit(loader, epochs=0)


# ------------------------------------------------------------------ the command line
@needs_laplace
def test_benchmark_command_runs_laplace_ll(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (96, 1))
    images = (rng.random((96, 8, 8)) * 100 + labels[:, :, None] * 120).astype(np.uint8)
    path = tmp_path / "blobs.npz"
    np.savez(
        path,
        train_images=images[:64],
        train_labels=labels[:64],
        test_images=images[64:],
        test_labels=labels[64:],
    )
    out = tmp_path / "out"
    args = [
        "benchmark",
        "--arch",
        f"{__name__}:tiny_cnn",
        "--data",
        str(path),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--methods",
        "deterministic,laplace-ll",
        "--no-sweep",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["deterministic", "laplace-ll"]
    assert math.isfinite(rows[1]["nll"]) and "prior precision" in rows[1]["note"]
