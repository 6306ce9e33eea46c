"""The bnnconvert CLI (in-process through CliRunner and as real subprocesses) and the
training loops behind ``bnnconvert train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import bnnconvert
from bnnconvert import Saliency, compute_saliency, convert
from bnnconvert.cli import main
from bnnconvert.convert import num_bayesian
from bnnconvert.data import open_data
from bnnconvert.demo import Recipe
from bnnconvert.layers import bayesian_layers
from bnnconvert.losses import task_loss
from bnnconvert.models import UNet, resnet18
from bnnconvert.serialization import load
from bnnconvert.training import check_fit, train

ROOT = Path(__file__).resolve().parents[1]
DIGITS = Path(bnnconvert.__file__).parent / "demo_data" / "digits.npz"
ARCH = ["--arch", "bnnconvert.models:resnet18", "--arch-kwargs", "num_classes=10,in_channels=1"]
BATCH = ["--batch-size", "16"]
TRAIN = ["--epochs", "1", "--samples", "2", "--checkpoint-every", "1", *BATCH]


def _npz(path: Path, n: dict[str, int], rgb: bool = False, classes: int | None = None):
    """A MedMNIST-format file of real digits (the bundled set)."""
    src = np.load(DIGITS)
    arrays = {}
    for split, k in n.items():
        images = src[f"{split}_images"][:k]
        arrays[f"{split}_images"] = np.repeat(images[..., None], 3, -1) if rgb else images
        labels = src[f"{split}_labels"][:k]
        arrays[f"{split}_labels"] = labels if classes is None else labels % classes + 4
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Workspace: 32/16/16 real digit images."""
    root = tmp_path_factory.mktemp("cli")
    _npz(root / "digits.npz", {"train": 32, "val": 16, "test": 16})
    return root


