"""Task and uncertainty metrics of the papers, for classification and segmentation.

Conventions (every function documents its own shapes):

- ``task="multiclass"``: ``probs`` (N, C, *spatial) sum to 1 over the class dim 1,
  ``targets`` (N, *spatial) hold class indices. Segmentation is multi-class per pixel
  (spatial = (H, W) or (H, W, D)); a per-pixel metric is averaged over every pixel.
- ``task="multilabel"``: ``probs`` (N, L, *spatial) are independent Bernoulli
  probabilities, ``targets`` of the same shape hold 0/1 (binary segmentation with one
  sigmoid channel is (N, 1, H, W)).
- Logarithms are natural (nats). Probabilities of exactly 0 or 1 never give NaN.
- Every function returns tensors (scalars as 0-dim tensors), except :func:`aula` and the
  dicts of :func:`evaluate` / :class:`SegmentationMeter`, which hold Python floats.

What builds on torchmetrics: AUROC (``binary_auroc``, exact, equal to scikit-learn's
``roc_auc_score``), average precision (``binary_average_precision``, equal to
scikit-learn's ``average_precision_score``) and the per-image, per-class TP/FP/FN counts
behind Dice and IoU (``multiclass_stat_scores``). Calibration is binned here: torchmetrics'
``CalibrationError`` keeps every confidence in memory (unbounded for segmentation) and
puts confidence 1.0 in a bin of its own; :func:`calibration_bins` keeps O(n_bins)
sums, mergeable across batches, with the bins (lo, hi] of Guo et al. (2017) (it equals
torchmetrics away from the bin edges; the tests check both).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from itertools import pairwise
from typing import Literal

import torch
from torch import Tensor

from .predict import Prediction, categorical_entropy, uncertainty_terms

__all__ = [
    "ECE_BINS",
    "METRIC_KEYS",
    "OOD_SCORES",
    "SegmentationMeter",
    "accuracy",
    "adaptive_calibration_error",
    "auc",
    "aula",
    "aurc",
    "brier_score",
    "calibration_bins",
    "confidence_and_correct",
    "dice",
    "ece_from_bins",
    "entropy_auroc",
    "entropy_of_expectation",
    "evaluate",
    "expected_calibration_error",
    "expected_entropy",
    "fpr_at_tpr",
    "image_uncertainty",
    "iou",
    "item_nll",
    "mutual_information",
    "nll",
    "ood_scores",
    "overlap_counts",
    "risk_coverage",
]

Task = Literal["multiclass", "multilabel"]
TASKS = ("multiclass", "multilabel")

ECE_BINS = 15
"""The number of equal-width bins of the ECE: the default of every calibration function
here, of :func:`evaluate` (so of the CLI's tables) and of the reliability diagrams of
:mod:`bnnconvert.plots`, which therefore draw the bins of the printed ECE."""

OOD_SCORES = ("entropy", "mutual_info", "max_prob")
"""The per-image uncertainty scores of :func:`image_uncertainty` and :func:`ood_scores`:
the entropy of the expected prediction (total uncertainty), the mutual information
(epistemic part) and 1 - the maximum probability (the baseline of Hendrycks and Gimpel,
2017)."""

_CLASSIFICATION_KEYS = (
    "accuracy",
    "auc",
    "nll",
    "brier",
    "ece",
    "adaptive_ece",
    "aurc",
    "entropy",
    "expected_entropy",
    "mutual_info",
)
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "multiclass": _CLASSIFICATION_KEYS,
    "multilabel": _CLASSIFICATION_KEYS,
    "segmentation": (
        "dice",
        "iou",
        "dice_per_image",
        "iou_per_image",
        "pixel_accuracy",
        "nll",
        "brier",
        "ece",
        "entropy",
        "expected_entropy",
        "mutual_info",
    ),
}
"""The keys of :func:`evaluate`'s dict for each task, in order (stable across versions).

Classification ("multiclass", "multilabel"):
    accuracy          :func:`accuracy` (multi-label: per label at threshold 0.5, averaged)
    auc               :func:`auc`, mean over labels (multi-class: one-vs-rest)
    nll               :func:`nll`
    brier             :func:`brier_score` on the mean prediction, mean over classes
    ece, adaptive_ece :func:`expected_calibration_error`, :func:`adaptive_calibration_error`
    aurc              :func:`aurc`, ranked by the mean prediction's confidence
    entropy, expected_entropy, mutual_info
                      mean over items (multi-label: over items and labels) of the
                      Prediction's fields, in nats
Segmentation (per pixel, averaged over all pixels of all images unless said otherwise):
    dice, iou         dataset-level: TP/FP/FN pooled over all images, per foreground class,
                      averaged over classes (:func:`dice`, :func:`iou`)
    dice_per_image, iou_per_image
                      mean over images of the per-image score (``per_image=True``)
    pixel_accuracy, nll, brier, ece, entropy, expected_entropy, mutual_info
                      as for classification, one item per pixel (NaN for the last two when
                      the prediction carries no samples' summary, e.g. bare probabilities)
"""


# --------------------------------------------------------------------- validation
def _tm():
    """torchmetrics.functional.classification, imported on first use: importing it takes
    seconds (it pulls in torchvision and scipy), which every ``bnnconvert`` command and
    ``import bnnconvert`` would otherwise pay."""
    import torchmetrics.functional.classification as classification

    return classification


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _check_multiclass(probs: Tensor, targets: Tensor) -> None:
    if probs.ndim < 2 or targets.shape != probs.shape[:1] + probs.shape[2:]:
        raise ValueError(
            f"multiclass expects probs (N, C, *spatial) and targets (N, *spatial) of class "
            f"indices; got probs {tuple(probs.shape)} and targets {tuple(targets.shape)}"
        )
    if targets.is_floating_point():
        raise ValueError("multiclass targets must be integer class indices, not floats")


def _multilabel_targets(probs: Tensor, targets: Tensor) -> Tensor:
    """Targets as floats of ``probs``' shape; (N, *spatial) is accepted for one channel."""
    if targets.shape != probs.shape and probs.ndim >= 2 and probs.shape[1] == 1:
        targets = targets.unsqueeze(1)
    if targets.shape != probs.shape:
        raise ValueError(
            f"multilabel expects targets of the shape of probs {tuple(probs.shape)}, got "
            f"{tuple(targets.shape)}"
        )
    return targets.to(probs.dtype)


def _flat_classes(probs: Tensor) -> Tensor:
    """(N, C, *spatial) -> (N * prod(spatial), C)."""
    return probs.movedim(1, -1).reshape(-1, probs.shape[1])


def _log(probs: Tensor) -> Tensor:
    """log p with log 0 = -inf (no warning, no NaN)."""
    return torch.log(probs.clamp_min(0))


# --------------------------------------------------------------------- accuracy
def accuracy(
    probs: Tensor,
    targets: Tensor,
    *,
    task: Task = "multiclass",
    threshold: float = 0.5,
    vote: bool = False,
    per_label: bool = False,
) -> Tensor:
    """Fraction of correct predictions.

    multiclass: mean over items (and pixels) of [argmax_c p_c == y].
    multilabel: mean over items and labels of [(p > threshold) == y].

    Args:
        probs: (N, C, *spatial), or with ``vote=True`` the samples (S, N, C, *spatial).
        targets: (N, *spatial) class indices (multiclass) or (N, L, *spatial) 0/1.
        vote: the reference code's majority vote: each sample predicts, the most frequent
            class wins (ties: the lowest class index); multilabel: a label is positive when
            more than half of the samples exceed ``threshold``.
        per_label: multilabel only: the accuracy of each label, shape (L, *spatial) -> (L,).

    Returns a scalar tensor, or (L,) with ``per_label``.
    """
    _check_task(task)
    if task == "multiclass":
        _check_multiclass(probs[0] if vote else probs, targets)
        if vote:
            votes = torch.nn.functional.one_hot(probs.argmax(2), probs.shape[2]).sum(0)
            pred = votes.argmax(-1)
        else:
            pred = probs.argmax(1)
        return (pred == targets).float().mean()
    if vote:
        positive = (probs > threshold).float().mean(0) > 0.5
    else:
        positive = probs > threshold
    correct = (positive.float() == _multilabel_targets(positive.float(), targets)).float()
    if per_label:
        return correct.transpose(0, 1).reshape(correct.shape[1], -1).mean(1)
    return correct.mean()


# --------------------------------------------------------------------- AUC
def auc(
    probs: Tensor,
    targets: Tensor,
    *,
    task: Task = "multilabel",
    average: Literal["macro", "none"] = "macro",
) -> Tensor:
    """Area under the ROC curve, one binary AUROC per label, averaged over labels.

    multilabel (ChestMNIST): label l scores ``probs[:, l]`` against ``targets[:, l]``.
    multiclass: one-vs-rest, class c scores ``probs[:, c]`` against ``targets == c``
    (scikit-learn's ``roc_auc_score(multi_class="ovr", average="macro")``).
    Each AUROC is exact (torchmetrics ``binary_auroc``, ties counted as 1/2).

    A label whose targets are all negative or all positive has no defined AUROC
    (torchmetrics would return 0): it gets NaN, a ``UserWarning`` names it, and the
    macro average is over the other labels; NaN if no label is defined.

    Args:
        probs: (N, L) probabilities (or any scores).
        targets: (N, L) 0/1 (multilabel) or (N,) class indices (multiclass).
        average: "macro" (a scalar) or "none" (the (L,) per-label values).
    """
    _check_task(task)
    if probs.ndim != 2:
        raise ValueError(f"auc expects probs of shape (N, L), got {tuple(probs.shape)}")
    if task == "multiclass":
        _check_multiclass(probs, targets)
        targets = torch.nn.functional.one_hot(targets.long(), probs.shape[1])
    targets = _multilabel_targets(probs, targets).long()
    values = torch.full((probs.shape[1],), math.nan, dtype=torch.float64)
    undefined = []
    for label in range(probs.shape[1]):
        positives = int(targets[:, label].sum())
        if positives in (0, targets.shape[0]):
            undefined.append(label)
            continue
        values[label] = _tm().binary_auroc(probs[:, label], targets[:, label]).item()
    if undefined:
        warnings.warn(
            f"AUC undefined for labels {undefined}: their targets hold a single class; "
            "they are left out of the average",
            stacklevel=2,
        )
    if average == "none":
        return values
    if average != "macro":
        raise ValueError(f"average must be 'macro' or 'none', got {average!r}")
    return values.nanmean() if len(undefined) < len(values) else torch.tensor(math.nan)


# --------------------------------------------------------------------- Dice / IoU
def _labels(pred: Tensor, target: Tensor) -> tuple[Tensor, int]:
    """(label map of ``target``'s shape, number of classes) from any prediction form:
    probabilities (N, C, *spatial) -> argmax (C = 1: p > 0.5, two classes);
    floating (N, *spatial) -> p > 0.5; integer/bool (N, *spatial) -> as is."""
    if pred.ndim == target.ndim + 1:
        if pred.shape[1] == 1:
            return (pred[:, 0] > 0.5).long(), 2
        return pred.argmax(1), pred.shape[1]
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}: give "
            "probabilities (N, C, *spatial) or a label map (N, *spatial)"
        )
    if pred.is_floating_point():
        return (pred > 0.5).long(), 2
    return pred.long(), 2


