"""bnnconvert.methods: every baseline trains on real data and predicts one Prediction."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import bnnconvert
from bnnconvert.convert import num_bayesian
from bnnconvert.data import demo_classification, demo_segmentation, make_loader
from bnnconvert.layers import bayesian_layers, convertible_parameters
from bnnconvert.methods import (
    SWA,
    CheckpointEnsemble,
    ComparisonReport,
    Deterministic,
    Ensemble,
    FullBayes,
    LastLayers,
    LayerEnsemble,
    MonteCarloDropout,
    SparseBayes,
    checkpoint_epochs,
    evaluate_methods,
    get_method,
    lr_at,
    results_markdown,
)
from bnnconvert.methods.full_bayes import _zero_sigma
from bnnconvert.metrics import evaluate
from bnnconvert.models import UNet, resnet18
from bnnconvert.posterior import MAX_TEMPERATURE

ALL_METHODS = [
    "deterministic", "ensemble2", "partial1", "magnitude1", "random1", "bayesian",
    "bayesian_torch", "last_layer", "mc_dropout", "checkpoint_ensemble", "swa",
    "layer_ensemble",
]  # fmt: skip
TWO_EPOCHS = ("checkpoint_ensemble", "swa")  # too short for gamma T: the last epoch is kept


# ------------------------------------------------------------------------ real data
@pytest.fixture(scope="module")
def cls_data():
    """64 real digits (1 x 28 x 28, 10 classes), 2 batches of 32."""
    data = Subset(demo_classification("train"), range(64))
    return make_loader(data, 32, shuffle=True, seed=0, drop_last=True)


@pytest.fixture(scope="module")
def seg_data():
    """8 real nuclei tiles (1 x 64 x 64, 2 classes), 2 batches of 4."""
    data = Subset(demo_segmentation("train"), range(8))
    return make_loader(data, 4, shuffle=True, seed=0, drop_last=True)


@pytest.fixture(scope="module")
def cls_model():
    torch.manual_seed(1)
    return resnet18(num_classes=10, in_channels=1)


@pytest.fixture(scope="module")
def seg_model():
    torch.manual_seed(2)
    return UNet(1, 2, base=4, depth=2)


def first(loader):
    return next(iter(loader))


def up_with_output_padding(model: UNet) -> UNet:
    """The UNet with its ConvTranspose2d(k=2, s=2) replaced by ConvTranspose2d(k=3, s=2,
    padding=1, output_padding=1): same sizes, but only thanks to output_padding."""
    for i, up in enumerate(model.up):
        model.up[i] = nn.ConvTranspose2d(
            up.in_channels, up.out_channels, 3, stride=2, padding=1, output_padding=1
        )
    return model


# ------------------------------------------------------------------------ every method
@pytest.mark.parametrize("name", ALL_METHODS)
@pytest.mark.parametrize("task", ["multiclass", "segmentation"])
def test_method_trains_and_predicts_with_right_shapes(
    name, task, cls_data, seg_data, cls_model, seg_model
):
    if task == "multiclass":
        model, data, classes = cls_model, cls_data, 10
    else:
        model, data, classes = seg_model, seg_data, 2
    method = get_method(name, model, task=task, samples=2)
    before = copy.deepcopy(model.state_dict())
    epochs = 2 if name in TWO_EPOCHS else 1
    method.fit(data, epochs=epochs, seed=0)
    assert method.train_steps == len(data) * epochs * (2 if name == "ensemble2" else 1)
    x, y = first(data)
    pred = method.predict([(x, y)], samples=3)
    spatial = tuple(x.shape[2:]) if task == "segmentation" else ()
    assert isinstance(pred, bnnconvert.Prediction)
    assert pred.probs.shape == (len(x), classes, *spatial)
    assert pred.entropy.shape == (len(x), *spatial)
    members = {"ensemble2": 2, "checkpoint_ensemble": 1, "swa": 1, "deterministic": 1}
    if name == "layer_ensemble":
        members[name] = method.members - method.skip
    assert pred.samples.shape[0] == members.get(name, 3)
    assert torch.allclose(pred.probs.sum(1), torch.ones(()), atol=1e-5)
    assert torch.equal(pred.targets, y)
    assert set(evaluate(pred, task=task)) >= {"nll", "brier", "ece", "entropy"}
    assert method.num_parameters() >= sum(p.numel() for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_prediction_is_bnnconvert_predict(seg_data, seg_model):
    method = SparseBayes(seg_model, r_bayes=0.05, criterion="magnitude", task="segmentation")
    method.fit(seg_data, epochs=1, seed=0)
    x, _ = first(seg_data)
    torch.manual_seed(5)
    ours = method.predict(x, samples=3)
    torch.manual_seed(5)
    reference = bnnconvert.predict(method.model, x, samples=3)
    assert torch.equal(ours.probs, reference.probs)
    assert torch.equal(ours.mutual_info, reference.mutual_info)


def test_fit_is_one_template_with_the_settings_of_the_caller(seg_data, seg_model):
    """Every method shares Method.fit; settings and single keywords reach train(); a
    variational method keeps its own beta and S unless fit() is given them."""
    from bnnconvert.methods import Method
    from bnnconvert.training import TrainSettings

    for cls in (Deterministic, Ensemble, SparseBayes, FullBayes, CheckpointEnsemble, SWA,
                LayerEnsemble, MonteCarloDropout, LastLayers):  # fmt: skip
        assert cls.fit is Method.fit, cls
    part = SparseBayes(seg_model, r_bayes=0.05, criterion="magnitude", task="segmentation",
                       samples=2, beta=0.1)  # fmt: skip
    seen = []
    part.fit(seg_data, epochs=1, seed=0, settings=TrainSettings(lr=0.05, beta=0.5),
             on_step=seen.append)  # fmt: skip
    assert {s.beta for s in seen} == {0.1} and part.train_samples == 2  # the method's own
    part.fit(seg_data, epochs=1, seed=0, beta=0.2, samples=3, lr=0.05, on_step=seen.append)
    assert seen[-1].beta == 0.2 and part.train_samples == 3  # fit's keywords win
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        part.fit(seg_data, epochs=1, learning_rate=0.1)
    with pytest.raises(ValueError, match="epochs must be an integer >= 0"):
        part.fit(seg_data, epochs=-1)
    with pytest.raises(TypeError, match="epochs must be an integer >= 0"):
        part.fit(seg_data, epochs=1.5)
    ens = CheckpointEnsemble(seg_model, task="segmentation")
    with pytest.raises(ValueError, match="sets its own learning-rate schedule"):
        ens.fit(seg_data, epochs=2, lr_schedule="cosine")


def test_method_errors(seg_data, seg_model):
    with pytest.raises(ValueError, match="bayesian-torch backend takes a constant beta"):
        FullBayes(seg_model, beta="linear:0.2:0.01")
    method = FullBayes(seg_model, task="segmentation", samples=2)
    with pytest.raises(ValueError, match="bayesian-torch backend takes a constant beta"):
        method.fit(seg_data, epochs=1, beta="linear:0.2:0.01")  # refused before training
    assert method.train_steps == 0
    FullBayes(seg_model, backend="bnnconvert", beta="linear:0.2:0.01")  # ours takes any
    with pytest.raises(ValueError, match="no default stages for Sequential"):
        LayerEnsemble(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(ValueError, match="no module named 'block9'"):
        LayerEnsemble(seg_model, stages=["block9"])
    with pytest.raises(ValueError, match="task must be one of"):
        Deterministic(seg_model, task="regression")
    with pytest.raises(TypeError, match="samples must be a positive integer"):
        Deterministic(seg_model, samples=1.5)
    with pytest.raises(RuntimeError, match="call fit"):
        Ensemble(seg_model, members=2).predict(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="members must be a positive integer"):
        Ensemble(seg_model, members=0)


def test_flops_follow_the_method(seg_data, seg_model):
    x, _ = first(seg_data)
    det = Deterministic(seg_model, task="segmentation").fit(seg_data, epochs=1)
    ens = Ensemble(seg_model, members=2, task="segmentation")
    drop = MonteCarloDropout(seg_model, task="segmentation", samples=4)
    part = SparseBayes(seg_model, r_bayes=0.01, task="segmentation", samples=3)
    ens.fit(seg_data, epochs=1)
    part.fit(seg_data, epochs=1)
    d, e, m, p = (method.flops(x) for method in (det, ens, drop, part))
    assert d["inference"] == d["forward"]
    assert e["inference"] == 2 * d["forward"] and e["train_run"] == 2 * d["train_run"]
    # MC dropout before the head: predict runs the rest once and the 1 x 1 head S = 4
    # times (hoisting), N x H x W x C_in x C_out FLOPs each
    head = [mod for mod in seg_model.modules() if isinstance(mod, nn.Conv2d)][-1]
    n, _, h, w = x.shape
    head_flops = n * h * w * head.in_channels * head.out_channels * math.prod(head.kernel_size)
    assert m["inference"] == m["forward"] + 3 * head_flops and m["train_run"] == 0
    assert p["train_step"] > 3 * d["train_step"]  # S = 3 forwards + KL per step
    assert p["train_run"] > part.train_steps * p["train_step"]  # + the saliency pass
    assert part.saliency_batches == len(seg_data)


# ------------------------------------------------------------------------ registry
def test_registry_names(seg_model):
    assert isinstance(get_method("ensemble5", seg_model), Ensemble)
    assert get_method("ensemble5", seg_model).members == 5
    cases = [("partial1", "grad2", 0.01), ("partial20", "grad2", 0.2),
             ("magnitude1", "magnitude", 0.01), ("random1", "random", 0.01)]  # fmt: skip
    for name, criterion, r in cases:
        method = get_method(name, seg_model)
        assert (method.criterion, method.r_bayes, method.name) == (criterion, r, name)
    assert get_method("last_layers2", seg_model).layers == ["decoder.1.3", "head"]
    assert get_method("bayesian", seg_model).backend == "bnnconvert"
    assert get_method("bayesian_torch", seg_model).backend == "bayesian-torch"
    assert type(get_method("swa", seg_model)) is SWA
    assert get_method("checkpoint_ensemble", seg_model).schedule["cycles"] == 1
    assert get_method("mc_dropout", seg_model, p=0.3).p == 0.3
    with pytest.raises(ValueError, match="unknown method"):
        get_method("dropconnect", seg_model)


# ------------------------------------------------------------------------ ensembles
@pytest.mark.parametrize("init", ["reset", "weights"])
def test_ensemble_members_differ(init, seg_data, seg_model):
    method = Ensemble(seg_model, members=2, init=init, task="segmentation")
    method.fit(seg_data, epochs=1, seed=0)
    a, b = (dict(m.named_parameters()) for m in method.member_models)
    assert not torch.equal(a["head.weight"], b["head.weight"])
    pred = method.predict(first(seg_data)[0])
    assert not torch.allclose(pred.samples[0], pred.samples[1])
    assert (pred.mutual_info > 0).any()


# ------------------------------------------------------------------------ last layers
def test_last_layers_are_fully_bayesian_and_nothing_else(seg_data, seg_model):
    method = LastLayers(seg_model, layers=2, task="segmentation", samples=2)
    method.fit(seg_data, epochs=1)
    names = [n for n, _ in bayesian_layers(method.model)]
    assert names == ["decoder.1.3", "head"]
    entries = seg_model.decoder[1][3].weight.numel() + sum(
        p.numel() for p in seg_model.head.parameters()
    )
    assert num_bayesian(method.model) == entries


# ------------------------------------------------------------------------ MC dropout
def test_mc_dropout_samples_differ_in_eval(seg_data, seg_model):
    method = MonteCarloDropout(seg_model, p=0.5, layers=2, task="segmentation", samples=4)
    method.fit(seg_data, epochs=1)
    assert {"head.1.weight", "decoder.1.3.1.weight"} <= set(method.model.state_dict())
    method.model.eval()
    pred = method.predict(first(seg_data)[0])
    assert not torch.allclose(pred.samples[0], pred.samples[1])
    assert (pred.mutual_info > 0).any()
    norms = [m for m in method.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not any(m.training for m in norms)


# ------------------------------------------------------------------------ checkpoints
def paper_lr(t, T, M, gamma, a0=0.01, ar=0.1, eps=0.9):
    """Eq. (4) of Zhao et al. as printed, with the restart only for later cycles."""
    tc_len = T / M
    tc = t % tc_len
    if tc == 0 and t >= tc_len:
        return ar
    return a0 * (1 - min(tc, gamma * tc_len) / T) ** eps


@pytest.mark.parametrize("T, M, gamma", [(10, 1, 0.8), (12, 3, 0.5), (1200, 3, 0.8)])
def test_lr_schedule_matches_the_paper(T, M, gamma):
    values = [lr_at(t, epochs=T, cycles=M, gamma=gamma) for t in range(T)]
    assert values == pytest.approx([paper_lr(t, T, M, gamma) for t in range(T)], rel=1e-12)
    if M == 1:  # nnU-Net's poly decay, then constant
        assert values[3] == pytest.approx(0.01 * (1 - 3 / T) ** 0.9)
        assert values[-1] == values[int(gamma * T)] < values[0] == 0.01
    else:
        assert values[T // M] == 0.1 and values[0] == 0.01


def test_checkpoint_epochs_are_the_constant_phase():
    assert checkpoint_epochs(10, 1, 0.8) == [8, 9]
    assert checkpoint_epochs(12, 3, 0.5) == [2, 3, 6, 7, 10, 11]
    assert checkpoint_epochs(12, 3, 0.5, keep=1) == [3, 7, 11]
    assert checkpoint_epochs(1200, 3, 0.8, keep=10)[-10:] == list(range(1190, 1200))
    assert checkpoint_epochs(2, 1, 0.8) == [1]  # too short: the last epoch
    with pytest.raises(ValueError, match="multiple of cycles"):
        checkpoint_epochs(10, 3)


def test_checkpoint_ensemble_collects_what_the_schedule_says(seg_data, seg_model):
    method = CheckpointEnsemble(seg_model, cycles=2, gamma=0.5, task="segmentation")
    method.fit(seg_data, epochs=4, seed=0, lr=0.05)
    assert method.kept_epochs == [1, 3] == checkpoint_epochs(4, 2, 0.5)
    assert method.lrs == pytest.approx(
        [lr_at(t, epochs=4, cycles=2, gamma=0.5, lr=0.05) for t in range(4)]
    )
    assert method.lrs[2] == 0.1  # the restart epoch of cycle 2
    first_ckpt, second = method.checkpoints
    assert not torch.equal(first_ckpt["head.weight"], second["head.weight"])
    assert method.predict(first(seg_data)[0]).samples.shape[0] == 2
    assert method.num_parameters() == 2 * sum(p.numel() for p in seg_model.parameters())


def test_swa_is_the_average_of_the_checkpoints(seg_data, seg_model):
    kwargs = {"cycles": 1, "gamma": 0.3, "task": "segmentation"}
    ens = CheckpointEnsemble(seg_model, **kwargs).fit(seg_data, epochs=3, seed=0)
    swa = SWA(seg_model, **kwargs).fit(seg_data, epochs=3, seed=0)
    assert swa.kept_epochs == ens.kept_epochs == [1, 2]
    averaged = dict(swa.averaged.module.named_parameters())
    for name, value in averaged.items():
        mean = torch.stack([c[name] for c in ens.checkpoints]).mean(0)
        assert torch.allclose(value, mean, atol=1e-6), name
    bn = swa.averaged.module.encoder[0][1]
    assert not torch.equal(bn.running_mean, ens.checkpoints[-1]["encoder.0.1.running_mean"])
    assert swa.flops(first(seg_data)[0])["train_run"] > 0


# ------------------------------------------------------------------------ layer ensembles
def test_layer_ensemble_heads_and_aula(seg_data, seg_model):
    method = LayerEnsemble(seg_model, skip=1, task="segmentation")
    method.fit(seg_data, epochs=1, seed=0)
    net = method.model
    assert net.stages == ["encoder.0", "encoder.1", "encoder.2", "decoder.0", "decoder.1"]
    assert len(net.heads) == len(net.stages) and method.members == 6
    assert all(h.conv.kernel_size == (3, 3) and h.conv.out_channels == 2 for h in net.heads)
    x = first(seg_data)[0]
    out = method.outputs(x, 1)
    assert out.shape == (5, len(x), 2, 64, 64)
    masks = out.argmax(2).numpy()
    expected = []
    for n in range(len(x)):
        agreement = []
        for a, b in zip(masks[:-1, n], masks[1:, n]):
            tp = ((a == 1) & (b == 1)).sum()
            fp = ((a == 1) & (b == 0)).sum()
            fn = ((a == 0) & (b == 1)).sum()
            agreement.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
        expected.append(np.trapezoid(agreement, dx=1 / (len(agreement) - 1)))
    assert method.aula(x).numpy() == pytest.approx(np.array(expected), abs=1e-6)


def test_layer_ensemble_classification_heads(cls_model):
    x = demo_classification("val")[0][0][None].repeat(2, 1, 1, 1)
    method = LayerEnsemble(cls_model, skip=0, task="multiclass", example_input=x)
    assert [type(h).__name__ for h in method.model.heads] == ["ClassificationHead"] * 4
    assert [h.linear.in_features for h in method.model.heads] == [64, 128, 256, 512]
    assert method.predict(x).samples.shape == (5, 2, 10)
    with pytest.raises(ValueError, match="segmentation"):
        method.aula(x)


# ------------------------------------------------------------------------ full Bayes
def test_bayesian_torch_runs_on_a_unet_with_output_padding(seg_data, seg_model):
    model = up_with_output_padding(copy.deepcopy(seg_model))
    x = first(seg_data)[0]
    model.eval()
    with torch.no_grad():
        reference = model(x)
    # bayesian-torch alone drops output_padding: the decoder no longer fits its skips
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn

    raw = copy.deepcopy(model)
    dnn_to_bnn(raw, {"prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0,
                     "posterior_rho_init": -3.0, "type": "Reparameterization",
                     "moped_enable": True, "moped_delta": 0.1})  # fmt: skip
    with pytest.raises(RuntimeError):
        raw(x)
    method = FullBayes(model, backend="bayesian-torch", task="segmentation", samples=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback
        method.fit(seg_data, epochs=0)
    assert method.backend_used == "bayesian-torch"
    assert type(method.model.up[0]).__name__ == "ConvTranspose2dReparameterization"
    assert method.model.up[0].output_padding == (1, 1)
    with _zero_sigma(method.model), torch.no_grad():
        assert torch.allclose(method.model.eval()(x), reference, atol=1e-5)
    method.fit(seg_data, epochs=1, seed=0)
    pred = method.predict(x)
    assert pred.probs.shape == (4, 2, 64, 64)
    assert not torch.allclose(pred.samples[0], pred.samples[1])
    convertible = sum(p.numel() for p in convertible_parameters(model).values())
    total = sum(p.numel() for p in model.parameters())
    assert method.num_parameters() == total + convertible  # mu and rho for every entry


def test_bayesian_torch_falls_back_when_padding_mode_is_lost(seg_data, seg_model):
    model = copy.deepcopy(seg_model)
    model.encoder[0][0].padding_mode = "reflect"
    method = FullBayes(model, backend="bayesian-torch", task="segmentation", samples=2)
    with pytest.warns(UserWarning, match="padding_mode='reflect'.*falling back"):
        method.fit(seg_data, epochs=0)
    assert method.backend_used == "bnnconvert"
    assert method.model.encoder[0][0].padding_mode == "reflect"
    assert num_bayesian(method.model) == sum(
        p.numel() for p in convertible_parameters(model).values()
    )


# ------------------------------------------------------------------------ temperature
def test_temperature_scaling_lowers_validation_nll(cls_data, cls_model):
    model = copy.deepcopy(cls_model)
    with torch.no_grad():
        model.fc.weight.mul_(30)  # an overconfident classifier
    val = make_loader(Subset(demo_classification("val"), range(64)), 32, shuffle=False, seed=0)
    method = Deterministic(model, task="multiclass", temperature_scaling=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # T at its bound, see below
        method.fit(cls_data, epochs=0, val_data=val)
    scaled = method.predict(val)
    temperature = method.temperature

    def nll_at(t: float) -> float:
        method.temperature = t
        return evaluate(method.predict(val), task="multiclass")["nll"]

    raw = nll_at(1.0)
    assert evaluate(scaled, task="multiclass")["nll"] < raw
    # the fitted T is the validation NLL's minimum within [1/100, 100] (this untrained
    # classifier's NLL keeps falling towards T = infinity: T stops at the bound), and it
    # softens the overconfident model
    assert nll_at(temperature) <= nll_at(0.8 * temperature)
    if temperature < MAX_TEMPERATURE:
        assert nll_at(temperature) <= nll_at(1.25 * temperature)
    else:
        assert temperature == pytest.approx(MAX_TEMPERATURE)
    method.temperature = 1.0
    assert scaled.probs.max(1).values.mean() < method.predict(val).probs.max(1).values.mean()


def test_temperature_scaling_without_validation_data_fails_before_training(cls_data, cls_model):
    method = Deterministic(cls_model, task="multiclass", temperature_scaling=True)
    with pytest.raises(ValueError, match="temperature scaling needs val_data"):
        method.fit(cls_data, epochs=1)
    assert method.train_steps == 0


# ------------------------------------------------------------------------ comparison
def test_evaluate_methods_renders_the_table(seg_data):
    test = make_loader(Subset(demo_segmentation("test"), range(4)), 4, shuffle=False, seed=0)
    ood = torch.stack([demo_classification("val", size=64)[i][0] for i in range(4)])

    def factory():
        return UNet(1, 2, base=4, depth=2)

    results = evaluate_methods(
        factory, seg_data, test, task="segmentation",
        methods="deterministic,ensemble2,partial1", epochs=1, pretrain_epochs=1,
        samples=2, seed=0, ood_data=ood,
    )  # fmt: skip
    assert [r["method"] for r in results] == ["deterministic", "ensemble2", "partial1"]
    det, ens, part = results
    assert det["train_flops_x"] == pytest.approx(1.0)
    assert ens["epochs"] == 2 and ens["train_flops_x"] == pytest.approx(2.0)  # M x (P + E)
    assert part["epochs"] == 1 and part["train_flops_x"] > 1.0
    assert ens["inference_flops_x"] == pytest.approx(2.0)
    for r in results:
        assert 0.0 <= r["dice"] <= 1.0 and 0.0 <= r["ood_auroc"] <= 1.0
    table = results_markdown(results)
    assert table.splitlines()[0].startswith("| method | Dice | IoU | Brier | entropy | ECE | NLL")
    assert "OOD AUROC" in table and "| ensemble2 |" in table and "2.00x" in table
    # the paired differences against the deterministic model: their estimates are the
    # differences of the table's NLL (the segmentation meter's pixel NLL) and OOD AUROC
    report = ComparisonReport(results)
    paired = report.paired()
    assert report.reference() == "deterministic" and set(paired) == {"ensemble2", "partial1"}
    for row in (ens, part):
        nll, ood = paired[row["method"]]["nll"], paired[row["method"]]["ood_auroc"]
        assert nll.estimate == pytest.approx(row["nll"] - det["nll"], abs=1e-5)
        assert ood.estimate == pytest.approx(row["ood_auroc"] - det["ood_auroc"], abs=1e-6)
        assert nll.low <= nll.estimate <= nll.high and nll.items == 4
    assert "## Paired differences against deterministic" in report.markdown()
    record = json.loads(report.to_json())
    assert "per_item" not in record["rows"][0] and set(record["paired"]) == set(paired)
    with pytest.raises(ValueError, match="no method 'temperature'"):
        report.paired("temperature")
    diverged = copy.deepcopy(results)  # a NaN prediction: no interval, the report still renders
    diverged[2]["per_item"]["nll"][0] = float("nan")
    assert set(ComparisonReport(diverged).paired()) == {"ensemble2"}
    assert "| ensemble2 |" in ComparisonReport(diverged).markdown()


def test_per_item_values_of_a_sigmoid_segmentation_match_the_segmentation_meter():
    """One sigmoid channel and (N, 1, H, W) masks are read as the segmentation metrics read
    them: the mean of the per-image NLL is the meter's pixel NLL."""
    from bnnconvert.methods.comparison import per_item_values
    from bnnconvert.predict import Prediction

    g = torch.Generator().manual_seed(2)
    probs = torch.rand(4, 1, 6, 6, generator=g)
    masks = torch.randint(0, 2, (4, 1, 6, 6), generator=g)
    entropy = torch.rand(4, 6, 6, generator=g)
    pred = Prediction(probs, torch.zeros_like(probs), activation="sigmoid", entropy=entropy,
                      expected_entropy=entropy, mutual_info=torch.zeros_like(entropy),
                      targets=masks)  # fmt: skip
    values = per_item_values(pred, None, "segmentation")
    assert len(values["nll"]) == 4 and "ood_uncertainty" not in values
    assert np.mean(values["nll"]) == pytest.approx(evaluate(pred, task="segmentation")["nll"],
                                                   rel=1e-5)  # fmt: skip
    assert values["uncertainty"] == pytest.approx(entropy.mean((1, 2)).tolist())