def _ok(args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def pipeline(ws):
    """Through CliRunner, the paper's steps on a torchvision ResNet18:
    train (step 1, from --arch) -> saliency -> convert -> train (ELBO) -> evaluate -> info."""
    data = ws / "digits.npz"
    out = {
        "det": _ok(
            [
                "train",
                *ARCH,
                "--data",
                data,
                "--epochs",
                "1",
                *BATCH,
                "--val-split",
                "val",
                "-o",
                ws / "det.pt",
            ]
        )
    }
    out["saliency"] = _ok(["saliency", ws / "det.pt", "--data", data, *BATCH, "-o", ws / "sal.pt"])
    out["convert"] = _ok(
        [
            "convert",
            ws / "det.pt",
            "--saliency",
            ws / "sal.pt",
            "--r-bayes",
            "0.01",
            "-o",
            ws / "bayes.pt",
        ]
    )
    out["train"] = _ok(["train", ws / "bayes.pt", "--data", data, *TRAIN, "-o", ws / "trained.pt"])
    out["evaluate"] = _ok(
        [
            "evaluate",
            ws / "trained.pt",
            "--data",
            data,
            "--samples",
            "2",
            *BATCH,
            "--json",
            ws / "metrics.json",
            "--plots",
            ws / "plots",
        ]
    )
    out["info"] = _ok(["info", ws / "trained.pt"])
    return out


# ----------------------------------------------------------------------- the pipeline
def test_pipeline_in_process(ws, pipeline):
    det = load(ws / "det.pt")
    assert not list(bayesian_layers(det)) and type(det).__name__ == "ResNet"
    assert det.bnnconvert_arch["kwargs"] == {"num_classes": 10, "in_channels": 1}
    assert "val_accuracy" in pipeline["det"]

    sal = Saliency.load(ws / "sal.pt")
    assert sal.criterion == "grad2" and sal.meta["num_samples"] == 32
    assert sal.num_entries == 11_165_770
    assert "conv1" in pipeline["saliency"] and "top 1 %" in pipeline["saliency"]

    bayes = load(ws / "bayes.pt")
    masks = sal.select(0.01)
    assert num_bayesian(bayes) == round(0.01 * sal.num_entries)
    for name, layer in bayesian_layers(bayes):
        for tensor in layer.bayes_names:
            assert torch.equal(layer.bayes_mask(tensor), masks[f"{name}.{tensor}"])
    x = torch.randn(2, 1, 28, 28)
    with bnnconvert.mean_weights(bayes):
        assert torch.equal(bayes(x), det(x))

    trained = load(ws / "trained.pt")
    assert not (ws / "trained.pt.ckpt").exists()  # removed once the output is written
    changed = [
        n
        for n, t in trained.state_dict().items()
        if n.endswith("_rho") and not torch.equal(t, bayes.state_dict()[n])
    ]
    assert changed  # sigma trained
    assert "kl" in pipeline["train"]

    record = json.loads((ws / "metrics.json").read_text())
    assert record["task"] == "multiclass" and 0 <= record["metrics"]["accuracy"] <= 1
    assert set(record["metrics"]) >= {"accuracy", "nll", "ece", "brier", "mutual_info"}
    assert "accuracy" in pipeline["evaluate"] and "16 items" in pipeline["evaluate"]
    assert png_size(ws / "plots" / "reliability.png") == (500, 600)  # 5 x 6 in, 100 dpi
    assert "bnnconvert.models:resnet18" in pipeline["info"]
    assert "111,658 of 11,165,770 entries (1.00 %)" in pipeline["info"]


def test_convert_fits_and_calibrates_the_posterior(ws, pipeline):
    """convert --posterior laplace --val-data: the same sigma, scale and temperature as
    the library calls on the same data, saved with the model; bad plans are refused."""
    data = ws / "digits.npz"
    args = ["convert", ws / "det.pt", "--saliency", ws / "sal.pt", "--data", data,
            "--val-data", data, "--posterior", "laplace", *BATCH, "--r-bayes", "0.01"]  # fmt: skip
    out = _ok([*args, "-o", ws / "posterior.pt"])
    assert "posterior: laplace" in out and "calibrated on --val-data" in out
    cli = load(ws / "posterior.pt")
    det = load(ws / "det.pt")
    ref = convert(det, Saliency.load(ws / "sal.pt"), 0.01)
    report = bnnconvert.fit_posterior(
        ref, open_data(data, "train", batch_size=16), open_data(data, "val", batch_size=16)
    )
    info = cli.bnnconvert_info["posterior"]
    assert info["prior_precision"] == pytest.approx(report.prior_precision, rel=1e-5)
    assert info["scale"] == report.calibration.scale
    assert info["temperature"] == pytest.approx(report.calibration.temperature, rel=1e-5)
    assert cli.bnnconvert_info["temperature"] == pytest.approx(info["temperature"])
    for (_, a), (_, b) in zip(bayesian_layers(cli), bayesian_layers(ref)):
        for t in a.bayes_names:
            torch.testing.assert_close(a.bayes_rho(t), b.bayes_rho(t))
            assert float(a.bayes_scale) == float(b.bayes_scale)
    auto = [*args[:6], "--posterior", "vi", "--r-bayes", "auto", "-o", ws / "x.pt"]
    bad = CliRunner().invoke(main, [str(a) for a in auto])
    assert bad.exit_code == 2 and "--r-bayes auto needs --val-data" in bad.output
    assert not (ws / "x.pt").exists()
    no_data = [*args[:4], "--posterior", "laplace", "--r-bayes", "0.01", "-o", ws / "x.pt"]
    bad = CliRunner().invoke(main, [str(a) for a in no_data])
    assert bad.exit_code == 2 and "--posterior needs --data" in bad.output
    bad = CliRunner().invoke(main, ["convert", str(ws / "det.pt"), "--r-bayes", "2", "-o", "y.pt"])
    assert bad.exit_code == 2 and "r_bayes" in bad.output


def test_convert_last_layer_is_the_classification_recipe(ws, pipeline):
    """convert --last-layer --posterior laplace: every entry of the last layer Bayesian and
    the library's fit and calibration at the recipe's S (the same numbers); --last-layer
    refuses --r-bayes, and without it --r-bayes is required."""
    data = ws / "digits.npz"
    args = ["convert", ws / "det.pt", "--data", data, "--val-data", data, "--posterior",
            "laplace", "--last-layer", "--samples", "20", *BATCH]  # fmt: skip
    _ok([*args, "-o", ws / "last.pt"])
    cli = load(ws / "last.pt")
    det = load(ws / "det.pt")
    ref = convert(det, bnnconvert.last_layer_masks(det), None)
    report = bnnconvert.fit_posterior(
        ref,
        open_data(data, "train", batch_size=16),
        open_data(data, "val", batch_size=16),
        samples=20,
    )
    assert bnnconvert.bayes_summary(cli).bayesian == bnnconvert.bayes_summary(ref).bayesian
    assert bnnconvert.bayes_summary(cli).bayesian == sum(
        p.numel() for p in list(det.modules())[-1].parameters()
    )
    info = cli.bnnconvert_info["posterior"]
    assert info["scale"] == report.calibration.scale
    assert info["temperature"] == pytest.approx(report.calibration.temperature, rel=1e-5)
    both = [*args, "--r-bayes", "0.01", "-o", ws / "x.pt"]
    bad = CliRunner().invoke(main, [str(a) for a in both])
    assert bad.exit_code == 2 and "--last-layer selects the entries" in bad.output
    neither = ["convert", ws / "det.pt", "--data", data, "-o", ws / "x.pt"]
    bad = CliRunner().invoke(main, [str(a) for a in neither])
    assert bad.exit_code == 2 and "--r-bayes" in bad.output
    assert not (ws / "x.pt").exists()


def _library_last_layer(ws, **options):
    """The library's version of convert --last-layer --posterior laplace on the workspace's
    digits: (the converted checkpoint, its PosteriorReport)."""
    det = load(ws / "det.pt")
    ref = convert(det, bnnconvert.last_layer_masks(det), None)
    data = ws / "digits.npz"
    train_data = open_data(data, "train", batch_size=16)
    report = bnnconvert.fit_posterior(
        ref, train_data, open_data(data, "val", batch_size=16), **options
    )
    return ref, report


def test_convert_covariance_kron_matches_the_library(ws, pipeline):
    """convert --last-layer --covariance kron: the library's Kronecker-factored posterior
    (the same lambda, t and T), saved with its factors, predicting as the library's model;
    --covariance kron without --posterior laplace (exit 2) and with a partial selection
    (exit 1, the fix named) are refused, with no file."""
    data = ws / "digits.npz"
    args = ["convert", ws / "det.pt", "--data", data, "--val-data", data, "--posterior",
            "laplace", "--last-layer", "--covariance", "kron", *BATCH]  # fmt: skip
    out = _ok([*args, "-o", ws / "kron.pt"])
    assert "laplace (kron covariance)" in out
    cli = load(ws / "kron.pt")
    ref, report = _library_last_layer(ws, predictive="probit", covariance="kron")
    info = cli.bnnconvert_info["posterior"]
    assert info["covariance"] == "kron" == report.covariance
    assert info["prior_precision"] == pytest.approx(report.prior_precision, rel=1e-6)
    assert info["scale"] == report.calibration.scale
    assert [n for n, m in cli.named_modules() if getattr(m, "is_kronecker", False)] == ["fc"]
    x = next(iter(open_data(data, "val", batch_size=16)))[0]
    torch.testing.assert_close(bnnconvert.predict(cli, x).probs, bnnconvert.predict(ref, x).probs)
    bad_args = [*args[:6], "--last-layer", "--covariance", "kron", *BATCH, "-o", ws / "x.pt"]
    bad = CliRunner().invoke(main, [str(a) for a in bad_args])
    assert bad.exit_code == 2 and "--covariance kron needs --posterior laplace" in bad.output
    assert not (ws / "x.pt").exists()
    partial = ["convert", ws / "det.pt", "--data", data, "--posterior", "laplace",
               "--covariance", "kron", "--saliency", "magnitude", "--r-bayes", "0.01",
               *BATCH, "-o", ws / "x.pt"]  # fmt: skip
    _fails(partial, "Kronecker-factored posterior needs", "--last-layer", output=ws / "x.pt")


def test_convert_outliers_synthetic_chooses_the_scale_for_ood_detection(ws, pipeline):
    """convert --outliers synthetic: the scale and temperature of the library's calibration
    with synthetic_outliers of the validation inputs (the same numbers), saved with the
    model and reported; without --val-data it is refused."""
    data = ws / "digits.npz"
    args = ["convert", ws / "det.pt", "--data", data, "--val-data", data, "--posterior",
            "laplace", "--last-layer", "--samples", "20", "--outliers", "synthetic",
            *BATCH]  # fmt: skip
    out = _ok([*args, "-o", ws / "ood.pt"])
    assert "scale chosen for OOD detection: outlier AUROC" in out
    cli = load(ws / "ood.pt")
    val = open_data(data, "val", batch_size=16)
    outliers = bnnconvert.synthetic_outliers(torch.cat([x for x, _ in val]), seed=0)
    _, report = _library_last_layer(ws, samples=20, outliers=outliers)
    info = cli.bnnconvert_info["posterior"]
    assert info["objective"] == "outliers" == report.calibration.objective
    assert info["scale"] == report.calibration.scale
    assert info["temperature"] == pytest.approx(report.calibration.temperature, rel=1e-5)
    assert dict(map(tuple, info["outlier_auroc"])) == pytest.approx(
        report.calibration.outlier_auroc
    )
    no_val = [*args[:4], *args[6:], "-o", ws / "x.pt"]  # without --val-data DATA
    bad = CliRunner().invoke(main, [str(a) for a in no_val])
    assert bad.exit_code == 2 and "--outliers needs --posterior and --val-data" in bad.output
    assert not (ws / "x.pt").exists()


def test_convert_predictive_probit_matches_the_library_and_predicts_in_one_forward(ws, pipeline):
    """convert --last-layer: the probit predictive by default (the recipe's), the library's
    probit calibration (the same t and T), saved with the model, which then predicts with
    one forward; --samples beside --predictive probit and --predictive without --val-data
    are refused (exit 2, no file)."""
    assert Recipe().last_layer_predictive == "probit"
    data = ws / "digits.npz"
    args = ["convert", ws / "det.pt", "--data", data, "--val-data", data, "--posterior",
            "laplace", "--last-layer", *BATCH]  # fmt: skip
    out = _ok([*args, "-o", ws / "probit.pt"])
    assert "probit predictive" in out
    cli = load(ws / "probit.pt")
    ref, report = _library_last_layer(ws, predictive="probit")
    info = cli.bnnconvert_info
    assert info["predictive"] == "probit" == info["posterior"]["predictive"]
    assert info["posterior"]["scale"] == report.calibration.scale
    assert info["posterior"]["temperature"] == pytest.approx(
        report.calibration.temperature, rel=1e-5
    )
    x = next(iter(open_data(data, "val", batch_size=16)))[0]
    pred = bnnconvert.predict(cli, x)
    assert pred.num_samples == 1
    torch.testing.assert_close(pred.probs, bnnconvert.predict(ref, x).probs)
    no_val = [*args[:4], *args[6:]]  # without --val-data DATA
    for bad_args, message in (
        ([*args, "--predictive", "probit", "--samples", "5"], "--predictive probit draws no"),
        ([*no_val, "--predictive", "probit"], "--predictive needs --posterior and --val-data"),
    ):
        bad = CliRunner().invoke(main, [str(a) for a in [*bad_args, "-o", ws / "x.pt"]])
        assert bad.exit_code == 2 and message in bad.output, bad.output
        assert not (ws / "x.pt").exists()


def test_include_and_exclude_choose_the_scored_parameters(ws, pipeline):
    """saliency/convert --include/--exclude: the scores and the Bayesian entries of exactly
    the chosen parameters, as the library's compute_saliency(include=, exclude=) gives."""
    data = ws / "digits.npz"
    _ok(["saliency", ws / "det.pt", "--data", data, *BATCH, "--batches", "2",
         "--include", "linear,conv", "--exclude", "layer4.*", "-o", ws / "sal_ie.pt"])  # fmt: skip
    det = load(ws / "det.pt")
    ref = bnnconvert.compute_saliency(
        det,
        open_data(data, "train", batch_size=16),
        num_batches=2,
        include=["linear", "conv"],
        exclude=["layer4.*"],
    )
    sal = Saliency.load(ws / "sal_ie.pt")
    assert set(sal.scores) == set(ref.scores)
    assert sal.scores and not any(n.startswith("layer4.") for n in sal.scores)
    _ok(["convert", ws / "det.pt", "--saliency", ws / "sal_ie.pt", "--r-bayes", "1%",
         "--include", "linear", "-o", ws / "fc_only.pt"])  # fmt: skip
    fc_only = load(ws / "fc_only.pt")
    assert [name for name, _ in bayesian_layers(fc_only)] == ["fc"]
    args = ["saliency", ws / "det.pt", "--criterion", "magnitude", "--include",
            "nothing_matches.*", "-o", ws / "x.pt"]  # fmt: skip
    bad = CliRunner().invoke(main, [str(a) for a in args])
    assert bad.exit_code != 0 and "nothing_matches" in bad.output
    assert not (ws / "x.pt").exists()


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, decoded in full (a truncated file fails)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        return img.size


def _start(*args, env=None, module="bnnconvert") -> subprocess.Popen:
    full_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(*args, env=None, check=True, module="bnnconvert") -> subprocess.CompletedProcess:
    return _wait(_start(*args, env=env, module=module), check)


def _wait(proc: subprocess.Popen, check=True) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    if check:
        assert proc.returncode == 0, stderr
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.integration
def test_pipeline_subprocess_with_kill_and_resume(ws, pipeline, tmp_path):
    """Each command as a real process, from a plain state_dict file + --arch; train is
    SIGKILLed mid-epoch, resumed, and ends bit-equal to the uninterrupted in-process run."""
    data = ws / "digits.npz"
    failing = _start("info", tmp_path / "missing.pt")  # runs alongside the rest
    torch.save(load(ws / "det.pt").state_dict(), tmp_path / "weights.pt")
    _run(
        "--progress",
        "saliency",
        tmp_path / "weights.pt",
        *ARCH,
        "--data",
        data,
        *BATCH,
        "-o",
        tmp_path / "sal.pt",
    )
    a, b = Saliency.load(ws / "sal.pt"), Saliency.load(tmp_path / "sal.pt")
    assert all(torch.equal(a.scores[k], b.scores[k]) for k in a.scores)
    _run(
        "convert",
        tmp_path / "weights.pt",
        *ARCH,
        "--saliency",
        tmp_path / "sal.pt",
        "--r-bayes",
        "0.01",
        "-o",
        tmp_path / "bayes.pt",
    )

    out, ckpt = tmp_path / "trained.pt", tmp_path / "trained.pt.ckpt"
    args = ["train", tmp_path / "bayes.pt", "--data", data, *TRAIN, "-o", out]
    killed = _run("2", *args, module="tests.kill_after", check=False)
    assert killed.returncode == -9, killed.stderr  # SIGKILL in step 2 of 2
    assert ckpt.exists() and not out.exists()
    assert torch.load(ckpt, weights_only=True)["step"] == 1  # written after step 1
    resumed = _run(*args)
    assert "resuming from" in resumed.stderr and not ckpt.exists()
    reference, result = load(ws / "trained.pt").state_dict(), load(out).state_dict()
    assert all(torch.equal(reference[k], result[k]) for k in reference)  # bit for bit

    evaluate = _start(
        "evaluate", out, "--data", data, "--samples", "2", *BATCH, "--json", tmp_path / "m.json"
    )
    info = _start("info", out, "--json")
    failed = _wait(failing, check=False)
    assert "accuracy" in _wait(evaluate).stdout
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads(
        (ws / "metrics.json").read_text()
    ) | {"model": str(out)}
    assert json.loads(_wait(info).stdout)["bayesian"] == 111_658
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [
        f"Error: no such file: {tmp_path / 'missing.pt'} (run with --debug for the traceback)"
    ]


# ----------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad(ws):
    """Files that are not what they claim, and data that does not fit the model."""
    root = ws / "bad"
    root.mkdir()
    (root / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "empty.pt").write_bytes(b"")
    (root / "text.pt").write_text("epoch,loss\n1,0.5\n")
    unet = UNet(in_channels=1, num_classes=2, base=4, depth=2)
    compute_saliency(unet, None, criterion="magnitude").save(root / "unet_sal.pt")
    _npz(root / "rgb.npz", {"train": 8, "test": 8}, rgb=True)
    _npz(root / "classes14.npz", {"train": 8, "test": 8}, classes=10)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), root / "whole.pt")
    torch.manual_seed(0)
    torch.save(resnet18(num_classes=10, in_channels=1).state_dict(), root / "weights.pt")
    return root


