"""Smoke tests of the benchmark scripts: a --quick run on tiny sizes writes its outputs."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_core.py"
POSTERIOR = SCRIPT.with_name("bench_posterior.py")


@pytest.mark.integration
def test_quick_run_writes_json_and_markdown(tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--models", "unet", "--rates", "0.05,1"]
    cmd += ["--threads", "1"]
    cmd += ["--json", str(out_json), "--markdown", str(out_md)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)

    report = json.loads(out_json.read_text())
    assert set(report) == {"meta", "models", "convert_memory", "targets"}
    assert report["meta"]["torch"] and report["meta"]["cpu"]
    variants = report["models"]["unet"]["variants"]
    assert {"det", "ours r=0.05", "ours r=1", "last stage 1 %", "bayesian-torch"} <= set(variants)
    det, ours, dense = variants["det"], variants["ours r=0.05"], variants["ours r=1"]
    assert ours["formula_ok"] is True and dense["formula_ok"] is True
    # parameters: the model's plus one rho per Bayesian entry, k = round(r N), never doubled
    entries = dense["k"]  # r = 1: every convertible entry
    assert ours["k"] == round(0.05 * entries)
    for v in (ours, dense):
        assert v["params"] == det["params"] + v["k"]
    assert 1.0 < ours["memory_ratio"] < dense["memory_ratio"] < 2.0
    assert variants["bayesian-torch"]["memory_ratio"] > 2  # mu, rho and three buffers
    # times: each key measured; 5 samples cost more than one deterministic forward or step
    for key in ("kl_ms", "draw_ms", "predict5_ms", "step1_ratio"):
        assert ours[key] > 0, key
    for key in ("pred5_plain_ratio", "pred5_hoisted_ratio", "elbo5_plain_ratio"):
        assert ours[key] > 1.0, key
    # hoisting: with only the last stage Bayesian, the hoisted 5-sample prediction runs the
    # rest of the network once, well under the plain loop's five times
    last = variants["last stage 1 %"]
    assert last["pred5_hoisted_ratio"] < last["pred5_plain_ratio"]
    assert report["convert_memory"][0]["inplace"] is True
    assert all({"model", "target", "value", "limit", "pass"} <= set(t) for t in report["targets"])

    text = out_md.read_text()
    assert "| variant |" in text and "## Targets" in text and "bayesian-torch" in text


def _positive(value) -> bool:
    return value is not None and math.isfinite(value) and value > 0


@pytest.mark.integration
def test_posterior_quick_run_measures_every_section(tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "benchmarks.md"
    out_md.write_text(
        "# Benchmarks\n\n## Setup\n\nkept\n\n## Posterior fitting\n\nstale\n\n## Later\n"
    )
    cmd = [sys.executable, str(POSTERIOR), "--quick", "--threads", "1"]
    cmd += ["--json", str(out_json), "--markdown", str(out_md)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)

    report = json.loads(out_json.read_text())
    assert set(report) == {"meta", "laplace", "calibration", "engines", "targets"}
    meta = report["meta"]
    assert meta["torch"] and meta["cpu"] and meta["torch threads"] == 1
    lap = report["laplace"]
    assert lap["k"] == round(0.01 * lap["entries"])  # r_bayes = 1 %, exactly k entries
    assert _positive(lap["prior_precision"])
    for key in ("epoch_s", "laplace_s", "curvature_s", "laplace_ratio", "curvature_ratio"):
        assert _positive(lap[key]), key
    cal = report["calibration"]
    assert cal["scales_tried"] in (9, 11)  # the default scales, refined or not
    assert _positive(cal["per_scale_s"]) and _positive(cal["per_scale_ratio"])

    engines = report["engines"]["engines"]
    assert set(engines) == {"plain", "tap", "func", "backpack"}
    assert engines["plain"]["time_ratio"] == 1.0 and engines["plain"]["peak_ratio"] == 1.0
    for name in ("tap", "func"):  # installed with torch: must run, time and memory
        row = engines[name]
        assert "error" not in row and "memory_error" not in row, row
        assert _positive(row["time_ratio"]) and _positive(row["peak_bytes"]), name
    # (a) and (b) compute the same per-example squares at the same sampled labels
    assert engines["func"]["max_rel_diff_to_a"] < 1e-4
    # torch.func holds every per-example gradient (B x entries float32) at once
    batch = report["engines"]["batch"]
    assert engines["func"]["peak_bytes"] > 0.9 * 4 * batch * lap["entries"]
    backpack = engines["backpack"]  # optional: measured, or its failure reported
    assert "error" in backpack or _positive(backpack["time_ratio"])
    assert {t["target"] for t in report["targets"]} >= {
        "Laplace fit (r = 1 %) / one training epoch",
        "calibration per tried t / one validation pass of S samples",
    }

    text = out_md.read_text()
    assert text.startswith("# Benchmarks\n\n## Setup\n\nkept\n") and text.endswith("## Later\n")
    assert text.count("## Posterior fitting") == 1 and "stale" not in text
    rows = ["Laplace fit (r = 1 %) / one training epoch", "plain forward + backward"]
    rows += ["(a) curvature.diagonal_ggn", "(b) torch.func vmap(grad)", "(c) BackPACK DiagGGNMC"]
    for row in rows:
        assert f"| {row} |" in text, row


def _load_posterior_script():
    spec = importlib.util.spec_from_file_location("bench_posterior", POSTERIOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_posterior_markdown_section_is_appended_then_replaced(tmp_path):
    bench = _load_posterior_script()
    path = tmp_path / "missing.md"
    bench.write_section(path, "## Posterior fitting\n\nfirst\n")
    assert path.read_text() == "## Posterior fitting\n\nfirst\n"

    path.write_text("# Benchmarks\n\n## Run F2\n\n#### resnet18\n\n| a |\n")
    bench.write_section(path, "## Posterior fitting\n\nfirst\n")
    bench.write_section(path, "## Posterior fitting\n\n### engines\n\nsecond\n")
    assert path.read_text() == (
        "# Benchmarks\n\n## Run F2\n\n#### resnet18\n\n| a |\n\n"
        "## Posterior fitting\n\n### engines\n\nsecond\n"
    )


STUDY = SCRIPT.with_name("posterior_study.py")


def _study(task: str, out: Path) -> dict:
    cmd = [sys.executable, str(STUDY), "--task", task, "--quick", "--seeds", "0"]
    cmd += ["--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    assert (out / f"{task}.md").read_text().count("\n| ") > 5
    return json.loads((out / f"{task}.json").read_text())["seeds"][0]["results"]


@pytest.mark.integration
def test_posterior_study_samples_and_shape_tasks(tmp_path):
    """The study's S and shape tasks (quick): every row; a calibrated posterior is never
    worse than temperature scaling on the validation NLL (t = 0 is temperature scaling);
    at its means it predicts the checkpoint's classes; the fixed-t rows keep their t with
    T >= the bound; the shape variants differ in lambda as asked."""
    rows = _study("samples", tmp_path)
    ts = rows["temperature scaling"]
    for s in (10, 100, 300):
        calibrated = rows[f"laplace, last layer, S = {s}"]
        assert calibrated["val_nll"] <= ts["val_nll"] + 1e-4
        assert rows[f"laplace, last layer, S = {s}, at its means"]["accuracy"] == ts["accuracy"]
    for label, t in (("0.71", 2**-0.5), ("1", 1.0)):
        fixed = rows[f"laplace, last layer, S = 300, t = {label}"]
        assert fixed["scale"] == pytest.approx(t) and fixed["temperature"] >= 0.5 - 1e-9
    shape = _study("shape", tmp_path)
    default = shape["Monte Carlo Fisher, lambda by the evidence"]
    for factor in (0.1, 10):
        lam = shape[f"Monte Carlo Fisher, lambda x {factor:g}"]["prior_precision"]
        assert lam == pytest.approx(factor * default["prior_precision"], rel=1e-6)
    assert all(row["val_nll"] <= shape["temperature scaling"]["val_nll"] + 1e-4
               for name, row in shape.items() if name != "temperature scaling")  # fmt: skip


@pytest.mark.integration
def test_posterior_study_outliers_task(tmp_path):
    """The study's outliers task (quick): t chosen on synthetic outliers stays within the
    NLL budget of temperature scaling on validation data and records its outlier AUROC;
    at its means each posterior predicts the checkpoint's classes."""
    rows = _study("outliers", tmp_path)
    ts = rows["temperature scaling"]
    chosen = rows["laplace, last layer, S = 300, t by synthetic outliers"]
    assert chosen["val_nll"] <= ts["val_nll"] + 1e-4
    assert 0.0 <= chosen["val_outlier_auroc"] <= 1.0
    for name in ("t by synthetic outliers", "t by the validation NLL (the default)"):
        means = rows[f"laplace, last layer, S = 300, {name}, at its means"]
        assert means["accuracy"] == ts["accuracy"]