def overlap_counts(pred: Tensor, target: Tensor, num_classes: int | None = None) -> Tensor:
    """Per-image, per-class (TP, FP, FN) pixel counts, shape (N, C, 3), int64.

    Args:
        pred: probabilities (N, C, *spatial) or a label map (N, *spatial) (see :func:`dice`).
        target: (N, *spatial) class indices (binary: 0/1; (N, 1, *spatial) is squeezed).
        num_classes: C for label maps; default max label + 1 (at least 2).
    """
    if target.ndim == pred.ndim >= 3 and target.shape[1] == 1 and pred.shape[1] > 1:
        target = target[:, 0]
    if target.is_floating_point():
        target = target.round()
    target = target.long()
    labels, classes = _labels(pred, target)
    if num_classes is None:
        found = int(max(labels.max(), target.max())) + 1 if labels.numel() else 0
        num_classes = max(classes, found)
    stats = _tm().multiclass_stat_scores(
        labels.reshape(len(labels), -1),
        target.reshape(len(target), -1),
        num_classes=num_classes,
        average="none",
        multidim_average="samplewise",
    )  # (N, C, [tp, fp, tn, fn, support])
    return stats[..., [0, 1, 3]]


def _score_from_counts(counts: Tensor, kind: str, empty: float) -> Tensor:
    """Dice 2TP / (2TP + FP + FN) or IoU TP / (TP + FP + FN) of counts (..., 3); ``empty``
    where TP + FP + FN = 0 (the class is absent from both prediction and target)."""
    tp, fp, fn = counts.double().unbind(-1)
    num = 2 * tp if kind == "dice" else tp
    den = num + fp + fn
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(den, empty))