def _fails(args, *words, output: Path | None = None) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    # one error line; warnings before it are one line each too ("warning: ...")
    lines = [x for x in result.stderr.strip().splitlines() if not x.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
    if output is not None:
        assert not output.exists()
        assert not list(output.parent.glob(f".{output.name}.tmp*"))
        assert not output.with_name(output.name + ".ckpt").exists()
    return lines[0]


CONVERT = ["--saliency", "magnitude", "--r-bayes", "0.01"]


@pytest.mark.parametrize(
    "name, args, words",
    [
        ("missing", ["convert", "{bad}/nope.pt", *CONVERT], ["no such file"]),
        ("random", ["convert", "{bad}/random.pt", *ARCH, *CONVERT], ["not a PyTorch checkpoint"]),
        ("empty", ["convert", "{bad}/empty.pt", *ARCH, *CONVERT], ["is empty"]),
        ("text", ["convert", "{bad}/text.pt", *ARCH, *CONVERT], ["not a PyTorch checkpoint"]),
        ("no-arch", ["convert", "{bad}/weights.pt", *CONVERT], ["no architecture", "--arch"]),
        (
            "bad-arch",
            ["convert", "{bad}/weights.pt", "--arch", "nonexistent_pkg.models:net", *CONVERT],
            ["cannot import module", "nonexistent_pkg"],
        ),
        (
            "unfit-arch",
            [
                "convert",
                "{bad}/weights.pt",
                "--arch",
                "bnnconvert.models:resnet18",
                "--arch-kwargs",
                "num_classes=14,in_channels=1",
                *CONVERT,
            ],
            ["does not fit", "fc.weight", "--arch-kwargs"],
        ),
        (
            "other-saliency",
            [
                "convert",
                "{bad}/weights.pt",
                *ARCH,
                "--saliency",
                "{bad}/unet_sal.pt",
                "--r-bayes",
                "0.01",
            ],
            ["another architecture", "Recompute the saliency"],
        ),
        (
            "r-bayes-0",
            ["convert", "{bad}/weights.pt", *ARCH, "--saliency", "magnitude", "--r-bayes", "0"],
            ["r_bayes must be in (0, 1]"],
        ),
        (
            "r-bayes-1.5",
            ["convert", "{bad}/weights.pt", *ARCH, "--saliency", "magnitude", "--r-bayes", "1.5"],
            ["r_bayes 1.5 is above 1", "write 1.5%"],
        ),
        (
            "rgb-data",
            ["saliency", "{bad}/weights.pt", *ARCH, "--data", "{bad}/rgb.npz"],
            ["data does not fit the model", "in_channels"],
        ),
        (
            "class-data",
            ["train", "{bad}/weights.pt", *ARCH, "--data", "{bad}/classes14.npz", "--epochs", "1"],
            ["outputs 10 classes but the data has 14"],
        ),
        ("pickle", ["info", "{bad}/whole.pt"], ["--trust-pickle", "arbitrary code"]),
        (
            "arch-kwargs",
            [
                "info",
                "{bad}/weights.pt",
                "--arch",
                "bnnconvert.models:resnet18",
                "--arch-kwargs",
                "num_classes",
            ],
            ["--arch-kwargs"],
        ),
    ],
)
def test_bad_input_one_line_error_no_output(ws, bad, tmp_path, name, args, words):
    args = [a.format(ws=ws, bad=bad) for a in args]
    output = tmp_path / "out.pt"
    if args[0] != "info":
        args += ["-o", output]
    _fails(args, *words, output=output if args[0] != "info" else None)


def test_pickled_module_accepted_with_trust(bad):
    out = _ok(["info", bad / "whole.pt", "--trust-pickle"])
    assert "Sequential" in out and "7,850" in out


def test_debug_shows_the_exception(ws):
    result = CliRunner().invoke(main, ["--debug", "info", str(ws / "nope.pt")])
    assert isinstance(result.exception, FileNotFoundError)
    result = CliRunner().invoke(main, ["info", str(ws / "nope.pt")], env={"BNNCONVERT_DEBUG": "1"})
    assert isinstance(result.exception, FileNotFoundError)


def test_output_folder_missing_fails_before_work(ws, tmp_path):
    _fails(
        [
            "saliency",
            tmp_path / "nope.pt",
            "--data",
            ws / "digits.npz",
            "-o",
            tmp_path / "no" / "sal.pt",
        ],
        "output folder does not exist",
    )


def test_resume_with_other_settings_is_refused(ws, pipeline, tmp_path):
    out = tmp_path / "t.pt"
    ckpt = out.with_name("t.pt.ckpt")
    args = ["train", ws / "bayes.pt", "--data", ws / "digits.npz", *TRAIN, "-o", out]
    torch.save({"format": "bnnconvert.train-checkpoint", "fingerprint": {"lr": 0.5}}, ckpt)
    _fails(args, "other settings", "--restart")
    assert ckpt.exists() and not out.exists()


# ----------------------------------------------------------------------- help and hooks
def test_help_lists_every_command_with_an_example():
    top = _ok(["--help"])
    for name in main.list_commands(click.Context(main)):
        assert f"bnnconvert {name}" in top, name
        sub = _ok([name, "--help"])
        assert f"bnnconvert {name}" in sub, name


hello = click.Command(
    "hello",
    callback=lambda: click.echo("hello from a plugin"),
    help="A plugin command.",
    epilog="Example:\n  bnnconvert hello",
)


def test_every_command_is_registered_in_order():
    """The commands are registered explicitly (no name table that could skip one)."""
    expected = [
        "saliency",
        "convert",
        "train",
        "evaluate",
        "predict",
        "info",
        "flops",
        "benchmark",
        "demo",
    ]
    assert main.list_commands(click.Context(main)) == expected
    assert main.more == ["flops", "benchmark", "demo"]


def test_an_added_command_is_listed_with_its_example_and_runs(monkeypatch):
    monkeypatch.setattr(main, "commands", dict(main.commands))
    monkeypatch.setattr(main, "more", list(main.more))
    main.add_more_command(hello)
    top = _ok(["--help"])
    more = top.split("More commands:")[1]
    assert "hello" in top.split("Commands:")[1] and "bnnconvert hello" in more
    assert _ok(["hello"]).strip() == "hello from a plugin"


def test_library_arguments_are_named_as_flags():
    from bnnconvert.cli.group import ARGUMENT_FLAGS, to_flags

    assert to_flags("pass arch=... and arch_kwargs=..., or trust_pickle=True") == (
        "pass --arch and --arch-kwargs, or --trust-pickle"
    )
    assert to_flags("delete it or pass resume=False") == "delete it or pass --restart"
    for flag in ARGUMENT_FLAGS.values():  # every flag named exists on some command
        assert any(
            flag in (*p.opts, *p.secondary_opts) for c in main.commands.values() for p in c.params
        ), flag


# ----------------------------------------------------------------------- train library
def _tiny():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)
    )


