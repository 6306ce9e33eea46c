"""Smoke test of benchmarks/bench_core.py: a --quick run on tiny sizes writes its outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_core.py"


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
    ours = variants["ours r=0.05"]
    assert ours["formula_ok"] is True
    for key in (
        "memory_ratio",
        "step1_ratio",
        "pred5_plain_ratio",
        "pred5_hoisted_ratio",
        "elbo5_plain_ratio",
        "elbo5_hoisted_ratio",
        "pred5_floor_ratio",
        "elbo5_floor_ratio",
        "kl_ms",
        "draw_ms",
        "predict5_ms",
    ):
        assert ours[key] > 0, key
    assert variants["bayesian-torch"]["memory_ratio"] > 2  # mu, rho and three buffers
    assert report["convert_memory"][0]["inplace"] is True
    assert all({"model", "target", "value", "limit", "pass"} <= set(t) for t in report["targets"])

    text = out_md.read_text()
    assert "| variant |" in text and "## Targets" in text and "bayesian-torch" in text