def _reduce_scores(scores: Tensor, average: str) -> Tensor:
    if average == "none":
        return scores
    if average != "macro":
        raise ValueError(f"average must be 'macro' or 'none', got {average!r}")
    return scores.nanmean(-1)


def _overlap_metric(
    kind: str,
    pred: Tensor,
    target: Tensor,
    num_classes: int | None,
    include_background: bool,
    per_image: bool,
    average: str,
    empty: float,
) -> Tensor:
    counts = overlap_counts(pred, target, num_classes)
    if not include_background:
        counts = counts[:, 1:]
    if not per_image:
        counts = counts.sum(0)
    return _reduce_scores(_score_from_counts(counts, kind, empty), average)


def dice(
    pred: Tensor,
    target: Tensor,
    *,
    num_classes: int | None = None,
    include_background: bool = False,
    per_image: bool = False,
    average: Literal["macro", "none"] = "macro",
    empty: float = 1.0,
) -> Tensor:
    """Dice coefficient 2 TP / (2 TP + FP + FN) of a hard segmentation, per class.

    Args:
        pred: probabilities (N, C, *spatial) (argmax; one channel: p > 0.5), floating
            binary probabilities (N, *spatial) (p > 0.5), or a label map (N, *spatial).
        target: (N, *spatial) class indices (0/1 for binary).
        num_classes: C for label maps (default: max label + 1, at least 2; pass it when a
            class may be missing from a batch).
        include_background: count class 0 too (default: foreground classes only; binary
            segmentation is then the Dice of class 1).
        per_image: one score per image, shape (N,) (or (N, C') with ``average="none"``);
            otherwise the dataset-level score: TP, FP, FN pooled over all images.
        average: "macro" (mean over the classes) or "none" (one value per class).
        empty: the score of a class absent from both prediction and target (TP + FP + FN
            = 0): 1.0 by default (perfect agreement on "nothing there"); pass NaN to leave
            such classes out of the average. A class absent from the target but predicted
            scores 0.

    Returns a scalar, (N,), (C',) or (N, C') float64 tensor (C' = classes counted).
    """
    return _overlap_metric(
        "dice", pred, target, num_classes, include_background, per_image, average, empty
    )


def iou(
    pred: Tensor,
    target: Tensor,
    *,
    num_classes: int | None = None,
    include_background: bool = False,
    per_image: bool = False,
    average: Literal["macro", "none"] = "macro",
    empty: float = 1.0,
) -> Tensor:
    """Intersection over union (Jaccard) TP / (TP + FP + FN), per class.

    Same arguments, shapes and empty-mask rule as :func:`dice`.
    """
    return _overlap_metric(
        "iou", pred, target, num_classes, include_background, per_image, average, empty
    )


