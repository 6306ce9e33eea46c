"""FLOP counting: analytic counts, agreement with FlopCounterMode, the Bayesian overhead,
the training cost, the method comparison, device handling and bad inputs."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bnnconvert import convert
from bnnconvert.costs import compare_method_costs, flops_report_text, parse_input_shape
from bnnconvert.flops import MAC_OPS, count_flops, training_cost
from bnnconvert.layers import convertible_parameters
from bnnconvert.models import UNet, resnet18

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Small(nn.Module):
    """Conv, BatchNorm, ReLU, ConvTranspose, pooling, residual-free head: (N, 3, 8, 8) -> (N, 5)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 5)

    def forward(self, x):
        return self.fc(self.pool(self.up(torch.relu(self.bn(self.conv(x))))).flatten(1))


def _entries(model: nn.Module) -> int:
    return sum(p.numel() for p in convertible_parameters(model).values())


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def small() -> nn.Module:
    torch.manual_seed(0)
    return Small().eval()


# ------------------------------------------------------------------ analytic counts
@pytest.mark.parametrize(
    ("layer", "shape", "macs"),
    [
        (nn.Conv2d(3, 8, 3, padding=1), (2, 3, 16, 16), 2 * 8 * 3 * 9 * 16 * 16),
        (nn.Conv2d(4, 6, 3, stride=2, groups=2), (1, 4, 9, 9), 6 * 2 * 9 * 4 * 4),
        (nn.Conv1d(2, 3, 5), (1, 2, 20), 3 * 2 * 5 * 16),
        (nn.Linear(20, 7), (4, 20), 4 * 20 * 7),
        (nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1), (1, 4, 5, 5), 25 * 4 * 6 * 9),
    ],
)
def test_layer_counts_match_the_analytic_count(layer, shape, macs):
    fma = count_flops(layer, torch.randn(shape))
    assert fma.total == macs  # one fused multiply-add = 1 FLOP; bias not counted
    assert fma.unsupported_ops == {}
    assert count_flops(layer, torch.randn(shape), convention="flop").total == 2 * macs


def test_resnet18_agrees_with_flop_counter_mode():
    model, x = resnet18(10).eval(), torch.randn(1, 3, 32, 32)
    report = count_flops(model, x, convention="flop")
    with FlopCounterMode(display=False) as mode, torch.no_grad():
        model(x)
    macs = sum(v for op, v in report.by_operator.items() if op in MAC_OPS)
    assert macs == mode.get_total_flops()
    assert report.unsupported_ops == {}
    assert report.by_module[""] == report.total
    assert "one fused multiply-add" in count_flops(model, x).header()


# ------------------------------------------------------------------ converted models
def test_converted_resnet18_has_no_unsupported_op():
    pbnn = convert(resnet18(10), "random", 0.05)
    cost = training_cost(pbnn, torch.randn(2, 3, 32, 32), samples=2)
    assert cost.forward.unsupported_ops == {}
    assert cost.unsupported_ops == {}  # the KL term too
    assert cost.forward.bayes_overhead > 0 and cost.kl > 0


@pytest.mark.parametrize("r_bayes", [0.05, 1.0])
def test_converted_unet_has_no_unsupported_op(r_bayes):
    pbnn = convert(UNet(in_channels=1, num_classes=2, base=4, depth=2), "random", r_bayes)
    x = torch.randn(1, 1, 16, 16)
    assert count_flops(pbnn, x).unsupported_ops == {}
    assert training_cost(pbnn, x).unsupported_ops == {}


def test_overhead_is_the_hand_count_and_grows_with_k(small):
    x = torch.randn(2, 3, 8, 8)
    det = count_flops(small, x)
    overheads = []
    for r in (0.01, 0.05, 0.2, 1.0):
        report = count_flops(convert(small, "magnitude", r), x)
        k = report.bayesian_entries
        scatter = "add" if r == 1.0 else "scatter_add"  # dense: mu + noise
        ops = {"softplus": k, "randn_like": k, "mul": 2 * k, scatter: k}  # mul: t, then eps
        assert report.bayes_by_operator == ops
        assert report.bayes_overhead == 5 * k
        assert report.deterministic_part == det.total  # the network itself is unchanged
        assert report.unsupported_ops == {}
        overheads.append(report.bayes_overhead)
    assert overheads == sorted(set(overheads))
    assert overheads[-1] == 5 * _entries(small)  # r = 1: the dense case, every entry


def test_overhead_is_attributed_to_the_owning_layer(small):
    report = count_flops(convert(small, "magnitude", 1.0), torch.randn(1, 3, 8, 8))
    for name, module in small.named_children():
        entries = sum(p.numel() for p in module.parameters()) if name != "bn" else 0
        assert report.bayes_by_module.get(name, 0) == 5 * entries
    assert sum(report.bayes_by_module.values()) == report.bayes_overhead


