"""The posterior study: does a converted model give better uncertainty than the checkpoint?

On the bundled digits (ResNet18), for each seed: train a checkpoint (the demo's step 1,
3 epochs SGD momentum 0.9, then 1 epoch without momentum), then compare on the test split
and on out-of-distribution images

- the checkpoint, and the checkpoint with temperature scaling (T fitted on validation);
- last-layer Laplace (laplace-torch: KFAC, marginal-likelihood prior precision; the probit
  and the Monte Carlo predictives);
- bnnconvert's posteriors on the grad2 top 1 % (the paper's selection) and on the last
  layer: "laplace" and "vi" (:func:`bnnconvert.fit_posterior`), each calibrated on the
  validation split (:func:`bnnconvert.calibrate_posterior`: sigma scale t and
  temperature T), each also at its means (t = 0, same T);
- the paper's recipe (rho -3, 2 ELBO epochs of beta 0.01 "mean" KL, SGD), uncalibrated as
  published, and at its means;
- the "variance" selection (Laplace), and a per-layer ablation of one posterior (noise on
  one group of layers at a time, at the calibrated t and T).

Every hyperparameter (t, T, lambda, the default recipe) is chosen on the validation split
(500 digits); the test split (500 digits), the photographs (far OOD, 500) and the UCI
digits of scikit-learn (near OOD, 500, upscaled) are only evaluated. Paired differences
against temperature scaling get 95 % bootstrap intervals (test items resampled within each
seed, the mean over seeds).

    python benchmarks/posterior_study.py --seeds 0 1 2 --out benchmarks/posterior_study

writes ``results.json`` (every number) and ``results.md`` (the tables of
docs/results.md) into ``--out``; ``--quick`` runs a few-minute smoke version.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import bnnconvert
from bnnconvert.data import demo_classification, demo_ood, demo_segmentation, make_loader
from bnnconvert.layers import bayesian_layers, set_sigma_scale
from bnnconvert.metrics import (
    calibration_bins,
    confidence_and_correct,
    ece_from_bins,
    evaluate,
    fpr_at_tpr,
)
from bnnconvert.models import UNet, resnet18
from bnnconvert.paired import auroc_rows, paired_difference
from bnnconvert.posterior import calibrate_posterior, fit_temperature, predictive_nll
from bnnconvert.predict import Prediction, predict
from bnnconvert.training import TrainSettings, train

log = logging.getLogger("posterior_study")

SAMPLES = 10
"""Posterior samples per prediction (calibration and evaluation)."""

GROUPS = ("conv1", "layer1", "layer2", "layer3", "layer4", "fc")
"""The per-layer ablation's groups of ResNet18."""


# ---------------------------------------------------------------------- data
def _tensors(dataset) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.stack(ys)


def near_ood(n: int = 500, seed: int = 0) -> Tensor | None:
    """UCI 8x8 digits (scikit-learn), upscaled into a 20 x 20 box of a 28 x 28 image as in
    MNIST, scaled to [-1, 1] like the bundled digits; None without scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    digits = load_digits()
    pick = np.random.default_rng(seed).choice(len(digits.images), n, replace=False)
    img = torch.tensor(digits.images[pick] / 16.0, dtype=torch.float32)[:, None]
    img = F.interpolate(img, size=(20, 20), mode="bilinear", align_corners=False).clamp(0, 1)
    return F.pad(img, (4, 4, 4, 4)) * 2 - 1


def validation_ood(n: int = 500, seed: int = 0) -> Tensor:
    """Out-of-distribution *validation* inputs, from neither test OOD set: n random 28 x 28
    crops of the bundled fluorescence-microscopy tiles (every split of
    ``demo_segmentation``; never used by the classification evaluation), in [-1, 1] like
    the digits. A diagnostic column (``auroc_valood``: validation digits against these),
    not used to choose anything."""
    tiles = torch.stack(
        [img for split in ("train", "val", "test") for img, _ in demo_segmentation(split)]
    )
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(tiles), (n,), generator=g)
    rows, cols = (torch.randint(64 - 28 + 1, (n,), generator=g) for _ in range(2))
    return torch.stack([tiles[i, :, r : r + 28, c : c + 28] for i, r, c in zip(pick, rows, cols)])


def load_sets(quick: bool, val_ood: bool = False) -> dict[str, Any]:
    sizes = (400, 200) if quick else (None, None)
    train_set = demo_classification("train")
    if sizes[0]:
        train_set = Subset(train_set, range(sizes[0]))
    sets = {"train": train_set}
    for split in ("val", "test"):
        x, y = _tensors(demo_classification(split))
        sets[split] = (x[: sizes[1]], y[: sizes[1]]) if sizes[1] else (x, y)
    sets["ood"] = _tensors(demo_ood())[0][: sizes[1]]
    near = near_ood()
    if near is not None:
        sets["near"] = near[: sizes[1]]
    if val_ood:
        sets["val_ood"] = validation_ood()[: sizes[1]]
    return sets


def train_loader(sets, seed: int, shuffle: bool = True) -> DataLoader:
    return make_loader(sets["train"], 50, shuffle=shuffle, seed=seed, drop_last=shuffle)


def val_loader(sets) -> DataLoader:
    return DataLoader(TensorDataset(*sets["val"]), batch_size=250)


BATCH = 25
"""Items per forward when predicting: the items of a forward share its S weight draws, so
a test split of 500 rests on 20 x S independent draws (calibrate_posterior chunks its
validation batches the same way, by 32)."""


# ---------------------------------------------------------------------- checkpoint
def checkpoint(sets, seed: int, folder: Path, quick: bool) -> nn.Module:
    """The demo's step 1 (3 epochs, momentum 0.9) plus 1 epoch without momentum, cached."""
    path = folder / f"checkpoint_seed{seed}{'_quick' if quick else ''}.pt"
    torch.manual_seed(seed)
    model = resnet18(10, 1)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    data = train_loader(sets, seed)
    base = TrainSettings(momentum=0.9)
    train(model, data, 1 if quick else 3, base, task="multiclass", seed=seed, progress=False)
    train(model, data, 1, base.replace(momentum=0.0), task="multiclass", seed=seed, progress=False)
    torch.save(model.state_dict(), path)
    return model.eval()


# ---------------------------------------------------------------------- evaluation
Predictor = Callable[[Tensor], Prediction]


def run_predictor(predictor: Predictor, sets, seed: int) -> dict[str, Prediction]:
    out = {}
    extra = ("val", "val_ood") if "val_ood" in sets else ()  # the covariance task's diagnostic
    for name in ("test", "ood", "near", *extra):
        if name in sets:
            torch.manual_seed(1000 + seed)
            x = sets[name][0] if isinstance(sets[name], tuple) else sets[name]
            out[name] = predictor(x)
    return out


def bayes_predictor(model: nn.Module, samples: int = SAMPLES, batch: int = BATCH) -> Predictor:
    return lambda x: predict(model, x, samples, batch_size=batch, keep_samples=False)


def logits_predictor(model: nn.Module, temperature: float = 1.0) -> Predictor:
    def run(x: Tensor) -> Prediction:
        with torch.no_grad():
            logits = torch.cat([model(b) for b in x.split(500)]) / temperature
        p = logits.softmax(1)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(1)
        return Prediction(
            p,
            torch.zeros_like(p),
            entropy=entropy,
            expected_entropy=entropy,
            mutual_info=torch.zeros_like(entropy),
        )

    return run


def summarise(preds: dict[str, Prediction], y: Tensor) -> dict[str, float]:
    test = preds["test"]
    m = evaluate(test, y, task="multiclass")
    row = {k: float(m[k]) for k in ("accuracy", "nll", "brier", "ece", "adaptive_ece")}
    for name, key in (("ood", "far"), ("near", "near")):
        if name not in preds:
            continue
        ind, ood = test.entropy.double(), preds[name].entropy.double()
        row[f"auroc_{key}"] = _auroc(ind, ood)
        row[f"fpr95_{key}"] = fpr_at_tpr(ind, ood)
        row[f"auroc_{key}_mi"] = _auroc(test.mutual_info.double(), preds[name].mutual_info.double())
    # AURC on the mixed stream: test items (risk = error) and far-OOD items (risk 1),
    # ranked by the entropy of the expected prediction
    errors = (test.probs.argmax(1) != y).double()
    risk = torch.cat([errors, torch.ones(len(preds["ood"].probs))])
    row["aurc_mixed"] = _aurc(torch.cat([test.entropy, preds["ood"].entropy]).double(), risk)
    if "val_ood" in preds:  # validation digits against validation OOD inputs
        row["auroc_valood"] = _auroc(
            preds["val"].entropy.double(), preds["val_ood"].entropy.double()
        )
    return row