# --------------------------------------------------------------------- Brier, NLL
def brier_score(
    probs: Tensor,
    targets: Tensor,
    *,
    task: Task = "multiclass",
    classes: Literal["mean", "sum"] = "mean",
    over_samples: bool = False,
) -> Tensor:
    """Brier score of the mean prediction (the paper's formula, lower is better).

        BS = mean over items (and pixels) of (1/C) sum_c (p_c - delta_c)^2,

    delta_c = 1 for the true class (multiclass) or the 0/1 label (multilabel, where it is
    the mean over labels of (p_l - y_l)^2). ``classes="sum"`` drops the 1/C: Brier's
    original sum over classes, in [0, 2].

    Args:
        probs: (N, C, *spatial), the mean over samples (``Prediction.probs``); with
            ``over_samples=True`` the samples (S, N, C, *spatial) instead, and the score is
            the mean over samples of each sample's Brier score (the reference code's
            choice; it is >= the score of the mean prediction, by convexity).
        targets: (N, *spatial) class indices or (N, L, *spatial) 0/1.
    """
    _check_task(task)
    if classes not in ("mean", "sum"):
        raise ValueError(f"classes must be 'mean' or 'sum', got {classes!r}")
    if over_samples:
        scores = [brier_score(p, targets, task=task, classes=classes) for p in probs]
        return torch.stack(scores).mean()
    if task == "multiclass":
        _check_multiclass(probs, targets)
        onehot = torch.nn.functional.one_hot(targets.long(), probs.shape[1]).movedim(-1, 1)
    else:
        onehot = _multilabel_targets(probs, targets)
    per_class = (probs - onehot.to(probs.dtype)).square()
    per_item = per_class.mean(1) if classes == "mean" else per_class.sum(1)
    return per_item.mean()


def nll(probs: Tensor, targets: Tensor, *, task: Task = "multiclass", eps: float = 1e-12) -> Tensor:
    """Negative log-likelihood of the targets under the mean prediction.

    multiclass: mean over items (and pixels) of -log max(p_y, eps).
    multilabel: mean over items and labels of -[y log max(p, eps) + (1 - y) log max(1 - p,
    eps)]. ``eps`` keeps p = 0 finite (-log 1e-12 = 27.6).

    Args:
        probs: (N, C, *spatial) or (N, L, *spatial).
        targets: (N, *spatial) class indices or (N, L, *spatial) 0/1.
    """
    return item_nll(probs, targets, task=task, eps=eps).mean()


def item_nll(
    probs: Tensor, targets: Tensor, *, task: Task = "multiclass", eps: float = 1e-12
) -> Tensor:
    """:func:`nll` of each item (N,): the mean over its pixels (and labels); :func:`nll` is
    their mean. What :func:`bnnconvert.paired.paired_difference` pairs between methods.

    Args:
        probs: (N, C, *spatial) or (N, L, *spatial).
        targets: (N, *spatial) class indices or (N, L, *spatial) 0/1.
    """
    _check_task(task)
    if task == "multiclass":
        _check_multiclass(probs, targets)
        p_true = probs.gather(1, targets.long().unsqueeze(1)).squeeze(1)
        losses = -p_true.clamp_min(eps).log()
        return losses.flatten(1).mean(1) if losses.dim() > 1 else losses
    y = _multilabel_targets(probs, targets)
    log_p, log_q = probs.clamp_min(eps).log(), (1 - probs).clamp_min(eps).log()
    return -(y * log_p + (1 - y) * log_q).flatten(1).mean(1)


# --------------------------------------------------------------------- entropies
def _log_probs(probs: Tensor, task: str) -> tuple[Tensor, int]:
    """Log-probabilities and class dim of (S, N, C, ...) probabilities (multilabel: a
    Bernoulli pair stacked in a last dim)."""
    _check_task(task)
    if task == "multiclass":
        return _log(probs), 2
    return torch.stack([_log(probs), _log(1 - probs)], dim=-1), probs.ndim


def entropy_of_expectation(probs: Tensor, *, task: Task = "multiclass") -> Tensor:
    """Entropy of the mean prediction, the total uncertainty (the paper's EoE), in nats.

    multiclass: H = -sum_c p_c log p_c over the class dim 1, shape (N, *spatial).
    multilabel: the Bernoulli entropy of each label -p log p - (1 - p) log(1 - p),
    shape (N, L, *spatial). 0 log 0 = 0.

    Args:
        probs: (N, C, *spatial), the mean over samples.
    """
    log_p, dim = _log_probs(probs.unsqueeze(0), task)
    return categorical_entropy(log_p, dim)[0]


def expected_entropy(samples: Tensor, *, task: Task = "multiclass") -> Tensor:
    """Mean over samples of each sample's entropy, the aleatoric part, in nats.

    Args:
        samples: (S, N, C, *spatial) probabilities of S Monte Carlo samples.

    Returns (N, *spatial) (multiclass) or (N, L, *spatial) (multilabel).
    """
    return uncertainty_terms(*_log_probs(samples, task))[1]


def mutual_information(samples: Tensor, *, task: Task = "multiclass") -> Tensor:
    """Mutual information between prediction and weights, the epistemic part, in nats:

        MI = H[mean_s p_s] - mean_s H[p_s] >= 0,

    clamped at 0 against rounding, and exactly 0 where the S samples are identical
    (one sample gives 0, never NaN).

    Args:
        samples: (S, N, C, *spatial) probabilities of S Monte Carlo samples.

    Returns (N, *spatial) (multiclass) or (N, L, *spatial) (multilabel).
    """
    return uncertainty_terms(*_log_probs(samples, task))[2]


# --------------------------------------------------------------------- calibration
def confidence_and_correct(
    probs: Tensor, targets: Tensor, *, task: Task = "multiclass"
) -> tuple[Tensor, Tensor]:
    """The (confidence, outcome) pairs that calibration is measured on, both flat (M,).

    multiclass: top-label confidence max_c p_c and [argmax_c p_c == y], one pair per item
    (and pixel). multilabel: each label's probability p and its 0/1 target (the positive
    class, as torchmetrics' ``binary_calibration_error``), one pair per item and label.
    """
    _check_task(task)
    if task == "multiclass":
        _check_multiclass(probs, targets)
        conf, pred = _flat_classes(probs).max(1)
        return conf, (pred == targets.reshape(-1)).to(conf.dtype)
    y = _multilabel_targets(probs, targets)
    return probs.reshape(-1), y.reshape(-1)


