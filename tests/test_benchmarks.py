"""Smoke test of benchmarks/bench_core.py: a --quick run on tiny sizes writes its outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_core.py"


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