@pytest.mark.integration
def test_posterior_study_predictive_task(tmp_path):
    """The study's predictive task (quick): the probit rows are calibrated without samples,
    never worse than temperature scaling on the validation NLL (their t = 0 is temperature
    scaling, the same closed-form NLL), at their means predict the checkpoint's classes, and
    the report names the predictive the rule chose."""
    rows = _study("predictive", tmp_path)
    ts = rows["temperature scaling"]
    for name in ("t by the validation NLL", "t by synthetic outliers"):
        probit = rows[f"laplace, last layer, probit, {name}"]
        assert probit["val_nll"] <= ts["val_nll"] + 1e-6
        means = rows[f"laplace, last layer, probit, {name}, at its means"]
        assert means["accuracy"] == ts["accuracy"]
    assert 0.0 <= rows["laplace, last layer, probit, t by synthetic outliers"]["val_outlier_auroc"]
    report = json.loads((tmp_path / "predictive.json").read_text())
    assert report["default"] in rows and "probit" in str(report["paired_other"])


@pytest.mark.integration
def test_posterior_study_covariance_task(tmp_path):
    """The study's covariance task (quick): the Kronecker rows are calibrated with the probit,
    never worse than temperature scaling on the validation NLL (t = 0 is in the grid), at
    their means predict the checkpoint's classes; every row has the validation-OOD AUROC;
    the report names the rule's choice."""
    rows = _study("covariance", tmp_path)
    ts = rows["temperature scaling"]
    for name in ("t by the validation NLL", "t by synthetic outliers"):
        kron = rows[f"laplace, last layer, Kronecker, probit, {name}"]
        assert kron["val_nll"] <= ts["val_nll"] + 1e-6
        means = rows[f"laplace, last layer, Kronecker, probit, {name}, at its means"]
        assert means["accuracy"] == ts["accuracy"]
    assert all(0.0 <= row["auroc_valood"] <= 1.0 for row in rows.values())
    report = json.loads((tmp_path / "covariance.json").read_text())
    assert report["default"] in rows and "Kronecker" in str(report["paired_other"])