def calibration_bins(confidence: Tensor, correct: Tensor, n_bins: int = ECE_BINS) -> Tensor:
    """Sums per equal-width confidence bin, shape (3, n_bins), float64:
    row 0 the count, row 1 the sum of confidences, row 2 the sum of outcomes.

    Bin b covers (b / n_bins, (b + 1) / n_bins]; bin 0 also takes confidence 0. The sums
    of several batches add up, so calibration accumulates in O(n_bins) memory.

    Args:
        confidence: (M,) values in [0, 1].
        correct: (M,) outcomes in [0, 1].
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    # bin in the confidences' own precision, so that float32 0.1 falls in (0, 0.1]
    confidence = confidence.reshape(-1).contiguous()
    confidence = confidence.to(torch.promote_types(confidence.dtype, torch.float32))
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype, device=confidence.device)
    index = torch.bucketize(confidence, edges[1:-1].contiguous(), right=False)
    confidence = confidence.double()
    values = torch.stack([torch.ones_like(confidence), confidence, correct.reshape(-1).double()])
    out = torch.zeros(3, n_bins, dtype=torch.float64, device=confidence.device)
    return out.index_add_(1, index, values)


def ece_from_bins(bins: Tensor) -> Tensor:
    """ECE = sum_b |sum of outcomes_b - sum of confidences_b| / M from
    :func:`calibration_bins` (= sum_b (n_b / M) |acc_b - conf_b|); NaN when M = 0."""
    total = bins[0].sum()
    if total == 0:
        return torch.tensor(math.nan, dtype=torch.float64)
    return (bins[2] - bins[1]).abs().sum() / total


def expected_calibration_error(
    probs: Tensor, targets: Tensor, *, task: Task = "multiclass", n_bins: int = ECE_BINS
) -> Tensor:
    """Expected calibration error with ``n_bins`` equal-width bins (Guo et al., 2017):

        ECE = sum_b (n_b / M) |acc_b - conf_b|,

    acc_b and conf_b the mean outcome and mean confidence of the n_b pairs in bin b of
    (confidence, outcome) pairs from :func:`confidence_and_correct` (top-label for
    multiclass, per label for multilabel). The papers use 10 bins (the reference code)
    and 100 (nnU-Net checkpoint ensembles); 15 (:data:`ECE_BINS`) is the common default.

    Args:
        probs: (N, C, *spatial); targets: (N, *spatial) or (N, L, *spatial).

    Returns a scalar float64 tensor in [0, 1].
    """
    conf, correct = confidence_and_correct(probs, targets, task=task)
    return ece_from_bins(calibration_bins(conf, correct, n_bins))


def adaptive_calibration_error(
    probs: Tensor, targets: Tensor, *, task: Task = "multiclass", n_bins: int = ECE_BINS
) -> Tensor:
    """Adaptive ECE: the ECE formula over equal-mass bins (Nixon et al., 2019).

    The M (confidence, outcome) pairs, sorted by confidence, are split into ``n_bins``
    consecutive groups of sizes differing by at most one (fewer when M < n_bins);
    ACE = sum_b (n_b / M) |acc_b - conf_b|. Shapes as :func:`expected_calibration_error`.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    conf, correct = confidence_and_correct(probs, targets, task=task)
    order = conf.argsort(stable=True)
    total = torch.zeros((), dtype=torch.float64)
    for group in order.tensor_split(n_bins):
        if group.numel():
            total += (correct[group].double().sum() - conf[group].double().sum()).abs()
    return total / conf.numel() if conf.numel() else torch.tensor(math.nan)