def _fit(ws, ckpt, kill_at=None, resume=False, epochs=2):
    torch.manual_seed(1)
    model = convert(_tiny(), "magnitude", 0.1)
    loader = open_data(ws / "digits.npz", "train", batch_size=8, shuffle=True, seed=0)
    losses = []

    def on_step(info):
        if info.global_step == kill_at:
            raise KeyboardInterrupt
        losses.append(info.loss)

    try:
        result = train(
            model,
            loader,
            epochs,
            samples=2,
            seed=3,
            momentum=0.9,
            checkpoint=ckpt,
            checkpoint_every=2,
            resume=resume,
            progress=False,
            on_step=on_step,
        )
    except KeyboardInterrupt:
        return None, losses
    return result, losses


@pytest.mark.parametrize("kill_at", [3, 5, 7], ids=["mid-epoch", "epoch-end", "next-epoch"])
def test_resumed_training_equals_uninterrupted(ws, tmp_path, kill_at):
    reference, ref_losses = _fit(ws, tmp_path / "ref.ckpt")
    _, first = _fit(ws, tmp_path / "run.ckpt", kill_at=kill_at)
    result, rest = _fit(ws, tmp_path / "run.ckpt", resume=True)
    epoch, step = result.resumed_from
    done = epoch * 4 + step  # 4 steps per epoch; checkpoints every 2 steps and epoch ends
    assert done == {3: 2, 5: 4, 7: 6}[kill_at]
    assert first[:done] + rest == ref_losses
    assert result.history == reference.history
    ref_state = reference.model.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in result.model.state_dict().items())