def _load_study():
    spec = importlib.util.spec_from_file_location("posterior_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_interval_two_way_counts_shared_items_once():
    """Four seeds that are copies of one (the same items, the same differences): the
    two-way bootstrap gives the interval of one seed (checked against a plain numpy
    percentile bootstrap of the mean difference), while resampling each seed's items
    independently narrows it about twofold, as if the seeds had scored 4x the items; the
    point estimate (the mean difference, the AUROC difference) is the same in both."""
    study = _load_study()
    rng = np.random.default_rng(3)
    items = {
        m: {"nll": rng.exponential(0.2 if m == "a" else 0.25, 300).tolist(),
            "entropy_test": rng.random(300).tolist(),
            "entropy_ood": (rng.random(200) + (0.3 if m == "a" else 0.2)).tolist()}
        for m in ("a", "b")
    }  # fmt: skip
    copies = [{"items": items}] * 4
    d = np.asarray(items["a"]["nll"]) - np.asarray(items["b"]["nll"])
    ref = np.percentile(d[rng.integers(0, len(d), (4000, len(d)))].mean(1), [2.5, 97.5])
    two_way = study.paired_interval(copies, "a", "b", "nll", scheme="two-way")
    per_seed = study.paired_interval(copies, "a", "b", "nll")
    assert two_way[0] == pytest.approx(d.mean()) and per_seed[0] == pytest.approx(d.mean())
    width = ref[1] - ref[0]
    assert two_way[2] - two_way[1] == pytest.approx(width, rel=0.15)
    assert per_seed[2] - per_seed[1] == pytest.approx(width / 2, rel=0.2)
    far = [study.paired_interval(copies, "a", "b", "auroc_far", draws=300, scheme=scheme)
           for scheme in ("two-way", "per seed")]  # fmt: skip
    assert far[0][0] == pytest.approx(far[1][0])
    assert far[1][2] - far[1][1] < 0.7 * (far[0][2] - far[0][1])


@pytest.mark.integration
def test_posterior_study_scale_tasks(tmp_path):
    """The study's scale tasks (quick): scale-choose writes, from validation data only, the
    t with the lowest mean validation NLL (recomputed here from its curves); scale refuses
    to run without that choice, then calibrates the pooled rows at exactly that t, their
    validation NLL reproduces the choice's curve at t (same checkpoint, same data), and the
    hindsight ceiling's test NLL is no higher than any row of its covariance that uses a t
    of the grid with T fitted on validation."""
    cmd = [sys.executable, str(STUDY), "--task", "scale", "--quick", "--seeds", "0"]
    refused = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True)
    assert refused.returncode != 0 and "scale-choose" in refused.stderr
    cmd_intervals = [sys.executable, str(STUDY), "--task", "scale-intervals"]
    refused = subprocess.run([*cmd_intervals, "--out", str(tmp_path)], capture_output=True,
                             text=True)  # fmt: skip
    assert refused.returncode != 0 and "run --task scale first" in refused.stderr
    assert not (tmp_path / "scale_intervals.md").exists()
    choose = [sys.executable, str(STUDY), "--task", "scale-choose", "--quick", "--seeds", "0"]
    subprocess.run([*choose, "--out", str(tmp_path)], check=True, capture_output=True,
                   text=True, timeout=600)  # fmt: skip
    choice = json.loads((tmp_path / "scale_choice.json").read_text())
    for cov in ("diagonal", "kron"):
        curve = choice["seeds"][0]["curves"][cov]
        assert choice["scale"][cov] == min(curve, key=lambda row: row[2])[0]
    rows = _study("scale", tmp_path)
    for cov, pooled, ceiling, grid_rows in (
        ("diagonal", "laplace, last layer, probit, t pooled",
         "laplace, last layer, probit, t by the test NLL (ceiling)",
         ("laplace, last layer, probit, t pooled", "laplace, last layer, probit, t = 1")),
        ("kron", "laplace, last layer, Kronecker, probit, t pooled",
         "laplace, last layer, Kronecker, probit, t by the test NLL (ceiling)",
         ("laplace, last layer, Kronecker, probit, t pooled",)),
    ):  # fmt: skip
        t = choice["scale"][cov]
        assert rows[pooled]["scale"] == pytest.approx(t)
        at_t = [row for row in choice["seeds"][0]["curves"][cov] if row[0] == pytest.approx(t)]
        assert rows[pooled]["val_nll"] == pytest.approx(at_t[0][2], rel=1e-6)
        assert all(rows[ceiling]["nll"] <= rows[name]["nll"] + 1e-9 for name in grid_rows)
        assert f"{pooled}, at its means" in rows and f"{ceiling}, at its means" not in rows
    report = json.loads((tmp_path / "scale.json").read_text())
    assert any(key.startswith("all") for key in report["criteria"])