class _KeywordCNN(nn.Module):
    """A Hugging Face-like classifier: ``model(pixel_values=x)`` -> logits (N, C)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)


@pytest.mark.parametrize(
    ("keys", "fmt"),
    [
        (("image", "label"), bnnconvert.BatchFormat("image", "label")),  # MONAI-like
        (("pixel_values", "labels"), bnnconvert.BatchFormat(["pixel_values"], "labels")),
    ],
)
def test_evaluate_methods_costs_mapping_batches_as_tuples(keys, fmt):
    """The reference cost (and every row) of mapping batches read by a BatchFormat equals
    that of the same data as (input, target) tuples."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(16, 3),
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    tuples = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))
              for _ in range(3)]  # fmt: skip
    mappings = [dict(zip(keys, batch)) for batch in tuples]
    model = _KeywordCNN(copy.deepcopy(net)) if fmt.keywords else copy.deepcopy(net)
    common = {"task": "multiclass", "methods": "deterministic,ensemble2,partial5", "epochs": 1,
              "samples": 2, "seed": 0}  # fmt: skip
    expected = evaluate_methods(net, tuples, tuples, **common)
    rows = evaluate_methods(model, mappings, mappings, train_kwargs={"batch_format": fmt}, **common)
    costs = ("train_flops", "train_flops_x", "inference_flops", "inference_flops_x",
             "parameters", "parameters_x")  # fmt: skip
    for row, ref in zip(rows, expected, strict=True):
        assert row["method"] == ref["method"]
        assert {k: row[k] for k in costs} == {k: ref[k] for k in costs}
        assert row["nll"] == pytest.approx(ref["nll"], rel=1e-5)  # same fit, same data
    assert expected[0]["train_flops_x"] == 1.0 and expected[1]["inference_flops_x"] == 2.0