def test_bayesian_torch_overhead_is_counted(small):
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn

    from bnnconvert.costs import BAYESIAN_TORCH_PRIOR

    bnn = copy.deepcopy(small)
    dnn_to_bnn(bnn, BAYESIAN_TORCH_PRIOR)
    report = count_flops(bnn, torch.randn(2, 3, 8, 8))
    k = _entries(small)
    assert report.bayesian_entries == k and report.unsupported_ops == {}
    assert report.bayes_by_operator == {op: k for op in ("exp", "log1p", "normal_", "mul", "add")}
    assert report.deterministic_part == count_flops(small, torch.randn(2, 3, 8, 8)).total


def test_unsupported_ops_are_reported_and_logged_once(caplog):
    class Cumsum(nn.Module):
        def forward(self, x):
            return x.cumsum(0)

    with caplog.at_level(logging.WARNING):
        report = count_flops(Cumsum(), torch.randn(3, 4))
    assert report.unsupported_ops == {"aten::cumsum": 1}
    assert "aten::cumsum" in str(report)
    assert [r.name for r in caplog.records] == ["bnnconvert.flops"]


def test_samples_multiply_every_count(small):
    pbnn, x = convert(small, "magnitude", 0.2), torch.randn(1, 3, 8, 8)
    one, three = count_flops(pbnn, x), count_flops(pbnn, x, samples=3)
    assert three.total == 3 * one.total and three.per_forward == one.total
    assert three.bayes_overhead == 3 * one.bayes_overhead
    assert three.by_module == {k: 3 * v for k, v in one.by_module.items()}


def test_the_model_is_left_unchanged(small):
    pbnn = convert(small, "magnitude", 0.2).train()
    before = _state(pbnn)
    training_cost(pbnn, torch.randn(2, 3, 8, 8), samples=2)  # a training-mode forward
    count_flops(pbnn, torch.randn(2, 3, 8, 8), device="cpu")
    assert pbnn.training
    assert all(torch.equal(before[k], v) for k, v in pbnn.state_dict().items())
    assert not any("flops" in name for name, _ in pbnn.named_modules())
    assert "sample_parameter" not in pbnn.conv.__dict__


# ------------------------------------------------------------------ training cost
def test_training_cost_formula(small):
    pbnn, x = convert(small, "magnitude", 0.05), torch.randn(2, 3, 8, 8)
    cost = training_cost(pbnn, x, samples=5, steps=10, saliency_batches=3)
    k = cost.forward.bayesian_entries
    assert cost.forward.train and cost.backward_factor == 2.0
    assert 12 * k <= cost.kl <= 12 * k + 30  # 12 elementwise ops per entry + per-tensor terms
    assert cost.per_step == 3 * (5 * cost.forward.total + cost.kl)
    assert cost.saliency == 3 * 3 * (cost.forward.total - 5 * k)
    assert cost.per_run == 10 * cost.per_step + cost.saliency
    det = training_cost(small, x, steps=10)
    assert det.kl == 0 and det.per_run == 10 * 3 * det.forward.total
    assert "backward" in str(cost)


# ------------------------------------------------------------------ comparison
def test_compare_method_costs(small):
    table = compare_method_costs(small, torch.randn(2, 3, 8, 8), epochs=2, steps_per_epoch=3)
    rows = {r.method: r for r in table.rows}
    mult = table.multiples()
    det = table.rows[0]
    assert mult[det.method] == {"inference": 1, "train_step": 1, "train_run": 1, "parameters": 1}
    assert mult["ensemble (M = 5)"]["train_run"] == pytest.approx(5.0)
    partial = [rows[f"partial r = {r} %"] for r in (1, 5, 20)]
    assert [p.bayesian_entries for p in partial] == sorted(p.bayesian_entries for p in partial)
    for p in partial:
        assert p.inference == 5 * (det.forward + 5 * p.bayesian_entries)
        assert mult[p.method]["train_step"] > 5.0
    ours = rows["Bayesian (bnnconvert, r = 100 %)"]
    bt = rows["Bayesian (bayesian-torch dnn_to_bnn)"]
    assert ours.bayesian_entries == bt.bayesian_entries == _entries(small)
    assert bt.parameters == 2 * _entries(small) + 2 * 4  # mu and rho; BatchNorm kept
    assert bt.inference == 5 * (det.forward + 5 * _entries(small))  # exp, log1p, normal, mul, add
    assert str(table).startswith("| method |") and "3.36x" in str(table)