@pytest.mark.integration
def test_posterior_study_segmentation_task(tmp_path):
    """The study's segmentation task (quick, a briefly trained UNet): every posterior row,
    the head's diagonal and Kronecker probit rows included, is calibrated (t, T, validation
    NLL); at its means each predicts the checkpoint's masks (the same Dice); the default
    is within 1 % of the lowest validation NLL, as the rule says."""
    cmd = [sys.executable, str(STUDY), "--task", "segmentation", "--quick", "--seeds", "0"]
    subprocess.run([*cmd, "--out", str(tmp_path)], check=True, capture_output=True, text=True,
                   timeout=600)  # fmt: skip
    report = json.loads((tmp_path / "segmentation.json").read_text())
    rows = report["seeds"][0]
    calibrated = [name for name, row in rows.items() if "val_nll" in row]
    assert "laplace, last layer, Kronecker, probit" in calibrated and len(calibrated) == 6
    for name in calibrated:
        assert rows[name]["scale"] >= 0 and rows[name]["temperature"] > 0
        assert rows[f"{name} at its means"]["dice"] == rows["checkpoint"]["dice"]
    best = min(rows[name]["val_nll"] for name in calibrated)
    assert report["default"] in calibrated
    assert rows[report["default"]]["val_nll"] <= best * 1.01
    assert (tmp_path / "segmentation.md").read_text().count("\n| ") == len(rows) + 1