def test_entropy_auroc_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    from bnnconvert import predict
    from bnnconvert.methods import entropy_auroc

    torch.manual_seed(3)
    test_logits, ood_logits = 3 * torch.randn(40, 5), torch.randn(30, 5)
    test, ood = (predict(nn.Identity(), x, samples=1) for x in (test_logits, ood_logits))
    p = torch.cat([test_logits, ood_logits]).double().softmax(1).numpy()
    entropy = -(p * np.log(p)).sum(1)  # the entropy of each image, computed here
    labels = np.r_[np.zeros(40), np.ones(30)]
    assert entropy_auroc(test, ood) == pytest.approx(roc_auc_score(labels, entropy), abs=1e-6)
    # segmentation: per-image score = mean pixel entropy
    seg_test, seg_ood = torch.randn(6, 2, 4, 4), 0.2 * torch.randn(5, 2, 4, 4)
    q = torch.cat([seg_test, seg_ood]).double().softmax(1).numpy()
    score = -(q * np.log(q)).sum(1).reshape(11, -1).mean(1)
    seg = [predict(nn.Identity(), x, samples=1) for x in (seg_test, seg_ood)]
    expected = roc_auc_score(np.r_[np.zeros(6), np.ones(5)], score)
    assert entropy_auroc(*seg) == pytest.approx(expected, abs=1e-6)