def _auroc(neg: Tensor, pos: Tensor) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie): the Mann-Whitney form of the AUROC."""
    scores = torch.cat([neg, pos])
    ranks = _ranks(scores)
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _ranks(x: Tensor) -> Tensor:
    """1-based ranks with ties averaged."""
    order = x.argsort()
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=torch.float64).index_add_(
        0, inverse, torch.ones_like(ranks)
    )
    return (sums / counts)[inverse]


def _aurc(uncertainty: Tensor, risk: Tensor) -> float:
    order = uncertainty.argsort(stable=True)
    cum = risk[order].cumsum(0) / torch.arange(1, len(risk) + 1, dtype=torch.float64)
    return float(cum.mean())


def _log_row(seed: int, name: str, row: dict[str, Any]) -> None:
    floats = {k: round(v, 4) for k, v in row.items() if isinstance(v, float)}
    log.info("seed %d %-40s %s", seed, name, floats)


def per_item(preds: dict[str, Prediction], y: Tensor) -> dict[str, list[float]]:
    """What the paired bootstrap needs: per test item its NLL and error, and every entropy."""
    p = preds["test"].probs.double()
    out = {
        "nll": (-p.clamp_min(1e-30).log().gather(1, y[:, None]).squeeze(1)).tolist(),
        "error": (p.argmax(1) != y).double().tolist(),
    }
    for name in preds:
        out[f"entropy_{name}"] = preds[name].entropy.double().tolist()
    return out


# ---------------------------------------------------------------------- methods
def temperature_scaled(model: nn.Module, sets) -> tuple[Predictor, dict]:
    with torch.no_grad():
        logits = torch.cat([model(b) for b in sets["val"][0].split(500)])
    t = fit_temperature(logits[None], sets["val"][1])
    val_nll = float(predictive_nll(logits[None], sets["val"][1], temperature=t))
    return logits_predictor(model, t), {"temperature": t, "val_nll": val_nll}


def laplace_last_layer(model: nn.Module, sets, seed: int, mc: bool) -> tuple[Predictor, dict]:
    from bnnconvert.methods import LaplaceLastLayer

    options = {"pred_type": "nn", "link_approx": "mc", "samples": SAMPLES} if mc else {}
    method = LaplaceLastLayer(model, task="multiclass", **options)
    start = time.perf_counter()
    method.fit(train_loader(sets, seed, shuffle=False), epochs=0)
    info = {
        "prior_precision": float(method.prior_precision),
        "seconds": time.perf_counter() - start,
    }
    return (lambda x: method.predict(x, batch_size=BATCH, keep_samples=False)), info


def masks_last_layer(model: nn.Module) -> dict[str, Tensor]:
    return {
        n: torch.ones_like(p, dtype=torch.bool) for n, p in model.fc.named_parameters(prefix="fc")
    }


def ours(model, sets, seed, selection, method, saliency) -> tuple[nn.Module, dict]:
    if selection == "grad2":
        pbnn = bnnconvert.convert(model, saliency, 0.01, moped_delta=0.1)
    elif selection == "last layer":
        pbnn = bnnconvert.convert(model, masks_last_layer(model), None, moped_delta=0.1)
    else:  # variance
        pbnn = bnnconvert.convert(model, saliency, 0.01)
    start = time.perf_counter()
    report = bnnconvert.fit_posterior(
        pbnn,
        train_loader(sets, seed, shuffle=method != "laplace"),
        val_loader(sets),
        method=method,
        epochs=2,
        samples=SAMPLES,
        seed=seed,
        progress=False,
    )
    cal = report.calibration
    info = {
        "seconds": time.perf_counter() - start,
        "prior_precision": report.prior_precision,
        "sigma_median": report.sigma_quantiles["median"],
        "scale": cal.scale,
        "temperature": cal.temperature,
        "val_nll": cal.nll,
        "curve": cal.curve,
        "timing": report.seconds,
    }
    return pbnn, info


def at_means(pbnn: nn.Module) -> Predictor:
    """The same calibrated model with t = 0 (the means, the same T)."""

    def run(x: Tensor) -> Prediction:
        scales = [float(layer.bayes_scale) for _, layer in bayesian_layers(pbnn)]
        set_sigma_scale(pbnn, 0.0)
        try:
            return predict(pbnn, x, 1, batch_size=BATCH, keep_samples=False)
        finally:
            for (_, layer), value in zip(bayesian_layers(pbnn), scales):
                layer.bayes_scale.fill_(value)

    return run


def paper(model, sets, seed, saliency) -> tuple[nn.Module, dict]:
    pbnn = bnnconvert.convert(model, saliency, 0.01, rho_init=-3.0)
    start = time.perf_counter()
    bnnconvert.fit_posterior(pbnn, train_loader(sets, seed), method="paper", epochs=2, seed=seed)
    return pbnn, {"seconds": time.perf_counter() - start}


def ablation(pbnn: nn.Module, sets, seed: int) -> dict[str, dict]:
    """Noise on one group of layers at a time (the others at t = 0), same t and T."""
    t = float(next(layer for _, layer in bayesian_layers(pbnn)).bayes_scale)
    rows = {}
    for group in GROUPS:
        members = [layer for name, layer in bayesian_layers(pbnn) if name.split(".")[0] == group]
        if not members:
            continue
        set_sigma_scale(pbnn, 0.0)
        for layer in members:
            layer.bayes_scale.fill_(t)
        rows[group] = summarise(run_predictor(bayes_predictor(pbnn), sets, seed), sets["test"][1])
    set_sigma_scale(pbnn, t)
    return rows


# ---------------------------------------------------------------------- one seed
def run_seed(seed: int, sets, folder: Path, quick: bool) -> dict[str, Any]:
    y = sets["test"][1]
    model = checkpoint(sets, seed, folder, quick)
    saliency = bnnconvert.compute_saliency(model, train_loader(sets, seed, shuffle=False))
    results: dict[str, dict] = {}
    items: dict[str, dict] = {}

    def record(name: str, predictor: Predictor, info: dict | None = None) -> None:
        preds = run_predictor(predictor, sets, seed)
        results[name] = {**summarise(preds, y), **(info or {})}
        items[name] = per_item(preds, y)
        _log_row(seed, name, results[name])

    record("checkpoint", logits_predictor(model))
    predictor, info = temperature_scaled(model, sets)
    record("temperature scaling", predictor, info)
    for mc in (False, True):
        predictor, info = laplace_last_layer(model, sets, seed, mc)
        record(f"last-layer Laplace (KFAC, {'MC' if mc else 'probit'})", predictor, info)
    candidates = {}
    for method in ("laplace", "vi"):
        for selection in ("grad2", "last layer"):
            name = f"{method}, {selection}"
            pbnn, info = ours(model, sets, seed, selection, method, saliency)
            record(name, bayes_predictor(pbnn), info)
            record(f"{name} at its means", at_means(pbnn))
            candidates[name] = pbnn
    pbnn, info = ours(
        model,
        sets,
        seed,
        "variance",
        "laplace",
        bnnconvert.compute_saliency(
            model, train_loader(sets, seed, shuffle=False), criterion="variance"
        ),
    )
    record("laplace, variance", bayes_predictor(pbnn), info)
    pbnn, info = paper(model, sets, seed, saliency)
    record("paper recipe (uncalibrated)", bayes_predictor(pbnn, 5), info)
    record("paper recipe at its means", at_means(pbnn))
    return {
        "results": results,
        "items": items,
        "candidates": list(candidates),
        "ablation": {
            name: ablation(m, sets, seed)
            for name, m in candidates.items()
            if name.endswith("grad2")
        },
    }


# ---------------------------------------------------------------------- segmentation
def segmentation_sets(quick: bool) -> dict[str, Any]:
    """The nuclei tiles: train (135, or 40 with --quick), val (15), test (16)."""
    train_set = demo_segmentation("train")
    if quick:
        train_set = Subset(train_set, range(40))
    return {
        "train": train_set,
        "val": _tensors(demo_segmentation("val")),
        "test": _tensors(demo_segmentation("test")),
    }


def unet_checkpoint(sets, seed: int, folder: Path, quick: bool) -> nn.Module:
    """The demo's UNet: 6 epochs SGD momentum 0.9, then 2 without momentum, batch 10."""
    path = folder / f"unet_seed{seed}{'_quick' if quick else ''}.pt"
    torch.manual_seed(seed)
    model = UNet(1, 2, base=16)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    data = make_loader(sets["train"], 10, shuffle=True, seed=seed, drop_last=True)
    base = TrainSettings(momentum=0.9)
    train(model, data, 2 if quick else 6, base, task="segmentation", seed=seed, progress=False)
    train(
        model,
        data,
        1 if quick else 2,
        base.replace(momentum=0.0),
        task="segmentation",
        seed=seed,
        progress=False,
    )
    torch.save(model.state_dict(), path)
    return model.eval()