def risk_coverage(
    probs: Tensor,
    targets: Tensor,
    *,
    task: Task = "multiclass",
    confidence: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The risk-coverage curve of selective prediction (Geifman et al., 2018).

    Items are ranked by decreasing confidence; keeping the k most confident gives the
    risk r_k = (errors among them) / k at coverage k / M, k = 1..M. Tied confidences keep
    their input order.

    Args:
        probs: (N, C, *spatial) (multiclass: an error is argmax != y, default confidence
            max_c p_c) or (N, L, *spatial) (multilabel: one item per label, an error is
            (p > 0.5) != y, default confidence max(p, 1 - p)).
        targets: (N, *spatial) or (N, L, *spatial).
        confidence: optional ranking score of the items' shape, higher = more confident,
            e.g. ``-prediction.entropy``.

    Returns (coverage, risk), both (M,) float64, coverage increasing from 1/M to 1.
    """
    _check_task(task)
    if task == "multiclass":
        default_conf, correct = confidence_and_correct(probs, targets, task=task)
    else:
        y = _multilabel_targets(probs, targets).reshape(-1)
        p = probs.reshape(-1)
        default_conf, correct = torch.maximum(p, 1 - p), ((p > 0.5).to(y.dtype) == y).double()
    conf = default_conf if confidence is None else confidence.reshape(-1)
    if conf.numel() != correct.numel():
        raise ValueError(f"confidence has {conf.numel()} items, expected {correct.numel()}")
    order = conf.argsort(descending=True, stable=True)
    errors = (1 - correct[order].double()).cumsum(0)
    kept = torch.arange(1, len(errors) + 1, dtype=torch.float64, device=errors.device)
    return kept / len(errors), errors / kept


def aurc(
    probs: Tensor,
    targets: Tensor,
    *,
    task: Task = "multiclass",
    confidence: Tensor | None = None,
) -> Tensor:
    """Area under the risk-coverage curve (Geifman et al., 2018), lower is better:
    AURC = (1/M) sum_k r_k over the curve of :func:`risk_coverage` (same arguments)."""
    return risk_coverage(probs, targets, task=task, confidence=confidence)[1].mean()


# --------------------------------------------------------------------- AULA
def aula(
    masks: Sequence[Tensor] | Tensor,
    *,
    num_classes: int | None = None,
    normalize: bool = True,
) -> float:
    """Area Under the Layer Agreement curve (Layer Ensembles, Kushibar et al., 2022).

    For K outputs of one image (e.g. the segmentation heads of a Layer Ensemble, from the
    first head used to the last), the agreement curve is a_i = Dice(mask_i, mask_{i+1}),
    i = 1..K-1 (foreground classes, macro-averaged, two empty masks agree with Dice 1).
    AULA is its area by the trapezoid rule. High AULA = the heads agree = low uncertainty.

    x-axis: with ``normalize=True`` the K-1 points lie at x = 0, 1/(K-2), ..., 1, so AULA
    is in [0, 1] whatever K (1 = full agreement); with K = 2 the single point is the value
    of a constant curve on [0, 1], so AULA = a_1. With ``normalize=False`` the points are
    one unit apart (numpy.trapezoid's default dx = 1) and AULA is in [0, K - 2].

    Args:
        masks: K >= 2 masks of one image, a sequence or a (K, *spatial) tensor: label maps
            (integer/bool; argmax a head's probabilities first) or binary probabilities
            (floating, foreground where p > 0.5).
        num_classes: C for label maps (default: inferred from the masks).

    Returns a Python float.
    """
    if len(masks) < 2:
        raise ValueError(f"aula needs at least 2 masks (one per head), got {len(masks)}")
    maps = [(m > 0.5).long() if m.is_floating_point() else m.long() for m in masks]
    if any(m.shape != maps[0].shape for m in maps):
        raise ValueError(f"aula needs masks of one shape, got {[tuple(m.shape) for m in maps]}")
    maps = [m.unsqueeze(0) for m in maps]
    if num_classes is None:
        num_classes = max(2, max(int(m.max()) for m in maps) + 1)
    agreement = torch.stack([dice(a, b, num_classes=num_classes) for a, b in pairwise(maps)])
    if len(agreement) == 1:
        return float(agreement[0]) if normalize else 0.0
    dx = 1.0 / (len(agreement) - 1) if normalize else 1.0
    return float(torch.trapezoid(agreement, dx=dx))


# --------------------------------------------------------------------- evaluation


def image_uncertainty(prediction: Prediction, score: str = "entropy") -> Tensor:
    """One uncertainty score per image (item), higher = more uncertain, shape (N,) float64.

    ``score`` is one of :data:`OOD_SCORES`: "entropy" (``prediction.entropy``),
    "mutual_info" (``prediction.mutual_info``: no samples need to be kept, the
    :class:`Prediction` holds it per item) or "max_prob" (1 - max_c p_c for softmax,
    1 - max(p, 1 - p) per entry for sigmoid). Per-pixel or per-label values, (N, *spatial)
    or (N, L, ...), are averaged over each image.

    Args:
        prediction: a "softmax" or "sigmoid" :class:`Prediction` of N items.
    """
    if score not in OOD_SCORES:
        raise ValueError(f"score must be one of {OOD_SCORES}, got {score!r}")
    if prediction.activation not in ("softmax", "sigmoid"):
        raise ValueError(
            f"the {score!r} score needs probabilities, got a prediction of raw outputs "
            f"(activation={prediction.activation!r}); predict with activation='softmax' or "
            "'sigmoid'"
        )
    if score == "max_prob":
        probs = prediction.probs
        if prediction.activation == "sigmoid":
            values = 1 - torch.maximum(probs, 1 - probs)
        else:
            values = 1 - probs.amax(1)
    else:
        values = getattr(prediction, score)
    values = values.double().cpu()
    return values.flatten(1).mean(1) if values.dim() > 1 else values


def _ood_auroc(in_scores: Tensor, out_scores: Tensor) -> float:
    """AUROC of OOD (positives) against in-distribution (negatives) scores (N,), (M,)."""
    scores = torch.cat([in_scores, out_scores])
    labels = torch.cat([torch.zeros(len(in_scores)), torch.ones(len(out_scores))]).long()
    return float(auc(scores[:, None], labels[:, None], task="multilabel"))


def entropy_auroc(in_distribution: Prediction, ood: Prediction) -> float:
    """AUROC of telling ``ood`` (positives) from ``in_distribution`` (negatives) by the
    entropy of the expected prediction, per image (the mean over pixels or labels):
    ``ood_scores(in_distribution, ood)["entropy"]["auroc"]`` without the other scores.

    Both predictions need an activation with entropies ("softmax" or "sigmoid"); their
    ``entropy`` is (N,) or (N, *spatial) / (N, L), reduced to (N,) per image.
    """
    return _ood_auroc(image_uncertainty(in_distribution), image_uncertainty(ood))


def ood_scores(in_distribution: Prediction, ood: Prediction) -> dict[str, dict[str, float]]:
    """How well each uncertainty score tells ``ood`` items (the positive class) from
    ``in_distribution`` items (negatives), one score per image (:func:`image_uncertainty`).

    For each score of :data:`OOD_SCORES` ("entropy", "mutual_info", "max_prob"):

    - "auroc": area under the ROC curve (scikit-learn's ``roc_auc_score``), higher is
      better, 0.5 is chance;
    - "aupr": area under the precision-recall curve with OOD positive, as average
      precision sum_n (R_n - R_(n-1)) P_n (scikit-learn's ``average_precision_score``,
      no interpolation); chance is the OOD share M / (N + M);
    - "fpr95": the in-distribution share flagged at 95 % of the OOD items flagged
      (:func:`fpr_at_tpr`), lower is better.

    A deterministic model (samples identical) has mutual information 0 everywhere: its
    "mutual_info" row is chance (AUROC 0.5).

    Args:
        in_distribution: a "softmax" or "sigmoid" :class:`Prediction` of N >= 1 test items
            (classification (N, C), or segmentation (N, C, *spatial): per-image means).
        ood: the :class:`Prediction` of M >= 1 out-of-distribution items, same activation.

    Returns {score: {"auroc", "aupr", "fpr95"}} of Python floats.
    """
    if len(in_distribution) == 0 or len(ood) == 0:
        raise ValueError(
            f"ood_scores needs at least one in-distribution and one OOD item, got "
            f"{len(in_distribution)} and {len(ood)}"
        )
    if in_distribution.activation != ood.activation:
        raise ValueError(
            f"the predictions have different activations ({in_distribution.activation!r}, "
            f"{ood.activation!r}); predict both with the same activation"
        )
    labels = torch.cat([torch.zeros(len(in_distribution)), torch.ones(len(ood))]).long()
    results = {}
    for score in OOD_SCORES:
        negatives = image_uncertainty(in_distribution, score)
        positives = image_uncertainty(ood, score)
        results[score] = {
            "auroc": _ood_auroc(negatives, positives),
            "aupr": float(
                _tm().binary_average_precision(torch.cat([negatives, positives]), labels)
            ),
            "fpr95": fpr_at_tpr(negatives, positives, 0.95),
        }
    return results


def fpr_at_tpr(in_scores: Tensor, ood_scores: Tensor, tpr: float = 0.95) -> float:
    """False-positive rate at a true-positive rate: the fraction of in-distribution items
    (negatives) flagged when the threshold on the uncertainty score flags at least ``tpr``
    of the OOD items (positives); lower is better ("FPR95" at 0.95).

    Args:
        in_scores: (N,) scores of the in-distribution items, higher = more uncertain.
        ood_scores: (M,) scores of the OOD items.
        tpr: the true-positive rate in (0, 1].
    """
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    if in_scores.numel() == 0 or ood_scores.numel() == 0:
        raise ValueError("fpr_at_tpr needs at least one in-distribution and one OOD score")
    ood = ood_scores.double().flatten().sort(descending=True).values
    threshold = ood[math.ceil(tpr * ood.numel()) - 1]  # flag score >= threshold
    return float((in_scores.double().flatten() >= threshold).double().mean())


def _two_class(probs: Tensor) -> Tensor:
    """One sigmoid channel (N, 1, ...) as two-class probabilities (N, 2, ...)."""
    return torch.cat([1 - probs, probs], dim=1) if probs.shape[1] == 1 else probs


class SegmentationMeter:
    """Accumulates segmentation metrics over batches in memory independent of N.

    Kept per class: pooled TP/FP/FN (C, 3); per image: N Dice and IoU values; per pixel
    sums only (calibration bins, Brier, NLL, correct, entropies). One sigmoid channel
    (N, 1, ...) is treated as two classes (background 1 - p, foreground p).

    Args:
        num_classes: C; default taken from the first batch's probabilities.
        include_background, empty: as in :func:`dice`.
        n_bins: bins of the ECE.
        eps: the NLL's clamp, as in :func:`nll`.

    Use::

        meter = SegmentationMeter()
        for pred in predict_batches(model, loader, keep_samples=False):
            meter.update(pred, pred.targets)
        results = meter.compute()   # keys METRIC_KEYS["segmentation"]
    """

    def __init__(
        self,
        num_classes: int | None = None,
        *,
        include_background: bool = False,
        n_bins: int = ECE_BINS,
        empty: float = 1.0,
        eps: float = 1e-12,
    ) -> None:
        self.num_classes = num_classes
        self.include_background = include_background
        self.n_bins = n_bins
        self.empty = empty
        self.eps = eps
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen."""
        self._counts: Tensor | None = None
        self._per_image: dict[str, list[Tensor]] = {"dice": [], "iou": []}
        self._bins = torch.zeros(3, self.n_bins, dtype=torch.float64)
        self._sums: dict[str, float] = dict.fromkeys(
            ("pixels", "correct", "nll", "brier", "entropy", "expected_entropy", "mutual_info"),
            0.0,
        )

    def update(self, prediction: Prediction | Tensor, target: Tensor) -> None:
        """Add a batch.

        Args:
            prediction: a :class:`Prediction` (softmax (N, C, *spatial) or one sigmoid
                channel (N, 1, *spatial)), or bare probabilities of those shapes (then
                expected entropy and mutual information are unknown: NaN).
            target: (N, *spatial) class indices ((N, 1, *spatial) is squeezed).
        """
        probs = prediction.probs if isinstance(prediction, Prediction) else prediction
        sigmoid = isinstance(prediction, Prediction) and prediction.activation == "sigmoid"
        if sigmoid and probs.shape[1] != 1:
            raise ValueError(
                "SegmentationMeter takes one sigmoid channel (binary) or softmax classes; "
                f"got a sigmoid prediction with {probs.shape[1]} channels (multi-label)"
            )
        if not probs.is_floating_point() or probs.ndim < 3:
            raise ValueError(
                f"SegmentationMeter expects probabilities (N, C, *spatial), got "
                f"{tuple(probs.shape)} of {probs.dtype}"
            )
        probs = _two_class(probs.detach())
        if target.ndim == probs.ndim:
            target = target[:, 0]
        target = target.long().to(probs.device)
        _check_multiclass(probs, target)
        self._update_overlap(probs, target)
        conf, correct = confidence_and_correct(probs, target)
        self._bins += calibration_bins(conf, correct, self.n_bins).cpu()
        pixels = target.numel()
        self._add("pixels", pixels)
        self._add("correct", correct.sum())
        self._add("nll", nll(probs, target, eps=self.eps) * pixels)
        self._add("brier", brier_score(probs, target) * pixels)
        self._update_uncertainty(prediction, probs)

    def _add(self, key: str, value: Tensor | float) -> None:
        self._sums[key] += float(value)

    def _update_overlap(self, probs: Tensor, target: Tensor) -> None:
        if self.num_classes is None:
            self.num_classes = probs.shape[1]
        counts = overlap_counts(probs, target, self.num_classes).cpu()
        if not self.include_background:
            counts = counts[:, 1:]
        self._counts = counts.sum(0) if self._counts is None else self._counts + counts.sum(0)
        for kind, scores in self._per_image.items():
            scores.append(_score_from_counts(counts, kind, self.empty).nanmean(-1))

    def _update_uncertainty(self, prediction: Prediction | Tensor, probs: Tensor) -> None:
        if isinstance(prediction, Prediction) and prediction.activation != "none":
            # a sigmoid channel's Bernoulli entropy is the two-class entropy: (N, 1, ...)
            for key in ("entropy", "expected_entropy", "mutual_info"):
                self._add(key, getattr(prediction, key).double().sum())
        else:
            self._add("entropy", entropy_of_expectation(probs).double().sum())
            self._sums["expected_entropy"] = math.nan
            self._sums["mutual_info"] = math.nan

    def compute(self) -> dict[str, float]:
        """The metrics so far, keyed as ``METRIC_KEYS["segmentation"]`` (Python floats)."""
        if self._counts is None:
            raise ValueError("SegmentationMeter.compute() called before any update()")
        n = self._sums["pixels"]
        per_image = {k: torch.cat(v).nanmean().item() for k, v in self._per_image.items()}
        dataset = {
            k: _score_from_counts(self._counts, k, self.empty).nanmean().item()
            for k in ("dice", "iou")
        }
        out = {
            "dice": dataset["dice"],
            "iou": dataset["iou"],
            "dice_per_image": per_image["dice"],
            "iou_per_image": per_image["iou"],
            "pixel_accuracy": self._sums["correct"] / n,
            "nll": self._sums["nll"] / n,
            "brier": self._sums["brier"] / n,
            "ece": ece_from_bins(self._bins).item(),
        }
        out.update({k: self._sums[k] / n for k in ("entropy", "expected_entropy", "mutual_info")})
        return out


def _classification(
    prediction: Prediction, targets: Tensor, task: str, n_bins: int
) -> dict[str, float]:
    probs = prediction.probs
    values = {
        "accuracy": accuracy(probs, targets, task=task),
        "auc": auc(probs, targets, task=task),
        "nll": nll(probs, targets, task=task),
        "brier": brier_score(probs, targets, task=task),
        "ece": expected_calibration_error(probs, targets, task=task, n_bins=n_bins),
        "adaptive_ece": adaptive_calibration_error(probs, targets, task=task, n_bins=n_bins),
        "aurc": aurc(probs, targets, task=task),
    }
    for key in ("entropy", "expected_entropy", "mutual_info"):
        values[key] = getattr(prediction, key).double().mean()
    return {k: float(v) for k, v in values.items()}


def evaluate(
    prediction: Prediction,
    targets: Tensor | None = None,
    task: Literal["multiclass", "multilabel", "segmentation"] = "multiclass",
    *,
    n_bins: int = ECE_BINS,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Every metric of ``task`` for a :class:`Prediction`, as {key: float}.

    The keys and their order are ``METRIC_KEYS[task]`` (documented there), stable for the
    CLI and the benchmark tables. For a segmentation test set too large to hold, feed a
    :class:`SegmentationMeter` batch by batch instead (this function uses one).

    Args:
        prediction: from :func:`bnnconvert.predict` ("softmax" for multiclass and
            segmentation, "sigmoid" for multilabel or one-channel segmentation).
        targets: (N,) class indices, (N, L) 0/1, or (N, *spatial) masks; default
            ``prediction.targets``.
        task: "multiclass", "multilabel" or "segmentation".
        n_bins: the ECE's bins.
        num_classes: segmentation only: C when the probabilities have one channel per class.
    """
    if task not in METRIC_KEYS:
        raise ValueError(f"task must be one of {tuple(METRIC_KEYS)}, got {task!r}")
    if targets is None:
        targets = prediction.targets
        if targets is None:
            raise ValueError(
                "no targets: pass them, or predict on (input, target) batches so that "
                "prediction.targets holds them"
            )
    targets = targets.to(prediction.probs.device)
    if task == "segmentation":
        meter = SegmentationMeter(num_classes, n_bins=n_bins)
        meter.update(prediction, targets)
        return meter.compute()
    return _classification(prediction, targets, task, n_bins)
