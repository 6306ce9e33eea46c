"""`bnnconvert flops`: the CLI's numbers are the library's, and bad input exits non-zero."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from torch import nn

from bnnconvert.cli import main
from bnnconvert.costs import compare_method_costs
from bnnconvert.flops import count_flops

TINY = ["--arch", "torch.nn:Conv2d", "--arch-kwargs", "in_channels=3,out_channels=8,kernel_size=3"]


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_json_total_is_the_analytic_count(tmp_path):
    path = tmp_path / "conv.pt"
    torch.save(nn.Conv2d(3, 8, 3).state_dict(), path)
    result = _run(["flops", str(path), *TINY, "--input-shape", "2,3,10,10", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert facts["total"] == 2 * 8 * 3 * 9 * 8 * 8  # N * C_out * C_in * 3 * 3 * H_out * W_out
    assert facts["bayes_overhead"] == 0 and facts["unsupported_ops"] == {}
    doubled = _run(["flops", str(path), *TINY, "--input-shape", "2x3x10x10", "--json",
                    "--convention", "flop", "--samples", "3"])  # fmt: skip
    assert json.loads(doubled.output)["total"] == 3 * 2 * facts["total"]


def test_table_and_compare_match_the_library(tmp_path):
    torch.manual_seed(0)
    model = nn.Conv2d(3, 8, 3)
    path = tmp_path / "conv.pt"
    torch.save(model.state_dict(), path)
    text = _run(["flops", str(path), *TINY, "--input-shape", "1,3,8,8", "--compare"]).output
    assert "one fused multiply-add = 1 FLOP" in text and "| ensemble" in text
    facts = json.loads(
        _run(["flops", str(path), *TINY, "--input-shape", "1,3,8,8", "--compare", "--json"]).output
    )
    expected = compare_method_costs(model, torch.randn(1, 3, 8, 8)).multiples()
    assert facts["multiples_of_deterministic"] == expected
    assert facts["total"] == count_flops(model, torch.randn(1, 3, 8, 8)).total


def test_bad_input_shape_is_one_line_and_non_zero(tmp_path):
    path = tmp_path / "conv.pt"
    torch.save(nn.Conv2d(3, 8, 3).state_dict(), path)
    rejected = CliRunner().invoke(main, ["flops", str(path), *TINY, "--input-shape", "1,4,8,8"])
    assert rejected.exit_code != 0
    assert "rejected an input of shape (1, 4, 8, 8)" in rejected.output
    assert "Traceback" not in rejected.output
    malformed = CliRunner().invoke(main, ["flops", str(path), *TINY, "--input-shape", "1,a"])
    assert malformed.exit_code == 2 and "positive integers" in malformed.output