def segmentation_row(pred: Prediction, y: Tensor) -> tuple[dict[str, float], np.ndarray]:
    """(Dice, IoU, pixel NLL, Brier, ECE; per-tile calibration bins (N, 3, 15))."""
    m = evaluate(pred, y, task="segmentation")
    row = {k: float(m[k]) for k in ("dice", "iou", "nll", "brier", "ece")}
    bins = []
    for i in range(len(y)):
        conf, correct = confidence_and_correct(pred.probs[i : i + 1], y[i : i + 1])
        bins.append(calibration_bins(conf, correct).numpy())
    return row, np.stack(bins)


def run_segmentation_seed(seed: int, sets, folder: Path, quick: bool) -> dict[str, Any]:
    model = unet_checkpoint(sets, seed, folder, quick)
    x, y = sets["test"]
    results, bins = {}, {}
    train_data = make_loader(sets["train"], 10, shuffle=False, seed=seed)
    val = DataLoader(TensorDataset(*sets["val"]), batch_size=2)  # 2 tiles share a draw

    def record(name: str, run: Callable[[Tensor], Prediction], info: dict | None = None) -> None:
        torch.manual_seed(1000 + seed)
        results[name], bins[name] = segmentation_row(run(x), y)
        results[name].update(info or {})
        _log_row(seed, name, results[name])

    record("checkpoint", logits_predictor(model))
    with torch.no_grad():
        logits = torch.cat([model(b) for b in sets["val"][0].split(8)])
    t = fit_temperature(logits[None], sets["val"][1])
    record("temperature scaling", logits_predictor(model, t), {"temperature": t})
    saliency = bnnconvert.compute_saliency(model, train_data)
    head = {
        n: torch.ones_like(p, dtype=torch.bool)
        for n, p in model.head.named_parameters(prefix="head")
    }
    for method in ("laplace", "vi"):
        for selection, chosen, r in (("grad2", saliency, 0.01), ("last layer", head, None)):
            pbnn = bnnconvert.convert(model, chosen, r, moped_delta=0.1)
            loader = make_loader(sets["train"], 10, shuffle=method == "vi", seed=seed)
            report = bnnconvert.fit_posterior(
                pbnn,
                loader,
                val,
                method=method,
                epochs=2,
                samples=SAMPLES,
                seed=seed,
                task="segmentation",
            )
            cal = report.calibration
            info = {
                "scale": cal.scale,
                "temperature": cal.temperature,
                "val_nll": cal.nll,
                "prior_precision": report.prior_precision,
                "timing": report.seconds,
            }
            record(f"{method}, {selection}", bayes_predictor(pbnn, SAMPLES, 2), info)
            record(f"{method}, {selection} at its means", at_means(pbnn))
    # the head's posterior with the closed-form probit predictive (no draws): diagonal,
    # and Kronecker-factored (the 1x1 convolution, every pixel a row)
    for covariance, label in (("diagonal", ""), ("kron", ", Kronecker")):
        pbnn = bnnconvert.convert(model, head, None, moped_delta=0.1)
        loader = make_loader(sets["train"], 10, shuffle=False, seed=seed)
        report = bnnconvert.fit_posterior(
            pbnn, loader, val, method="laplace", seed=seed, task="segmentation",
            predictive="probit", covariance=covariance,
        )  # fmt: skip
        cal = report.calibration
        info = {"scale": cal.scale, "temperature": cal.temperature, "val_nll": cal.nll,
                "prior_precision": report.prior_precision, "timing": report.seconds}  # fmt: skip
        record(f"laplace, last layer{label}, probit", bayes_predictor(pbnn, 1, 2), info)
        record(f"laplace, last layer{label}, probit at its means", at_means(pbnn))
    return {"results": results, "bins": bins}


def segmentation_paired_ece(seeds: list[dict], name: str, draws: int = 2000):
    """Mean over seeds of the pixel-ECE difference (name - temperature scaling) and its
    95 % bootstrap interval (test tiles resampled within each seed)."""
    rng = np.random.default_rng(0)
    diffs = np.zeros(draws)
    point = 0.0
    for run in seeds:
        a, b = run["bins"][name], run["bins"]["temperature scaling"]
        point += _pooled_ece(a) - _pooled_ece(b)
        for i in range(draws):
            idx = rng.integers(0, len(a), len(a))
            diffs[i] += _pooled_ece(a[idx]) - _pooled_ece(b[idx])
    lo, hi = np.percentile(diffs / len(seeds), [2.5, 97.5])
    return point / len(seeds), float(lo), float(hi)


def _pooled_ece(bins: np.ndarray) -> float:
    """The pixel ECE of tiles pooled: per-tile bins (N, 3, B) summed."""
    return float(ece_from_bins(torch.from_numpy(bins.sum(0))))


