"""`bnnconvert flops`: the CLI's numbers are the library's, and bad input exits non-zero."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bnnconvert.cli import main
from bnnconvert.costs import compare_method_costs
from bnnconvert.flops import count_flops, count_prediction_flops

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


def _stochastic_rows(model: nn.Module) -> dict[str, nn.Module]:
    """The Bayesian rows of ``compare_method_costs`` (default r values, magnitude
    saliency) and the models whose predictions they cost."""
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn

    from bnnconvert.convert import convert
    from bnnconvert.costs import BAYESIAN_TORCH_PRIOR

    rows = {f"partial r = {100 * r:g} %": convert(model, "magnitude", r) for r in (0.01, 0.05, 0.2)}
    rows["Bayesian (bnnconvert, r = 100 %)"] = convert(model, "magnitude", 1.0)
    foreign = copy.deepcopy(model)
    dnn_to_bnn(foreign, BAYESIAN_TORCH_PRIOR)
    rows["Bayesian (bayesian-torch dnn_to_bnn)"] = foreign
    return rows


def two_convs() -> nn.Module:
    """Conv, ReLU, conv: bayesian-torch converts both convolutions (not a bare root)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))


def test_compare_counts_predictions_of_the_given_samples(tmp_path):
    """--samples N is S of the comparison's inference column: each stochastic row costs
    count_prediction_flops(its model, x, N) over one deterministic forward."""
    torch.manual_seed(0)
    model = two_convs()
    path = tmp_path / "convs.pt"
    torch.save(model.state_dict(), path)
    x = torch.randn(1, 3, 8, 8)
    forward = count_flops(model, x).total
    rows = _stochastic_rows(model)
    arch = ["--arch", f"{__name__}:two_convs"]
    args = ["flops", str(path), *arch, "--input-shape", "1,3,8,8", "--compare"]
    for samples in (2, 7):
        facts = json.loads(_run([*args, "--json", "--samples", str(samples)]).output)
        multiples = facts["multiples_of_deterministic"]
        for label, net in rows.items():
            expected = count_prediction_flops(net, x, samples) / forward
            assert multiples[label]["inference"] == pytest.approx(expected, rel=1e-12), label
        assert multiples["deterministic"]["inference"] == 1.0
        assert multiples["ensemble (M = 5)"]["inference"] == 5.0  # members, not samples
        assert facts["samples"] == facts["inference_samples"] == samples
        text = _run([*args, "--samples", str(samples)]).output
        assert f"inference: S = {samples} forwards" in text
    default = json.loads(_run([*args, "--json"]).output)  # the paper's S = 5 by default
    assert default["samples"] == 1 and default["inference_samples"] == 5


def test_samples_below_one_is_refused_by_its_flag(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "convs.pt"
    torch.save(two_convs().state_dict(), path)
    args = ["flops", str(path), "--arch", f"{__name__}:two_convs", "--input-shape", "1,3,8,8"]
    for samples in ("0", "-2"):
        result = CliRunner().invoke(main, [*args, "--samples", samples])
        assert result.exit_code == 2 and "--samples" in result.output