def test_posterior_methods_fit_and_calibrate_the_posterior():
    """posterior_ll / laplaceP: convert, fit_posterior on the training data, calibrated on
    val_data; the same sigma as fit_posterior called directly on the same conversion."""
    from torch.utils.data import DataLoader, TensorDataset

    import bnnconvert
    from bnnconvert.layers import bayesian_layers

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    y = (x[:, :3].argmax(1)).long()
    data, val = DataLoader(TensorDataset(x, y), 50), DataLoader(TensorDataset(x[:80], y[:80]), 40)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    method = get_method("posterior_ll", net, task="multiclass", samples=4)
    method.fit(data, epochs=0, val_data=val)
    assert method.report.method == "laplace" and method.report.calibration is not None
    assert [name for name, _ in bayesian_layers(method.model)] == ["2"]
    ref = bnnconvert.convert(net, bnnconvert.last_layer_masks(net), None, moped_delta=0.1)
    bnnconvert.fit_posterior(ref, data, task="multiclass")
    for (_, a), (_, b) in zip(bayesian_layers(method.model), bayesian_layers(ref)):
        torch.testing.assert_close(a.bayes_rho("weight"), b.bayes_rho("weight"))
    kron = get_method("posterior_ll_kron", net, task="multiclass", samples=4)
    kron.fit(data, epochs=0, val_data=val)
    assert kron.report.covariance == "kron" and kron.model[2].is_kronecker
    ref_kron = bnnconvert.convert(net, bnnconvert.last_layer_masks(net), None)
    ref_report = bnnconvert.fit_posterior(ref_kron, data, task="multiclass", covariance="kron")
    assert kron.report.prior_precision == pytest.approx(ref_report.prior_precision, rel=1e-9)
    torch.testing.assert_close(kron.model[2].kron_var, ref_kron[2].kron_var)
    with pytest.raises(ValueError, match="needs posterior='laplace'"):
        get_method("last_layer", net, covariance="kron")
    sparse = get_method("vi5", net, task="multiclass")
    assert sparse.posterior == "vi" and sparse.r_bayes == 0.05
    with pytest.raises(ValueError, match="posterior"):
        SparseBayes(net, posterior="mcmc")
