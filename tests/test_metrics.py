"""bnnconvert.metrics against independent references: scikit-learn, numpy, hand counts."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import (
    binary_calibration_error,
    multiclass_calibration_error,
)
from torchmetrics.functional.segmentation import dice_score

import bnnconvert
from bnnconvert import metrics as M
from bnnconvert.predict import predict, predict_batches

from .conftest import segmentation_batches


def random_probs(n: int, c: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(n, c, generator=g, dtype=torch.float64), 1)


def loop_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    """ECE by a direct loop over bins (lo, hi], bin 0 closed at 0."""
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return total


# --------------------------------------------------------------------- accuracy
def test_accuracy_multiclass_multilabel_and_vote():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.4, 0.5, 0.1], [0.3, 0.3, 0.4]])
    targets = torch.tensor([0, 2, 0, 1])
    assert M.accuracy(probs, targets).item() == pytest.approx(0.5)
    ml = torch.tensor([[0.9, 0.2], [0.4, 0.5], [0.6, 0.51]])
    y = torch.tensor([[1, 0], [1, 0], [1, 1]])
    # predicted (p > 0.5): [[1, 0], [0, 0], [1, 1]]: 5 of 6 entries right
    assert M.accuracy(ml, y, task="multilabel").item() == pytest.approx(5 / 6)
    assert torch.allclose(
        M.accuracy(ml, y, task="multilabel", per_label=True), torch.tensor([2 / 3, 1.0])
    )
    # majority vote over 3 samples: item 0 votes [0, 1, 1] -> 1; item 1 votes [2, 2, 0] -> 2
    samples = torch.zeros(3, 2, 3)
    for s, (a, b) in enumerate([(0, 2), (1, 2), (1, 0)]):
        samples[s, 0, a] = samples[s, 1, b] = 1.0
    assert M.accuracy(samples, torch.tensor([1, 2]), vote=True).item() == 1.0
    assert M.accuracy(samples, torch.tensor([0, 2]), vote=True).item() == 0.5
    ml_samples = torch.tensor([[[0.9]], [[0.6]], [[0.2]]])  # 2 of 3 say positive
    assert M.accuracy(ml_samples, torch.tensor([[1]]), task="multilabel", vote=True) == 1.0


# --------------------------------------------------------------------- AUC
def test_auc_matches_sklearn_multilabel_and_multiclass():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(60, 4, generator=g, dtype=torch.float64)
    targets = (torch.rand(60, 4, generator=g) < 0.3 + 0.4 * probs).long()
    ours = M.auc(probs, targets)
    ref = roc_auc_score(targets.numpy(), probs.numpy(), average="macro")
    assert ours.item() == pytest.approx(ref, abs=1e-7)
    per_label = M.auc(probs, targets, average="none")
    for label in range(4):
        ref_l = roc_auc_score(targets[:, label].numpy(), probs[:, label].numpy())
        assert per_label[label].item() == pytest.approx(ref_l, abs=1e-7)
    p = random_probs(80, 3, seed=2)
    y = torch.randint(0, 3, (80,), generator=g)
    ref = roc_auc_score(y.numpy(), p.numpy(), multi_class="ovr", average="macro")
    assert M.auc(p, y, task="multiclass").item() == pytest.approx(ref, abs=1e-7)


def test_auc_with_tied_scores_matches_sklearn():
    probs = torch.tensor([[0.1], [0.1], [0.9], [0.9], [0.5]])
    targets = torch.tensor([[0], [1], [0], [1], [1]])
    ref = roc_auc_score(targets.numpy(), probs.numpy())
    assert M.auc(probs, targets).item() == pytest.approx(ref)


def test_auc_absent_class_is_skipped_with_a_warning():
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(40, 3, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 2, (40, 3), generator=g)
    targets[:, 1] = 0  # label 1 never positive
    with pytest.warns(UserWarning, match=r"AUC undefined for labels \[1\]"):
        ours = M.auc(probs, targets)
    ref = roc_auc_score(targets[:, [0, 2]].numpy(), probs[:, [0, 2]].numpy())
    assert ours.item() == pytest.approx(ref)
    with pytest.warns(UserWarning):
        assert math.isnan(M.auc(probs, targets, average="none")[1])
    with pytest.warns(UserWarning):
        assert math.isnan(M.auc(probs, torch.ones(40, 3, dtype=torch.long)).item())
    with pytest.warns(UserWarning, match=r"labels \[2\]"):  # multiclass: class 2 absent
        value = M.auc(random_probs(10, 3), torch.tensor([0, 1] * 5), task="multiclass")
    assert 0 <= value.item() <= 1


# --------------------------------------------------------------------- Dice / IoU
def test_dice_and_iou_binary_by_hand():
    pred = torch.tensor([[[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]])
    true = torch.tensor([[[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]])
    # TP = 3, FP = 2 (pixels (1,1) and (3,3)), FN = 1 (pixel (0,2))
    assert M.dice(pred, true).item() == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert M.iou(pred, true).item() == pytest.approx(3 / (3 + 2 + 1))
    counts = M.overlap_counts(pred, true)
    assert counts[0, 1].tolist() == [3, 2, 1]
    # probabilities (two channels, one sigmoid channel, plain floats) give the same masks
    two = torch.stack([1 - pred, pred], 1).double()
    for form in (two, pred.unsqueeze(1) * 0.9, pred * 0.8):
        assert M.dice(form, true).item() == pytest.approx(6 / 9)


def test_dice_multiclass_per_image_and_overall_by_hand():
    pred = torch.tensor([[0, 1, 1, 2], [2, 2, 0, 0]])
    true = torch.tensor([[0, 1, 2, 2], [2, 0, 0, 1]])
    # image 0: class 1 TP1 FP1 FN0 -> 2/3; class 2 TP1 FP0 FN1 -> 2/3
    # image 1: class 1 TP0 FP0 FN1 -> 0;   class 2 TP1 FP1 FN0 -> 2/3
    per_image = M.dice(pred, true, num_classes=3, per_image=True)
    assert per_image.tolist() == pytest.approx([2 / 3, 1 / 3])
    per_class = M.dice(pred, true, num_classes=3, per_image=True, average="none")
    expected = torch.tensor([[2 / 3, 2 / 3], [0, 2 / 3]], dtype=torch.float64)
    assert torch.allclose(per_class, expected)
    # overall: class 1 TP1 FP1 FN1 -> 1/2; class 2 TP2 FP1 FN1 -> 2/3
    assert M.dice(pred, true, num_classes=3).item() == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert M.iou(pred, true, num_classes=3).item() == pytest.approx((1 / 3 + 2 / 4) / 2)
    with_bg = M.dice(pred, true, num_classes=3, include_background=True, average="none")
    assert with_bg[0].item() == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # class 0: TP2 FP1 FN1
    ref = dice_score(pred, true, 3, include_background=False, average="none", input_format="index")
    assert torch.allclose(per_class.float(), ref)  # torchmetrics agrees where defined


def test_dice_empty_masks():
    empty = torch.zeros(1, 4, 4, dtype=torch.long)
    some = empty.clone()
    some[0, 0, 0] = 1
    assert M.dice(empty, empty).item() == 1.0  # both empty: perfect agreement
    assert M.iou(empty, empty).item() == 1.0
    assert M.dice(some, empty).item() == 0.0  # predicted where nothing is
    assert M.dice(empty, some).item() == 0.0  # missed
    assert math.isnan(M.dice(empty, empty, empty=math.nan).item())
    # with empty=nan an empty image is left out of the per-image mean
    batch_p, batch_t = torch.cat([empty, some]), torch.cat([empty, some])
    assert M.dice(batch_p, batch_t, per_image=True).tolist() == [1.0, 1.0]
    scores = M.dice(batch_p, batch_t, per_image=True, empty=math.nan)
    assert math.isnan(scores[0]) and scores[1] == 1.0


# --------------------------------------------------------------------- Brier, NLL
def test_brier_by_the_formula():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])
    targets = torch.tensor([0, 1])
    per_item = [(0.3**2 + 0.2**2 + 0.1**2), (0.2**2 + 0.8**2 + 0.6**2)]
    assert M.brier_score(probs, targets).item() == pytest.approx(sum(per_item) / 3 / 2)
    assert M.brier_score(probs, targets, classes="sum").item() == pytest.approx(sum(per_item) / 2)
    samples = torch.stack([probs, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])])
    mean_pred = M.brier_score(samples.mean(0), targets)
    over = M.brier_score(samples, targets, over_samples=True)
    assert over.item() == pytest.approx((M.brier_score(probs, targets).item() + 0) / 2)
    assert over >= mean_pred  # convexity
    ml = torch.tensor([[0.9, 0.2], [0.4, 1.0]])
    y = torch.tensor([[1, 0], [0, 1]])
    ref = (0.1**2 + 0.2**2 + 0.4**2 + 0.0) / 4
    assert M.brier_score(ml, y, task="multilabel").item() == pytest.approx(ref)


def test_nll_and_probabilities_zero_and_one():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    targets = torch.tensor([0, 0, 1])
    value = M.nll(probs, targets)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx((0 - math.log(1e-12) + math.log(2)) / 3)
    ml = torch.tensor([[1.0, 0.0]])
    assert torch.isfinite(M.nll(ml, torch.tensor([[0, 1]]), task="multilabel"))
    for fn in (M.entropy_of_expectation, M.brier_score, M.expected_calibration_error):
        args = (probs,) if fn is M.entropy_of_expectation else (probs, targets)
        assert torch.isfinite(fn(*args)).all(), fn.__name__
    assert M.entropy_of_expectation(probs)[:2].tolist() == [0.0, 0.0]


def test_item_nll_matches_torch_losses_item_by_item():
    """Per item: multiclass -log p_y (torch's nll_loss on log p), segmentation the mean
    over pixels, multilabel the mean binary cross-entropy over labels; nll is their mean."""
    g = torch.Generator().manual_seed(6)
    probs = torch.softmax(torch.randn(7, 4, generator=g, dtype=torch.float64), 1)
    y = torch.randint(0, 4, (7,), generator=g)
    ref = torch.nn.functional.nll_loss(probs.log(), y, reduction="none")
    assert torch.allclose(M.item_nll(probs, y), ref)
    seg = torch.softmax(torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64), 1)
    mask = torch.randint(0, 2, (3, 5, 5), generator=g)
    ref = torch.nn.functional.nll_loss(seg.log(), mask, reduction="none").mean((1, 2))
    assert torch.allclose(M.item_nll(seg, mask), ref)
    ml = torch.rand(6, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 2, (6, 3), generator=g)
    ref = torch.nn.functional.binary_cross_entropy(ml, labels.double(), reduction="none")
    assert torch.allclose(M.item_nll(ml, labels, task="multilabel"), ref.mean(1))
    pixel_mean = torch.nn.functional.nll_loss(seg.log(), mask).item()
    assert M.nll(seg, mask).item() == pytest.approx(pixel_mean)


# --------------------------------------------------------------------- entropies
def test_entropy_and_mutual_information_match_numpy():
    g = torch.Generator().manual_seed(4)
    samples = torch.softmax(torch.randn(5, 7, 4, 3, 3, generator=g, dtype=torch.float64), 2)
    p = samples.numpy()
    mean = p.mean(0)
    h_mean = -(mean * np.log(mean)).sum(1)
    h_each = -(p * np.log(p)).sum(2).mean(0)
    assert np.allclose(M.entropy_of_expectation(samples.mean(0)).numpy(), h_mean)
    assert np.allclose(M.expected_entropy(samples).numpy(), h_each)
    assert np.allclose(M.mutual_information(samples).numpy(), h_mean - h_each)
    q = torch.rand(4, 6, 5, generator=g, dtype=torch.float64)  # multilabel samples
    qm = q.mean(0).numpy()
    bern = -(qm * np.log(qm) + (1 - qm) * np.log(1 - qm))
    assert np.allclose(M.entropy_of_expectation(q.mean(0), task="multilabel").numpy(), bern)
    qn = q.numpy()
    each = -(qn * np.log(qn) + (1 - qn) * np.log(1 - qn)).mean(0)
    assert np.allclose(M.mutual_information(q, task="multilabel").numpy(), bern - each)


def test_mutual_information_single_or_identical_samples_is_zero():
    p = random_probs(6, 4).float()
    assert torch.equal(M.mutual_information(p.unsqueeze(0)), torch.zeros(6))
    assert torch.equal(M.mutual_information(p.expand(5, 6, 4)), torch.zeros(6))
    hard = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two confident samples disagree
    assert M.mutual_information(hard).item() == pytest.approx(math.log(2))
    assert torch.isfinite(M.expected_entropy(hard)).all()


# --------------------------------------------------------------------- calibration
def test_ece_hand_example():
    # bin (0.6, 0.7]: conf 0.65 twice, one right -> |0.5 - 0.65| = 0.15, weight 1/2
    # bin (0.9, 1.0]: conf 0.95 twice, both right -> |1 - 0.95| = 0.05, weight 1/2
    probs = torch.tensor([[0.65, 0.35], [0.65, 0.35], [0.05, 0.95], [0.95, 0.05]])
    targets = torch.tensor([0, 1, 1, 0])
    ece = M.expected_calibration_error(probs, targets, n_bins=10)
    assert ece.item() == pytest.approx(0.1)
    assert loop_ece(np.array([0.65, 0.65, 0.95, 0.95]), np.array([1, 0, 1, 1]), 10) == (
        pytest.approx(0.1)
    )


@pytest.mark.parametrize("n_bins", [10, 15, 100])
def test_ece_matches_a_direct_loop_and_torchmetrics(n_bins):
    probs = random_probs(400, 5, seed=5)
    targets = torch.randint(0, 5, (400,), generator=torch.Generator().manual_seed(6))
    conf, pred = probs.max(1)
    ref = loop_ece(conf.numpy(), (pred == targets).double().numpy(), n_bins)
    ours = M.expected_calibration_error(probs, targets, n_bins=n_bins)
    assert ours.item() == pytest.approx(ref, abs=1e-7)
    tm = multiclass_calibration_error(probs.float(), targets, 5, n_bins=n_bins)
    assert ours.item() == pytest.approx(tm.item(), abs=1e-5)
    p, y = probs[:, 0], (targets == 0).long()  # multilabel: positive-class calibration
    tm_bin = binary_calibration_error(p.float(), y, n_bins=n_bins)
    ours_ml = M.expected_calibration_error(p[:, None], y[:, None], task="multilabel", n_bins=n_bins)
    assert ours_ml.item() == pytest.approx(tm_bin.item(), abs=1e-5)


def test_calibration_bin_edges():
    bins = M.calibration_bins(torch.tensor([0.0, 0.1, 0.3, 0.31, 1.0]), torch.ones(5), 10)
    assert bins[0].tolist() == [2, 0, 1, 1, 0, 0, 0, 0, 0, 1]  # bins (lo, hi], 0 in bin 0
    assert bins[1].tolist() == pytest.approx([0.1, 0, 0.3, 0.31, 0, 0, 0, 0, 0, 1.0])
    # torchmetrics gives confidence 1.0 a bin of its own: (|0 - 1| + |1 - 0.95|) / 2 there,
    # |0.5 - 0.975| here, where (0.9, 1.0] holds both
    p, y = torch.tensor([1.0, 0.95]), torch.tensor([0, 1])
    assert binary_calibration_error(p, y, n_bins=10).item() == pytest.approx(0.525)
    ours = M.expected_calibration_error(p[:, None], y[:, None], task="multilabel", n_bins=10)
    assert ours.item() == pytest.approx(0.475)
    halves = M.calibration_bins(torch.tensor([0.2, 0.9]), torch.tensor([1.0, 0.0]), 2)
    assert torch.equal(
        halves + halves,
        M.calibration_bins(torch.tensor([0.2, 0.9, 0.2, 0.9]), torch.tensor([1.0, 0, 1, 0]), 2),
    )


def test_adaptive_ece_hand_example():
    # sorted confidences [0.6, 0.7 | 0.8, 0.9], outcomes [1, 0 | 1, 1]
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    targets = torch.tensor([0, 0, 0, 1])
    ace = M.adaptive_calibration_error(probs, targets, n_bins=2)
    assert ace.item() == pytest.approx(0.5 * abs(0.5 - 0.65) + 0.5 * abs(1 - 0.85))


def test_aurc_hand_example():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    targets = torch.tensor([0, 0, 0, 0])  # ranked 0.9 ok, 0.8 wrong, 0.7 ok, 0.6 wrong
    expected = (0 + 1 / 2 + 1 / 3 + 2 / 4) / 4
    assert M.aurc(probs, targets).item() == pytest.approx(expected)
    reverse = M.aurc(probs, targets, confidence=-probs.max(1).values)
    assert reverse.item() == pytest.approx((1 + 1 / 2 + 2 / 3 + 2 / 4) / 4)


# --------------------------------------------------------------------- AULA
def test_aula_hand_computation():
    a = torch.tensor([[1, 1], [0, 0]])
    b = torch.tensor([[1, 0], [0, 0]])
    zero = torch.zeros(2, 2, dtype=torch.long)
    # agreements: Dice(a, a) = 1, Dice(a, b) = 2/3, Dice(b, zero) = 0
    assert M.aula([a, a, b, zero]) == pytest.approx(0.5 * (1 + 2 / 3) / 2 + 0.5 * (2 / 3) / 2)
    assert M.aula([a, a, b, zero], normalize=False) == pytest.approx((1 + 2 / 3) / 2 + 1 / 3)
    assert M.aula(torch.stack([a, a, a])) == 1.0
    assert M.aula([a, b]) == pytest.approx(2 / 3)
    assert M.aula([a.double() * 0.9, b.double() * 0.9]) == pytest.approx(2 / 3)
    assert M.aula([zero, zero, zero]) == 1.0  # empty heads agree
    with pytest.raises(ValueError, match="at least 2"):
        M.aula([a])


# --------------------------------------------------------------------- evaluation
def test_evaluate_classification_keys_and_values():
    probs = random_probs(30, 4, seed=7)
    samples = torch.stack([probs, probs.roll(1, 1)])
    y = torch.randint(0, 4, (30,), generator=torch.Generator().manual_seed(8))
    pbnn = bnnconvert.convert(torch.nn.Linear(5, 4), "random", 0.5)
    pred = predict(pbnn, torch.randn(30, 5), samples=3)
    results = M.evaluate(pred, y, "multiclass")
    assert tuple(results) == M.METRIC_KEYS["multiclass"]
    assert all(math.isfinite(v) for v in results.values())
    assert results["accuracy"] == pytest.approx(M.accuracy(pred.probs, y).item())
    assert results["mutual_info"] == pytest.approx(pred.mutual_info.mean().item())
    ml = predict(pbnn, torch.randn(30, 5), samples=2, activation="sigmoid")
    yl = (torch.rand(30, 4, generator=torch.Generator().manual_seed(9)) < 0.5).long()
    results = M.evaluate(ml, yl, "multilabel")
    assert tuple(results) == M.METRIC_KEYS["multilabel"]
    assert all(math.isfinite(v) for v in results.values())
    assert M.mutual_information(samples).shape == (30,)
    with pytest.raises(ValueError, match="no targets"):
        M.evaluate(pred, task="multiclass")


def test_segmentation_meter_streams_like_evaluate(unet):
    pbnn = bnnconvert.convert(unet, "random", 0.05)
    batches = segmentation_batches(n_batches=2, batch=2, size=16)
    torch.manual_seed(0)
    whole = predict(pbnn, batches, samples=2, keep_samples=False, progress=False)
    expected = M.evaluate(whole, task="segmentation")
    assert tuple(expected) == M.METRIC_KEYS["segmentation"]
    meter = M.SegmentationMeter()
    torch.manual_seed(0)
    for part in predict_batches(pbnn, batches, samples=2, progress=False):
        meter.update(part, part.targets)
    streamed = meter.compute()
    assert streamed == pytest.approx(expected, rel=1e-6)
    assert streamed["dice"] == pytest.approx(M.dice(whole.probs, whole.targets).item())
    assert streamed["dice_per_image"] == pytest.approx(
        M.dice(whole.probs, whole.targets, per_image=True).mean().item()
    )
    assert streamed["ece"] == pytest.approx(
        M.expected_calibration_error(whole.probs, whole.targets).item()
    )
    assert streamed["brier"] == pytest.approx(M.brier_score(whole.probs, whole.targets).item())
    assert streamed["entropy"] == pytest.approx(whole.entropy.mean().item(), rel=1e-5)


def test_segmentation_meter_binary_sigmoid_and_bare_probabilities():
    probs = torch.tensor([[[[0.9, 0.2], [0.0, 1.0]]]])  # (1, 1, 2, 2), exact 0 and 1
    target = torch.tensor([[[1, 1], [0, 1]]])
    meter = M.SegmentationMeter()
    meter.update(probs, target)
    out = meter.compute()
    assert out["dice"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    assert out["pixel_accuracy"] == pytest.approx(3 / 4)
    assert math.isfinite(out["nll"]) and math.isfinite(out["entropy"])
    assert math.isnan(out["mutual_info"])  # unknown without samples
    with pytest.raises(ValueError, match="before any update"):
        M.SegmentationMeter().compute()


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="task must be one of"):
        M.nll(random_probs(2, 2), torch.tensor([0, 1]), task="binary")
    with pytest.raises(ValueError, match="multiclass expects probs"):
        M.brier_score(random_probs(2, 2), torch.tensor([[0, 1]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on a clean call
        M.auc(random_probs(6, 2), torch.tensor([0, 1] * 3), task="multiclass")


def test_fpr_at_tpr_against_scikit_learn():
    from sklearn.metrics import roc_curve

    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        ind = torch.randn(200, generator=g)
        ood = torch.randn(150, generator=g) + 1.0
        if trial == 4:  # ties
            ind, ood = ind.round(decimals=1), ood.round(decimals=1)
        labels = torch.cat([torch.zeros(200), torch.ones(150)]).numpy()
        fpr, tpr, _ = roc_curve(labels, torch.cat([ind, ood]).numpy())
        expected = fpr[(tpr >= 0.95).argmax()]  # the first threshold reaching 95 % TPR
        assert M.fpr_at_tpr(ind, ood, 0.95) == pytest.approx(expected)
    with pytest.raises(ValueError, match="tpr"):
        M.fpr_at_tpr(ind, ood, 0.0)