def test_deterministic_model_trains_plain_nll(ws):
    loader = open_data(ws / "digits.npz", "train", batch_size=16, shuffle=True, seed=0)
    seen = []
    result = train(
        _tiny(),
        loader,
        1,
        samples=5,
        beta=0.5,
        progress=False,
        on_step=seen.append,
        validate=lambda m: {"score": 1.0},
    )
    assert [s.beta for s in seen] == [0.0] * 2 and all(s.kl == 0 for s in seen)
    assert result.history[0]["val_score"] == 1.0 and result.history[0]["nll"] > 0


def test_task_losses_and_fit_check():
    logits = torch.randn(4, 3)
    weight = torch.tensor([1.0, 2.0, 3.0])
    target = torch.tensor([0, 2, 1, 2])
    expected = nn.functional.cross_entropy(logits, target, weight=weight)
    assert torch.allclose(task_loss("multiclass", weight)(logits, target[:, None]), expected)
    multi = torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]])
    assert torch.allclose(
        task_loss("multilabel", weight)(logits, multi),
        nn.functional.binary_cross_entropy_with_logits(logits, multi, pos_weight=weight),
    )
    seg = torch.randn(2, 3, 4, 4)
    mask = torch.randint(0, 3, (2, 4, 4))
    assert torch.allclose(
        task_loss("segmentation")(seg, mask), nn.functional.cross_entropy(seg, mask)
    )
    with pytest.raises(ValueError, match="task must be one of"):
        task_loss("regression")
    batches = [(torch.randn(2, 1, 28, 28), torch.tensor([0, 12]))]
    with pytest.raises(ValueError, match="do not fit the targets"):
        check_fit(_tiny(), batches, task_loss("multiclass"))
    with pytest.raises(ValueError, match="data does not fit the model"):
        check_fit(_tiny(), [(torch.randn(2, 3, 28, 28), torch.tensor([0, 1]))])