@pytest.mark.integration
def test_predict_memory_quick_run(tmp_path):
    """bench_predict_memory --quick: the two-stage 3-D UNet (bnnconvert.models.UNet with
    spatial_dims=3, base 8, depth 1) on 16^3 volumes, one forward row and one row per N."""
    out_json, out_md = tmp_path / "memory.json", tmp_path / "memory.md"
    cmd = [sys.executable, str(SCRIPT.with_name("bench_predict_memory.py")), "--quick"]
    cmd += ["--json", str(out_json), "--markdown", str(out_md)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)

    report = json.loads(out_json.read_text())
    size, samples, v = 16, 2, 16**3
    assert report["meta"]["size"] == size and report["meta"]["samples"] == samples

    # parameters: conv 3^3 (no bias) + BN per double convolution, ConvTranspose 2^3, 1x1 head
    def double(cin: int, cout: int) -> int:
        return cout * cin * 27 + 2 * cout + cout * cout * 27 + 2 * cout

    params = double(1, 8) + double(8, 16) + (16 * 8 * 8 + 8) + double(16, 8) + (2 * 8 + 2)
    assert report["meta"]["parameters"] == params
    forward, *cases = report["rows"]
    # every leaf's output, float32: 6 leaves per double convolution, pool, up, head
    floats = 6 * 8 * v + 8 * v // 8 + 6 * 16 * v // 8 + 8 * v + 6 * 8 * v + 2 * v
    assert forward["what"] == "forward" and forward["activations"] == 4 * floats
    assert [(r["what"], r["volumes"]) for r in cases] == [("cases", 1), ("cases", 2)]
    assert all(r["allocator_peak"] > 0 and r["rss_peak"] > 0 for r in report["rows"])
    ratios = [r[k] / forward[k] for r in cases for k in ("allocator_peak", "rss_peak")]
    assert report["ratio"] == pytest.approx(max(ratios))
    assert report["kept_samples_bytes"] == samples * 2 * 2 * v * 4  # S x N x C x D x H x W
    text = out_md.read_text()
    assert f"({params:,} parameters)" in text and "Target: peak <" in text