def segmentation_markdown(seeds: list[dict], paired: dict) -> str:
    names = list(seeds[0]["results"])
    keys = (
        ("dice", "Dice"),
        ("iou", "IoU"),
        ("nll", "pixel NLL"),
        ("brier", "Brier"),
        ("ece", "pixel ECE"),
    )
    lines = [
        "| method | " + " | ".join(c for _, c in keys) + " | ECE - TS [95 % CI] |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for name in names:
        cells = []
        for key, _ in keys:
            values = [s["results"][name][key] for s in seeds]
            cells.append(f"{np.mean(values):.4f} ({', '.join(f'{v:.3f}' for v in values)})")
        if name in paired:
            d, lo, hi = paired[name]
            cells.append(f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        else:
            cells.append("")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- statistics
def paired_interval(
    seeds: list[dict],
    name: str,
    reference: str,
    stat: str,
    draws: int = 2000,
    scheme: str = "per seed",
) -> tuple[float, float, float]:
    """Mean over seeds of (name - reference) and its 95 % bootstrap interval; both methods
    of a draw see the same resampled items. ``scheme`` "two-way":
    :func:`bnnconvert.paired.paired_difference` over the seeds (every seed scores the
    same test and OOD items: one draw resamples the items once for all seeds, and the
    seeds). "per seed" (every table before the scale task, kept to reproduce them): each
    seed's test items (and OOD items for AUROC) resampled independently of the other
    seeds', which counts the shared items once per seed (too narrow)."""
    ood = {"auroc_far": "entropy_ood", "auroc_near": "entropy_near"}.get(stat)
    if scheme == "two-way":
        key = "nll" if ood is None else "entropy_test"
        a, b = ([r["items"][m][key] for r in seeds] for m in (name, reference))
        extra = {} if ood is None else {
            "ood_a": [r["items"][name][ood] for r in seeds],
            "ood_b": [r["items"][reference][ood] for r in seeds],
        }  # fmt: skip
        diff = paired_difference(a, b, draws=draws, **extra)
        return diff.estimate, diff.low, diff.high
    rng = np.random.default_rng(0)
    n_seeds = len(seeds)
    if ood is None:
        d = np.stack([np.asarray(r["items"][name]["nll"]) - np.asarray(r["items"][reference]["nll"])
                      for r in seeds])  # fmt: skip
        n = d.shape[1]
        per_seed = np.stack([d[s, rng.integers(0, n, (draws, n))].mean(1)
                             for s in range(n_seeds)], 1)  # fmt: skip
        point = float(d.mean())
    else:
        arrays = [[np.asarray(r["items"][m][k]) for m in (name, reference)
                   for k in ("entropy_test", ood)] for r in seeds]  # fmt: skip
        point = float(np.mean([_np_auroc(a[0], a[1]) - _np_auroc(a[2], a[3]) for a in arrays]))
        n_test, n_ood = len(arrays[0][0]), len(arrays[0][1])
        columns = []
        for ta, oa, tb, ob in arrays:
            pairs = [(rng.integers(0, n_test, n_test), rng.integers(0, n_ood, n_ood))
                     for _ in range(draws)]  # fmt: skip
            it, io = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
            columns.append(auroc_rows(ta[it], oa[io]) - auroc_rows(tb[it], ob[io]))
        per_seed = np.stack(columns, 1)  # (draws, seeds)
    lo, hi = np.percentile(per_seed.mean(1), [2.5, 97.5])
    return point, float(lo), float(hi)


def _np_auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    return float(auroc_rows(neg[None], pos[None])[0])


# ---------------------------------------------------------------------- report
COLUMNS = (
    ("accuracy", "acc"),
    ("nll", "NLL"),
    ("brier", "Brier"),
    ("ece", "ECE"),
    ("adaptive_ece", "aECE"),
    ("auroc_far", "far AUROC"),
    ("fpr95_far", "far FPR95"),
    ("auroc_near", "near AUROC"),
    ("aurc_mixed", "AURC mixed"),
)


def markdown(report: dict[str, Any]) -> str:
    seeds = report["seeds"]
    names = list(seeds[0]["results"])
    lines = [f"Machine: {report['machine']}; {report['seconds']:.0f} s; S = {SAMPLES} samples.", ""]
    lines.append("| method | " + " | ".join(c for _, c in COLUMNS) + " | val NLL |")
    lines.append("|---" * (len(COLUMNS) + 2) + "|")
    for name in names:
        cells = []
        for key, _ in COLUMNS:
            values = [s["results"][name].get(key) for s in seeds]
            if any(v is None for v in values):
                cells.append("")
                continue
            cells.append(f"{np.mean(values):.4f} ({', '.join(f'{v:.3f}' for v in values)})")
        val = [s["results"][name].get("val_nll") for s in seeds]
        cells.append("" if any(v is None for v in val) else f"{np.mean(val):.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired differences against temperature scaling (mean over seeds, 95 % "
        "bootstrap interval):",
        "",
        "| method | NLL | far AUROC | near AUROC |",
        "|---|---|---|---|",
    ]
    for name in names:
        if name == "temperature scaling":
            continue
        cells = []
        for stat in ("nll", "auroc_far", "auroc_near"):
            if stat not in report["paired"][name]:
                cells.append("")
                continue
            d, lo, hi = report["paired"][name][stat]
            cells.append(f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for cand, per_seed in report["ablation"].items():
        lines += [
            "",
            f"Per-layer ablation of '{cand}' (noise on one group only; mean over seeds):",
            "",
            "| group | acc | NLL | ECE | far AUROC | near AUROC |",
            "|---|---|---|---|---|---|",
        ]
        for group in GROUPS:
            rows = [s[group] for s in per_seed if group in s]
            if not rows:
                continue
            cells = [
                f"{np.mean([r[k] for r in rows]):.4f}"
                for k in ("accuracy", "nll", "ece", "auroc_far", "auroc_near")
                if k in rows[0]
            ]
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Default recipe (the lowest mean validation NLL; within 1 % of it, the "
        f"cheapest): **{report['default']}**.",
    ]
    return "\n".join(lines) + "\n"


def sigma_histograms(args, folder: Path) -> None:
    """sigma before and after fitting, on the seed's checkpoint: the paper's recipe (rho
    -3, 2 ELBO epochs), "vi" (MOPED 0.1 start, 2 epochs) and "laplace" (no training), all
    on the grad2 top 1 %; a histogram of log10 sigma (docs/img/sigma_histograms.png) and
    the quantiles (sigma.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = load_sets(args.quick)
    seed = args.seeds[0]
    model = checkpoint(sets, seed, folder, args.quick)
    saliency = bnnconvert.compute_saliency(model, train_loader(sets, seed, shuffle=False))
    runs = {}
    for name, init, method in (
        ("paper's recipe", {"rho_init": -3.0}, "paper"),
        ("vi", {"moped_delta": 0.1}, "vi"),
        ("laplace", {"moped_delta": 0.1}, "laplace"),
    ):
        pbnn = bnnconvert.convert(model, saliency, 0.01, **init)
        before = _softplus_rho(pbnn)
        shuffle = method != "laplace"
        bnnconvert.fit_posterior(
            pbnn, train_loader(sets, seed, shuffle), method=method, epochs=2, seed=seed
        )
        runs[name] = (before, _softplus_rho(pbnn))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), dpi=100)
    for ax, (name, (before, after)) in zip(axes, runs.items()):
        bins = np.linspace(-6, 0.5, 60)
        ax.hist(np.log10(before.numpy()), bins, alpha=0.6, label="after convert()")
        ax.hist(np.log10(after.numpy()), bins, alpha=0.6, label="after fit_posterior()")
        ax.set_title(name)
        ax.set_xlabel("log10 sigma")
    axes[0].set_ylabel("entries")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    Path("docs/img").mkdir(parents=True, exist_ok=True)
    fig.savefig("docs/img/sigma_histograms.png")
    levels = torch.tensor([0.05, 0.5, 0.95])
    report = {
        name: {
            "before": torch.quantile(b, levels).tolist(),
            "after": torch.quantile(a, levels).tolist(),
        }
        for name, (b, a) in runs.items()
    }
    (folder / "sigma.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def _softplus_rho(model: nn.Module) -> Tensor:
    """softplus(rho) of every Bayesian entry (sigma at t = 1), a subsample of 10^6."""
    sigma = torch.cat(
        [
            F.softplus(layer.bayes_rho(t)).detach().flatten()
            for _, layer in bayesian_layers(model)
            for t in layer.bayes_names
        ]
    )
    pick = torch.randperm(len(sigma), generator=torch.Generator().manual_seed(0))[: 10**6]
    return sigma[pick]


def segmentation_main(args, folder: Path) -> None:
    sets = segmentation_sets(args.quick)
    start = time.perf_counter()
    seeds = [run_segmentation_seed(seed, sets, folder, args.quick) for seed in args.seeds]
    paired = {
        name: segmentation_paired_ece(seeds, name)
        for name in seeds[0]["results"]
        if name != "temperature scaling"
    }
    default = choose_default(seeds)
    text = (
        f"Machine: {_machine()}; {time.perf_counter() - start:.0f} s; S = {SAMPLES}.\n\n"
        + segmentation_markdown(seeds, paired)
        + "\nDefault recipe (the lowest mean validation NLL; within 1 % of it, the cheapest): "
        + f"**{default}**.\n"
    )
    report = {"seeds": [s["results"] for s in seeds], "paired_ece": paired, "default": default}
    (folder / "segmentation.json").write_text(json.dumps(report, indent=1))
    (folder / "segmentation.md").write_text(text)
    print(text)


def choose_default(seeds: list[dict], tolerance: float = 0.01) -> str:
    """The candidate with the lowest mean validation NLL over the seeds, and among those
    within ``tolerance`` (relative) of it the cheapest: Laplace before VI, the last layer
    before grad2 (the rule of select_r_bayes: the smallest within 1 %)."""
    candidates = [
        c
        for c, row in seeds[0]["results"].items()
        if "val_nll" in row and c.startswith(("laplace,", "vi,")) and "variance" not in c
    ]
    mean = {c: float(np.mean([s["results"][c]["val_nll"] for s in seeds])) for c in candidates}
    best = min(mean.values())
    near = [c for c, v in mean.items() if v <= best * (1 + tolerance)]
    return min(near, key=lambda c: (c.startswith("vi"), c.endswith("grad2"), mean[c]))


# ---------------------------------------------------------------------- samples
SAMPLE_GRID = (10, 100, 300)


def samples_seed(seed: int, sets, folder: Path, quick: bool) -> dict[str, Any]:
    """The recipe's posterior (diagonal Laplace on the last layer, fitted once) calibrated
    and predicted with S draws for each S of SAMPLE_GRID; beside it temperature scaling,
    laplace-torch's last-layer Laplace, each posterior at its means, and at the largest S
    the posterior at two fixed scales (t = 0.71, and t = 1: as fitted), T on validation."""
    y = sets["test"][1]
    model = checkpoint(sets, seed, folder, quick)
    rows: dict[str, dict] = {}
    items: dict[str, dict] = {}

    def record(name: str, predictor: Predictor, info: dict) -> None:
        start = time.perf_counter()
        preds = run_predictor(predictor, sets, seed)
        rows[name] = {**summarise(preds, y), **info, "predict_seconds": time.perf_counter() - start}
        items[name] = per_item(preds, y)
        _log_row(seed, name, rows[name])

    record("temperature scaling", *temperature_scaled(model, sets))
    record("last-layer Laplace (laplace-torch)", *laplace_last_layer(model, sets, seed, mc=False))
    pbnn = bnnconvert.convert(model, masks_last_layer(model), None, moped_delta=0.1)
    start = time.perf_counter()
    report = bnnconvert.fit_posterior(
        pbnn, train_loader(sets, seed, shuffle=False), method="laplace", seed=seed, progress=False
    )
    fit = {"fit_seconds": time.perf_counter() - start, "prior_precision": report.prior_precision}
    for samples in SAMPLE_GRID:
        calibrated = copy.deepcopy(pbnn)
        cal = calibrate_posterior(calibrated, val_loader(sets), samples=samples, seed=seed)
        info = {**fit, "scale": cal.scale, "temperature": cal.temperature, "val_nll": cal.nll}
        info["calibration_seconds"] = cal.seconds
        record(f"laplace, last layer, S = {samples}", bayes_predictor(calibrated, samples), info)
        record(f"laplace, last layer, S = {samples}, at its means", at_means(calibrated), {})
    samples = SAMPLE_GRID[-1]
    for scale, label in ((2**-0.5, "0.71"), (1.0, "1")):  # fixed t (1: as fitted), T on val
        fixed = copy.deepcopy(pbnn)
        cal = calibrate_posterior(
            fixed, val_loader(sets), samples=samples, scales=(scale,), refine=False, seed=seed
        )
        info = {**fit, "scale": cal.scale, "temperature": cal.temperature, "val_nll": cal.nll}
        name = f"laplace, last layer, S = {samples}, t = {label}"
        record(name, bayes_predictor(fixed, samples), info)
    return {"seed": seed, "results": rows, "items": items}


OUTLIERS_DEFAULT = "laplace, last layer, S = 300, t by the validation NLL (the default)"
OUTLIERS_SYNTHETIC = "laplace, last layer, S = 300, t by synthetic outliers"
PROBIT_NLL = "laplace, last layer, probit, t by the validation NLL"
PROBIT_SYNTHETIC = "laplace, last layer, probit, t by synthetic outliers"
MC_NLL = "laplace, last layer, S = 300, t by the validation NLL"
KRON_NLL = "laplace, last layer, Kronecker, probit, t by the validation NLL"
KRON_SYNTHETIC = "laplace, last layer, Kronecker, probit, t by synthetic outliers"


def outliers_seed(seed: int, sets, folder: Path, quick: bool) -> dict[str, Any]:
    """The recipe's posterior (diagonal Laplace on the last layer, S = SAMPLE_GRID[-1])
    calibrated twice: t by the validation NLL (the default) and t chosen for OOD detection
    with synthetic outliers made from the validation digits (calibrate_posterior's
    ``outliers``; no photograph and no test item is used to choose); beside them
    temperature scaling, laplace-torch's last-layer Laplace and each posterior at its
    means."""
    variants = {OUTLIERS_DEFAULT: ("sample", False), OUTLIERS_SYNTHETIC: ("sample", True)}
    return calibrations_seed(seed, sets, folder, quick, variants)


def predictive_seed(seed: int, sets, folder: Path, quick: bool) -> dict[str, Any]:
    """The recipe's posterior calibrated with the Monte Carlo predictive (S =
    SAMPLE_GRID[-1]) and with the closed-form probit predictive (``predictive="probit"``),
    t by the validation NLL and by synthetic outliers; beside them temperature scaling,
    laplace-torch's last-layer Laplace and each posterior at its means."""
    variants = {
        MC_NLL: ("sample", False),
        PROBIT_NLL: ("probit", False),
        PROBIT_SYNTHETIC: ("probit", True),
    }
    return calibrations_seed(seed, sets, folder, quick, variants)


def covariance_seed(seed: int, sets, folder: Path, quick: bool) -> dict[str, Any]:
    """The recipe's posterior (diagonal Laplace on the last layer, probit) beside the
    Kronecker-factored Laplace posterior of the same layer (``fit_posterior(...,
    covariance="kron")``, probit), t by the validation NLL and by synthetic outliers;
    beside them temperature scaling, laplace-torch's last-layer Laplace and each posterior
    at its means."""
    variants = {
        PROBIT_NLL: ("probit", False),
        KRON_NLL: ("probit", False, "kron"),
        KRON_SYNTHETIC: ("probit", True, "kron"),
    }
    return calibrations_seed(seed, sets, folder, quick, variants)


def calibrations_seed(
    seed: int, sets, folder: Path, quick: bool, variants: dict[str, tuple]
) -> dict[str, Any]:
    """Fitted last-layer Laplace posteriors calibrated once per variant {row name:
    (predictive, t by synthetic outliers?[, covariance: "diagonal" (default) or
    "kron"])}: S = SAMPLE_GRID[-1] draws for "sample", none for "probit"; every variant
    also at its means."""
    y = sets["test"][1]
    model = checkpoint(sets, seed, folder, quick)
    rows: dict[str, dict] = {}
    items: dict[str, dict] = {}

    def record(name: str, predictor: Predictor, info: dict) -> None:
        preds = run_predictor(predictor, sets, seed)
        rows[name] = {**summarise(preds, y), **info}
        items[name] = per_item(preds, y)
        _log_row(seed, name, rows[name])

    record("temperature scaling", *temperature_scaled(model, sets))
    record("last-layer Laplace (laplace-torch)", *laplace_last_layer(model, sets, seed, mc=False))
    fitted: dict[str, nn.Module] = {}
    outliers = bnnconvert.synthetic_outliers(sets["val"][0], seed=seed)
    for name, (predictive, by_outliers, *structure) in variants.items():
        covariance = structure[0] if structure else "diagonal"
        scales = structure[1] if len(structure) > 1 else None  # a fixed grid, or "hindsight"
        if covariance not in fitted:
            pbnn = bnnconvert.convert(model, masks_last_layer(model), None, moped_delta=0.1)
            report = bnnconvert.fit_posterior(
                pbnn, train_loader(sets, seed, shuffle=False), method="laplace",
                covariance=covariance, seed=seed, progress=False,
            )  # fmt: skip
            fitted[covariance] = pbnn
            log.info("seed %d, %s posterior: %s", seed, covariance, report)
        calibrated = copy.deepcopy(fitted[covariance])
        samples = SAMPLE_GRID[-1] if predictive == "sample" else None
        extra = {"outliers": outliers} if by_outliers else {}
        if predictive == "probit":
            extra["predictive"] = "probit"
        if scales is not None:  # t fixed (T still on validation), or every t of SCALE_GRID
            grid = SCALE_GRID if scales == "hindsight" else scales
            extra.update(scales=grid, refine=False)
        cal = calibrate_posterior(calibrated, val_loader(sets), samples=samples, seed=seed, **extra)
        if scales == "hindsight":
            cal = hindsight_scale(calibrated, cal, sets, seed)
        info = {"scale": cal.scale, "temperature": cal.temperature, "val_nll": cal.nll}
        info["calibration_seconds"] = cal.seconds
        if cal.outlier_auroc:
            info["val_outlier_auroc"] = cal.outlier_auroc[cal.scale]
        record(name, bayes_predictor(calibrated, cal.samples), info)
        if scales != "hindsight":  # a ceiling, not a recipe: no "at its means" row
            record(f"{name}, at its means", at_means(calibrated), {})
    return {"seed": seed, "results": rows, "items": items}


# ---------------------------------------------------------------------- scale
SCALE_GRID = (0.0, *(2.0 ** (k / 2) for k in range(-8, 7)))
"""t = 0 and 2^(k/2) for k = -8 .. 6 (0.0625 .. 8): DEFAULT_SCALES with the sqrt(2) steps
that calibrate_posterior's refinement would try."""

POOLED_DIAG = "laplace, last layer, probit, t pooled"
POOLED_KRON = "laplace, last layer, Kronecker, probit, t pooled"
UNIT_DIAG = "laplace, last layer, probit, t = 1"
HINDSIGHT_DIAG = "laplace, last layer, probit, t by the test NLL (ceiling)"
HINDSIGHT_KRON = "laplace, last layer, Kronecker, probit, t by the test NLL (ceiling)"


def hindsight_scale(model: nn.Module, cal, sets, seed: int):
    """A ceiling, not a method: among the (t, T) of ``cal.curve`` (T fitted on validation at
    each t) the one with the lowest *test* NLL, set in ``model``; returns ``cal`` with that
    t, T and validation NLL."""
    y = sets["test"][1]
    best = None
    for t, temp, val_nll in cal.curve:
        set_sigma_scale(model, t)
        bnnconvert.calibration.set_temperature(model, temp)
        torch.manual_seed(1000 + seed)
        nll = float(evaluate(bayes_predictor(model, 1)(sets["test"][0]), y)["nll"])
        if best is None or nll < best[0]:
            best = (nll, t, temp, val_nll)
    _, t, temp, val_nll = best
    set_sigma_scale(model, t)
    bnnconvert.calibration.set_temperature(model, temp)
    return dataclasses.replace(cal, scale=t, temperature=temp, nll=val_nll)


def scale_choose_seed(seed: int, sets, folder: Path, quick: bool) -> dict[str, Any]:
    """Validation data only: the validation NLL of the diagonal and the Kronecker last-layer
    posteriors (probit) at every t of SCALE_GRID, T fitted at each t."""
    model = checkpoint(sets, seed, folder, quick)
    curves = {}
    for covariance in ("diagonal", "kron"):
        pbnn = bnnconvert.convert(model, masks_last_layer(model), None, moped_delta=0.1)
        bnnconvert.fit_posterior(
            pbnn, train_loader(sets, seed, shuffle=False), method="laplace",
            covariance=covariance, seed=seed, progress=False,
        )  # fmt: skip
        cal = calibrate_posterior(
            pbnn, val_loader(sets), scales=SCALE_GRID, refine=False, predictive="probit",
            seed=seed,
        )  # fmt: skip
        curves[covariance] = [list(row) for row in cal.curve]
        log.info("seed %d, %s: %s", seed, covariance, cal.curve)
    return {"seed": seed, "curves": curves}


def choose_scale(seeds: list[dict], tolerance: float = 0.01) -> dict[str, Any]:
    """The rule (fixed before any test number was computed): per covariance, the t of
    SCALE_GRID with the lowest validation NLL averaged over the seeds (each at its own T);
    then the covariance with the lower pooled NLL at its t, the diagonal within
    ``tolerance`` (relative) of the best."""
    pooled = {
        cov: {t: float(np.mean([[r[2] for r in s["curves"][cov] if r[0] == t] for s in seeds]))
              for t in SCALE_GRID}
        for cov in ("diagonal", "kron")
    }  # fmt: skip
    scale = {cov: min(curve, key=curve.get) for cov, curve in pooled.items()}
    best = {cov: pooled[cov][scale[cov]] for cov in pooled}
    chosen = "diagonal" if best["diagonal"] <= min(best.values()) * (1 + tolerance) else "kron"
    return {"pooled": pooled, "scale": scale, "covariance": chosen}


def scale_choose_main(args, folder: Path) -> None:
    """Write scale_choice.json / .md: the pooled validation curves and the chosen t."""
    sets = load_sets(args.quick)
    seeds = [scale_choose_seed(seed, sets, folder, args.quick) for seed in args.seeds]
    report = {"machine": _machine(), "seeds": seeds, **choose_scale(seeds)}
    (folder / "scale_choice.json").write_text(json.dumps(report, indent=1))
    lines = [
        f"Machine: {report['machine']}; seeds " + ", ".join(str(s["seed"]) for s in seeds)
        + "; validation split only.", "",
        "Validation NLL (probit, T fitted at each t), mean over the seeds:", "",
        "| t | diagonal | Kronecker |", "|---:|---:|---:|",
    ]  # fmt: skip
    for t in SCALE_GRID:
        cells = [f"{report['pooled'][c][t]:.5f}" for c in ("diagonal", "kron")]
        lines.append(f"| {t:.4g} | " + " | ".join(cells) + " |")
    lines += ["", f"Chosen: t = {report['scale']['diagonal']:.4g} (diagonal), "
              f"{report['scale']['kron']:.4g} (Kronecker); covariance "
              f"**{report['covariance']}**."]  # fmt: skip
    (folder / "scale_choice.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def scale_seed(seed: int, sets, folder: Path, quick: bool, choice: dict) -> dict[str, Any]:
    """The default (t by this seed's validation NLL), t fixed at the pooled choice (diagonal
    and Kronecker), t = 1 (the fitted posterior, T on validation) and the hindsight ceiling
    (t by the test NLL), beside temperature scaling and laplace-torch."""
    scale = choice["scale"]
    variants = {
        PROBIT_NLL: ("probit", False),
        POOLED_DIAG: ("probit", False, "diagonal", (scale["diagonal"],)),
        POOLED_KRON: ("probit", False, "kron", (scale["kron"],)),
        UNIT_DIAG: ("probit", False, "diagonal", (1.0,)),
        HINDSIGHT_DIAG: ("probit", False, "diagonal", "hindsight"),
        HINDSIGHT_KRON: ("probit", False, "kron", "hindsight"),
    }
    return calibrations_seed(seed, sets, folder, quick, variants)


def criteria(seeds: list[dict], name: str) -> dict[str, Any]:
    """#13's must-shows for row ``name`` on ``seeds``: paired NLL and far-OOD AUROC against
    temperature scaling, the far gain per seed, the accuracy gap, and the far AUROC against
    the row at its means, per seed."""
    ts = "temperature scaling"
    far = [s["results"][name]["auroc_far"] - s["results"][ts]["auroc_far"] for s in seeds]
    acc = [s["results"][name]["accuracy"] - s["results"][ts]["accuracy"] for s in seeds]
    means = f"{name}, at its means"
    vs_means = [s["results"][name]["auroc_far"] - s["results"][means]["auroc_far"]
                for s in seeds if means in s["results"]]  # fmt: skip
    nll = paired_interval(seeds, name, ts, "nll", scheme="two-way")
    return {
        "nll": nll, "nll_met": nll[2] < 0,
        "nll_per_seed_scheme": paired_interval(seeds, name, ts, "nll"),
        "far": paired_interval(seeds, name, ts, "auroc_far", scheme="two-way"),
        "far_per_seed": far,
        "far_met": float(np.mean(far)) >= 0.02 and min(far) >= 0,
        "accuracy_gap": acc, "accuracy_met": min(acc) >= -0.005,
        "vs_means": vs_means, "vs_means_met": bool(vs_means) and min(vs_means) > 0,
        "near": paired_interval(seeds, name, ts, "auroc_near", scheme="two-way"),
    }  # fmt: skip


def choice_path(folder: Path) -> Path:
    return folder / "scale_choice.json"


def scale_criteria(seeds: list[dict], choice: dict) -> dict[str, dict]:
    """criteria() of the default and the pooled-t rows on the seeds the choice was made on,
    on the others (fresh: their validation data did not enter the choice) and on all."""
    chosen = {s["seed"] for s in choice["seeds"]}
    groups = {
        "choice seeds": [s for s in seeds if s["seed"] in chosen],
        "fresh seeds": [s for s in seeds if s["seed"] not in chosen],
        "all": seeds,
    }
    return {
        f"{group} ({', '.join(str(s['seed']) for s in runs)})": {
            name: criteria(runs, name) for name in (PROBIT_NLL, POOLED_DIAG, POOLED_KRON)
        }
        for group, runs in groups.items()
        if runs
    }


def scale_intervals(seeds: list[dict], choice: dict) -> tuple[dict, str]:
    """Two-way intervals (paired_interval) of every row of the scale task against
    temperature scaling and of our rows against laplace-torch over every seed, and the
    plan's decision rule (the pooled t minus the default on the fresh seeds, with both
    schemes). Returns (numbers, markdown)."""
    ts, lt = "temperature scaling", "last-layer Laplace (laplace-torch)"
    stats = ("nll", "auroc_far", "auroc_near")
    names = [n for n in seeds[0]["results"] if n != ts]
    ours = [PROBIT_NLL, POOLED_DIAG, POOLED_KRON, UNIT_DIAG]
    chosen = {s["seed"] for s in choice["seeds"]}
    fresh = [s for s in seeds if s["seed"] not in chosen]
    out = {
        "vs_ts": {n: {k: paired_interval(seeds, n, ts, k, scheme="two-way") for k in stats}
                  for n in names},
        "vs_laplace_torch": {n: {k: paired_interval(seeds, n, lt, k, scheme="two-way")
                                 for k in stats} for n in ours},
        "decision": {scheme: {k: paired_interval(fresh, POOLED_DIAG, PROBIT_NLL, k, scheme=scheme)
                              for k in stats} for scheme in ("per seed", "two-way")}
        if fresh else {},
    }  # fmt: skip

    def cells(row: dict) -> str:
        return " | ".join(f"{v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]" for v in row.values())

    head = ["| | NLL | far-OOD AUROC | near-OOD AUROC |", "|---|---|---|---|"]
    lines = [f"Seeds {', '.join(str(s['seed']) for s in seeds)}; 95 % two-way bootstrap (the "
             "test and OOD items, which every seed shares, resampled once per draw for all "
             "seeds, and the seeds resampled), 2,000 draws.", "",
             "Minus temperature scaling:", "", *head]  # fmt: skip
    lines += [f"| {n} | {cells(r)} |" for n, r in out["vs_ts"].items()]
    lines += ["", "Minus last-layer Laplace (laplace-torch):", "", *head]
    lines += [f"| {n} | {cells(r)} |" for n, r in out["vs_laplace_torch"].items()]
    if fresh:
        lines += ["", f"The plan's decision: {POOLED_DIAG} minus {PROBIT_NLL}, fresh seeds "
                  f"{', '.join(str(s['seed']) for s in fresh)} (adopt if the NLL's upper bound "
                  "is below +0.002 and the far-OOD mean above 0):", "", *head]  # fmt: skip
        lines += [f"| {scheme} | {cells(r)} |" for scheme, r in out["decision"].items()]
    return out, "\n".join(lines) + "\n"


def scale_intervals_main(folder: Path) -> None:
    """Recompute scale_intervals.{json,md} from scale.json and scale_items.pt."""
    for name in ("scale.json", "scale_items.pt", "scale_choice.json"):
        if not (folder / name).exists():
            raise SystemExit(f"{folder / name} is missing: run --task scale first")
    report = json.loads((folder / "scale.json").read_text())
    items = torch.load(folder / "scale_items.pt", weights_only=False)
    seeds = [{**s, "items": items[s["seed"]]} for s in report["seeds"]]
    out, text = scale_intervals(seeds, json.loads(choice_path(folder).read_text()))
    (folder / "scale_intervals.json").write_text(json.dumps(out, indent=1))
    (folder / "scale_intervals.md").write_text(text)
    print(text)


def criteria_markdown(report: dict[str, Any]) -> str:
    lines = ["", "#13's must-shows per group of seeds: NLL, far- and near-OOD AUROC minus "
             "temperature scaling (paired, 95 % two-way bootstrap: the items, shared by every "
             "seed, and the seeds resampled; NLL also with the per-seed scheme of the tables "
             "above); the far gain per seed; the lowest accuracy gap; the lowest far AUROC "
             "gain over the row at its means:", "",
             "| row | seeds | NLL (two-way) | met | NLL (per seed) | far AUROC (per seed) | "
             "met | acc | vs means | near |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for group, rows in report["criteria"].items():
        for name, c in rows.items():
            nll, far, near = c["nll"], c["far"], c["near"]
            per_seed = ", ".join(f"{g:+.3f}" for g in c["far_per_seed"])
            lines.append(
                f"| {name} | {group} | {nll[0]:+.4f} [{nll[1]:+.4f}, {nll[2]:+.4f}] | "
                f"{'yes' if c['nll_met'] else 'no'} | "
                f"[{c['nll_per_seed_scheme'][1]:+.4f}, {c['nll_per_seed_scheme'][2]:+.4f}] | "
                f"{far[0]:+.4f} [{far[1]:+.4f}, {far[2]:+.4f}] ({per_seed}) | "
                f"{'yes' if c['far_met'] else 'no'} | {min(c['accuracy_gap']):+.3f} "
                f"{'yes' if c['accuracy_met'] else 'no'} | "
                + (f"{min(c['vs_means']):+.3f} {'yes' if c['vs_means_met'] else 'no'}"
                   if c["vs_means"] else "")
                + f" | {near[0]:+.4f} [{near[1]:+.4f}, {near[2]:+.4f}] |"
            )  # fmt: skip
    return "\n".join(lines) + "\n"


PAIRED_OTHER = {
    "outliers": {OUTLIERS_SYNTHETIC: ("last-layer Laplace (laplace-torch)", OUTLIERS_DEFAULT)},
    "predictive": {
        name: ("last-layer Laplace (laplace-torch)", MC_NLL)
        for name in (PROBIT_NLL, PROBIT_SYNTHETIC)
    },
    "covariance": {
        name: ("last-layer Laplace (laplace-torch)", PROBIT_NLL)
        for name in (KRON_NLL, KRON_SYNTHETIC)
    },
    "scale": {
        name: ("last-layer Laplace (laplace-torch)", PROBIT_NLL)
        for name in (POOLED_DIAG, POOLED_KRON)
    },
}
"""Per task, {row: (the rows it is compared with, paired)} beside temperature scaling."""


def last_layer_main(args, folder: Path, task: str, run_seed: Callable) -> None:
    """Run ``run_seed`` (samples_seed or shape_seed) on every seed; write ``task``.json and
    ``task``.md with the paired differences against temperature scaling."""
    sets = load_sets(args.quick, val_ood=task in ("covariance", "scale"))
    start = time.perf_counter()
    seeds = [run_seed(seed, sets, folder, args.quick) for seed in args.seeds]
    names = [n for n in seeds[0]["results"] if n != "temperature scaling"]
    paired = {
        name: {
            stat: paired_interval(seeds, name, "temperature scaling", stat)
            for stat in ("nll", "auroc_far") + (("auroc_near",) if "near" in sets else ())
        }
        for name in names
    }
    report = {
        "machine": _machine(),
        "seconds": time.perf_counter() - start,
        "seeds": [{"seed": s["seed"], "results": s["results"]} for s in seeds],
        "paired": paired,
    }
    if task in PAIRED_OTHER:  # the variants against laplace-torch and the default
        report["paired_other"] = {
            name: {
                reference: {
                    stat: paired_interval(seeds, name, reference, stat)
                    for stat in ("nll", "auroc_far", "auroc_near")
                }
                for reference in references
            }
            for name, references in PAIRED_OTHER[task].items()
        }
    if task == "predictive":
        report["default"] = choose_predictive(seeds)
    if task == "covariance":
        report["default"] = choose_covariance(seeds)
    if task == "scale":
        report["criteria"] = scale_criteria(seeds, json.loads(choice_path(folder).read_text()))
    (folder / f"{task}.json").write_text(json.dumps(report, indent=1))
    items = {s["seed"]: s["items"] for s in seeds}
    torch.save(items, folder / f"{task}_items.pt")  # per item, for other intervals; ignored
    if task == "scale":
        scale_intervals_main(folder)
    text = samples_markdown(report) + (criteria_markdown(report) if task == "scale" else "")
    (folder / f"{task}.md").write_text(text)
    print(text)


def samples_markdown(report: dict[str, Any]) -> str:
    seeds = report["seeds"]
    names = list(seeds[0]["results"])
    columns = ("accuracy", "nll", "ece", "auroc_far", "auroc_near", "fpr95_far")
    if "auroc_valood" in seeds[0]["results"]["temperature scaling"]:
        columns += ("auroc_valood",)
    lines = [
        f"Machine: {report['machine']}; {report['seconds']:.0f} s; seeds "
        + ", ".join(str(s["seed"]) for s in seeds)
        + ".",
        "",
        "Mean over the seeds (test split; far OOD: the photographs; near OOD: UCI digits):",
        "",
        "| | " + " | ".join(columns) + " | val NLL | t | calibration s |",
        "|---|" + "---:|" * (len(columns) + 3),
    ]
    for name in names:
        runs = [s["results"][name] for s in seeds]

        def mean(key: str, digits: int = 4, runs=runs) -> str:
            values = [r[key] for r in runs if key in r]
            return f"{np.mean(values):.{digits}f}" if values else ""

        scales = ", ".join(f"{r['scale']:.3g}" for r in runs) if "scale" in runs[0] else ""
        lines.append(
            f"| {name} | "
            + " | ".join(mean(c) for c in columns)
            + f" | {mean('val_nll')} | {scales} | {mean('calibration_seconds', 1)} |"
        )
    lines += [
        "",
        "Paired differences against temperature scaling (mean over seeds, 95 % bootstrap "
        "interval; per seed in brackets for the far-OOD AUROC):",
        "",
        "| | NLL | far-OOD AUROC | per seed | near-OOD AUROC |",
        "|---|---|---|---|---|",
    ]
    for name, stats in report["paired"].items():
        gains = [
            s["results"][name]["auroc_far"] - s["results"]["temperature scaling"]["auroc_far"]
            for s in seeds
        ]
        per_seed = ", ".join(f"{g:+.3f}" for g in gains)
        cells = [
            f"{v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]" if (v := stats.get(k)) else ""
            for k in ("nll", "auroc_far")
        ]
        near = stats.get("auroc_near")
        near_cell = f"{near[0]:+.4f} [{near[1]:+.4f}, {near[2]:+.4f}]" if near else ""
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {per_seed} | {near_cell} |")
    for name, references in report.get("paired_other", {}).items():
        for reference, stats in references.items():
            cells = [f"{v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]" for v in stats.values()]
            lines += [
                "",
                f"{name} minus {reference} (paired, 95 % bootstrap interval):",
                "",
                "| NLL | far-OOD AUROC | near-OOD AUROC |",
                "|---|---|---|",
                "| " + " | ".join(cells) + " |",
            ]
    if "default" in report:
        lines += ["", f"The study's rule on the validation NLL chooses: **{report['default']}**."]
    return "\n".join(lines) + "\n"


def choose_predictive(seeds: list[dict], tolerance: float = 0.01) -> str:
    """Between the Monte Carlo and the probit predictive, both with t by the validation
    NLL: the lower mean validation NLL over the seeds, and within ``tolerance`` (relative)
    of it the cheaper, the probit (one forward, no draw)."""
    mean = {
        c: float(np.mean([s["results"][c]["val_nll"] for s in seeds])) for c in (MC_NLL, PROBIT_NLL)
    }
    best = min(mean.values())
    return PROBIT_NLL if mean[PROBIT_NLL] <= best * (1 + tolerance) else MC_NLL


def choose_covariance(seeds: list[dict], tolerance: float = 0.01) -> str:
    """Between the diagonal and the Kronecker-factored last-layer posterior (both probit,
    t by the validation NLL): the lower mean validation NLL over the seeds, and within
    ``tolerance`` (relative) of it the cheaper, the diagonal (rule fixed before the run)."""
    mean = {
        c: float(np.mean([s["results"][c]["val_nll"] for s in seeds]))
        for c in (PROBIT_NLL, KRON_NLL)
    }
    best = min(mean.values())
    return PROBIT_NLL if mean[PROBIT_NLL] <= best * (1 + tolerance) else KRON_NLL


# ---------------------------------------------------------------------- shape
def shape_seed(seed: int, sets, folder: Path, quick: bool) -> dict[str, Any]:
    """The recipe's last-layer posterior (S = SAMPLE_GRID[-1]) with other shapes of sigma:
    the exact GGN instead of the Monte Carlo Fisher, and the prior precision lambda x 0.1
    and x 10 of the evidence's (wider: sigma follows the curvature more; narrower: closer
    to one sigma for every entry); each calibrated on the validation split."""
    y = sets["test"][1]
    model = checkpoint(sets, seed, folder, quick)
    samples = SAMPLE_GRID[-1]
    base = bnnconvert.convert(model, masks_last_layer(model), None, moped_delta=0.1)
    data = train_loader(sets, seed, shuffle=False)
    evidence = bnnconvert.fit_posterior(copy.deepcopy(base), data, method="laplace", seed=seed)
    variants = {
        "Monte Carlo Fisher, lambda by the evidence": {},
        "exact GGN, lambda by the evidence": {"curvature": "exact"},
        "Monte Carlo Fisher, lambda x 0.1": {"prior_precision": evidence.prior_precision * 0.1},
        "Monte Carlo Fisher, lambda x 10": {"prior_precision": evidence.prior_precision * 10},
    }
    rows: dict[str, dict] = {}
    items: dict[str, dict] = {}
    predictor, info = temperature_scaled(model, sets)
    preds = run_predictor(predictor, sets, seed)
    rows["temperature scaling"] = {**summarise(preds, y), **info}
    items["temperature scaling"] = per_item(preds, y)
    for name, options in variants.items():
        pbnn = copy.deepcopy(base)
        report = bnnconvert.fit_posterior(
            pbnn, data, val_loader(sets), method="laplace", samples=samples, seed=seed, **options
        )
        cal = report.calibration
        preds = run_predictor(bayes_predictor(pbnn, samples), sets, seed)
        rows[name] = {
            **summarise(preds, y),
            "val_nll": cal.nll,
            "scale": cal.scale,
            "temperature": cal.temperature,
            "prior_precision": report.prior_precision,
            "sigma_median": report.sigma_quantiles["median"],
        }
        items[name] = per_item(preds, y)
        _log_row(seed, name, rows[name])
    return {"seed": seed, "results": rows, "items": items}


LAST_LAYER_TASKS = {
    "samples": samples_seed,
    "shape": shape_seed,
    "outliers": outliers_seed,
    "predictive": predictive_seed,
    "covariance": covariance_seed,
}


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/posterior_study")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--task",
        choices=(
            "classification",
            "segmentation",
            "sigma",
            "samples",
            "shape",
            "outliers",
            "predictive",
            "covariance",
            "scale-choose",
            "scale",
            "scale-intervals",
        ),
        default="classification",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    if args.task == "segmentation":
        segmentation_main(args, folder)
        return
    if args.task == "sigma":
        sigma_histograms(args, folder)
        return
    if args.task == "scale-choose":
        scale_choose_main(args, folder)
        return
    if args.task == "scale-intervals":
        scale_intervals_main(folder)
        return
    if args.task == "scale":
        if not choice_path(folder).exists():
            raise SystemExit(f"{choice_path(folder)} is missing: run --task scale-choose first")
        choice = json.loads(choice_path(folder).read_text())
        run = functools.partial(scale_seed, choice=choice)
        last_layer_main(args, folder, "scale", run)
        return
    if args.task in LAST_LAYER_TASKS:
        last_layer_main(args, folder, args.task, LAST_LAYER_TASKS[args.task])
        return
    sets = load_sets(args.quick)
    start = time.perf_counter()
    seeds = [run_seed(seed, sets, folder, args.quick) for seed in args.seeds]
    names = list(seeds[0]["results"])
    paired = {
        name: {
            stat: paired_interval(seeds, name, "temperature scaling", stat)
            for stat in ("nll", "auroc_far") + (("auroc_near",) if "near" in sets else ())
        }
        for name in names
        if name != "temperature scaling"
    }
    default = choose_default(seeds)
    report = {
        "machine": _machine(),
        "seconds": time.perf_counter() - start,
        "samples": SAMPLES,
        "seeds": seeds,
        "paired": paired,
        "default": default,
        "ablation": {c: [s["ablation"].get(c, {}) for s in seeds] for c in seeds[0]["ablation"]},
    }
    torch.save([s.pop("items") for s in seeds], folder / "items.pt")  # per-item, not committed
    (folder / "results.json").write_text(json.dumps(report, indent=1))
    (folder / "results.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