def test_compare_method_costs_counts_inference_with_the_predictions_samples(small):
    """Training steps at S = 2, predictions at S = 7 (as the demo's tables): the inference
    column is 7 x (F + 5k) / F, the training columns those of a table at S = 2."""
    x = torch.randn(2, 3, 8, 8)
    table = compare_method_costs(small, x, samples=2, inference_samples=7, epochs=2,
                                 bayesian_torch=False)  # fmt: skip
    same = compare_method_costs(small, x, samples=2, epochs=2, bayesian_torch=False)
    det, mult = table.rows[0], table.multiples()
    assert table.inference_samples == 7 and same.inference_samples == 2
    for row, other in zip(table.rows[2:], same.rows[2:]):  # the Bayesian rows
        expected = 7 * (det.forward + 5 * row.bayesian_entries)
        assert row.inference == expected
        assert mult[row.method]["inference"] == pytest.approx(expected / det.forward)
        assert other.inference == 2 * (det.forward + 5 * row.bayesian_entries)
        assert (row.train_step, row.train_run) == (other.train_step, other.train_run)
    assert "S = 7 forwards" in table.notes() and "S = 2 training-mode" in table.notes()
    with pytest.raises(ValueError, match="inference_samples"):
        compare_method_costs(small, x, inference_samples=0)


def test_flops_report_text(small):
    text = flops_report_text(small, "1,3,8,8", compare=True)
    assert "(total)" in text and "| partial r = 1 % |" in text
    converted = flops_report_text(convert(small, "magnitude", 0.05), [1, 3, 8, 8], compare=True)
    assert "Bayesian sampling" in converted and "| deterministic | 0 |" in converted
    assert parse_input_shape("1x3x8x8") == parse_input_shape([1, 3, 8, 8]) == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="bad input shape"):
        parse_input_shape("1,3,a")


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("model", "shape"),
    [(resnet18(10), (1, 1, 32, 32)), (nn.Linear(4, 2), (3, 5))],
)
def test_rejected_input_gives_a_clear_error(model, shape):
    with pytest.raises(ValueError, match=r"rejected an input of shape \(") as info:
        count_flops(model, torch.randn(shape))
    assert str(tuple(shape)) in str(info.value) and "\n" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_bad_arguments(small):
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="convention"):
        count_flops(small, x, convention="macs")
    with pytest.raises(ValueError, match="samples"):
        count_flops(small, x, samples=0)
    with pytest.raises(ValueError, match="r_values"):
        compare_method_costs(small, x, r_values=(0.0,))


# ------------------------------------------------------------------ CUDA
@cuda
@pytest.mark.cuda
def test_cuda_count_equals_cpu_count_and_model_stays(small):
    pbnn, x = convert(small, "magnitude", 0.2), torch.randn(2, 3, 8, 8)
    on_cuda = count_flops(pbnn, x, device="cuda")
    assert on_cuda.device.startswith("cuda")
    assert next(pbnn.parameters()).device.type == "cpu"
    on_cpu = count_flops(pbnn, x)
    assert (on_cuda.total, on_cuda.bayes_overhead) == (on_cpu.total, on_cpu.bayes_overhead)


@cuda
@pytest.mark.cuda
def test_cuda_model_is_counted_where_it_is():
    pbnn = convert(resnet18(10), "random", 0.05).cuda()
    cost = training_cost(pbnn, torch.randn(2, 3, 32, 32), samples=2)  # inputs moved
    assert cost.unsupported_ops == {} and cost.forward.device.startswith("cuda")
    assert next(pbnn.parameters()).device.type == "cuda"
    table = compare_method_costs(pbnn, torch.randn(2, 3, 32, 32, device="cuda"), r_values=(0.01,))
    assert table.device.startswith("cuda") and len(table.rows) == 5


def test_prediction_flops_count_the_hoisted_prefix_once():
    """A last-layer Bayesian ResNet18: the S draws share the network up to the pooled
    features, so S samples cost one forward + (S - 1) fc products + S samplings of the
    k = 5,130 entries (5 FLOPs each); a model that cannot be split costs S forwards."""
    from bnnconvert.convert import last_layer_masks
    from bnnconvert.flops import count_prediction_flops
    from bnnconvert.models import resnet18

    torch.manual_seed(0)
    det = resnet18(10, 1).eval()
    x = torch.randn(4, 1, 28, 28)
    pbnn = convert(det, last_layer_masks(det))
    k, s = 5130, 7
    base = count_flops(det, x).total
    fc = 4 * 512 * 10  # fvcore counts the multiply-adds of addmm (the bias add is free)
    assert count_prediction_flops(pbnn, x, s) == base + (s - 1) * fc + s * 5 * k
    stem = convert(det, {"conv1.weight": torch.ones(64, 1, 7, 7, dtype=torch.bool)}, None)
    assert count_prediction_flops(stem, x, s) == count_flops(stem, x, samples=s).total