# ----------------------------------------------------------------------- other tasks
def small_cnn(num_classes: int = 3, in_channels: int = 1) -> nn.Module:
    """A factory for ``--arch tests.test_cli:small_cnn``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def test_multilabel_npz_through_the_cli(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 255, (16, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (16, 3))
    np.savez(tmp_path / "ml.npz", **arrays)
    data = ["--data", tmp_path / "ml.npz", "--batch-size", "8"]
    _ok(["train", "--arch", "tests.test_cli:small_cnn", *data, "--epochs", "1",
         "-o", tmp_path / "det.pt"])  # fmt: skip
    _ok(["convert", tmp_path / "det.pt", "--saliency", "magnitude", "--r-bayes", "0.2",
         "-o", tmp_path / "bayes.pt"])  # fmt: skip
    _ok(["train", tmp_path / "bayes.pt", *data, "--epochs", "1", "--samples", "2",
         "-o", tmp_path / "trained.pt"])  # fmt: skip
    _ok(["evaluate", tmp_path / "trained.pt", *data, "--json", tmp_path / "m.json",
         "--plots", tmp_path / "plots"])  # fmt: skip
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["task"] == "multilabel" and "auc" in record["metrics"]
    assert (tmp_path / "plots" / "reliability.png").exists()


def test_segmentation_folder_through_the_cli(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for sub in ("images", "masks"):
            (tmp_path / "seg" / split / sub).mkdir(parents=True)
        for i in range(n):
            image = rng.integers(0, 255, (16, 16), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "seg" / split / "images" / f"{i}.png")
            mask = ((image > 128) * 255).astype(np.uint8)
            Image.fromarray(mask).save(tmp_path / "seg" / split / "masks" / f"{i}.png")
    unet = ["--arch", "bnnconvert.models:UNet", "--arch-kwargs", "base=4,depth=2"]
    data = ["--data", tmp_path / "seg", "--batch-size", "4"]
    _ok(["train", *unet, *data, "--epochs", "1", "-o", tmp_path / "det.pt"])
    _ok(["saliency", tmp_path / "det.pt", *data, "-o", tmp_path / "sal.pt"])
    _ok(["convert", tmp_path / "det.pt", "--saliency", tmp_path / "sal.pt", "--r-bayes",
         "0.05", "-o", tmp_path / "bayes.pt"])  # fmt: skip
    _ok(["train", tmp_path / "bayes.pt", *data, "--epochs", "1", "--samples", "2",
         "--beta", "linear:0.2:0.01", "-o", tmp_path / "trained.pt"])  # fmt: skip
    out = _ok(["evaluate", tmp_path / "trained.pt", *data, "--plots", tmp_path / "plots"])
    assert "dice" in out and "4 items" in out
    overlays = sorted((tmp_path / "plots").glob("overlay_*.png"))
    assert [png_size(p) for p in overlays] == [(1200, 400)] * 4  # 12 x 4 in, 100 dpi
